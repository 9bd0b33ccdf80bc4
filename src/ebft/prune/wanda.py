"""Wanda: pruning by weights and activations (Sun et al. 2023, "A Simple and Effective Pruning
Approach for Large Language Models", arXiv:2306.11695).

Score S_ij = |W_ij| · ‖X_j‖₂, where ‖X_j‖₂ is the norm of input feature j over all calibration
tokens. Scores are compared within each output row (the paper's per-output comparison group),
hence the "row" default scope; for N:M, within each group of M inputs. No weight update.
"""
from __future__ import annotations

import torch

from ebft.masks import Pattern, mask_from_scores
from ebft.prune.base import PruneResult, register_pruner, require_stats
from ebft.stats import LayerStats


@register_pruner("wanda", needs=("sq",), default_scope="row")
@torch.no_grad()
def wanda(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, settings=None) -> PruneResult:
    """Keep mask from S = |W| · ‖X_j‖₂ (broadcast over output rows)."""
    col_norm = require_stats(stats, "sq_sum", "wanda").col_norm.to(weight.device)
    return PruneResult(mask_from_scores(weight.abs() * col_norm, pattern))
