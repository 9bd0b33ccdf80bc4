"""Make a structurally pruned model saveable as a plain config of its own family.

transformers builds every decoder block from one config: one head count, one MLP width, one set of
bias flags. So the saved model needs a single block shape that (a) is at least as large as every
pruned block, (b) the family's config class accepts (Llama and Gemma 2/3 require ``hidden_size``
to be a multiple of ``num_attention_heads``; OPT derives ``head_dim`` from ``hidden_size /
num_attention_heads``, so its head count cannot change at all) and (c) has a bias wherever a pruned
block has a nonzero one (FLAP's compensation puts biases on o_proj and down_proj).

:func:`save_shape` finds the smallest such shape by asking the family itself: it edits a copy of
the config, runs the config's own validation and builds the model on the meta device (no memory),
then reads the shapes back with :func:`~ebft.structured.layout.block_layout`. Bias flags are found
the same way: each boolean config field whose name contains "bias" (``attention_bias``,
``mlp_bias``, ``enable_bias``…) is switched on in turn to see which linears it gives a bias; only
flags that cover a needed bias are turned on, and the other linears those flags touch (Llama's
``attention_bias`` also gives q, k, v a bias) get zero biases. A family with no flag for a needed
bias (Mistral, Qwen2, Phi-3 have no o_proj/down_proj bias; Qwen3 and Gemma have none on down_proj)
is an error naming the way out: prune without bias compensation.

:func:`make_saveable_` then zero-pads each smaller block to that shape (exact: a zero KV group or
MLP channel contributes exactly nothing, see :mod:`ebft.structured.surgery`), adds and drops zero
biases as the flags require, and updates the model's config in place, so that
``model.save_pretrained`` writes a folder plain ``AutoModelForCausalLM.from_pretrained`` loads.

- ``uniform`` pruning: every block has the same shape, nothing is padded unless the family refuses
  the head count (then heads are padded to the next count it accepts).
- ``adaptive`` pruning: transformers 5.24 has a per-layer override mechanism in the config
  (``per_layer_config``, HeterogeneousConfigMixin), but the Llama, Mistral, Qwen, Gemma, Phi-3 and
  OPT model classes do not read it (building one raises AmbiguousGlobalPerLayerAttributeError), and
  no built-in family of this kind takes per-layer head counts or MLP widths. So blocks are padded
  to the largest one: the file is as large as the largest block times the number of blocks, and
  :class:`SaveShape` reports both counts (``params_in_memory`` vs ``params_saved``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ebft.errors import EbftError
from ebft.models import find_blocks
from ebft.structured.layout import ATTENTION, MLP, block_layout
from ebft.structured.surgery import resize_units_

_HEAD_KEYS = ("num_attention_heads",)
_KV_KEYS = ("num_key_value_heads",)
_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")


@dataclass(frozen=True)
class SaveShape:
    """The one block shape the saved config describes, and what it costs."""

    config: object  # a copy of the model's config with ``changes`` applied
    changes: dict = field(repr=False)  # config field -> value, applied in place by make_saveable_
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    bias_linears: frozenset  # linear names (relative to a block) that carry a bias when saved
    params_in_memory: int  # the pruned model as it is
    params_saved: int  # the model as saved: padding and zero biases included

    @property
    def padding_params(self) -> int:
        return self.params_saved - self.params_in_memory


def save_shape(model: nn.Module) -> SaveShape:
    """The smallest block shape the family's config can express that holds every block (pure)."""
    config = model.config
    _, blocks = find_blocks(model)
    layouts = [block_layout(b, config) for b in blocks]
    g, d = layouts[0].group_size, layouts[0].head_dim
    if any((lay.group_size, lay.head_dim) != (g, d) for lay in layouts):
        raise EbftError("structured pruning: blocks differ in head_dim or query heads per KV group")
    kv_needed = max(lay.num_kv_heads for lay in layouts)
    width = max(lay.intermediate_size for lay in layouts)
    nonzero_bias = {n for b in blocks for n, m in b.named_modules()
                    if isinstance(m, nn.Linear) and m.bias is not None and bool(m.bias.detach().ne(0).any())}

    family = getattr(config, "model_type", type(config).__name__)
    flags = _bias_flags(model, config, nonzero_bias, family)
    width_key = next((k for k in _WIDTH_KEYS if isinstance(getattr(config, k, None), int)), None)
    if width_key is None:
        raise EbftError(f"structured pruning: {family} config names no MLP width ({', '.join(_WIDTH_KEYS)})")
    has_kv_key = hasattr(config, "num_key_value_heads")
    if g > 1 and not has_kv_key:
        raise EbftError(f"structured pruning: {family} config has no num_key_value_heads for grouped heads")
    kv_original = (has_kv_key and config.num_key_value_heads) or config.num_attention_heads // g
    hidden = layouts[0].hidden_size
    refusals = []
    for kv in range(kv_needed, max(kv_original, kv_needed) + 1):  # the smallest head count the family accepts
        changes = {**flags, "num_attention_heads": kv * g, width_key: width}
        if has_kv_key:
            changes["num_key_value_heads"] = kv
        if hasattr(config, "head_dim") or hidden // (kv * g) != d:
            changes["head_dim"] = d  # families that derive it from hidden_size / heads would get it wrong
        candidate, why = _try(model, config, changes, kv, g, d, width)
        if candidate is not None:
            meta_model, saved = candidate
            bias_linears = frozenset(n for n, m in find_blocks(meta_model)[1][0].named_modules()
                                     if isinstance(m, nn.Linear) and m.bias is not None)
            in_memory = sum(p.numel() for p in model.parameters())
            params_saved = sum(p.numel() for p in meta_model.parameters())
            return SaveShape(saved, changes, kv * g, kv, width, bias_linears, in_memory, params_saved)
        refusals.append(f"{kv * g} heads: {why}")
    raise EbftError(f"structured pruning: no {family} config holds the pruned blocks ({'; '.join(refusals)})")


