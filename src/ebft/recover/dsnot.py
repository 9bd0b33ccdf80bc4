"""DSnoT: training-free prune-and-grow refinement of a mask (Zhang et al., ICLR 2024, "Dynamic Sparse
No Training: Training-Free Fine-tuning for Sparse LLMs", arXiv:2310.08915).

For one linear layer with dense weight W, current sparse weight Ŵ (zero where the mask prunes) and
calibration inputs x with per-feature mean μ_j, variance σ²_j and norm ‖X_j‖₂, the expected
reconstruction error of output row i is

    e_i = E[(W x − Ŵ x)_i] = Σ_j (W_ij − Ŵ_ij) μ_j.

Each cycle, every row whose |e_i| is above the threshold swaps one weight (one grown, one pruned,
so its sparsity is kept):

- grow the pruned weight j that moves e_i towards zero fastest and most reliably: same sign as the
  error, sign(W_ij μ_j) = sign(e_i), the largest |W_ij μ_j| / (σ²_j)^power (growing it lowers
  e_i by W_ij μ_j; a high-variance input makes that reduction unreliable);
- prune the kept weight k with the smallest Wanda score |Ŵ_ik|·‖X_k‖ among those whose contribution
  does not push e_i the other way, sign(Ŵ_ik μ_k) ≠ sign(e_i) (pruning it adds Ŵ_ik μ_k to e_i).

A swap is accepted only if it lowers |e_i|; a weight swapped once is never swapped back. A row stops
when |e_i| falls under the threshold, when its best swap would not lower |e_i| (it would overshoot
past zero), or when it has no candidate left; all rows stop after ``dsnot_cycles`` cycles.

N:M patterns: the pruned weight k is the lowest-Wanda untouched kept weight *in j's group of M*
(so every group keeps exactly N, with no sign condition on k), and j is only taken from groups that
still have such a k.

Statistics: the dense block's linears on the sparse chain's inputs, as the reference code computes
them — the walk's own pass over the dense block, shared with the pruner (``needs``). The threshold is on the
reference's scale: its "mean" is the per-window *sum* of each feature, so ``dsnot_threshold`` (0.1)
is compared with ``seqlen · |e_i|`` — the reference's behaviour at the same window length.

Differences from the reference code (zyxxmu/DSnoT), on purpose:
- it accepts every unstructured swap, even one that overshoots and leaves |e_i| larger (its sign
  check is off: ``--without_same_sign`` is a ``type=bool`` flag that is always true), and for N:M
  stops a row when its error changes sign; here one rule for both: a swap must lower |e_i|;
- candidates are exact: its index pointers can run past the candidates and then break the per-row
  count or the N:M pattern;
- the inputs' variance is pooled over all tokens (it averages per-window variances).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..masks import Pattern
from ..settings import option
from ..stats import LayerStats
from .base import BlockContext, register_recovery

_MLP = re.compile(r"(^|\.)(mlp|ffn|feed_forward|fc\d*)(\.|$)")
_VAR_FLOOR = 1e-10  # a constant input feature has zero variance: the most reliable one to grow


@dataclass
class DsnotSettings:
    """The DSnoT paper's defaults."""

    dsnot_cycles: int = option(50, "DSnoT swap cycles per layer at most", low=1)
    dsnot_threshold: float = option(0.1, "DSnoT stops a row when its expected error, summed over a window's "
                                    "tokens as the reference does, is below this", low=0)
    dsnot_power: float = option(1.0, "DSnoT grows by |W·mean| / variance**power", low=0)
    dsnot_skip_mlp: bool = option(False, "DSnoT refines the attention linears only (the reference code's default)")


def is_mlp(name: str) -> bool:
    """``mlp.up_proj`` (Llama, Qwen, Gemma, Phi-3), ``fc1``/``fc2`` (OPT), ``ffn.*``, ``feed_forward.*``."""
    return _MLP.search(name) is not None


