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
them (one pass with hooks, before any linear of the block is pruned). The threshold is on the
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

import torch
from torch import nn

from ..masks import Pattern
from ..stats import LayerStats
from . import register_recovery

_MLP = re.compile(r"(^|\.)(mlp|ffn|feed_forward|fc\d*)(\.|$)")
_VAR_FLOOR = 1e-10  # a constant input feature has zero variance: the most reliable one to grow


def is_mlp(name: str) -> bool:
    """``mlp.up_proj`` (Llama, Qwen, Gemma, Phi-3), ``fc1``/``fc2`` (OPT), ``ffn.*``, ``feed_forward.*``."""
    return _MLP.search(name) is not None


@torch.no_grad()
def input_stats(block: nn.Module, linears: dict[str, nn.Linear], io, inputs: torch.Tensor,
                weights: dict[str, torch.Tensor] | None = None, needs=("mean",)) -> dict[str, LayerStats]:
    """Statistics of each linear's inputs while ``block`` runs on ``inputs``.

    With ``weights`` (name -> tensor), the linears hold those weights during the pass (e.g. the dense
    ones, as the pruners saw them) and get their own back afterwards.
    """
    stats = {n: LayerStats(l.in_features, frozenset(needs), io.device) for n, l in linears.items()}
    hooks = [l.register_forward_hook(lambda m, a, o, s=stats[n]: s.update(a[0])) for n, l in linears.items()]
    own = {n: l.weight.data for n, l in linears.items()} if weights else {}
    try:
        for n, w in own.items():
            linears[n].weight.data = weights[n].to(w.device, w.dtype)
        for i in range(0, inputs.shape[0], io.batch_size):
            io.call(block, inputs[i:i + io.batch_size].to(io.device, non_blocking=True))
    finally:
        for h in hooks:
            h.remove()
        for n, w in own.items():
            linears[n].weight.data = w
    return stats


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


@register_recovery("dsnot", needs_targets=False, changes_masks=True,
                   options=("dsnot_cycles", "dsnot_threshold", "dsnot_power", "dsnot_skip_mlp"))
@torch.no_grad()
def dsnot(block, inputs, targets, masks, linears, io, settings, index=0, progress=None,
          dense_weights=None, pattern=None) -> dict:
    """Refine every linear's mask with DSnoT (skipping MLPs with ``dsnot_skip_mlp``); record swaps."""
    if dense_weights is None or pattern is None:
        raise ValueError("dsnot changes masks: call it through the walk, which passes dense_weights and pattern")
    names = [n for n in masks if not (settings.dsnot_skip_mlp and is_mlp(n))]
    stats = input_stats(block, {n: linears[n] for n in names}, io, inputs, dense_weights)
    threshold = settings.dsnot_threshold / inputs.shape[1]  # the reference's per-window sum, per token
    record = {"dsnot_swaps": 0, "dsnot_error_before": 0.0, "dsnot_error_after": 0.0, "dsnot_layers": {}}
    for name in names:
        linear = linears[name]
        sparse = linear.weight.data.float()
        old = masks[name].to(sparse.device)
        keep, layer = dsnot_layer(dense_weights[name], sparse, old, stats[name], pattern,
                                  settings.dsnot_cycles, threshold, settings.dsnot_power)
        weight = torch.where(keep & ~old, dense_weights[name], sparse) * keep
        linear.weight.data = weight.to(linear.weight.dtype)
        masks[name] = keep.to(masks[name].device)
        record["dsnot_swaps"] += layer["swaps"]
        record["dsnot_error_before"] += layer["error_before"]
        record["dsnot_error_after"] += layer["error_after"]
        record["dsnot_layers"][name] = layer
    return record
