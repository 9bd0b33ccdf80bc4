"""EBFT: block-wise reconstruction fine-tuning of a pruned block (Guo et al., 2024).

For block ℓ with calibration inputs Xℓ and targets Yℓ (by default the dense block applied to the
same inputs, Yℓ = Bℓ(Xℓ; W); optionally the dense model's own activations), minimise

    L(W′) = 1/|D| Σ_{x∈D} ‖Bℓ(x; M ⊙ W′) − y‖²

over the kept weights W′ with the masks M fixed: AdamW (β = 0.9, 0.95), linear decay of the
learning rate to zero, gradient-norm clipping, a few epochs over the windows (the loop, the loss
and the precision rules are in :mod:`.training`).

Masks are preserved exactly: gradients are multiplied by the mask before every step, so with
decoupled weight decay (AdamW) a zero weight has zero gradient, zero moments and a zero update
— it stays exactly 0.0. The walk re-checks every mask after this function returns.

**Joint windows** (``window`` K > 1; Shin et al., EMNLP 2024, "Rethinking pruning of large language
models via block reconstruction"; Roux et al. 2025, arXiv 2510.14444): K consecutive blocks, each
pruned with its own masks, are trained together as one function of the first one's inputs towards
the dense model's output after the last, L = ‖B_{ℓ+K−1}∘…∘Bℓ(Xℓ; M ⊙ W′) − Y_{ℓ+K−1}‖². The walk
hands this function the window as one "block" (:class:`ebft.walk.JointBlocks`); K = 1 is the
paper's EBFT, unchanged.

**A closed-form start** (``refit``; on in ``--recipe best``): before the first step, each pruned linear's
kept weights are set to their masked least-squares optimum on the calibration inputs
(:mod:`.refit`); the training starts from there. The block's loss "before" is still the pruned block's,
and a block that ends worse than that is restored to its pruned weights, refit undone with it.

On CUDA the trainable weights are held in fp32 for the block's lifetime (master weights) while the
forward runs under autocast; they go back to the model's dtype at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..models import norm_modules
from ..settings import option
from .base import BlockContext, register_recovery
from .refit import MASKED, RefitSettings, refit_block
from .training import BlockTrainingSettings, Trainee, Training, make_adamw, mask_dtype, train_block


@dataclass
class KeptWeightSettings(BlockTrainingSettings):
    """What trains a block's kept weights (EBFT, the moving mask): the optimiser's settings."""

    lr: float = option(2e-4, "EBFT AdamW learning rate, decayed linearly to 0", low=0)
    weight_decay: float = option(0.1, "EBFT AdamW weight decay (the reference's 0.1)", low=0)
    train_norms: bool = option(False, "EBFT also trains the block's norm weights (off: linear weights and "
                               "biases only)")


@dataclass
class EbftSettings(RefitSettings, KeptWeightSettings):
    refit: bool = option(False, "ebft: before training, set each pruned layer's kept weights to their least-squares "
                         "optimum on the calibration inputs (closed form, as --recover refit; training then starts "
                         "there)", keyed="set", needs=MASKED)
    window: int = option(1, "ebft: blocks trained together — each run of this many consecutive blocks, every "
                         "block pruned with its own masks, is trained jointly towards the dense model's output "
                         "after its last block (needs target dense-model); 1: each block alone, as the paper",
                         low=1, high=1024, flag="--recover-window", metavar="BLOCKS", keyed="set")


def trainable_parameters(block: nn.Module, linears: dict[str, nn.Linear], train_norms: bool) -> list[nn.Parameter]:
    """The linears' weights and biases; with ``train_norms`` also the norm layers' parameters."""
    params = []
    for lin in linears.values():
        params += [p for p in (lin.weight, lin.bias) if p is not None]
    if train_norms:
        params += [p for module in norm_modules(block) for p in module.parameters(recurse=False)]
    return params


class KeptWeights(Trainee):
    """EBFT's trainee: the kept weights of the block's linears (and their biases; norms with ``train_norms``),
    in fp32 for the block's lifetime (master weights); a host copy to restore a block training made worse."""

    def __init__(self, ctx: BlockContext, settings: KeptWeightSettings):
        self.ctx, self.settings = ctx, settings
        self.refit_record: dict = {}
        self.params = trainable_parameters(ctx.block, ctx.linears, settings.train_norms)
        self.dtypes = [p.dtype for p in self.params]

    def prepare(self) -> None:
        for p in self.params:  # fp32 master weights for the block's lifetime
            p.data = p.data.float()
        self.saved = [p.detach().to("cpu", copy=True) for p in self.params]  # to restore a rejected block

    def start(self) -> Training:
        ctx = self.ctx
        if getattr(self.settings, "refit", False):  # the closed-form start; undo() still returns to the pruned weights
            self.refit_record = refit_block(ctx, self.settings.refit_damp)
        for p in self.params:
            p.requires_grad_(True)
        weight_masks = [(ctx.linears[name].weight, m.to(ctx.device, mask_dtype(ctx.device)))
                        for name, m in ctx.masks.items()]
        return Training(self.params, make_adamw(self.params, self.settings.lr, self.settings.weight_decay),
                        weight_masks)

    def undo(self) -> None:
        for p, s in zip(self.params, self.saved):
            p.data.copy_(s)

    def finish(self, record: dict) -> None:
        for p, dt in zip(self.params, self.dtypes):
            p.data = p.data.to(dt)
        # what the optimizer can change: the kept weights (a masked weight's gradient is zeroed), biases, norms
        record["trainable_params"] = (sum(p.numel() for p in self.params)
                                      - sum(int((~m).sum()) for m in self.ctx.masks.values()))
        record.update(self.refit_record)
        self.saved = []


@register_recovery("ebft", settings=EbftSettings, target=lambda settings: settings.target, state_bytes=16,
                   window=lambda settings: settings.window, needs=lambda settings: ("hessian",) if settings.refit else (),
                   dense_weights=lambda settings: settings.refit, summary="ebft trains the kept weights of each block")
def ebft(ctx: BlockContext, settings: EbftSettings) -> dict:
    """Train the kept weights of ``ctx.block`` to reproduce ``ctx.targets``; return the block's record."""
    return train_block(ctx, settings, KeptWeights(ctx, settings))
