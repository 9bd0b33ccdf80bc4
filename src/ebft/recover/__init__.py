"""Recoveries, registered by name.

A recovery is ``fn(block, inputs, targets, masks, linears, io, settings, index, progress) -> dict`` that
changes the kept weights of one pruned block (already on its device) so that the block's outputs on
``inputs`` come closer to ``targets``. It never changes a mask (unless it is a mask-tuning method),
never moves the block, never loops over blocks. The returned dict is merged into the block's record
in ``run.json``. ``io.call(block, x)`` calls the block with the keyword arguments it expects.

A mask-tuning method (``changes_masks=True``) may replace entries of ``masks`` in place
(``masks[name] = new_mask``) and must leave each linear's weight zero wherever its new mask is
False; the walk re-checks the updated masks. It also receives ``dense_weights`` (name -> the fp32
weight before pruning, on the block's device: grown weights take their dense value) and ``pattern``
(the :class:`ebft.masks.Pattern` every new mask must follow).

A *model-scope* recovery (``scope="model"``, e.g. LoRA) is not block-wise: the walk only prunes,
then :func:`ebft.api.run` calls ``fn(model, tokenizer, masks, settings, text, device, progress) -> dict``
once on the whole pruned model (``masks``: full linear name -> mask; ``text``: a
:class:`TrainingText` to draw training windows from). It must leave every masked weight exactly zero.

Each recovery declares ``options``: the :class:`ebft.config.RecoverConfig` fields it reads (directly
or through shared helpers; undeclared = any of them). ``ebft sweep`` keys a cell on those only, so tuning one method's options
never re-runs another method's finished cells; ``tests/test_sweep.py`` checks the declarations by
recording every field each recovery actually reads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Recovery:
    name: str
    fn: Callable
    needs_targets: bool
    changes_masks: bool = False  # mask-tuning: may update ``masks``; gets ``dense_weights`` and ``pattern``
    scope: str = "block"  # "block": called per block inside the walk | "model": once, after the walk
    options: tuple[str, ...] | None = None  # the RecoverConfig fields it reads; None: maybe any of them


RECOVERIES: dict[str, Recovery] = {}


def register_recovery(name: str, needs_targets: bool = True, changes_masks: bool = False, scope: str = "block",
                      options: tuple[str, ...] | None = None):
    def wrap(fn):
        RECOVERIES[name] = Recovery(name, fn, needs_targets, changes_masks, scope,
                                    None if options is None else tuple(options))
        return fn
    return wrap


@dataclass(frozen=True)
class TrainingText:
    """Where a model-scope recovery draws its training windows: the calibration source's train split."""

    source: str
    seqlen: int
    seed: int = 0

    def windows(self, tokenizer, n: int) -> torch.Tensor:
        """``[n, seqlen]`` random windows (same draw as the calibration windows: the first ones coincide)."""
        from ..data import calibration_windows

        return calibration_windows(tokenizer, self.source, n, self.seqlen, self.seed)


def get_recovery(name: str) -> Recovery:
    if name not in RECOVERIES:
        raise ConfigError("recover", name, f"allowed: {', '.join(sorted(RECOVERIES))}")
    return RECOVERIES[name]


@register_recovery("none", needs_targets=False, options=())
def no_recovery(block, inputs, targets, masks, linears, io, settings, index=0, progress=None) -> dict:
    """Keep the pruned weights as they are."""
    return {}


from . import dsnot, ebft, mask_tuning  # noqa: E402,F401  (registers)
from . import lora  # noqa: E402,F401  (registers)
