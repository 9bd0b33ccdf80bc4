"""Physically shrink (or zero-pad) a decoder block's KV groups and MLP channels, in place.

:func:`shrink_block_` removes the units a :class:`~ebft.structured.flap.Structure` drops: the rows
of q, k, v (or the fused qkv) and of gate, up (fc1, fused gate_up), and the matching input columns
of o_proj and down_proj (fc2). The head counts the attention's forward reads are updated: module
attributes such as OPT's ``num_heads`` or Phi-3's ``num_key_value_heads``, and, for Phi-3's fused
qkv (whose forward splits at ``config.num_attention_heads · head_dim``), a private shallow copy of
the config with the block's own counts. ``num_key_value_groups`` (query heads per KV head) does not
change because whole groups go. The model's shared config is left alone: it still describes the
dense model until :mod:`ebft.structured.saving` writes the one to save.

**Bias compensation** (An et al., AAAI 2024, arXiv:2312.11983, "baseline bias compensation"): an
output projection y = W x + b whose input channels R are removed loses Σ_{j∈R} W[:, j] x_j. Its
mean over the calibration tokens, Σ_{j∈R} W[:, j] x̄_j, is added to b (a zero bias is created when
the layer has none), so the projection's mean output on the calibration data is unchanged; only
the removed channels' fluctuation around their means is lost, which is exactly what FLAP's scores
measure. A unit whose weights are already zero contributes nothing either way, so removing it
changes nothing (the exactness test).

:func:`resize_units_` is the shared primitive: it rebuilds one module type from a list of old unit
indices, ``None`` meaning a zero unit (used to pad blocks to a common shape for saving; a zero KV
group contributes exactly nothing: zero q and k give uniform attention over zero values, and its
o_proj columns are zero).
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from ebft.errors import EbftError
from ebft.stats import LayerStats
from ebft.structured.flap import Structure
from ebft.structured.layout import ATTENTION, KINDS, MLP, BlockLayout, block_layout

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
_KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
_WIDTH_ATTRS = ("intermediate_size", "ffn_dim")


@torch.no_grad()
def shrink_block_(block: nn.Module, config, structure: Structure,
                  stats: Mapping[str, LayerStats] | None = None) -> BlockLayout:
    """Remove the units ``structure`` drops from the dense ``block``; return the new layout.

    ``stats`` (keyed by linear name, with ``mean``) turns on bias compensation for the output
    projections; None turns it off. ``config`` is the model's config (read, never changed).
    """
    layout = block_layout(block, config)
    for kind in KINDS:
        units = layout.units(kind)
        expected = structure.attention_units if kind == ATTENTION else structure.mlp_units
        if units.count != expected:
            raise EbftError(f"structured pruning: the block has {units.count} {kind} units but the structure "
                            f"was chosen for {expected} (already shrunk, or a different block?)")
    for kind in KINDS:
        keep = structure.keep(kind)
        if stats is not None:
            units = layout.units(kind)
            if units.out_proj not in stats:
                raise ValueError(f"bias compensation needs the input statistics of {units.out_proj!r}")
            removed = sorted(set(range(units.count)) - set(keep))
            compensate_bias_(block.get_submodule(units.out_proj), stats[units.out_proj].mean,
                             [c for u in removed for c in units.cols.span(u)])
        resize_units_(block, layout, kind, list(keep))
    return block_layout(block, config)


@torch.no_grad()
def compensate_bias_(linear: nn.Linear, mean: torch.Tensor, removed: Sequence[int]) -> None:
    """b += W[:, removed] · mean[removed]; creates a zero bias when there is none."""
    w = linear.weight
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                   requires_grad=w.requires_grad)
    if not removed:
        return
    idx = torch.as_tensor(removed, dtype=torch.long, device=w.device)
    shift = w.index_select(1, idx).float() @ mean.to(w.device, torch.float32).index_select(0, idx)
    linear.bias.add_(shift.to(linear.bias.dtype))


@torch.no_grad()
def resize_units_(block: nn.Module, layout: BlockLayout, kind: str, units: Sequence[int | None]) -> None:
    """Rebuild ``kind``'s units of ``block`` as ``units``: each entry an old unit index or None for a
    zero unit. Updates the head/width attributes the forward reads."""
    group = layout.units(kind)
    if not units:
        raise EbftError(f"structured pruning: cannot remove every {kind} unit of a block")
    rows_by_linear: dict[str, list[int]] = {}
    for section in group.rows:  # sections of one fused linear are concatenated in their order
        rows_by_linear.setdefault(section.linear, []).extend(_indices(section, units))
    for name, rows in rows_by_linear.items():
        linear = block.get_submodule(name)
        covered = sum(s.width * group.count for s in group.rows if s.linear == name)
        if covered != linear.out_features:
            raise AssertionError(f"{name}: sections cover {covered} of {linear.out_features} rows")
        _take_(linear, rows, dim=0)
    _take_(block.get_submodule(group.cols.linear), _indices(group.cols, units), dim=1)
    module = block.get_submodule(group.module) if group.module else block
    if kind == ATTENTION:
        heads, kv_heads = len(units) * layout.group_size, len(units)
        _set_ints(module, _HEAD_ATTRS, heads)
        _set_ints(module, _KV_ATTRS, kv_heads)
        if layout.fused_qkv and getattr(module, "config", None) is not None:
            module.config = copy.copy(module.config)  # private: its forward splits qkv by the config's counts
            _set_ints(module.config, ("num_attention_heads",), heads)
            _set_ints(module.config, ("num_key_value_heads",), kv_heads)
    elif kind == MLP and group.module:
        _set_ints(module, _WIDTH_ATTRS, len(units))


def _indices(section, units) -> list[int | None]:
    out: list[int | None] = []
    for u in units:
        out.extend(section.span(u) if u is not None else [None] * section.width)
    return out


def _take_(linear: nn.Linear, index: list[int | None], dim: int) -> None:
    """Keep rows (dim 0) or columns (dim 1) ``index`` of ``linear``, None giving zeros."""
    w = linear.weight
    src = torch.tensor([-1 if i is None else i for i in index], dtype=torch.long, device=w.device)
    have = src >= 0
    shape = (len(index), w.shape[1]) if dim == 0 else (w.shape[0], len(index))
    new = torch.zeros(shape, dtype=w.dtype, device=w.device)
    if dim == 0:
        new[have] = w.detach().index_select(0, src[have])
    else:
        new[:, have] = w.detach().index_select(1, src[have])
    linear.weight = nn.Parameter(new, requires_grad=w.requires_grad)
    if dim == 0:
        linear.out_features = len(index)
        if linear.bias is not None:
            b = linear.bias
            new_b = torch.zeros(len(index), dtype=b.dtype, device=b.device)
            new_b[have] = b.detach().index_select(0, src[have])
            linear.bias = nn.Parameter(new_b, requires_grad=b.requires_grad)
    else:
        linear.in_features = len(index)


def _set_ints(obj, names, value: int) -> None:
    for name in names:
        if isinstance(getattr(obj, name, None), int) and not isinstance(getattr(obj, name), bool):
            setattr(obj, name, value)
