"""The allocation: what global methods decide from the whole dense model before any block is pruned.

An *allocation* turns the run's one target pattern into a pattern per block (and, for structured
pruning, what each block keeps). ``uniform`` gives every block the target (no pass). ``owl`` and FLAP
need statistics from every block first: the walk's dense planning pass
(:func:`ebft.walk.planning_pass`) runs the *dense* model over the calibration chain block by block,
each block is summarised by :meth:`Allocator.summarise` into something small before its statistics
are dropped, and :meth:`Allocator.decide` turns the summaries into the :class:`Allocation`. Nothing
here runs a model: the pipeline drives the pass (:func:`ebft.pipeline.allocate`).

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

**FLAP** (structured patterns): the same pass collects the means and variances of the inputs of
each block's output projections; :mod:`ebft.structured` scores every KV group and MLP channel and
chooses what each block keeps, over the whole model (``flap_structure=adaptive``) or block by block
(``uniform``). The allocation then carries one :class:`~ebft.structured.Structure` per block.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import ConfigError
from .masks import Pattern
from .settings import option
from .structured import STATS_NEEDED, Structure, block_layout, block_scores, removed_fraction, select_structure

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "owl")


@dataclass
class AllocationSettings:
    allocation: str = option("uniform", "sparsity per block: {choices} (owl: outlier-weighed, Yin et al. 2024; "
                             "same overall sparsity, needs a dense planning pass)", choices=ALLOCATIONS)
    owl_lambda: float = option(0.08, "OWL: per-block sparsities lie within target ± lambda (the paper's 0.08)",
                               low=0, high=0.5)
    owl_threshold: float = option(5.0, "OWL: a weight is an outlier when its Wanda score exceeds this many times "
                                  "the block's mean score (the paper's M = 5)", low=0, low_open=True)


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
    """How one allocation is decided from a dense pass: the statistics it needs (``needs``) of the
    linears matching ``layers``; ``summarise(index, block, linears, stats)`` keeps what it needs of
    each block; ``decide(summaries)`` makes the :class:`Allocation`."""

    needs: tuple[str, ...]
    layers: str | None
    summarise: Callable
    decide: Callable[[list], Allocation]


def check_allocation(settings: AllocationSettings, pattern: Pattern) -> None:
    """Refuse what cannot work, before any model is loaded."""
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
    low, high = pattern.sparsity - settings.owl_lambda, pattern.sparsity + settings.owl_lambda
    if low < 0 or high >= 1:
        raise ConfigError("prune.owl_lambda", settings.owl_lambda,
                          f"sparsity {pattern.sparsity:g} ± lambda must stay within [0, 1): "
                          f"use lambda < {min(pattern.sparsity, 1 - pattern.sparsity):g}")


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


def allocator(pattern: Pattern, settings: AllocationSettings, layers: str | None, pruner_settings=None,
              model_config=None) -> Allocator | None:
    """The allocator of this run: FLAP's for a structured pattern, OWL's, or None for a uniform
    unstructured allocation (every block gets ``pattern``, no pass)."""
    check_allocation(settings, pattern)
    if pattern.structured:
        return flap_allocator(pattern, pruner_settings, model_config)
    if settings.allocation == "uniform":
        return None

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
