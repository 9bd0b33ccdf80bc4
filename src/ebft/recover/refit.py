r"""Refit: each pruned linear's kept weights set to their least-squares optimum, in closed form.

Pruning a linear with dense weights W₀ to the mask M loses ‖W₀X − (M ⊙ W₀)X‖² of its output on the
calibration inputs X. Wanda and magnitude pruning keep the surviving weights as they were; the best
kept weights for the same mask solve, row by row (w₀ a row of W₀, K its kept columns, D the dropped
ones, H = XXᵀ summed over the calibration tokens):

    min_w (w − w₀)ᵀ (H + λI) (w − w₀)   subject to w_D = 0
    ⇒  w_K = w₀_K + (H_KK + λI)⁻¹ H_KD w₀_D

— the masked least-squares problem that SparseGPT (Frantar & Alistarh 2023) approximates column by
column and that Boža ("Fast and Effective Weight Update for Pruned Large Language Models", TMLR 2024,
arXiv:2401.02938) solves with ADMM for any given mask. λ = ``refit_damp`` · mean(diag H) keeps the
system well posed (SparseGPT's dampening, there 0.01) and pulls the solution towards the dense weights;
ebft's default is 1.0, a real ridge: with 0.01 the refit fits the few thousand calibration tokens so
closely that EBFT after it ended worse on WikiText-2 at 50 % than without it (docs/results.md, round four).

**How it is solved here.** Every row has its own K, so there is no single factorisation; instead the
rows are solved together by preconditioned conjugate gradients on the masked operator
R ↦ M ⊙ (R (H + λI)) (symmetric positive definite on each row's kept coordinates), with the diagonal of
H + λI as the preconditioner, starting from the pruned weights M ⊙ W₀. One iteration is one
[out, in] × [in, in] product; it stops when every row's residual is below :data:`TOLERANCE` of its
right-hand side (or after :data:`MAX_ITERATIONS`). That is a few tens of iterations for the blocks
measured (benchmarks in docs/results.md); the relative layer error it reaches is within a percent of
the exact solution's. Any mask works: per row, per layer, N:M. Masked weights stay exactly 0.0
(the result is multiplied by M).

**Where it runs.** As EBFT's first step when ``refit`` is on (``--recipe best``: it is; ``paper``: off):
the block's training then starts from the refit weights instead of the pruned ones, and
:func:`~ebft.recover.training.train_block`'s undo still returns to what pruning left, so a refit that
made the block worse end to end is undone with the training. Alone it is the ``refit`` recovery (no
training: seconds, not minutes). It reads the Hessian sums of the linears' inputs (the dense block on
the chain's inputs, collected in the walk's one dense pass, as SparseGPT's) and the dense weights.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from ..prune.base import PRUNERS
from ..settings import Needs, option
from .base import BlockContext, register_recovery
from .recipes import DEFAULT_RECIPE, RECIPES

log = logging.getLogger(__name__)

TOLERANCE = 1e-2  # a row stops when ‖residual‖ < TOLERANCE · ‖right-hand side‖ (every row must)
MAX_ITERATIONS = 100


# where a refit applies: a pruner that leaves masks (a structurally pruned block has none to refit)
MASKED = Needs("prune.method", lambda method: method not in PRUNERS or not PRUNERS[method].structured,
               "a pruner that leaves masks (a structured pruner's blocks have none)")


def _refits(recover: dict) -> bool:
    """Whether the run's recovery refits: EBFT where its ``refit`` is on (given, else from its recipe); the
    other owner of the dampening, the ``refit`` recovery, always."""
    if recover.get("method") != "ebft":
        return True
    refit = recover.get("refit")
    return bool(RECIPES.get(recover.get("recipe", DEFAULT_RECIPE), {}).get("refit", False) if refit is None else refit)


@dataclass
class RefitSettings:
    refit_damp: float = option(1.0, "refit: λ = this fraction of mean(diag H) added to the layer Hessian's "
                               "diagonal, a ridge towards the dense weights (SparseGPT's 0.01 fits the calibration "
                               "text closer and recovered worse on SmolLM2 at 50 %)", low=0, low_open=True,
                               keyed="set", needs=MASKED & Needs("recover", _refits, "a refit (--recover refit, "
                                                                 "or --recover ebft with --refit or --recipe best)"))


@torch.no_grad()
def masked_lstsq(dense: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, damp: float = 1.0,
                 tol: float = TOLERANCE, max_iterations: int = MAX_ITERATIONS) -> tuple[torch.Tensor, int]:
    """The weights W (fp32, [out, in], zero where ``mask`` is False) minimising (W − W₀)(H + λI)(W − W₀)ᵀ
    row by row, and the iterations it took (see the module docstring). ``hessian`` is H (any positive
    scale); ``dense`` is W₀."""
    W0 = dense.to(torch.float32)
    H = hessian.to(W0.device, torch.float32, copy=True)
    diag = H.diagonal()
    diag[diag == 0] = 1.0  # a dead input (always zero): its weight does not matter; keep the system regular
    diag.add_(damp * float(diag.mean()))
    M = mask.to(W0.device, torch.float32)
    b = M * (W0 @ H)
    x = M * W0
    r = b - M * (x @ H)
    inv_diag = 1.0 / diag
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(1, keepdim=True)
    limit = (tol ** 2) * b.square().sum(1, keepdim=True)
    iterations = 0
    while iterations < max_iterations and bool((r.square().sum(1, keepdim=True) > limit).any()):
        Hp = M * (p @ H)
        alpha = rz / (p * Hp).sum(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        x.addcmul_(alpha, p)
        r.sub_(alpha * Hp)
        z = r * inv_diag
        rz_next = (r * z).sum(1, keepdim=True)
        p = z + (rz_next / rz.clamp_min(torch.finfo(torch.float32).tiny)) * p
        rz = rz_next
        iterations += 1
    return x * M, iterations


def layer_error(weight: torch.Tensor, dense: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖(W − W₀)X‖² / ‖W₀X‖² from H = XXᵀ: the linear's relative output error on the calibration inputs."""
    d = weight.float() - dense.float()
    lost = float((d @ hessian * d).sum())
    return lost / max(float((dense.float() @ hessian * dense.float()).sum()), torch.finfo(torch.float32).tiny)


