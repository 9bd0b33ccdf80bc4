"""The pruner contract and registry: what a pruner declares, and how a block is pruned with it.

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
the allocation pass chooses a :class:`ebft.structured.Structure` per block, and the walk calls
``fn(block, model_config, structure, stats, settings)``, which shrinks the block in place.

The registration is everything the rest of ebft reads about a pruner: its settings (flags, YAML
keys, sweep keys), the statistics the walk collects for it (``needs``; the estimator sizes them),
its default scope, and whether it is structured. :meth:`Pruner.prune_block` and
:meth:`Pruner.check_block` are how the walk applies and checks it, whatever kind it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import logging

import torch
from torch import nn

from ..allocation import AllocationSettings
from ..errors import ConfigError, EbftError
from ..masks import SCOPES, MaskError, Pattern, check_mask, check_weight, validate_width
from ..models import find_blocks, find_linears
from ..settings import claim_flags, option, register, unregister
from ..stats import STAT_KINDS, LayerStats
from ..structured import bias_slot_problem, block_layout, check_layouts, make_saveable_, shrink_block_

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneResult:
    mask: torch.Tensor  # bool [out, in], True = keep
    weight: torch.Tensor | None = None  # the updated weight, or None when the weight is unchanged


@dataclass
class NoSettings:
    """A pruner without options."""


@dataclass(frozen=True)
class BlockSite:
    """Where a block is pruned: its index and full name, the model's config, its pattern and (structured
    pruning) the structure the allocation chose for it."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    config: object
    pattern: Pattern
    structure: object = None  # ebft.structured.Structure


@dataclass(frozen=True)
class Pruner:
    name: str
    fn: Callable[..., PruneResult]
    needs: frozenset[str] = frozenset()  # which LayerStats the walk must collect
    default_scope: str = "row"  # unstructured scope when the config names none
    settings: type = NoSettings  # the pruner's settings dataclass
    structured = False  # removes whole units (see StructuredPruner)

    def default_settings(self):
        return self.settings()

    def __call__(self, weight: torch.Tensor, stats: LayerStats | None, pattern: Pattern, settings=None) -> PruneResult:
        return self.fn(weight, stats, pattern, self.settings() if settings is None else settings)

    def prune_block(self, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, LayerStats],
                    site: BlockSite, settings) -> tuple[dict[str, torch.Tensor], dict]:
        """Choose and apply a mask (and, for SparseGPT, new kept weights) for each linear; check them.
        Returns ``(masks by linear name, record)``."""
        masks = {}
        for name, linear in linears.items():
            full = f"{site.prefix}.{name}"
            result = self(linear.weight.data.float(), stats.get(name), site.pattern, settings)
            weight = linear.weight.data if result.weight is None else result.weight.to(linear.weight.dtype)
            if not isinstance(result.mask, torch.Tensor):
                raise EbftError(f"pruner {self.name!r}: {full}: returned a {type(result.mask).__name__} as its mask, "
                                "not a tensor")
            linear.weight.data = weight * result.mask.to(weight.device, weight.dtype)
            masks[name] = result.mask
        self.check_block(block, linears, masks, site)
        return masks, {}

    def check_block(self, block: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor],
                    site: BlockSite, by: str | None = None) -> None:
        """Every mask follows the pattern, every masked weight is exactly zero and every weight is finite;
        else one line naming the layer and ``by`` (what changed the block last; default: this pruner), so that
        a plugin's mistake is caught where it is made."""
        try:
            for name, mask in masks.items():
                full = f"{site.prefix}.{name}"
                check_mask(mask, site.pattern, full)
                check_weight(linears[name].weight.data, mask, full)
            for name, linear in linears.items():
                if not torch.isfinite(linear.weight.data).all():
                    raise MaskError(f"layer {site.prefix}.{name}: its weights hold NaN or infinity")
        except MaskError as error:
            raise EbftError(f"{by or f'pruner {self.name!r}'}: {error}") from None

    def restore_shape(self, block: nn.Module, site: BlockSite) -> None:
        """Give a dense block the shape this pruner left it in (resuming from a checkpoint): nothing to do."""

    def check_model(self, model: nn.Module, pattern: Pattern, layers: str | None, settings) -> dict:
        """What can only be checked on the loaded model, before any work: every block has linears to prune
        (a ``layers`` regex that matches none is an error, not a silent no-op) and N:M widths divide.
        Returns the settings it resolved from the model (``auto`` values), for the run's config."""
        _, blocks = find_blocks(model)
        for index, block in enumerate(blocks):
            linears = find_linears(block, layers)
            if not linears:
                if layers is not None:
                    names = ", ".join(find_linears(block)) or "none"
                    raise ConfigError("prune.layers", layers, f"matches no linear in block {index}; its linears: {names}")
                raise EbftError(f"{type(model).__name__}: block {index} has no nn.Linear layers to prune "
                                f"(this family's layers are {type(block).__name__} internals ebft cannot prune)")
            for name, linear in linears.items():
                validate_width(linear.in_features, pattern, name)
        return {}

    def make_saveable(self, model: nn.Module) -> dict | None:
        """Make the pruned model saveable as a plain model of its family; what that did (None: nothing to do)."""
        return None


