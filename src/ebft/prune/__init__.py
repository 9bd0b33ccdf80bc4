"""Pruners, registered by name.

A pruner is a pure function ``fn(weight, stats, pattern, settings) -> PruneResult``:

- ``weight``: the layer's ``[out, in]`` fp32 weight; never modified in place;
- ``stats``: the :class:`ebft.stats.LayerStats` of the layer's inputs (those named in ``needs``),
  or None for a pruner that needs none;
- ``pattern``: the :class:`ebft.masks.Pattern` the mask must follow exactly;
- ``settings``: an instance of the pruner's own settings dataclass (declared with
  :func:`ebft.settings.option`; its fields become flags and YAML keys under ``prune:``).

It returns the keep mask and, when it changes the kept weights (SparseGPT), the new weight with
exact zeros where pruned. Devices, dtypes and the walk over blocks belong to the orchestrator.

A *structured* pruner (``structured=True``, FLAP) removes whole units instead of masking weights:
the planning pass chooses a :class:`ebft.structured.Structure` per block, and the walk calls
``fn(block, model_config, structure, stats, settings)``, which shrinks the block in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ebft.errors import ConfigError
from ebft.masks import SCOPES, Pattern
from ebft.stats import STAT_KINDS, LayerStats


@dataclass(frozen=True)
class PruneResult:
    mask: torch.Tensor  # bool [out, in], True = keep
    weight: torch.Tensor | None = None  # the updated weight, or None when the weight is unchanged


@dataclass
class NoSettings:
    """A pruner without options."""


@dataclass(frozen=True)
class Pruner:
    name: str
    fn: Callable[..., PruneResult]
    needs: frozenset[str] = frozenset()  # which LayerStats the walk must collect
    default_scope: str = "row"  # unstructured scope when the config names none
    settings: type = NoSettings  # the pruner's settings dataclass
    structured: bool = False  # removes whole units: fn(block, config, structure, stats, settings), no masks

    def default_settings(self):
        return self.settings()

    def __call__(self, weight: torch.Tensor, stats: LayerStats | None, pattern: Pattern, settings=None) -> PruneResult:
        return self.fn(weight, stats, pattern, self.settings() if settings is None else settings)


PRUNERS: dict[str, Pruner] = {}


def register_pruner(name: str, needs=(), default_scope: str = "row", settings: type = NoSettings,
                    structured: bool = False):
    """Decorator: add ``fn`` to :data:`PRUNERS` under ``name``."""
    needs = frozenset(needs)
    if not needs <= set(STAT_KINDS):
        raise ValueError(f"pruner {name!r}: unknown statistics {sorted(needs - set(STAT_KINDS))}")
    if default_scope not in SCOPES:
        raise ValueError(f"pruner {name!r}: default_scope must be one of {SCOPES}")

    def register(fn):
        if name in PRUNERS:
            raise ValueError(f"pruner {name!r} is registered twice")
        PRUNERS[name] = Pruner(name, fn, needs, default_scope, settings, structured)
        return fn

    return register


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise ConfigError("method", name, f"allowed: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


def require_stats(stats: LayerStats | None, attr: str, pruner: str) -> LayerStats:
    """The orchestrator collects what ``needs`` says; missing statistics are a wiring bug."""
    if stats is None or getattr(stats, attr) is None:
        raise ValueError(f"pruner {pruner!r} needs LayerStats with {attr!r}; collect its `needs`")
    return stats


# Importing the modules registers them (kept last: they import the names above).
from ebft.prune import flap, magnitude, sparsegpt, wanda  # noqa: E402,F401
