"""The allocation: what global methods decide from the whole dense model before any block is pruned.

An *allocation* turns the run's one target pattern into a pattern per block (and, for structured
pruning, what each block keeps). ``uniform`` gives every block the target (no pass). ``owl`` and FLAP
need statistics from every block first: the walk's dense planning pass
(:func:`ebft.walk.planning_pass`) runs the *dense* model over the calibration chain block by block,
each block is summarised by :meth:`Allocator.summarise` into something small before its statistics
are dropped, and :meth:`Allocator.decide` turns the summaries into the :class:`Allocation`. ``atp``
needs no statistics (``Allocator.needs_pass`` is False): each block is summarised from its weights'
sizes alone (:func:`weight_summaries`) and nothing runs. Nothing here runs a model: the pipeline drives
the pass (:func:`ebft.pipeline.allocate`).

**OWL** (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce
for Pruning LLMs to High Sparsity", arXiv:2310.05175). For block ℓ, with Wanda's score
S_ij = |W_ij|·‖X_j‖₂ over all its pruned linears, the *outlier ratio* is

    D_ℓ = #{S_ij > M · mean(S)} / #S          (M = ``owl_threshold``, the paper's 5)

Blocks with more outliers matter more, so they are pruned less. The ratios are mapped linearly onto
a band of width 2λ (λ = ``owl_lambda``, the paper's 0.08) around the target sparsity s:

    s_ℓ = s − 2λ·(D_ℓ − min D)/(max D − min D) + c,

with c chosen so that the parameter-weighted mean of s_ℓ is s (the same overall sparsity as a
uniform run; with blocks of equal size c = 2λ·mean(normalised D), as in the paper). Within a block
every linear gets s_ℓ under the run's scope (per row or per layer). N:M patterns stay uniform: every
group keeps N of M whatever the block.

**ATP** (Huang et al., ICML 2025, "Determining Layer-wise Sparsity for Large Language Models Through a
Theoretical Perspective", arXiv:2502.14770). Pruning an early block leaves a reconstruction error that
every later block carries and amplifies, so early blocks should be pruned less and late ones more. The
paper shows that a monotonically increasing arithmetic progression over depth is close to the best
allocation, which leaves one hyperparameter, the common difference β (``atp_beta``): for L blocks,

    s_ℓ = s + β·(ℓ − c),    ℓ = 0 … L−1,

with c the parameter-weighted mean depth, so that the parameter-weighted mean of s_ℓ is s (blocks of
equal size: c = (L−1)/2, the paper's formula). β = 0 is uniform. Every s_ℓ must lie in [0, 1): the
largest β depends on the block count, so it is checked once the model's config is known
(:func:`check_allocation` with ``model_config``). No statistics, no dense pass. As for OWL, N:M and
structured patterns are refused.

**FLAP** (structured patterns): the same pass collects the means and variances of the inputs of
each block's output projections; :mod:`ebft.structured` scores every KV group and MLP channel and
chooses what each block keeps, over the whole model (``flap_structure=adaptive``) or block by block
(``uniform``). The allocation then carries one :class:`~ebft.structured.Structure` per block.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ConfigError
from .masks import Pattern
from .models import find_blocks, find_linears
from .settings import option
from .structured import STATS_NEEDED, Structure, block_layout, block_scores, removed_fraction, select_structure

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl", "atp")


@dataclass
class AllocationSettings:
    allocation: str = option("uniform", "sparsity per block: {choices}, each with the same overall sparsity "
                             "(owl: outlier-weighed, Yin et al. 2024, needs a dense planning pass; atp: rising "
                             "with depth, Huang et al. 2025, no pass)", choices=ALLOCATIONS)
    owl_lambda: float = option(0.08, "OWL: per-block sparsities lie within target ± lambda (the paper's 0.08)",
                               low=0, high=0.5, keyed="always")
    owl_threshold: float = option(5.0, "OWL: a weight is an outlier when its Wanda score exceeds this many times "
                                  "the block's mean score (the paper's M = 5)", low=0, low_open=True,
                                  keyed="always")
    atp_beta: float = option(0.005, "ATP: the sparsity added per block of depth (block l of L gets target + "
                             "beta * (l - (L-1)/2)); 0: uniform", low=0)


# the settings that apply only with one allocation (given with another, they are refused as unused)
ALLOCATION_SETTINGS = {"owl": ("owl_lambda", "owl_threshold"), "atp": ("atp_beta",)}


@dataclass
class Allocation:
    """A pattern for every block (and, for structured pruning, what each block keeps), and what decided
    it (for run.json)."""

    patterns: list[Pattern]
    record: dict = field(default_factory=dict)
    structures: list[Structure] | None = None  # what each block keeps, for structured patterns

    def to_json(self) -> dict:
        return {"patterns": [dataclasses.asdict(p) for p in self.patterns], "record": self.record,
                "structures": None if self.structures is None else [dataclasses.asdict(s) for s in self.structures]}

    @classmethod
    def from_json(cls, data: dict) -> "Allocation":
        structures = None
        if data["structures"] is not None:
            structures = [Structure(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                          for s in data["structures"]]
        return cls([Pattern(**p) for p in data["patterns"]], data["record"], structures)


@dataclass(frozen=True)
class Allocator:
    """How one allocation is decided: the statistics it needs (``needs``) of the linears matching
    ``layers``; ``summarise(index, block, linears, stats)`` keeps what it needs of each block;
    ``decide(summaries)`` makes the :class:`Allocation`. ``needs_pass``: whether the statistics come
    from a dense planning pass; without one (ATP), ``summarise`` sees each block's weights only, with
    ``stats`` None (:func:`weight_summaries`)."""

    needs: tuple[str, ...]
    layers: str | None
    summarise: Callable
    decide: Callable[[list], Allocation]
    needs_pass: bool = True


def weight_summaries(model, decider: Allocator) -> list:
    """Every block's summary from its weights alone (no statistics, nothing run): for an allocator that
    needs no pass. A lazily loaded model's skeleton serves as well (its weights' shapes are known)."""
    _, blocks = find_blocks(model)
    return [decider.summarise(index, block, find_linears(block, decider.layers), None)
            for index, block in enumerate(blocks)]


def check_allocation(settings: AllocationSettings, pattern: Pattern, model_config=None) -> None:
    """Refuse what cannot work: before any model is loaded, and again with ``model_config`` once the
    model's config is known (ATP's beta against the number of blocks)."""
    if settings.allocation == "uniform":
        return
    if pattern.structured:
        raise ConfigError("prune.allocation", settings.allocation,
                          "structured pruning allocates with FLAP itself (flap_structure adaptive or uniform); "
                          "use allocation uniform")
    if pattern.is_nm:
        raise ConfigError("prune.allocation", settings.allocation,
                          f"{pattern} stays uniform (every group of {pattern.m} keeps {pattern.n} in every block); "
                          "use allocation uniform, or an unstructured pattern")
    if settings.allocation == "owl":
        low, high = pattern.sparsity - settings.owl_lambda, pattern.sparsity + settings.owl_lambda
        if low < 0 or high >= 1:
            raise ConfigError("prune.owl_lambda", settings.owl_lambda,
                              f"sparsity {pattern.sparsity:g} ± lambda must stay within [0, 1): "
                              f"use lambda < {min(pattern.sparsity, 1 - pattern.sparsity):g}")
    blocks = getattr(model_config, "num_hidden_layers", None)
    if settings.allocation == "atp" and isinstance(blocks, int) and blocks > 0:
        check_atp(settings.atp_beta, pattern.sparsity, [1] * blocks)


@torch.no_grad()
def outlier_ratio(linears: dict, stats: dict, threshold: float) -> float:
    """D = share of the block's Wanda scores above ``threshold`` × their mean (OWL's layer outlier ratio)."""
    scores = torch.cat([(l.weight.detach().float().abs() * stats[n].col_norm.to(l.weight.device)).flatten()
                        for n, l in linears.items()])
    return (scores > threshold * scores.mean()).float().mean().item()


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities in a 2λ band, more outliers → less sparse, size-weighted mean = ``target``."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = d.max() - d.min()
    norm = (d - d.min()) / span if span > 0 else torch.zeros_like(d)
    offset = 2 * lam * norm
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    s = target - offset + (w * offset).sum()
    return [float(v) for v in s]


def atp_sparsities(sizes: list[int], target: float, beta: float) -> list[float]:
    """ATP's per-block sparsities: ``target + beta·(ℓ − c)`` for ℓ = 0 … L−1, with c the mean depth weighted
    by ``sizes`` (the blocks' pruned parameters), so that the size-weighted mean is ``target``."""
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(sizes))
    depth = torch.arange(len(sizes), dtype=torch.float64)
    return [float(v) for v in target + beta * (depth - (w * depth).sum())]