@torch.no_grad()
def dsnot_layer(dense: torch.Tensor, sparse: torch.Tensor, keep: torch.Tensor, stats: LayerStats,
                pattern: Pattern, cycles: int = 50, threshold: float = 0.1, power: float = 1.0
                ) -> tuple[torch.Tensor, dict]:
    """Refine the keep mask of one layer; return (new keep mask, record).

    ``dense``/``sparse``: the ``[out, in]`` fp32 weights before and after pruning (``sparse`` is zero
    where ``keep`` is False); ``threshold`` is per token (the caller rescales the CLI's value).
    The new weight is ``dense`` where a weight was grown, ``sparse`` where it stayed, 0 elsewhere.
    """
    mu, norm = stats.mean.to(dense.device), stats.col_norm.to(dense.device)
    var = stats.var.to(dense.device).clamp_min(_VAR_FLOOR)
    rows = dense.shape[0]
    row = torch.arange(rows, device=dense.device)
    grow_gain = dense * mu  # growing j lowers e_i by this
    prune_gain = sparse * mu  # pruning k raises e_i by this
    error = (dense - sparse) @ mu
    before = error.abs().mean().item()

    # Candidate tables, [0] for rows with e_i > 0 and [1] for e_i <= 0; a non-candidate holds ∓inf.
    # A swap only ever retires two entries, so each cycle is a max and a min over the tables.
    grow_score = grow_gain / var.pow(power)
    grow_table = torch.stack([torch.where(~keep & (grow_gain > 0), grow_score, -torch.inf),
                              torch.where(~keep & (grow_gain < 0), -grow_score, -torch.inf)])
    wanda = torch.where(keep, sparse.abs() * norm, torch.inf)
    if pattern.is_nm:  # any free kept weight of the grown weight's group, whatever its sign
        prune_table = wanda
        free = keep.view(rows, -1, pattern.m).sum(-1)  # free kept weights per group
        offsets = torch.arange(pattern.m, device=dense.device)
    else:
        prune_table = torch.stack([torch.where(prune_gain <= 0, wanda, torch.inf),
                                   torch.where(prune_gain >= 0, wanda, torch.inf)])
        del wanda
    del grow_score

    keep = keep.clone()
    active = error.abs() > threshold
    swaps = torch.zeros(rows, dtype=torch.long, device=dense.device)
    used = 0
    for _ in range(cycles):
        if not active.any():
            break
        used += 1
        side = (error <= 0).long()
        best, grow = grow_table.max(2)
        best, grow = best[side, row], grow[side, row]
        if pattern.is_nm:  # the lowest-Wanda free kept weight in the grown weight's group
            group = (grow - grow % pattern.m)[:, None] + offsets
            low, at = prune_table.gather(1, group).min(1)
            prune = group[row, at]
        else:
            low, prune = prune_table.min(2)
            low, prune = low[side, row], prune[side, row]
        after = error - grow_gain[row, grow] + prune_gain[row, prune]
        accept = active & (best > -torch.inf) & (low < torch.inf) & (after.abs() < error.abs())
        r, g, p = row[accept], grow[accept], prune[accept]
        keep[r, g] = True
        keep[r, p] = False
        grow_table[:, r, g] = -torch.inf  # swapped weights are never swapped back
        if pattern.is_nm:
            prune_table[r, p] = torch.inf
            free[r, g // pattern.m] -= 1
            done = free[r, g // pattern.m] == 0  # a group with no free kept weight cannot grow
            cols_done = (g[done] - g[done] % pattern.m)[:, None] + offsets
            grow_table[:, r[done, None], cols_done] = -torch.inf
        else:
            prune_table[:, r, p] = torch.inf
        error = torch.where(accept, after, error)
        swaps += accept
        active = accept & (error.abs() > threshold)
    return keep, {"swaps": int(swaps.sum()), "cycles": used, "error_before": before,
                  "error_after": error.abs().mean().item()}


@register_recovery("dsnot", settings=DsnotSettings, target=None, changes_masks=True, needs=("mean", "sq"),
                   structured=False, summary="dsnot: training-free prune-and-grow")
@torch.no_grad()
def dsnot(ctx: BlockContext, settings: DsnotSettings) -> dict:
    """Refine every linear's mask with DSnoT (skipping MLPs with ``dsnot_skip_mlp``); record swaps."""
    if ctx.dense_weights is None:
        raise ValueError("dsnot changes masks: call it through the walk, which passes dense_weights")
    names = [n for n in ctx.masks if not (settings.dsnot_skip_mlp and is_mlp(n))]
    threshold = settings.dsnot_threshold / ctx.inputs.shape[1]  # the reference's per-window sum, per token
    record = {"dsnot_swaps": 0, "dsnot_error_before": 0.0, "dsnot_error_after": 0.0, "dsnot_layers": {}}
    for name in names:
        linear, dense = ctx.linears[name], ctx.dense_weights[name]
        sparse = linear.weight.data.float()
        old = ctx.masks[name].to(sparse.device)
        keep, layer = dsnot_layer(dense, sparse, old, ctx.stats[name], ctx.pattern,
                                  settings.dsnot_cycles, threshold, settings.dsnot_power)
        weight = torch.where(keep & ~old, dense, sparse) * keep
        linear.weight.data = weight.to(linear.weight.dtype)
        ctx.masks[name] = keep.to(ctx.masks[name].device)
        record["dsnot_swaps"] += layer["swaps"]
        record["dsnot_error_before"] += layer["error_before"]
        record["dsnot_error_after"] += layer["error_after"]
        record["dsnot_layers"][name] = layer
    return record
