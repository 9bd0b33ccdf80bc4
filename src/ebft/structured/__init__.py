"""Structured pruning with FLAP: remove whole KV groups and MLP channels, physically.

An, Zhao, Yu, Tang, Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024, arXiv:2312.11983.

The pure core, in the order a run uses it (the walk owns blocks, devices and the calibration data):

1. :func:`block_layout` (``layout.py``) — where a block's units are: its KV groups (k and v rows of
   a KV head, q rows of its g query heads, the matching o_proj columns) and MLP channels.
2. plan, on a dense pass: collect :class:`ebft.stats.LayerStats` with needs :data:`STATS_NEEDED`
   on the inputs of each block's ``layout.attention.out_proj`` and ``layout.mlp.out_proj``;
   :func:`block_scores` (``flap.py``) turns them into standardised unit scores per block, and
   :func:`select_structure` picks one :class:`Structure` per block for a ratio of block parameters,
   ``uniform`` (FLAP's UL-UM) or ``adaptive`` (AL-AM, the paper's default).
3. walk: :func:`shrink_block_` (``surgery.py``) removes the units in place, with FLAP's bias
   compensation from the same statistics' means.
4. save: :func:`make_saveable_` (``saving.py``) pads blocks to one shape the family's config can
   express, sets the bias flags and updates the config, so ``save_pretrained`` gives a folder that
   plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads; :func:`save_shape` reports
   that shape and its cost without changing anything.
"""
from ebft.structured.flap import (METRICS, MODES, STATS_NEEDED, Structure, UnitScores, block_scores,
                                  channel_scores, removed_fraction, select_structure, standardise)
from ebft.structured.layout import ATTENTION, MLP, BlockLayout, Section, Units, block_layout
from ebft.structured.saving import SaveShape, bias_slot_problem, check_layouts, make_saveable_, save_shape
from ebft.structured.surgery import compensate_bias_, resize_units_, shrink_block_

__all__ = [
    "ATTENTION", "MLP", "METRICS", "MODES", "STATS_NEEDED",
    "BlockLayout", "Section", "Units", "block_layout",
    "UnitScores", "Structure", "channel_scores", "standardise", "block_scores", "select_structure",
    "removed_fraction",
    "shrink_block_", "compensate_bias_", "resize_units_",
    "SaveShape", "save_shape", "make_saveable_", "bias_slot_problem", "check_layouts",
]
