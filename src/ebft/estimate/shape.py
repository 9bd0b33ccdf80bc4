"""What the estimator needs of a model, from its config alone: exact parameter counts and widths.

The model is instantiated on the ``meta`` device (shapes, no storage), which gives exact parameter
counts per block and outside the blocks for any architecture that transformers builds.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..models import find_blocks, find_linears, load_config, norm_modules


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs from a model, read off a meta-device instance (no weights)."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    attention: str  # the attention implementation: sdpa | eager | flash_attention_2 | ...
    gated_mlp: bool
    act_saves_input: bool  # False for ReLU (saves its output)
    norms: int  # hidden-width norm layers per block
    head_norms: bool  # per-head q/k norms (Qwen3, Gemma 3)
    softcap: bool  # attention-logit soft-capping (Gemma 2), eager only
    config_dtype: str | None
    params_total: int  # distinct parameters (tied embeddings once)
    params_outside: int  # embeddings, final norm, head, learned positions
    params_blocks: tuple[int, ...]  # every parameter of each block
    linear_params: tuple[int, ...]  # weights + biases of each block's selected linears
    mask_params: tuple[int, ...]  # weights of each block's selected linears (the masked elements)
    norm_params: tuple[int, ...]  # each block's norm parameters
    qkv_params: int  # block 0's q/k/v weights (their inputs need no gradient)
    max_linear: int  # the largest linear weight in a block
    linear_inputs: tuple[int, ...]  # in_features of block 0's selected linears
    stats_inputs: tuple[int, ...] = ()  # in_features of each distinct input among them (q/k/v read one, gate/up one)

    @property
    def params_in_blocks(self) -> int:
        return sum(self.params_blocks)

    @property
    def block_params(self) -> int:
        return max(self.params_blocks)


def meta_model(config, attention: str | None = None, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device: every shape, no storage, no initialisation cost."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attention} if attention else {}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), trust_remote_code=trust_remote_code, **kwargs)
    model.tie_weights()  # so that a tied head is counted once, whatever from_config did on meta
    return model


def model_shape(config, layers: str | None = None, attention: str | None = None,
                trust_remote_code: bool = False) -> ModelShape:
    """Exact parameter counts and the widths the activation formulas need, from the config alone."""
    config = load_config(config, trust_remote_code)
    model = meta_model(config, attention, trust_remote_code)
    _, blocks = find_blocks(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    per_block = tuple(sum(p.numel() for p in b.parameters()) for b in blocks)
    linears = [find_linears(b, layers) for b in blocks]
    linear_params = tuple(sum(_numel(l.weight) + _numel(l.bias) for l in ls.values()) for ls in linears)
    mask_params = tuple(sum(l.weight.numel() for l in ls.values()) for ls in linears)
    norms = [norm_modules(b) for b in blocks]
    norm_params = tuple(sum(p.numel() for m in ns for p in m.parameters(recurse=False)) for ns in norms)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = text_cfg.hidden_size
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or hidden // heads
    kv_heads = getattr(text_cfg, "num_key_value_heads", None) or heads
    all0 = find_linears(blocks[0])
    wide = [l for l in all0.values() if l.in_features == hidden and l.out_features not in (hidden, heads * head_dim,
                                                                                            kv_heads * head_dim)]
    intermediate = (getattr(text_cfg, "intermediate_size", None) or getattr(text_cfg, "ffn_dim", None)
                    or max((l.out_features for l in wide), default=4 * hidden))
    gated = sum(1 for l in all0.values() if l.in_features == hidden and l.out_features == intermediate) >= 2
    act = str(getattr(text_cfg, "hidden_act", None) or getattr(text_cfg, "hidden_activation", None)
              or getattr(text_cfg, "activation_function", None) or "silu")
    qkv = [l for n, l in linears[0].items() if re.search(r"(^|\.)(q|k|v|qkv|query_key_value|c_attn)_?(proj)?$", n)]
    hidden_norms = sum(1 for m in norms[0] if _norm_width(m) in (hidden, None))
    context = next((int(getattr(text_cfg, k)) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if getattr(text_cfg, k, None)), 2048)
    dtype = getattr(config, "dtype", None)
    return ModelShape(
        model_type=str(getattr(config, "model_type", type(model).__name__)),
        layers=len(blocks), hidden=hidden, intermediate=int(intermediate), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, vocab=int(text_cfg.vocab_size), context=context,
        attention=str(getattr(cfg, "_attn_implementation", None) or "sdpa"),
        gated_mlp=gated, act_saves_input=act.lower() != "relu", norms=hidden_norms,
        head_norms=any(_norm_width(m) == head_dim for m in norms[0]),
        softcap=getattr(text_cfg, "attn_logit_softcapping", None) is not None,
        config_dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
        params_total=total, params_outside=total - sum(per_block), params_blocks=per_block,
        linear_params=linear_params, mask_params=mask_params, norm_params=norm_params,
        qkv_params=sum(l.weight.numel() for l in qkv),
        max_linear=max((l.weight.numel() for l in all0.values()), default=0),
        linear_inputs=tuple(l.in_features for l in linears[0].values()),
        stats_inputs=_distinct_inputs(linears[0], qkv, intermediate if gated else None, hidden),
    )


def _distinct_inputs(linears: dict, qkv: list, gated_width: int | None, hidden: int) -> tuple[int, ...]:
    """The in_features of each distinct input tensor the linears read: the walk's statistics are one object per
    input (:class:`ebft.stats.StatsHooks`) — the attention's q/k/v projections read one, a gated MLP's gate and
    up projections one."""
    groups: dict[str, int] = {}
    for name, lin in linears.items():
        if any(lin is q for q in qkv):
            key = "qkv"
        elif gated_width is not None and lin.in_features == hidden and lin.out_features == gated_width:
            key = "gate/up"
        else:
            key = name
        groups.setdefault(key, lin.in_features)
    return tuple(groups.values())


def _numel(p) -> int:
    return 0 if p is None else p.numel()


def _norm_width(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    return w.shape[-1] if isinstance(w, torch.Tensor) else None
