"""EBFT mask tuning — the EBFT paper's ablation: freeze the weights and learn *which* of them to
keep, with the same block objective as EBFT,

    min_S  1/|D| Σ_{x∈D} ‖Bℓ(x; W° ⊙ M(S)) − y‖²,   M(S) = top-k(S) under the exact pattern,

where W° holds the pruner's values for the weights it kept and the dense values W elsewhere: a
weight the mask grows comes back at its dense value, and a weight the pruner kept keeps the value
the pruner gave it (for Wanda and magnitude that is W itself; SparseGPT's kept weights carry its
OBS update, which mask tuning therefore starts from instead of discarding). At the start
W° ⊙ M = the pruned weight exactly, so the first loss is the pruned block's.

Each linear gets real-valued scores S shaped like its weight. The forward pass uses the hard mask
M = ``mask_from_scores(S, pattern)`` — per-row ratio, per-layer ratio or N:M, exact at every step —
and the backward pass is straight-through: the gradient reaches S as if M were S
(``M + (S − S.detach())``: exactly M in the forward, so an untrained
step reproduces the pruned block bit for bit), so ∂L/∂S = ∂L/∂(W ⊙ M) ⊙ W. AdamW on S (no weight decay), learning rate
``mask_lr`` decayed linearly to 0, ``epochs`` passes in batches of ``batch_size``.

‖X_j‖ is the walk's statistic of the dense block on the chain's inputs, as the pruner saw it.

Initial scores reproduce the pruner's mask exactly: S = |W|·‖X_j‖ normalised to [0, 1] per row
(per layer for a per-layer scope), plus, for every kept weight, the smallest shift that puts it
above every pruned weight of its comparison group (row, layer, or group of M), plus a small margin.
For a Wanda mask that shift is just the margin, so weights near the pruner's cut-off can trade
places within a few steps, while clear keeps and clear prunes stay put.

Safety as EBFT: if the learned mask's loss is not finite or is above the starting block's, the
starting masks and weights are kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..masks import Pattern, mask_from_scores
from ..settings import option
from .base import BlockContext, register_recovery
from .training import BlockTrainingSettings, Trainee, Training, train_block

MARGIN = 1e-3  # of the normalised score: how far the initial mask sits from a tie


@dataclass
class MaskTuningSettings(BlockTrainingSettings):
    mask_lr: float = option(1e-3, "ebft-mask AdamW learning rate on the mask scores, decayed linearly to 0 "
                            "(5e-3 overfitted 16 calibration windows)", low=0, low_open=True)


def _comparison_groups(t: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """View ``t`` as [groups, members]: the sets within which the pattern counts kept weights."""
    if pattern.is_nm:
        return t.reshape(-1, pattern.m)
    return t if pattern.scope == "row" else t.reshape(1, -1)


@torch.no_grad()
def initial_scores(importance: torch.Tensor, keep: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Scores whose top-k under ``pattern`` is exactly ``keep``, ordered by ``importance`` otherwise."""
    per_row = pattern.is_nm or pattern.scope == "row"
    top = importance.amax(1, keepdim=True) if per_row else importance.max()
    base = importance / top.clamp_min(torch.finfo(importance.dtype).tiny)
    groups, kept = _comparison_groups(base, pattern), _comparison_groups(keep, pattern)
    gap = (torch.where(kept, -torch.inf, groups).amax(1) - torch.where(kept, groups, torch.inf).amin(1))
    shift = gap.nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp_min(0) + MARGIN
    return (groups + kept * shift[:, None]).reshape(importance.shape)


class _MaskedDense(nn.Module):
    """Parametrization of a linear's weight: W° ⊙ M(S), straight-through to the scores S."""

    def __init__(self, frozen: torch.Tensor, scores: torch.Tensor, pattern: Pattern, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("frozen", frozen, persistent=False)
        self.scores = nn.Parameter(scores)
        self.pattern, self.out_dtype = pattern, dtype

    def hard_mask(self) -> torch.Tensor:
        return mask_from_scores(self.scores.detach(), self.pattern)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        mask = self.hard_mask().to(self.scores.dtype) + (self.scores - self.scores.detach())  # exactly M
        return (self.frozen * mask).to(self.out_dtype)


class TunedMasks(Trainee):
    """Mask tuning's trainee: each linear's weight parametrized as W° ⊙ M(S) (:class:`_MaskedDense`) while its
    scores S train; the learned masks are kept, or the pruner's (the parametrization removed either way)."""

    undone = "keeping the pruner's masks"

    def __init__(self, ctx: BlockContext, settings: MaskTuningSettings):
        if ctx.dense_weights is None:
            raise ValueError("ebft-mask changes masks: call it through the walk, which passes dense_weights")
        self.ctx, self.settings = ctx, settings
        self.tuned: dict[str, _MaskedDense] = {}
        self.frozen: dict[str, torch.Tensor] = {}

    def start(self) -> Training:
        ctx, linears = self.ctx, self.ctx.linears
        for name, mask in ctx.masks.items():
            dense = ctx.dense_weights[name]
            keep = mask.to(dense.device)
            self.frozen[name] = torch.where(keep, linears[name].weight.detach().float(), dense)
            importance = self.frozen[name].abs() * ctx.stats[name].col_norm.to(keep.device)
            scores = initial_scores(importance, keep, ctx.pattern)
            self.tuned[name] = _MaskedDense(self.frozen[name], scores, ctx.pattern, linears[name].weight.dtype)
            parametrize.register_parametrization(linears[name], "weight", self.tuned[name], unsafe=True)
        params = [t.scores for t in self.tuned.values()]
        return Training(params, torch.optim.AdamW(params, lr=self.settings.mask_lr, betas=(0.9, 0.95), weight_decay=0.0))

    def trained(self) -> None:
        self.new_masks = {name: t.hard_mask() for name, t in self.tuned.items()}

    def stop(self) -> None:
        for name in self.tuned:
            parametrize.remove_parametrizations(self.ctx.linears[name], "weight", leave_parametrized=False)

    def keep(self, record: dict) -> None:
        # flips: weights that changed between kept and pruned
        record["mask_flips"] = 0
        for name, keep in self.new_masks.items():
            weight, masks = self.ctx.linears[name].weight, self.ctx.masks
            record["mask_flips"] += int((keep != masks[name].to(keep.device)).sum())
            weight.data = (self.frozen[name] * keep).to(weight.dtype)
            masks[name] = keep.to(masks[name].device)

    def finish(self, record: dict) -> None:
        record.setdefault("mask_flips", 0)


@register_recovery("ebft-mask", settings=MaskTuningSettings, target=lambda settings: settings.target,
                   changes_masks=True, needs=("sq",), structured=False, state_bytes=24,
                   summary="ebft-mask learns the masks, weights frozen")
def ebft_mask(ctx: BlockContext, settings: MaskTuningSettings) -> dict:
    """Learn the masks of ``ctx.block`` with its weights frozen (pruner's values where kept, dense values
    elsewhere); return its record."""
    return train_block(ctx, settings, TunedMasks(ctx, settings))