@torch.no_grad()
def refit_block(ctx: BlockContext, damp: float) -> dict:
    """Set every pruned linear of ``ctx`` (a block or a joint window) to its masked least-squares optimum;
    return the record: the mean relative layer error before and after, the most iterations, the seconds."""
    if ctx.dense_weights is None:
        raise ValueError("refit needs the dense weights: call it through the walk (the recovery declares them)")
    start, before, after, most = time.perf_counter(), [], [], 0
    for name, lin in ctx.linears.items():
        mask = ctx.masks.get(name)
        if mask is None:
            continue
        H = ctx.stats[name].hessian.to(ctx.device)
        dense = ctx.dense_weights[name].to(ctx.device)
        before.append(layer_error(lin.weight, dense, H))
        solved, iterations = masked_lstsq(dense, H, mask, damp)
        lin.weight.data.copy_(solved.to(lin.weight.dtype))
        after.append(layer_error(lin.weight, dense, H))
        most = max(most, iterations)
    mean = lambda v: round(sum(v) / len(v), 6) if v else None  # noqa: E731
    record = {"refit_error_before": mean(before), "refit_error_after": mean(after), "refit_iterations": most,
              "refit_seconds": round(time.perf_counter() - start, 3)}
    log.info("block %d refit: layer error %.4g -> %.4g (%d iterations at most)", ctx.index,
             record["refit_error_before"] or 0.0, record["refit_error_after"] or 0.0, most)
    return record


@register_recovery("refit", settings=RefitSettings, target=None, needs=("hessian",), dense_weights=True,
                   structured=False, summary="refit sets each pruned layer's kept weights to their least-squares "
                   "optimum (closed form, no training)")
def refit(ctx: BlockContext, settings: RefitSettings) -> dict:
    """Refit the kept weights of ``ctx.block`` (see the module docstring); the block's record."""
    return refit_block(ctx, settings.refit_damp)

