"""FLAP's unit scores and the choice of what to remove.

An, Zhao, Yu, Tang, Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024, arXiv:2312.11983.

**Scores.** FLAP asks how well the output of a block's output projection (o_proj, down_proj;
weight W of shape [out, in]) can be recovered when input channel j is removed and replaced by its
mean x̄_j (the bias compensation in :mod:`ebft.structured.surgery`). What is lost is the channel's
fluctuation around that mean, seen through W's column j. Over the N calibration tokens:

- IFV  (input feature variance):          s_j = Var_t(x_tj)
- WIFV (weighted IFV, FLAP's default):     s_j = Var_t(x_tj) · ‖W[:, j]‖²
- WIFN (weighted input feature norm):      s_j = sqrt(mean_t x_tj²) · mean_i |W_ij|

FLAP's reference code squares the channel scores of the attention output projection before
anything else; we do the same. The variance here is the population variance (FLAP's running
estimate is the sample variance): a factor N/(N−1) that standardisation removes.

**Standardisation.** Attention and MLP scores differ by orders of magnitude, and so do blocks.
FLAP standardises the channel scores of each module type *within each block* to mean 0 and standard
deviation 1 (the reference code's ``standarlization`` over the channels of each layer), so one
ranking can compare them. A KV group's score is then the mean of its g·head_dim standardised
channel scores (FLAP: a head's score is the mean over its head_dim channels; with grouped-query
attention the group of g heads is removed whole, so its score averages all of them).

**Selection** (:func:`select_structure`); ``ratio`` is the fraction of the prunable block
parameters removed: the weights of the attention and MLP projections plus their bias entries that
go with a unit (norms and the output projections' biases are not counted).

- ``uniform`` (FLAP's UL-UM): every block removes ``round(ratio · units)`` KV groups and
  ``round(ratio · channels)`` MLP channels, the lowest scores of each. The achieved ratio is within
  half a unit per module type per block of the target.
- ``adaptive`` (FLAP's AL-AM, the paper's default): one ranking of every KV group and MLP channel of
  every block by standardised score; remove from the bottom, each unit weighted by the parameters it
  removes — (2g+2)·head_dim·hidden for a KV group of g query heads, 3·hidden for a channel of a
  gated MLP (gate, up, down), 2·hidden for fc1/fc2 — stopping at the count whose removed total is
  closest to ``ratio`` × total. The achieved ratio is within half of the largest unit of the target.

**Edges.** The best unit of each module type in each block is never removed (a block with no
attention or no MLP is not a model transformers can load): ``uniform`` caps each count at
units − 1; ``adaptive`` leaves each block's top-scoring unit out of the ranking, and when the target
then cannot be reached it removes every candidate and logs a warning. Attention with one KV group
per block (multi-query attention) cannot be pruned in whole groups: that is an error, not a quiet
MLP-only pruning. Ties are broken by position (block, then unit index), so the choice is
deterministic.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ebft.errors import ConfigError, EbftError
from ebft.stats import LayerStats
from ebft.structured.layout import ATTENTION, KINDS, MLP, BlockLayout

log = logging.getLogger(__name__)

METRICS = ("WIFV", "IFV", "WIFN")
MODES = ("adaptive", "uniform")
STATS_NEEDED = frozenset({"mean"})  # LayerStats kinds the walk must collect on the output projections' inputs


def channel_scores(weight: torch.Tensor, stats: LayerStats, metric: str = "WIFV") -> torch.Tensor:
    """FLAP's score of each input channel of an output projection ``weight`` [out, in] (fp32)."""
    if metric not in METRICS:
        raise ConfigError("flap_metric", metric, f"allowed: {', '.join(METRICS)}")
    if stats is None or stats.x_sum is None or stats.count == 0:
        raise ValueError("FLAP needs LayerStats with 'mean' of the output projection's inputs "
                         "(collect STATS_NEEDED)")
    w = weight.detach().float().to(stats.sq_sum.device)
    if metric == "IFV":
        return stats.var.clone()
    if metric == "WIFV":
        return stats.var * w.square().sum(0)
    return (stats.sq_sum / stats.count).sqrt() * w.abs().mean(0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / std (sample std, as torch.std). All-equal scores give zeros, not NaN."""
    std = x.std() if x.numel() > 1 else x.new_zeros(())
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


@dataclass(frozen=True)
class UnitScores:
    """Standardised scores of one block's units (higher = keep) and what each unit costs."""

    attention: torch.Tensor  # [KV groups]
    mlp: torch.Tensor  # [MLP channels]
    attention_params: int  # parameters one KV group removes
    mlp_params: int  # parameters one MLP channel removes

    def of(self, kind: str) -> torch.Tensor:
        return self.attention if kind == ATTENTION else self.mlp

    def params(self, kind: str) -> int:
        return self.attention_params if kind == ATTENTION else self.mlp_params


def block_scores(block: nn.Module, layout: BlockLayout, stats: Mapping[str, LayerStats],
                 metric: str = "WIFV") -> UnitScores:
    """Scores of a dense block's KV groups and MLP channels from the statistics of the inputs of its
    output projections, keyed by linear name (``layout.attention.out_proj``, ``layout.mlp.out_proj``)."""
    o_name, down_name = layout.attention.out_proj, layout.mlp.out_proj
    missing = [n for n in (o_name, down_name) if n not in stats]
    if missing:
        raise ValueError(f"FLAP needs statistics of the inputs of {missing}; "
                         f"collect them with needs {sorted(STATS_NEEDED)}")
    attn = channel_scores(block.get_submodule(o_name).weight, stats[o_name], metric).square()
    groups = standardise(attn).reshape(layout.attention.count, -1).mean(1)
    mlp = standardise(channel_scores(block.get_submodule(down_name).weight, stats[down_name], metric))
    return UnitScores(groups.cpu(), mlp.cpu(), layout.attention.params_per_unit, layout.mlp.params_per_unit)


@dataclass(frozen=True)
class Structure:
    """What one block keeps: indices of its dense KV groups and MLP channels, ascending."""

    attention_keep: tuple[int, ...]
    mlp_keep: tuple[int, ...]
    attention_units: int  # the dense block's counts, to check the structure fits the block
    mlp_units: int
    attention_params: int  # parameters per unit, for the bookkeeping below
    mlp_params: int
    # the dense model's mean inputs of the output projections ({linear name: [mean per input]}), taken in
    # the allocation pass: bias compensation from the dense model (FLAP's reference), not the pruned chain
    dense_means: dict | None = field(default=None, compare=False)

    def __post_init__(self):
        for kind, keep, units in ((ATTENTION, self.attention_keep, self.attention_units),
                                  (MLP, self.mlp_keep, self.mlp_units)):
            if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= units:
                raise ValueError(f"{kind}: keep {keep} must be distinct ascending indices in [0, {units}), "
                                 "at least one")

    def keep(self, kind: str) -> tuple[int, ...]:
        return self.attention_keep if kind == ATTENTION else self.mlp_keep

    @property
    def total_params(self) -> int:
        return self.attention_units * self.attention_params + self.mlp_units * self.mlp_params

    @property
    def removed_params(self) -> int:
        return ((self.attention_units - len(self.attention_keep)) * self.attention_params
                + (self.mlp_units - len(self.mlp_keep)) * self.mlp_params)


def removed_fraction(structures: Sequence[Structure]) -> float:
    """The fraction of the prunable block parameters that ``structures`` remove."""
    return sum(s.removed_params for s in structures) / max(sum(s.total_params for s in structures), 1)


def select_structure(scores: Sequence[UnitScores], ratio: float, mode: str = "adaptive") -> list[Structure]:
    """Choose the units to remove so that ``ratio`` of the prunable block parameters go (see the
    module docstring for both modes and the edges). One :class:`Structure` per block, in order."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError("sparsity", ratio,
                          "allowed: a number in [0, 1), the fraction of block parameters removed")
    if mode not in MODES:
        raise ConfigError("flap_structure", mode, f"allowed: {', '.join(MODES)}")
    if ratio > 0 and all(len(s.attention) == 1 for s in scores):
        raise EbftError("structured pruning: every block has a single KV group (multi-query attention); "
                        "FLAP removes whole KV groups, so these heads cannot be pruned")
    drop = _uniform(scores, ratio) if mode == "uniform" else _adaptive(scores, ratio)
    structures = []
    for s, (drop_attn, drop_mlp) in zip(scores, drop):
        keep_a = tuple(i for i in range(len(s.attention)) if i not in drop_attn)
        keep_m = tuple(i for i in range(len(s.mlp)) if i not in drop_mlp)
        structures.append(Structure(keep_a, keep_m, len(s.attention), len(s.mlp),
                                    s.attention_params, s.mlp_params))
    return structures


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    # A stable sort keeps the lower index first among ties: deterministic.
    return set(torch.sort(scores, stable=True).indices[:count].tolist())


def _uniform(scores, ratio):
    out = []
    for s in scores:
        counts = [min(math.floor(ratio * len(s.of(k)) + 0.5), len(s.of(k)) - 1) for k in KINDS]
        out.append(tuple(_lowest(s.of(k), n) for k, n in zip(KINDS, counts)))
    return out


def _adaptive(scores, ratio):
    # All units of all blocks in one list, ordered (block, kind, index); a stable sort by score then
    # breaks ties by that position.
    values, costs, owner = [], [], []
    for b, s in enumerate(scores):
        for k in KINDS:
            v = s.of(k).double()
            candidate = torch.ones(len(v), dtype=torch.bool)
            candidate[torch.sort(v, descending=True, stable=True).indices[0]] = False  # each block keeps its best
            values.append(v[candidate])
            costs.append(torch.full((int(candidate.sum()),), s.params(k), dtype=torch.float64))
            owner += [(b, k, i) for i in candidate.nonzero().flatten().tolist()]
    total = sum(len(s.attention) * s.attention_params + len(s.mlp) * s.mlp_params for s in scores)
    target = ratio * total
    order = torch.sort(torch.cat(values), stable=True).indices
    removed = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cat(costs)[order].cumsum(0)])
    count = int((removed - target).abs().argmin())  # argmin returns the first (smallest) count among ties
    if count == len(order) and removed[-1] < target:
        log.warning("FLAP adaptive: %.1f%% of block parameters requested, %.1f%% reachable while every block "
                    "keeps one KV group and one MLP channel", 100 * ratio, 100 * float(removed[-1]) / total)
    out = [(set(), set()) for _ in scores]
    for j in order[:count].tolist():
        b, k, i = owner[j]
        out[b][KINDS.index(k)].add(i)
    return out
