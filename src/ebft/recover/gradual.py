"""EBFT with a moving mask: the block's weights train while its mask tightens to the target, each
tightening chosen from the weights as they are then (block-local gradual pruning).

One-shot pruning fixes the mask from the *dense* weights before any training; at high sparsity that
choice is a large part of the error EBFT cannot undo. Gradual magnitude pruning (Zhu & Gupta, "To
prune, or not to prune", 2017) instead raises the sparsity step by step during training, each step
pruning the weights that matter least *now*. Here it runs inside one block's EBFT, with EBFT's own
objective, budget (the same epochs and steps) and optimiser:

1. start from the dense weights, pruned to ``gradual_start`` × the target sparsity by Wanda's score
   S = |W|·‖X_j‖₂ (the block's own input norms, from the walk's dense pass);
2. train as EBFT does (masked AdamW on the kept weights, the block objective, the learning rate decayed
   linearly); at ``gradual_updates`` evenly spaced steps up to ``gradual_end`` of the training, raise the
   sparsity on the cubic schedule s_k = s·(1 − (1 − start)(1 − k/K)³) and prune, among the weights still
   kept, those of the lowest score S computed from the current weights (pruned weights stay pruned; their
   optimiser moments are zeroed, so they stay exactly 0.0);
3. after the last update the mask is the target pattern exactly (per row or per layer; for N:M the
   intermediate steps prune whole groups to N of M, the cheapest groups first, and the last one all of
   them), and training goes on with it fixed.

If the block ends with a higher loss than the pruner's one-shot mask and weights had, those are kept
(never worse than one-shot pruning, as EBFT never ends worse than pruning). The pruner still runs
first: its mask is the reference for that check and for the run's records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import Pattern, mask_from_scores
from ..settings import option
from .base import BlockContext, register_recovery
from .ebft import KeptWeightSettings, trainable_parameters
from .training import Trainee, Training, make_adamw, mask_dtype, train_block


@dataclass
class GradualSettings(KeptWeightSettings):
    gradual_start: float = option(0.5, "ebft-gradual: the sparsity training starts at, as a fraction of the target",
                                  low=0, high=1, high_open=True)
    gradual_end: float = option(0.6, "ebft-gradual: the share of the training steps after which the mask is "
                                "final (it then trains fixed)", low=0, low_open=True, high=1)
    gradual_updates: int = option(8, "ebft-gradual: how many times the mask tightens", low=1, high=10_000)


def cubic(start: float, k: int, updates: int) -> float:
    """The fraction of the target sparsity after update ``k`` of ``updates`` (0: the start, K: all of it)."""
    return 1.0 - (1.0 - start) * (1.0 - k / updates) ** 3


@torch.no_grad()
def tighten(weight: torch.Tensor, keep: torch.Tensor, norms: torch.Tensor, target: Pattern,
            fraction: float) -> torch.Tensor:
    """The keep mask at ``fraction`` of ``target``'s sparsity, chosen among ``keep`` by S = |W|·‖X_j‖₂.
    ``fraction`` 1 gives ``target`` exactly; pruned weights stay pruned."""
    score = (weight.float().abs() * norms.to(weight.device)).masked_fill(~keep, float("-inf"))
    if not target.is_nm:
        return mask_from_scores(score, Pattern(min(target.sparsity * fraction, target.sparsity),
                                               scope=target.scope)) & keep
    rows, cols = weight.shape
    groups = score.reshape(rows, cols // target.m, target.m)
    nm = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(target.n, -1).indices, True)
    pruned = (~keep).reshape_as(groups).any(-1)  # groups already at N of M
    cost = torch.where(nm, torch.zeros_like(groups), groups.clamp_min(0)).sum(-1)  # what pruning them loses
    cost = cost.masked_fill(pruned, float("-inf"))
    count = max(int(round(fraction * cost.numel())), int(pruned.sum()))
    chosen = torch.zeros(cost.numel(), dtype=torch.bool, device=cost.device)
    chosen[cost.flatten().topk(count, largest=False).indices] = True
    chosen = chosen.reshape(cost.shape)
    return torch.where(chosen[..., None], nm, torch.ones_like(nm)).reshape(rows, cols) & keep


class MovingMask(Trainee):
    """The moving mask's trainee: the kept weights from their dense values while the mask tightens (every
    ``on_step``) to the target; the pruner's one-shot weights (and mask) kept to go back to."""

    undone = "keeping the pruner's one-shot mask and weights"

    def __init__(self, ctx: BlockContext, settings: GradualSettings):
        if ctx.dense_weights is None:
            raise ValueError("ebft-gradual changes masks: call it through the walk, which passes dense_weights")
        self.ctx, self.settings = ctx, settings
        self.params = trainable_parameters(ctx.block, ctx.linears, settings.train_norms)
        self.dtypes = [p.dtype for p in self.params]
        self.done = 0  # mask updates made

    def prepare(self) -> None:
        self.one_shot = [p.detach().clone() for p in self.params]  # the pruner's weights: kept if training does not beat them

    def start(self) -> Training:
        ctx, settings, linears, masks = self.ctx, self.settings, self.ctx.linears, self.ctx.masks
        for name, lin in linears.items():  # from the dense weights, at the start's sparsity
            lin.weight.data = ctx.dense_weights[name].to(lin.weight.device, lin.weight.dtype)
        self.norms = {name: ctx.stats[name].col_norm for name in masks}
        self.keep_masks = {name: tighten(linears[name].weight, torch.ones_like(m, device=linears[name].weight.device),
                                         self.norms[name], ctx.pattern, settings.gradual_start)
                           for name, m in masks.items()}
        for p in self.params:
            p.data = p.data.float()
            p.requires_grad_(True)
        self.weight_masks = {name: keep.to(mask_dtype(keep.device), copy=True) for name, keep in self.keep_masks.items()}
        for name in masks:
            linears[name].weight.data.mul_(self.weight_masks[name])
        self.optimizer = make_adamw(self.params, settings.lr, settings.weight_decay)
        return Training(self.params, self.optimizer, [(linears[n].weight, self.weight_masks[n]) for n in masks],
                        self.on_step)

    def on_step(self, step: int, total: int) -> None:
        """Tighten the mask to the updates due after ``step`` of ``total`` steps (the cubic schedule)."""
        settings = self.settings
        due = min(settings.gradual_updates, int(step / max(total * settings.gradual_end, 1) * settings.gradual_updates))
        while self.done < due:
            self.done += 1
            fraction = cubic(settings.gradual_start, self.done, settings.gradual_updates)
            for name, mask in self.weight_masks.items():
                weight = self.ctx.linears[name].weight
                self.keep_masks[name] = tighten(weight.data, self.keep_masks[name], self.norms[name], self.ctx.pattern,
                                                fraction)
                mask.copy_(self.keep_masks[name])
                weight.data.mul_(mask)
                for moment in self.optimizer.state.get(weight, {}).values():
                    if torch.is_tensor(moment) and moment.shape == weight.shape:
                        moment.mul_(mask)

    def trained(self) -> None:
        self.on_step(1, 1)  # the target exactly, whatever the number of steps (a budget may have cut them)

    def undo(self) -> None:
        for p, saved in zip(self.params, self.one_shot):
            p.data = saved.clone()

    def keep(self, record: dict) -> None:
        masks, flips = self.ctx.masks, 0
        for name, keep in self.keep_masks.items():
            flips += int((keep != masks[name].to(keep.device)).sum())
            masks[name] = keep.to(masks[name].device)
        record["mask_flips"] = flips

    def finish(self, record: dict) -> None:
        for p, dt in zip(self.params, self.dtypes):
            p.data = p.data.to(dt)
        record["trainable_params"] = (sum(p.numel() for p in self.params)
                                      - sum(int((~m).sum()) for m in self.ctx.masks.values()))


@register_recovery("ebft-gradual", settings=GradualSettings, target=lambda settings: settings.target,
                   changes_masks=True, needs=("sq",), structured=False, state_bytes=24,
                   summary="ebft-gradual trains the weights while the mask tightens to the target")
def ebft_gradual(ctx: BlockContext, settings: GradualSettings) -> dict:
    """Train ``ctx.block`` from its dense weights while its masks tighten to ``ctx.pattern``; the record."""
    return train_block(ctx, settings, MovingMask(ctx, settings))