@dataclass(frozen=True)
class StructuredPruner(Pruner):
    """A pruner that removes whole KV groups and MLP channels (``fn(block, config, structure, stats,
    settings)``); there are no masks: the block's linears are smaller."""

    structured = True

    def prune_block(self, block, linears, stats, site, settings):
        self.fn(block, site.config, site.structure, stats, settings)
        self.check_block(block, linears, {}, site)
        layout = block_layout(block, site.config)
        return {}, {"kv_groups_kept": layout.num_kv_heads, "channels_kept": layout.intermediate_size}

    def check_block(self, block, linears, masks, site, by: str | None = None) -> None:
        """The block has exactly the units its structure keeps (the structured twin of the mask checks), and
        finite weights; else one line naming the layer and ``by`` (default: this pruner)."""
        layout = block_layout(block, site.config)
        structure = site.structure
        if (layout.num_kv_heads, layout.intermediate_size) != (len(structure.attention_keep), len(structure.mlp_keep)):
            raise MaskError(f"{site.prefix}: {layout.num_kv_heads} KV groups and {layout.intermediate_size} "
                            f"channels, expected {len(structure.attention_keep)} and {len(structure.mlp_keep)}")
        super().check_block(block, linears, {}, site, by)

    def restore_shape(self, block, site) -> None:
        shrink_block_(block, site.config, site.structure, None)

    def check_model(self, model, pattern, layers, settings) -> dict:
        """The family's blocks can be shrunk, and saved with the biases compensation needs; ``auto`` bias
        compensation is decided here, from the family (returned, for the run's settings)."""
        check_layouts(model)
        compensate = getattr(settings, "bias_compensation", False)
        if compensate is None:
            why = bias_slot_problem(model)
            if why is not None:
                log.warning("%s: bias compensation off (%s); --bias-compensation insists and fails", self.name, why)
            return {"bias_compensation": why is None}
        if compensate:
            why = bias_slot_problem(model)
            if why is not None:
                raise ConfigError("--bias-compensation", True, f"{why}: pass --no-bias-compensation (or leave it "
                                  "unset: auto turns it off for such a family)")
        return {}

    def make_saveable(self, model) -> dict:
        """One block shape the family's config can express (adaptive: zero-padded to the largest block)."""
        params_pruned = sum(p.numel() for p in model.parameters())
        shape = make_saveable_(model)
        return {"params_pruned": params_pruned, "params_saved": shape.params_saved,
                "padding_params": shape.padding_params,
                "saved_config": {"num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
                                 "intermediate_size": shape.intermediate_size}}


PRUNERS: dict[str, Pruner] = {}

SECTION_BASE = [
    ("method", str, option("wanda", "pruner: {choices}", choices=lambda: tuple(sorted(PRUNERS)))),
    ("sparsity", float | None, option(None, "fraction of weights set to zero, in [0, 1); structured: the "
                                      "fraction of the blocks' parameters removed", low=0, high=1, high_open=True,
                                      default_text="0.5; implied by an N:M pattern; 0.2 structured")),
    ("pattern", str, option("unstructured", "unstructured; N:M keeping N of every M consecutive weights along "
                            "the input (2:4 is 50 %); or structured (whole heads and MLP channels removed, "
                            "with method flap; implied by it)")),
    ("scope", str | None, option(None, "unstructured ratio per output row or per layer: {choices}",
                                 choices=SCOPES, default_text="each pruner's own: {default_scopes}")),
    ("layers", str | None, option(None, "regex on linear names inside a block, e.g. mlp (never embeddings or "
                                  "lm_head)", default_text="all linears")),
]
claim_flags(SECTION_BASE, "prune", "the prune section")
claim_flags(AllocationSettings, "prune", "the allocation")



def register_pruner(name: str, needs=(), default_scope: str = "row", settings: type = NoSettings,
                    structured: bool = False):
    """Decorator: add ``fn`` to :data:`PRUNERS` under ``name``, with what it declares."""
    needs = frozenset(needs)
    if not needs <= set(STAT_KINDS):
        raise ValueError(f"pruner {name!r}: unknown statistics {sorted(needs - set(STAT_KINDS))}")
    if default_scope not in SCOPES:
        raise ValueError(f"pruner {name!r}: default_scope must be one of {SCOPES}")

    def register_fn(fn):
        kind = StructuredPruner if structured else Pruner
        register("pruner", PRUNERS, name, fn, settings, "prune", SECTION_BASE,
                 lambda: kind(name, fn, needs, default_scope, settings), shared=(AllocationSettings,))
        return fn

    return register_fn


def default_scopes() -> str:
    """Each unstructured pruner's declared ``default_scope``, by scope: ``wanda row, magnitude/sparsegpt layer``
    (``--scope``'s default in ``--help``)."""
    by_scope = {scope: sorted(n for n, p in PRUNERS.items() if not p.structured and p.default_scope == scope)
                for scope in SCOPES}
    return ", ".join(f"{'/'.join(names)} {scope}" for scope, names in by_scope.items() if names)


def unregister_pruner(name: str) -> None:
    """Remove a registered pruner (a plugin or a test that registered its own)."""
    unregister("pruner", PRUNERS, name)


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise ConfigError("method", name, f"allowed: {', '.join(sorted(PRUNERS))}")
    return PRUNERS[name]


def require_stats(stats: LayerStats | None, attr: str, pruner: str) -> LayerStats:
    """The orchestrator collects what ``needs`` says; missing statistics are a wiring bug."""
    if stats is None or getattr(stats, attr) is None:
        raise ValueError(f"pruner {pruner!r} needs LayerStats with {attr!r}; collect its `needs`")
    return stats
