r"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", arXiv:2301.00774): choose a mask and update the kept weights so the layer
output on calibration inputs X changes as little as possible.

The maths. For each output row w, the layer error ‖wX − ŵX‖² has Hessian H = 2XᵀX/n, the same
for every row. Optimal Brain Surgeon (Hassibi & Stork 1993) says: removing weight j and
re-optimising the others costs w_j² / [H⁻¹]_jj and moves them by
δ = −(w_j / [H⁻¹]_jj) · H⁻¹_{:,j}. SparseGPT processes the columns left to right, only updating the
columns not yet processed. With U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU), row j of U is
exactly the inverse Hessian of the remaining columns {j, j+1, …} scaled by 1/√[·]_jj, so for
column j:

    q   = w_j · mask_j                         (kept or zeroed)
    err = (w_j − q) / U_jj
    w_{j+1:} −= err · U_{j, j+1:}

Columns are handled in blocks of B (default 128): inside a block the update is applied column by
column (inherent to OBS); the block's accumulated errors reach the columns right of it in one
matrix product, W[:, i2:] −= Err_block @ U[i1:i2, i2:] ("lazy batch updates").

Masks are chosen adaptively on the current (already updated) weights with the OBS saliency
w² / U_jj²: for unstructured patterns once per block ([i1, i2) columns; per row or over the
block's entries for layer scope, with counts that add up to the exact total); for N:M at every
column that starts a group of M.

Numerics: dead inputs (H_jj = 0, the feature is always zero) get H_jj = 1 and their weights zeroed
(they cannot affect the output); λ = percdamp · mean(diag H) is added to the diagonal, as in the
paper, and multiplied by 10 on each retry if the Cholesky factorisation still fails.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ebft.masks import Pattern, keep_dropping_lowest, mask_from_scores, n_pruned, validate_width
from ebft.prune.base import PruneResult, register_pruner, require_stats
from ebft.settings import option
from ebft.stats import LayerStats

log = logging.getLogger(__name__)
DAMP_RETRIES = 4


@dataclass
class SparseGPTSettings:
    sparsegpt_blocksize: int = option(128, "SparseGPT columns per lazy-update block (the paper's B)", low=1)
    sparsegpt_damp: float = option(0.01, "SparseGPT dampening: this fraction of mean(diag H) is added to H's "
                                   "diagonal (the paper's 1 %)", low=0, low_open=True)


@register_pruner("sparsegpt", needs=("hessian",), default_scope="layer", settings=SparseGPTSettings)
def _registered(weight: torch.Tensor, stats: LayerStats, pattern: Pattern, settings: SparseGPTSettings) -> PruneResult:
    return sparsegpt(weight, stats, pattern, settings.sparsegpt_blocksize, settings.sparsegpt_damp)


@torch.no_grad()
def sparsegpt(weight: torch.Tensor, stats: LayerStats, pattern: Pattern,
              blocksize: int = 128, percdamp: float = 0.01) -> PruneResult:
    """Mask and OBS-updated weight for one linear layer (see the module docstring)."""
    rows, cols = weight.shape
    size = f"{rows}x{cols}"
    validate_width(cols, pattern, size)
    if pattern.sparsity == 0:
        return PruneResult(torch.ones_like(weight, dtype=torch.bool), weight.clone())

    W = weight.detach().to(torch.float32, copy=True)
    # The property builds a fresh tensor, so editing H below never touches the running sums.
    H = require_stats(stats, "xxt", "sparsegpt").hessian.to(W.device, torch.float32)
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    U = _inverse_hessian_factor(H, percdamp, size)

    if pattern.is_nm:  # an N:M group must not straddle two blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, keep1 = W[:, i1:i2], U[i1:i2, i1:i2], keep[:, i1:i2]  # views, updated in place
        if not pattern.is_nm:
            keep1.copy_(_block_mask(W1, U1.diagonal(), pattern, i1, i2))
        err = _prune_block(W1, U1, keep1, pattern)
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return PruneResult(keep, W.to(weight.dtype))


def _inverse_hessian_factor(H: torch.Tensor, percdamp: float, size: str) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, retrying with 10× λ if H is not positive definite."""
    mean_diag = H.diagonal().mean()
    damp = percdamp * mean_diag
    for attempt in range(DAMP_RETRIES):
        Hd = H.clone()
        Hd.diagonal().add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        log.warning("sparsegpt: %s Hessian not positive definite with damping %.3g; retrying x10",
                    size, float(damp))
        tried = damp
        damp = damp * 10 if damp > 0 else 0.01 * mean_diag  # percdamp=0 would never grow
    raise RuntimeError(f"sparsegpt: the Hessian of the {size} layer is not positive definite even "
                       f"with damping {float(tried):.3g}; are its calibration inputs finite and varied?")


def _block_mask(W1: torch.Tensor, d: torch.Tensor, pattern: Pattern, i1: int, i2: int) -> torch.Tensor:
    """Unstructured keep mask of columns [i1, i2) by saliency w²/U_jj².

    Counts telescope: block b prunes n_pruned(i2) − n_pruned(i1) per row (or over the block's
    rows·width entries for layer scope), so the totals are exactly n_pruned(in) per row
    (n_pruned(out·in) per layer).
    """
    saliency = W1.square() / d.square()
    s, rows = pattern.sparsity, W1.shape[0]
    if pattern.scope == "row":
        return keep_dropping_lowest(saliency, n_pruned(i2, s) - n_pruned(i1, s), per_row=True)
    count = n_pruned(rows * i2, s) - n_pruned(rows * i1, s)
    return keep_dropping_lowest(saliency, count, per_row=False)


def _prune_block(W1: torch.Tensor, U1: torch.Tensor, keep1: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """OBS column loop over one block, in place on W1 (and keep1 for N:M); returns Err_block."""
    d = U1.diagonal()
    err = torch.zeros_like(W1)
    for j in range(W1.shape[1]):
        if pattern.is_nm and j % pattern.m == 0:  # block starts are multiples of m
            group = slice(j, j + pattern.m)
            keep1[:, group] = mask_from_scores(W1[:, group].square() / d[group].square(), pattern)
        w = W1[:, j]
        q = torch.where(keep1[:, j], w, torch.zeros_like(w))
        err[:, j] = (w - q) / d[j]
        W1[:, j + 1:] -= err[:, j:j + 1] * U1[j, j + 1:]
        W1[:, j] = q  # set, not subtracted: pruned weights must be exactly zero
    return err
