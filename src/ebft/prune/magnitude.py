"""Magnitude pruning: keep the weights of largest |W_ij|.

The classic baseline (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks"); the LLM papers (SparseGPT, Wanda) report it with one threshold over the whole layer,
hence the "layer" default scope.
"""
from __future__ import annotations

import torch

from ebft.masks import Pattern, mask_from_scores
from ebft.prune.base import PruneResult, register_pruner


@register_pruner("magnitude", needs=(), default_scope="layer")
@torch.no_grad()
def magnitude(weight: torch.Tensor, stats, pattern: Pattern, settings=None) -> PruneResult:
    """Score S_ij = |W_ij|; needs no calibration data."""
    return PruneResult(mask_from_scores(weight.abs(), pattern))