@torch.no_grad()
def make_saveable_(model: nn.Module) -> SaveShape:
    """Pad every block to :func:`save_shape`'s shape, match its biases and update ``model.config``
    in place; the model computes exactly what it did, and ``save_pretrained`` gives a plain folder."""
    shape = save_shape(model)
    config = model.config
    _, blocks = find_blocks(model)
    for block in blocks:
        layout = block_layout(block, config)
        for kind, target in ((ATTENTION, shape.num_kv_heads), (MLP, shape.intermediate_size)):
            count = layout.units(kind).count
            if count < target:
                resize_units_(block, layout, kind, [*range(count), *[None] * (target - count)])
        for name, linear in block.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            if name in shape.bias_linears and linear.bias is None:
                w = linear.weight
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                           requires_grad=w.requires_grad)
            elif name not in shape.bias_linears and linear.bias is not None:
                linear.bias = None  # save_shape only leaves out biases that are all zero
    for key, value in shape.changes.items():
        setattr(config, key, value)
    for block in blocks:  # blocks now match the shared config: drop private copies (Phi-3's fused qkv)
        attn = block.get_submodule(block_layout(block, config).attention.module)
        if getattr(attn, "config", config) is not config:
            attn.config = config
    _check_matches(model)
    return shape


def _try(model, config, changes, kv, g, d, width):
    """Build the model for ``config`` + ``changes`` on the meta device; (model, config) if its blocks
    have the wanted shape, else (None, why)."""
    candidate = copy.deepcopy(config)
    for key, value in changes.items():
        setattr(candidate, key, value)
    try:
        if hasattr(candidate, "validate"):
            candidate.validate()
        meta_model = _meta_model(model, candidate)
    except Exception as exc:  # the family refuses this config (its validation, or building it): try the next
        return None, str(exc).strip().splitlines()[-1]
    lay = block_layout(find_blocks(meta_model)[1][0], candidate)
    got = (lay.num_kv_heads, lay.group_size, lay.head_dim, lay.intermediate_size)
    if got != (kv, g, d, width):
        return None, f"builds kv_heads, g, head_dim, width = {got}, not {(kv, g, d, width)}"
    return (meta_model, candidate), ""


def _meta_model(model: nn.Module, config) -> nn.Module:
    with torch.device("meta"):
        return type(model)(config)


def _bias_flags(model, config, needed: set[str], family: str) -> dict[str, bool]:
    """Boolean ``*bias*`` config fields to switch on so that every linear in ``needed`` has a bias."""
    def biased(cfg) -> set[str]:
        block = find_blocks(_meta_model(model, cfg))[1][0]
        return {n for n, m in block.named_modules() if isinstance(m, nn.Linear) and m.bias is not None}

    have = biased(config)
    flags: dict[str, bool] = {}
    candidates = sorted(k for k in config.to_dict() if "bias" in k and getattr(config, k, None) is False)
    for key in candidates:
        if needed <= have:
            break
        probe = copy.deepcopy(config)
        setattr(probe, key, True)
        gained = biased(probe) - have
        if gained & (needed - have):
            flags[key] = True
            have |= gained
    if not needed <= have:
        raise EbftError(f"structured pruning: a {family} config cannot give {sorted(needed - have)} a bias, which "
                        "bias compensation needs to be saved; pass --no-bias-compensation for this family")
    return flags


def bias_slot_problem(model: nn.Module) -> str | None:
    """Before any work: why the family's config cannot give the output projections (o_proj, down_proj)
    the biases FLAP's compensation puts there (the pruned model could then not be saved), or None."""
    _, blocks = find_blocks(model)
    layout = block_layout(blocks[0], model.config)
    needed = {layout.attention.out_proj, layout.mlp.out_proj}
    family = getattr(model.config, "model_type", type(model).__name__)
    try:
        _bias_flags(model, model.config, needed, family)
    except EbftError:
        return f"a {family} config has no bias slot for {' and '.join(sorted(needed))}"
    return None


def check_layouts(model: nn.Module) -> None:
    """Before any work: every block's units can be found (a clear error for a layout ebft does not know)."""
    _, blocks = find_blocks(model)
    for block in blocks:
        block_layout(block, model.config)


def _check_matches(model: nn.Module) -> None:
    """The padded model's tensors are exactly those a fresh model of its config has."""
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fresh = {k: tuple(v.shape) for k, v in _meta_model(model, model.config).state_dict().items()}
    if mine != fresh:
        diff = sorted(set(mine.items()) ^ set(fresh.items()))[:6]
        raise AssertionError(f"saveable model and its config disagree: {diff}")
