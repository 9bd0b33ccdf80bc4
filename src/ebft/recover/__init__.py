"""Recoveries, registered by name.

A recovery is ``fn(block, inputs, targets, masks, linears, io, settings, index, progress) -> dict`` that
changes the kept weights of one pruned block (already on its device) so that the block's outputs on
``inputs`` come closer to ``targets``. It never changes a mask (unless it is a mask-tuning method),
never moves the block, never loops over blocks. The returned dict is merged into the block's record
in ``run.json``. ``io.call(block, x)`` calls the block with the keyword arguments it expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError


@dataclass(frozen=True)
class Recovery:
    name: str
    fn: Callable
    needs_targets: bool


RECOVERIES: dict[str, Recovery] = {}


def register_recovery(name: str, needs_targets: bool = True):
    def wrap(fn):
        RECOVERIES[name] = Recovery(name, fn, needs_targets)
        return fn
    return wrap


def get_recovery(name: str) -> Recovery:
    if name not in RECOVERIES:
        raise ConfigError("recover", name, f"allowed: {', '.join(sorted(RECOVERIES))}")
    return RECOVERIES[name]


@register_recovery("none", needs_targets=False)
def no_recovery(block, inputs, targets, masks, linears, io, settings, index=0, progress=None) -> dict:
    """Keep the pruned weights as they are."""
    return {}


from . import ebft  # noqa: E402,F401  (registers)