def check_atp(beta: float, target: float, sizes: list[int]) -> None:
    """Refuse, in one line, a beta that takes the first block below 0 or the last to 1 or above."""
    s = atp_sparsities(sizes, target, beta)
    if s[0] >= -1e-12 and s[-1] < 1:  # (a first block of exactly 0 may come out as -1e-17)
        return
    steps = atp_sparsities(sizes, 0.0, 1.0)  # s_ℓ = target + beta × steps[ℓ]; steps[0] < 0 < steps[-1]
    by_first = target / -steps[0] if steps[0] < 0 else math.inf
    by_last = (1 - target) / steps[-1] if steps[-1] > 0 else math.inf
    largest, strict = (by_last, "<") if by_last <= by_first else (by_first, "≤")
    raise ConfigError("prune.atp_beta", beta,
                      f"with {len(sizes)} blocks the sparsities would run from {s[0]:.4g} to {s[-1]:.4g}, outside "
                      f"[0, 1): use beta {strict} {_floor(largest)} for this model at sparsity {target:g}")


def _floor(value: float, digits: int = 4) -> str:
    """``value`` rounded down to ``digits`` significant digits (so the bound quoted is itself allowed)."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(value))) if value > 0 else 1
    return f"{math.floor(value * scale * (1 + 1e-12)) / scale:.{digits}g}"  # (0.3 / 1.5 is 0.19999999999999998)


def allocator(pattern: Pattern, settings: AllocationSettings, layers: str | None, pruner_settings=None,
              model_config=None) -> Allocator | None:
    """The allocator of this run: FLAP's for a structured pattern, OWL's, ATP's, or None for a uniform
    unstructured allocation (every block gets ``pattern``, no pass)."""
    check_allocation(settings, pattern, model_config)
    if pattern.structured:
        return flap_allocator(pattern, pruner_settings, model_config)
    if settings.allocation == "uniform":
        return None
    if settings.allocation == "atp":
        return atp_allocator(pattern, settings, layers)

    def summarise(index, block, linears, stats):
        return {"outlier_ratio": outlier_ratio(linears, stats, settings.owl_threshold),
                "params": sum(l.weight.numel() for l in linears.values())}

    def decide(summaries) -> Allocation:
        ratios = [s["outlier_ratio"] for s in summaries]
        sparsities = owl_sparsities(ratios, [s["params"] for s in summaries], pattern.sparsity, settings.owl_lambda)
        patterns = [Pattern(min(max(s, 0.0), 1 - 1e-9), scope=pattern.scope) for s in sparsities]
        log.info("OWL: block sparsities %s", ", ".join(f"{s:.3f}" for s in sparsities))
        record = {"allocation": "owl", "owl_lambda": settings.owl_lambda, "owl_threshold": settings.owl_threshold,
                  "blocks": [{"index": i, "outlier_ratio": round(r, 6), "sparsity": round(s, 6)}
                             for i, (r, s) in enumerate(zip(ratios, sparsities))]}
        return Allocation(patterns, record)

    return Allocator(("sq",), layers, summarise, decide)


def atp_allocator(pattern: Pattern, settings: AllocationSettings, layers: str | None) -> Allocator:
    """ATP: sparsity rising with depth in equal steps of ``atp_beta`` (see the module docstring); no pass."""

    def summarise(index, block, linears, stats):
        return {"params": sum(l.weight.numel() for l in linears.values())}

    def decide(summaries) -> Allocation:
        sizes = [s["params"] for s in summaries]
        check_atp(settings.atp_beta, pattern.sparsity, sizes)
        sparsities = atp_sparsities(sizes, pattern.sparsity, settings.atp_beta)
        log.info("ATP: block sparsities %s", ", ".join(f"{s:.3f}" for s in sparsities))
        record = {"allocation": "atp", "atp_beta": settings.atp_beta,
                  "blocks": [{"index": i, "sparsity": round(s, 6)} for i, s in enumerate(sparsities)]}
        return Allocation([Pattern(max(s, 0.0), scope=pattern.scope) for s in sparsities], record)

    return Allocator((), layers, summarise, decide, needs_pass=False)


def flap_allocator(pattern: Pattern, settings, model_config) -> Allocator:
    """FLAP: score every unit of the dense model, choose what each block keeps (see the module docstring)."""

    def summarise(index, block, linears, stats):
        layout = block_layout(block, model_config)
        means = {name: stats[name].mean.tolist() for name in (layout.attention.out_proj, layout.mlp.out_proj)}
        return block_scores(block, layout, stats, settings.flap_metric), means

    def decide(summaries) -> Allocation:
        structures = select_structure([scores for scores, _ in summaries], pattern.sparsity, settings.flap_structure)
        if getattr(settings, "flap_bias_stats", "dense") == "dense":  # kept for the compensation
            structures = [dataclasses.replace(s, dense_means=means) for s, (_, means) in zip(structures, summaries)]
        blocks = [{"index": i, "kv_groups": s.attention_units, "kv_groups_kept": len(s.attention_keep),
                   "channels": s.mlp_units, "channels_kept": len(s.mlp_keep),
                   "removed_fraction": round(s.removed_params / max(s.total_params, 1), 6)}
                  for i, s in enumerate(structures)]
        removed = removed_fraction(structures)
        log.info("FLAP %s: %.2f%% of block parameters removed (asked %.2f%%)", settings.flap_structure,
                 100 * removed, 100 * pattern.sparsity)
        record = {"allocation": f"flap-{settings.flap_structure}", "flap_metric": settings.flap_metric,
                  "bias_compensation": settings.bias_compensation, "removed_fraction": round(removed, 6),
                  "blocks": blocks}
        return Allocation([pattern] * len(structures), record, structures)

    return Allocator(tuple(sorted(STATS_NEEDED)), None, summarise, decide)
