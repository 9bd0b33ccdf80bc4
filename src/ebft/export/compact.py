"""A structurally pruned model, compacted: each block back to the units it really uses.

A model saved by ebft after adaptive FLAP is zero-padded to one block shape (transformers builds every
block from one config); the padding is whole KV groups and MLP channels whose output-projection columns
(o_proj, down_proj) are all zero. Such a unit contributes exactly nothing to the block's output — its
heads' outputs (or its channel's activation) are multiplied by zero columns — so removing it is exact,
whatever its q/k/v or gate/up rows hold. :func:`compact_` removes them in place, block by block (each
block's own head counts are set, so the compacted model still runs in transformers), and returns the
per-layer sizes a format with per-layer sizes (llama.cpp's ``deci``) writes.

Two units are always kept, even if all zero (llama.cpp reads the shapes, not the values): one KV group
per block (an attention-free layer would drop its output projection's bias) and one MLP channel (a
layer with ``n_ff = 0`` silently loses its attention output in llama.cpp). ``multiple`` pads each MLP
width with zero channels to a multiple (quantized formats quantize rows in blocks of 32: exact).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models import find_blocks
from ..structured import ATTENTION, MLP, block_layout, resize_units_


@dataclass(frozen=True)
class LayerSize:
    """One block's attention and MLP sizes."""

    heads: int
    kv_heads: int
    ffn: int


def live_units(block: nn.Module, config) -> dict[str, list[int]]:
    """``{ATTENTION: kept KV groups, MLP: kept channels}``: the units whose output-projection columns are
    not all zero (at least one of each)."""
    layout = block_layout(block, config)
    out = {}
    for kind in (ATTENTION, MLP):
        units = layout.units(kind)
        weight = block.get_submodule(units.cols.linear).weight.detach()
        alive = [u for u in range(units.count)
                 if bool(weight[:, list(units.cols.span(u))].ne(0).any())]
        out[kind] = alive or [0]
    return out


def layer_sizes(model: nn.Module) -> list[LayerSize]:
    """Every block's sizes as it is now."""
    sizes = []
    for block in find_blocks(model)[1]:
        layout = block_layout(block, model.config)
        sizes.append(LayerSize(layout.num_heads, layout.num_kv_heads, layout.intermediate_size))
    return sizes


def compacted_sizes(model: nn.Module, multiple: int = 1) -> list[LayerSize]:
    """The per-layer sizes :func:`compact_` would give, without changing anything."""
    sizes = []
    for block in find_blocks(model)[1]:
        alive, layout = live_units(block, model.config), block_layout(block, model.config)
        kv, ffn = len(alive[ATTENTION]), len(alive[MLP])
        sizes.append(LayerSize(kv * layout.group_size, kv, ffn + (-ffn % multiple)))
    return sizes


@torch.no_grad()
def compact_(model: nn.Module, multiple: int = 1, drop: bool = True) -> list[LayerSize]:
    """Remove every unit that contributes nothing, block by block (in place, exact; ``drop=False``: keep
    every unit); pad MLP widths with zero channels to a multiple of ``multiple``. Returns the per-layer
    sizes."""
    for block in find_blocks(model)[1]:
        layout = block_layout(block, model.config)
        alive = live_units(block, model.config) if drop else {
            ATTENTION: list(range(layout.num_kv_heads)), MLP: list(range(layout.intermediate_size))}
        if len(alive[ATTENTION]) < layout.num_kv_heads:
            resize_units_(block, layout, ATTENTION, alive[ATTENTION])
        layout = block_layout(block, model.config)
        channels: list[int | None] = list(alive[MLP])
        channels += [None] * (-len(channels) % multiple)
        if channels != list(range(layout.intermediate_size)):
            resize_units_(block, layout, MLP, channels)
    return layer_sizes(model)


def uniform(sizes: list[LayerSize]) -> bool:
    return len(set(sizes)) == 1
