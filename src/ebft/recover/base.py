"""The recovery contract and registry: what a recovery declares and what it is handed.

A *block-scope* recovery is ``fn(ctx: BlockContext, settings) -> dict``: it changes the kept weights
of one pruned block (already on its device) so that the block's outputs on ``ctx.inputs`` come
closer to ``ctx.targets``. It never changes a mask (unless it is a mask-tuning method), never moves
the block, never loops over blocks. The returned dict is merged into the block's record in
``run.json``. ``ctx.forward(x)`` calls the block with the arguments it really receives.

A mask-tuning method (``changes_masks=True``) may replace entries of ``ctx.masks`` in place
(``ctx.masks[name] = new_mask``) and must leave each linear's weight zero wherever its new mask is
False; the walk re-checks the updated masks. It gets ``ctx.dense_weights`` (name -> the fp32 weight
before pruning: grown weights take their dense value) and ``ctx.pattern`` (every new mask must follow it).

A *model-scope* recovery (``scope="model"``, e.g. LoRA) is not block-wise: the walk only prunes, then
the pipeline calls ``fn(ctx: ModelContext, settings) -> dict`` once on the whole pruned model. It must
leave every masked weight exactly zero.

``settings`` is an instance of the recovery's own settings dataclass (fields declared with
:func:`ebft.settings.option`): its fields are the flags, the YAML keys under ``recover:`` and what an
``ebft sweep`` cell of this method is keyed on — a recovery sees only its own settings, so tuning one
method never reruns another's cells. Statistics the recovery reads (``needs``) are collected by the
walk in its one dense pass over the block, together with the pruner's, and handed over in ``ctx.stats``.
The run's seed is ``ctx.seed``: every random draw of a recovery derives from it.

**What a registration declares** — everything the walk, the estimator (``ebft plan``), the CLI and
sweeps read about a recovery, so that adding one is one module:

- ``settings``: its settings dataclass (flags, YAML keys, validation, sweep keys);
- ``target``: what each block is trained towards — ``"dense-block"`` (the dense block on the chain's
  inputs), ``"dense-model"`` (the dense model's own activations), a function of the settings that
  returns one of these (EBFT: its ``target`` setting), or None for a recovery that needs no targets;
- ``needs``: the input statistics the walk's dense pass collects for it (beside the pruner's), or a
  function of the settings that returns them (EBFT: the Hessian when ``refit`` is on);
- ``dense_weights``: whether it is handed ``ctx.dense_weights`` (the fp32 weights before pruning), or a
  function of the settings (a mask-tuning method always gets them);
- ``state_bytes``: bytes of optimiser state per trained parameter on the accelerator (the estimator's
  memory arithmetic; 0 for a recovery that does not train);
- ``window``: how many consecutive blocks one call trains together, a function of the settings (EBFT:
  its ``window`` setting; default 1). A window of K > 1 is handed to ``fn`` as one block whose
  linears, masks and statistics are named ``"<position>.<name>"`` (position 0 … K−1 in the window),
  called on the first block's inputs and trained towards the dense model's output after the last;
  it needs the ``dense-model`` target and a recovery that does not change masks;
- ``changes_masks``, ``scope`` (``"block"`` or ``"model"``), ``structured`` (whether it works on a
  structurally pruned model) and a one-line ``summary`` for ``--help``;
- ``text_windows`` (a model-scope recovery that trains on ``ctx.text``): how many windows it takes from
  the calibration text's draw, a function of its settings (LoRA: steps × batch + 4). ``--calib self``
  generates them with the calibration windows, on the dense model before the walk; without it the
  recovery cannot run with ``--calib self``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..data import VALIDATION_SOURCES, calibration_windows
from ..errors import ConfigError, EbftError
from ..settings import Needs, claim_flags, option, register, unregister
from ..stats import STAT_KINDS
from .recipes import DEFAULT_RECIPE, RECIPES

TARGETS = ("dense-block", "dense-model")


@dataclass
class BlockContext:
    """Everything a block-scope recovery may read (and, for masks and weights, change)."""

    index: int  # the block's position in the model
    block: nn.Module  # on the device
    linears: dict[str, nn.Linear]  # the pruned linears, by name inside the block
    inputs: torch.Tensor  # [N, S, H] the calibration chain's inputs to this block
    targets: torch.Tensor | None  # [N, S, H] what the block should output (None if not ``needs_targets``)
    masks: dict[str, torch.Tensor]  # name -> bool keep mask
    stats: dict  # name -> LayerStats of the linear's inputs (dense block, chain inputs), as ``needs`` asks
    pattern: object  # ebft.masks.Pattern of this block
    io: object  # ebft.walk.BlockIO: how the block is called, device, batch size
    seed: int = 0
    dense_weights: dict[str, torch.Tensor] | None = None  # for ``changes_masks`` and ``dense_weights`` recoveries
    progress: Callable[..., None] | None = None
    # seconds this block's training may take (``--recover-budget``: the budget left, shared over the
    # blocks left); None: no time limit, the settings' epochs run
    time_share: float | None = None

    @property
    def device(self) -> torch.device:
        return self.io.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.io.call(self.block, x)

    def report(self, event: str, **info) -> None:
        if self.progress is not None:
            self.progress(event, **info)


@dataclass
class ModelContext:
    """What a model-scope recovery gets: the whole pruned model and where to draw training text."""

    model: nn.Module
    tokenizer: object
    masks: dict[str, torch.Tensor]  # full linear name -> keep mask
    text: "TrainingText"
    device: torch.device
    seed: int = 0
    progress: Callable[..., None] | None = None

    def report(self, event: str, **info) -> None:
        if self.progress is not None:
            self.progress(event, **info)


@dataclass
class NoSettings:
    """A recovery without options."""


@dataclass(frozen=True)
class Recovery:
    name: str
    fn: Callable
    settings: type = NoSettings  # the recovery's settings dataclass
    target: str | Callable | None = "dense-block"  # see the module docstring
    changes_masks: bool = False  # mask tuning: may update ``ctx.masks``; gets ``ctx.dense_weights``
    scope: str = "block"  # "block": called per block inside the walk | "model": once, after the walk
    needs: frozenset[str] | Callable = frozenset()  # LayerStats kinds the walk collects for it (or settings -> them)
    dense_weights: bool | Callable = False  # hand it ``ctx.dense_weights`` (or settings -> whether to)
    structured: bool = True  # False: refuses structured (shape-changing) pruning
    state_bytes: int = 0  # optimiser state per trained parameter (the estimator's arithmetic)
    summary: str = ""  # one line for --help
    window: Callable | None = None  # settings -> blocks trained together (None: 1)
    text_windows: Callable | None = None  # settings -> windows it takes from ctx.text (model scope)

    def target_of(self, settings) -> str | None:
        """What each block is trained towards with these settings: dense-block, dense-model, or None."""
        target = self.target(settings) if callable(self.target) else self.target
        if target is not None and target not in TARGETS:
            raise ValueError(f"recovery {self.name!r}: target {target!r} is not one of {TARGETS}")
        return target

    def needs_of(self, settings) -> frozenset[str]:
        """The input statistics the walk collects for it with these settings."""
        return frozenset(self.needs(settings) if callable(self.needs) else self.needs)

    def wants_dense_weights(self, settings) -> bool:
        """Whether it is handed the dense weights (``ctx.dense_weights``) with these settings."""
        return self.changes_masks or bool(self.dense_weights(settings) if callable(self.dense_weights)
                                          else self.dense_weights)

    def window_of(self, settings) -> int:
        """How many consecutive blocks one call trains together with these settings (1: each alone)."""
        return 1 if self.window is None else int(self.window(settings))

    def check_window(self, settings) -> None:
        """Refuse a joint window this recovery cannot train: it needs the dense model's output as the target
        (the dense blocks on the sparse chain's inputs give one block's target, not a window's) and fixed masks."""
        k = self.window_of(settings)
        if k == 1:
            return
        flag = "--recover-window (recover.window)"
        if self.changes_masks:
            raise ConfigError(flag, k, f"recovery {self.name!r} changes masks block by block; a joint window needs "
                              "fixed masks: use window 1")
        if self.target_of(settings) != "dense-model":
            raise ConfigError(flag, k, "a window is trained towards the dense model's output after its last block: "
                              "add --target dense-model (the best recipe's), or use window 1")

    @property
    def needs_targets(self) -> bool:
        return self.target is not None

    @property
    def guardable(self) -> bool:
        """Whether the end-to-end guard can check this recovery: it changes blocks inside the walk."""
        return self.scope == "block" and self.name != "none"

    @property
    def trains_blocks(self) -> bool:
        """Whether it trains each block against targets (what ``--recover-budget`` times)."""
        return self.scope == "block" and self.needs_targets

    def default_settings(self):
        return self.settings()


RECOVERIES: dict[str, Recovery] = {}

SECTION_BASE = [
    ("method", str, option("ebft", "recovery: {choices} — {summaries}", flag="--recover",
                           choices=lambda: tuple(sorted(RECOVERIES)))),
    ("recipe", str, option(DEFAULT_RECIPE, "block-training settings not given explicitly come from: {choices} "
                           "(best: what ebft measured to recover the most; paper: the EBFT reference code's values, "
                           "to compare with the paper)", choices=tuple(RECIPES))),
    ("guard", int, option(4, "held-out windows of the calibration text on which the recovered model must do no "
                          "worse end to end than the model pruning alone gives (a --recover none run's), else that "
                          "one is kept (0: no check)", low=0,
                          high=4096, flag="--recover-guard", metavar="WINDOWS", keyed="set")),
    ("guard_texts", list[str], option([], "further texts the guard checks (the recovered model must do no worse on "
                                      "each, else pruning alone's model is kept): WINDOWS windows of the "
                                      f"evaluation length from each; {', '.join(VALIDATION_SOURCES)}: their "
                                      "validation split; a file: as written (a validation split, never an --eval "
                                      "text)",
                                      flag="--recover-guard-on", metavar="TEXT", keyed="set")),
    ("budget", str | None, option(None, "time for the block-wise training of all blocks, e.g. 90s, 10m, 1.5h: each "
                                  "block gets what is left over the blocks left, and as many epochs as fit in it "
                                  "run (--epochs becomes a cap; at least one); not bit-reproducible",
                                  flag="--recover-budget", metavar="TIME", default_text="none: the epochs decide", keyed="set",
                                  needs=Needs("recover.method", lambda method: method in RECOVERIES
                                              and RECOVERIES[method].trains_blocks, "a recovery that trains blocks"))),
]
claim_flags(SECTION_BASE, "recover", "the recover section")



def register_recovery(name: str, settings: type = NoSettings, target: str | Callable | None = "dense-block",
                      changes_masks: bool = False, scope: str = "block", needs=(), structured: bool = True,
                      state_bytes: int = 0, summary: str = "", window: Callable | None = None,
                      text_windows: Callable | None = None, dense_weights: bool | Callable = False):
    """Decorator: add ``fn`` to :data:`RECOVERIES` under ``name``, with what it declares."""
    if scope not in ("block", "model"):
        raise ValueError(f"recovery {name!r}: scope must be 'block' or 'model'")
    if not callable(needs) and not set(needs) <= set(STAT_KINDS):
        raise ValueError(f"recovery {name!r}: unknown statistics {sorted(set(needs) - set(STAT_KINDS))}")
    if not (target is None or callable(target) or target in TARGETS):
        raise ValueError(f"recovery {name!r}: target must be None, a function of the settings, or one of {TARGETS}")

    def wrap(fn):
        register("recovery", RECOVERIES, name, fn, settings, "recover", SECTION_BASE,
                 lambda: Recovery(name, fn, settings, target, changes_masks, scope,
                                  needs if callable(needs) else frozenset(needs), dense_weights, structured,
                                  state_bytes, summary, window, text_windows))
        return fn
    return wrap


def unregister_recovery(name: str) -> None:
    """Remove a registered recovery (a plugin or a test that registered its own)."""
    unregister("recovery", RECOVERIES, name)


@dataclass(frozen=True)
class TrainingText:
    """Where a model-scope recovery (and the finish) draws its training windows: the calibration source's
    train split; with ``--calib self``, ``drawn``: the windows the dense model generated before the walk."""

    source: str
    seqlen: int
    seed: int = 0
    drawn: torch.Tensor | None = field(default=None, compare=False, repr=False)  # [N, seqlen], --calib self

    def windows(self, tokenizer, n: int) -> torch.Tensor:
        """``[n, seqlen]`` random windows (same draw as the calibration windows: the first ones coincide);
        with ``drawn``, its first ``n``."""
        if self.drawn is None:
            return calibration_windows(tokenizer, self.source, n, self.seqlen, self.seed)
        if n > len(self.drawn):  # a consumer that did not declare what it takes (RunConfig.windows_drawn)
            raise EbftError(f"calib self: {n} windows asked of the {len(self.drawn)} generated before the walk; a "
                            "model-scope recovery declares the windows it takes (text_windows)")
        return self.drawn[:n]


def get_recovery(name: str) -> Recovery:
    if name not in RECOVERIES:
        raise ConfigError("recover", name, f"allowed: {', '.join(sorted(RECOVERIES))}")
    return RECOVERIES[name]
