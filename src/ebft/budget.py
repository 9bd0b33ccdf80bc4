"""Plan before spending: the memory and time a run needs, from the model's config alone.

Nothing here loads a weight. The model is instantiated on the ``meta`` device (shapes, no storage),
which gives exact parameter counts per block and outside the blocks for any architecture that
transformers builds. Everything else is arithmetic on those counts and the run's settings
(:class:`PlanSettings`), in bytes:

``b``  bytes of the run dtype (weights and stored activations: 4 fp32, 2 bf16/fp16)
``a``  bytes of the training compute dtype (the autocast dtype; 4 without autocast)
``N, S``  calibration windows × tokens; ``B`` the recovery batch (windows per step); ``T = B·S``
``W, Sₑ``  evaluation windows per text × tokens; ``k`` stages carried (dense / pruned / final)
``H, I``  hidden and MLP widths; ``q = heads·d``, ``kv = kv_heads·d`` attention widths
``P``  parameters (``P_blk`` one block, ``P_lin`` its linears, ``P_t`` what EBFT trains)

**Weights.** ``b·P_total`` in all; host memory holds that when loading eagerly, and
``b·(max P_blk + P_outside)`` when loading lazily (one block plus embeddings, final norm, head);
plus ``Σ P_mask`` bytes for the bool masks the walk keeps of every finished block (``keep_masks``).

**Activations** (stored in the run dtype, resident for the whole walk)::

    calibration chain   N·S·H·b       the inputs of the current block, updated in place
    targets             N·S·H·b       dense-block: the dense block's outputs (one copy per block)
                                      dense-model: the dense model's own stream, carried beside the chain
    evaluation streams  texts·k·W·Sₑ·H·b
    stats-pass outputs  N·S·H·b       only when the pruner needs statistics and no dense-block target
                                      keeps the dense outputs: the walk's stats pass writes them anyway

**Accelerator working memory** is the largest of three phases (activations come on top; a CPU run
counts the same in host memory, less what the host's weights already hold):

- *recovery* (EBFT, per block): the untrained weights ``b·(P_blk − P_t)`` + ``20·P_t`` (the fp32 master
  copy 4 that replaces the trained weights, fp32 gradients 4, AdamW's two moments 8, the fp32 snapshot
  EBFT restores a rejected block from 4) + masks ``5·P_mask`` (bool from the pruner 1, the fp32 copy that multiplies gradients 4)
  + one training step: the activations autograd saves for backward (formula below) + the autocast
  weight copies ``a·(P_lin − P_qkv)`` (bf16 casts of the fp32 master weights that backward needs;
  q/k/v read the block's input, which needs no gradient, so their casts are not saved) + the batch's
  inputs and targets ``2·T·H·b`` + a backward workspace ``3·T·a·I + a·max P_linear`` (gradients of the
  MLP's widest tensors while they are still saved; an estimate).
- *pruning and forward passes*: block weights + the pruner's statistics (Wanda ``4·Σ in``, doubled for
  DSnoT's means; SparseGPT a fp32 Hessian per linear ``4·Σ in²`` plus ``4·max in²`` for its inverse and
  ``4·max P_linear`` for a fp32 weight copy) + one no-grad forward batch of the walk
  (:func:`forward_transient_bytes`, an estimate).
- *head*: embeddings, final norm and head ``b·P_outside`` + the logits of one evaluation window and
  their fp32 copy and log-softmax ``Sₑ·V·(b + 8)``.

**Saved activations of one decoder block** (per token; pre-norm decoder, the block's input needs no
gradient so the first norm saves nothing)::

    a·H                    input of q/k/v (the first norm's output)
    a·(2q + 2kv) + 4·heads sdpa/flash: q, k, v (k, v at kv_heads), output = o_proj's input, fp32 logsumexp
    a·(4q) + (4 + a')·heads·S   eager instead: q, k, v repeated to every head, output, fp32 softmax and
                           its cast (a' = a, or 0 when a = 4); + a·heads·S with logit soft-capping
    4H·(n_norms − 1)       each later norm's fp32 input (RMSNorm upcasts; LayerNorm runs in fp32)
    4·(q + kv)             per-head q/k norms, where the family has them
    a·H + m·a·I            MLP input; m = 4 gated (gate out, act out, up out, product) or 2 plain,
                           one less when the activation is ReLU (it saves its output, which is the next input)
    4H                     the loss's fp32 difference (out − target)

Checked against :func:`measure_saved_bytes` (``torch.autograd.graph.saved_tensors_hooks`` summing the
distinct storages a forward saves) on Llama, Qwen2, Qwen3, Gemma, Gemma 2 and OPT blocks, fp32 and bf16
autocast, sdpa and eager: −1 % to +6 % (tests/test_budget.py asserts 10 %).

**Placement** (:func:`place`) is a pure function of byte counts: the activation groups, in priority
order (the chain and targets are read every training step; the evaluation streams once per block),
go to the accelerator while working memory + groups fit in ``reserve`` of its free memory; the rest
to pinned host memory while weights + host groups fit in ``host_reserve`` of free host memory; else
the plan says "reduce" and :func:`plan` finds, setting by setting, the largest value that fits.

**Time** (:func:`estimate_time`) builds ONE decoder block from the config with random weights on the
device, times a training step and forward passes, and extrapolates to the whole walk:
``blocks × (stats pass + dense-model stream + EBFT's two loss checks + epochs × steps + propagation
+ evaluation streams)``. Pruning itself (SparseGPT's solve), the capture and the head are not
timed. On a CPU it is a rough estimate, labelled so.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

GiB = 1024 ** 3
ACCELERATOR, PINNED, HOST, REDUCE, UNKNOWN = "accelerator", "pinned host", "host", "reduce", "unknown"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Recoveries that train with AdamW on the accelerator, and their optimiser state per trained element:
# ebft: fp32 master 4 + grad 4 + two moments 8 + fp32 restore snapshot 4.
# ebft-mask: fp32 scores 4 + grad 4 + moments 8 + fp32 frozen weights 4 + fp32 dense weights 4.
STATE_BYTES = {"ebft": 20, "ebft-mask": 24}
# What each pruner accumulates per linear: Wanda/DSnoT a fp32 vector over inputs, SparseGPT a Hessian.
PRUNER_STATS = {"magnitude": None, "wanda": "sq", "sparsegpt": "hessian"}
# Tokens of the WikiText-2 test split with the Llama-2 tokenizer (83 windows of 4096, 166 of 2048);
# c4 evaluation takes 256 windows (SparseGPT's protocol). Other tokenizers differ by ~15 %.
EVAL_TOKENS = {"wikitext2": 341_469}
EVAL_WINDOWS = {"c4": 256}


# ---------------------------------------------------------------------------------------------
# Settings and shape
# ---------------------------------------------------------------------------------------------

@dataclass
class PlanSettings:
    """The run settings the arithmetic depends on (mirrors the run config; see :func:`settings_from_run_config`)."""

    device: str = "cuda"  # what the run will use: cpu | cuda (the plan may be made elsewhere)
    dtype: str = "auto"  # run dtype of weights and activations: auto (cuda: bfloat16, cpu: float32) | float32 | bfloat16 | float16
    precision: str = "auto"  # recovery compute: auto (cuda: bf16 autocast, cpu: fp32) | fp32 | bf16 | fp16
    load: str = "auto"  # eager (whole model in host memory) | lazy (one block at a time) | auto (eager if it fits)
    calib_nsamples: int = 128
    calib_seqlen: int | None = None  # None: min(model context, 2048)
    eval_texts: int = 1
    eval_windows: int = 0  # windows per text
    eval_seqlen: int | None = None  # None: min(model context, 2048)
    eval_stages: int = 3  # streams carried per text: dense, pruned, final
    pruner: str = "wanda"
    recovery: str = "ebft"  # ebft | ebft-mask | dsnot | none | lora (model scope: not planned here)
    recovery_batch: int = 8
    epochs: int = 10
    holdout: int = 0
    target: str = "dense-block"  # dense-block | dense-model
    train_norms: bool = False
    walk_batch: int = 1  # windows per forward pass in the walk (stats, propagation, evaluation)
    layers: str | None = None  # regex on linear names inside a block: the pruned (and trained) ones
    attention: str | None = None  # attention implementation; None: what transformers picks for the config
    keep_masks: bool = True  # the walk keeps every finished block's bool masks on the host (run record, LoRA)
    trust_remote_code: bool = False  # for configs whose model code lives on the hub

    def run_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    def autocast_dtype(self) -> str | None:
        """The recovery's autocast dtype, or None (fp32 compute: CPU, or precision fp32)."""
        if self.precision == "fp32" or (self.precision == "auto" and not self.device.startswith("cuda")):
            return None
        return "float16" if self.precision == "fp16" else "bfloat16"

    def trains(self) -> bool:
        return self.recovery in STATE_BYTES

    def needs_targets(self) -> bool:
        return self.recovery in STATE_BYTES

    def stages(self) -> int:
        """Evaluation streams per text: without recovery 'pruned' and 'final' are the same stream."""
        return min(self.eval_stages, 2) if self.recovery == "none" else self.eval_stages


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

    @property
    def params_in_blocks(self) -> int:
        return sum(self.params_blocks)

    @property
    def block_params(self) -> int:
        return max(self.params_blocks)


def load_config(source, trust_remote_code: bool = False):
    """A transformers config from a folder, a hub id, a ``.gguf`` file or a config object (no weights)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    path = os.path.expanduser(str(source))
    if path.endswith(".gguf"):
        return AutoConfig.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                          trust_remote_code=trust_remote_code)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


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
    from .models import find_blocks, find_linears

    config = load_config(config, trust_remote_code)
    model = meta_model(config, attention, trust_remote_code)
    _, blocks = find_blocks(model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    per_block = tuple(sum(p.numel() for p in b.parameters()) for b in blocks)
    linears = [find_linears(b, layers) for b in blocks]
    linear_params = tuple(sum(_numel(l.weight) + _numel(l.bias) for l in ls.values()) for ls in linears)
    mask_params = tuple(sum(l.weight.numel() for l in ls.values()) for ls in linears)
    norms = [_norm_modules(b) for b in blocks]
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
    )


def _numel(p) -> int:
    return 0 if p is None else p.numel()


def _norm_modules(block: nn.Module) -> list[nn.Module]:
    """The block's norm layers, found the way EBFT finds the ones it may train."""
    return [m for n, m in block.named_modules() if n and ("norm" in type(m).__name__.lower()
                                                          or "norm" in n.split(".")[-1].lower())]


def _norm_width(module: nn.Module) -> int | None:
    w = getattr(module, "weight", None)
    return w.shape[-1] if isinstance(w, torch.Tensor) else None


# ---------------------------------------------------------------------------------------------
# The arithmetic
# ---------------------------------------------------------------------------------------------

def dtype_bytes(name: str | torch.dtype | None) -> int:
    if name is None:
        return 4
    if isinstance(name, torch.dtype):
        return name.itemsize
    return DTYPE_BYTES[str(name).replace("torch.", "")]


def seqlens(shape: ModelShape, s: PlanSettings) -> tuple[int, int]:
    """(calibration, evaluation) window lengths: the settings', else min(model context, 2048)."""
    default = min(shape.context, 2048)
    return s.calib_seqlen or default, s.eval_seqlen or default


def saved_bytes_per_token(shape: ModelShape, compute_bytes: int, seqlen: int, train_norms: bool = False) -> int:
    """Bytes autograd saves for backward per token of one block's forward (+ the loss); see the module doc."""
    a, H, I, q, kv, nh = compute_bytes, shape.hidden, shape.intermediate, shape.heads * shape.head_dim, \
        shape.kv_heads * shape.head_dim, shape.heads
    n = a * H  # q/k/v input
    if shape.attention == "eager":
        n += 4 * a * q + 4 * nh * seqlen + (0 if a == 4 else a * nh * seqlen)
        n += a * nh * seqlen if shape.softcap else 0
    else:  # sdpa, flash: no S×S matrix is kept
        n += a * (2 * q + 2 * kv) + 4 * nh
    n += 4 * H * max(shape.norms - 1, 0)
    n += 4 * (q + kv) if shape.head_norms else 0
    m = (4 if shape.gated_mlp else 2) - (0 if shape.act_saves_input else 1)
    n += a * H + m * a * I
    n += 4 * H  # fp32 (out − target)
    if train_norms:  # weight·x̂ saves x̂ for the norm weights' gradient
        n += a * H * shape.norms
    return n


def training_step_bytes(shape: ModelShape, s: PlanSettings, batch: int | None = None) -> dict[str, int]:
    """Accelerator memory of one EBFT training step beyond the block's weights and optimiser state."""
    batch = batch or s.recovery_batch
    seq, _ = seqlens(shape, s)
    amp = s.autocast_dtype()
    a = dtype_bytes(amp) if amp else 4
    b = dtype_bytes(s.run_dtype())
    tokens = batch * seq
    lin = max(shape.linear_params)
    casts = a * (lin - (0 if s.train_norms else shape.qkv_params)) if amp else 0
    return {
        "saved activations": tokens * saved_bytes_per_token(shape, a, seq, s.train_norms),
        "autocast weight copies": max(casts, 0),
        "batch inputs and targets": 2 * tokens * shape.hidden * b,
        "backward workspace": 3 * tokens * a * shape.intermediate + a * shape.max_linear,
    }


def optimizer_bytes(shape: ModelShape, s: PlanSettings) -> dict[str, int]:
    """EBFT's state for the largest block: master weights, gradients, moments, restore snapshot, masks."""
    if not s.trains():
        return {}
    trained = trained_params(shape, s)
    masked = max(shape.mask_params)
    per = STATE_BYTES[s.recovery]
    out = {"fp32 master weights": 4 * trained, "fp32 gradients": 4 * trained, "AdamW moments": 8 * trained}
    out["fp32 restore snapshot" if s.recovery == "ebft" else "fp32 frozen + dense weights"] = (per - 16) * trained
    out["masks (bool + fp32)"] = 5 * masked
    return out


def pruner_bytes(shape: ModelShape, s: PlanSettings) -> int:
    kind = PRUNER_STATS.get(s.pruner, "sq")
    ins = shape.linear_inputs
    if kind == "hessian":
        return 4 * sum(i * i for i in ins) + 4 * max(ins, default=0) ** 2 + 4 * shape.max_linear
    if kind == "sq":
        return 4 * 2 * sum(ins)  # DSnoT adds a mean beside the squared norms
    return 0


def forward_transient_bytes(shape: ModelShape, s: PlanSettings) -> int:
    """Tensors in flight during one no-grad forward of the walk (stats, propagation, evaluation) at the
    longer window: ``T·b·(3I + 2q + 2kv + 2H)`` (MLP, attention projections, the output and its copy),
    plus the ``heads·S²`` scores of eager attention in fp32 and the run dtype. An estimate."""
    b = dtype_bytes(s.run_dtype())
    seq, eval_seq = seqlens(shape, s)
    seq = max(seq, eval_seq if s.eval_windows else 0)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    n = s.walk_batch * seq * b * (3 * shape.intermediate + 2 * q + 2 * kv + 2 * shape.hidden)
    if shape.attention == "eager":
        n += s.walk_batch * shape.heads * seq * seq * (4 + b)
    return n


def activation_bytes(shape: ModelShape, s: PlanSettings) -> dict[str, int]:
    """The activation groups the walk keeps resident, in placement priority order."""
    b = dtype_bytes(s.run_dtype())
    seq, eval_seq = seqlens(shape, s)
    chain = s.calib_nsamples * seq * shape.hidden * b
    groups = {"calibration chain": chain}
    if s.needs_targets():
        groups["dense-model stream" if s.target == "dense-model" else "targets"] = chain
    if PRUNER_STATS.get(s.pruner, "sq") and not (s.needs_targets() and s.target == "dense-block"):
        # the walk's statistics pass writes the block's full output even when nothing keeps it
        groups["stats-pass outputs"] = chain
    evals = s.eval_texts * s.stages() * s.eval_windows * eval_seq * shape.hidden * b
    if evals:
        groups["evaluation streams"] = evals
    return groups


def weight_bytes(shape: ModelShape, s: PlanSettings) -> dict[str, int]:
    b = dtype_bytes(s.run_dtype())
    return {"total": b * shape.params_total, "block": b * shape.block_params, "outside blocks": b * shape.params_outside,
            "eager": b * shape.params_total, "lazy": b * (shape.block_params + shape.params_outside)}


def trained_params(shape: ModelShape, s: PlanSettings) -> int:
    """What EBFT trains in the largest block: its selected linears (+ norms with ``train_norms``)."""
    return max(lp + (np if s.train_norms else 0) for lp, np in zip(shape.linear_params, shape.norm_params))


def working_bytes(shape: ModelShape, s: PlanSettings, batch: int | None = None) -> dict[str, dict[str, int]]:
    """Working memory per phase, activations not included: on the accelerator for a GPU run; for a CPU
    run the extra host memory (the block and the head are then already among the host's weights)."""
    b = dtype_bytes(s.run_dtype())
    _, eval_seq = seqlens(shape, s)
    gpu = s.device.startswith("cuda")
    block = {"block weights": b * shape.block_params} if gpu else {}
    phases = {"pruning and forward passes": {**block, "pruner statistics": pruner_bytes(shape, s),
                                             "one forward batch (estimate)": forward_transient_bytes(shape, s)}}
    if s.trains():
        state = optimizer_bytes(shape, s)
        trained = trained_params(shape, s)
        if gpu:  # the trained weights become the fp32 master copy; the rest stay in the run dtype
            block = {"block weights (frozen part)": b * (shape.block_params - trained)}
        else:  # on the CPU the master copy is the weights themselves unless they are half precision
            state["fp32 master weights"] = (4 - b) * trained
        phases["recovery"] = {**block, **state, **training_step_bytes(shape, s, batch)}
    if s.eval_windows:
        phases["head"] = {**({"embeddings and head": b * shape.params_outside} if gpu else {}),
                          "logits of one window": eval_seq * shape.vocab * (b + 8)}
    return phases


def host_fixed_bytes(shape: ModelShape, s: PlanSettings, load: str) -> dict[str, int]:
    w = weight_bytes(shape, s)
    out = {f"weights ({load})": w[load]}
    if s.keep_masks and s.pruner and load != "lazy":  # a lazy walk writes each block out and keeps no masks
        out["masks of finished blocks (bool)"] = sum(shape.mask_params)
    return out


# ---------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where each activation group lives, and whether the run fits at all."""

    decision: str  # accelerator | pinned host | host | reduce (| unknown: a GPU plan without its memory)
    where: dict[str, str]  # group -> accelerator | pinned host | host
    accelerator_bytes: int  # working memory + groups placed there
    accelerator_budget: int | None  # reserve × free accelerator memory
    host_bytes: int  # fixed host memory + groups placed there
    host_budget: int  # host_reserve × free host memory
    reason: str = ""  # why "reduce"


def place(groups: dict[str, int], working: int, free_accelerator: int | None, free_host: int,
          host_fixed: int = 0, reserve: float = 0.9, host_reserve: float = 0.8) -> Placement:
    """Place activation groups (priority order) on the accelerator or in pinned host memory.

    A group goes to the accelerator when ``working`` + the groups already there + it fit in
    ``reserve · free_accelerator``; otherwise to pinned host memory. The plan fits when
    ``host_fixed`` + the host groups fit in ``host_reserve · free_host``. With no accelerator
    (``free_accelerator=None``) working memory and every group live in (plain) host memory.
    Decision: "accelerator" (every group there), "pinned host" (some in pinned memory), "host" (CPU
    run), or "reduce" (``reason`` says which memory is short).
    """
    host_budget = int(host_reserve * free_host)
    if free_accelerator is None:
        need = host_fixed + working + sum(groups.values())
        where = {g: HOST for g in groups}
        if need > host_budget:
            return Placement(REDUCE, where, 0, None, need, host_budget,
                             f"host memory: need {fmt_bytes(need)}, have {fmt_bytes(host_budget)}")
        return Placement(HOST, where, 0, None, need, host_budget)
    acc_budget = int(reserve * free_accelerator)
    used, host, where = working, host_fixed, {}
    for name, nbytes in groups.items():
        if used + nbytes <= acc_budget:
            where[name], used = ACCELERATOR, used + nbytes
        else:
            where[name], host = PINNED, host + nbytes
    if working > acc_budget:
        return Placement(REDUCE, where, used, acc_budget, host, host_budget,
                         f"accelerator memory: the block's working memory alone needs {fmt_bytes(working)}, "
                         f"have {fmt_bytes(acc_budget)}")
    if host > host_budget:
        return Placement(REDUCE, where, used, acc_budget, host, host_budget,
                         f"host memory: need {fmt_bytes(host)}, have {fmt_bytes(host_budget)}")
    decision = ACCELERATOR if all(w == ACCELERATOR for w in where.values()) else PINNED
    return Placement(decision, where, used, acc_budget, host, host_budget)


@dataclass(frozen=True)
class Reduction:
    setting: str  # the PlanSettings field
    current: int | str
    fits_at: int | str | None  # the largest value that fits, None: no value of this setting alone does


def available_memory(device: str | torch.device) -> tuple[int | None, int]:
    """(free accelerator bytes or None on CPU, available host bytes) on this machine, now."""
    device = torch.device(device)
    free = None
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
    return free, host_available()


def host_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def parse_bytes(text: str | int) -> int:
    """``"80GB"`` → 80·10⁹, ``"16GiB"`` → 16·2³⁰, ``"512M"``, plain integers as bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 80GB, 16GiB, 512M)")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** power)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024 ** 2:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------

@dataclass
class Plan:
    model: str
    settings: PlanSettings
    shape: ModelShape
    load: str  # eager | lazy, as decided
    weights: dict[str, int]
    host_fixed: dict[str, int]
    activations: dict[str, int]
    phases: dict[str, dict[str, int]]  # accelerator working memory per phase
    working: int  # the largest phase
    placement: Placement
    free_accelerator: int | None
    free_host: int
    reductions: list[Reduction] = field(default_factory=list)
    time: "TimeEstimate | None" = None
    notes: list[str] = field(default_factory=list)


def _fit(shape: ModelShape, s: PlanSettings, free_acc: int | None, free_host: int, reserve: float,
         host_reserve: float) -> tuple[str, dict, dict, dict, int, Placement]:
    """(load, host fixed, activation groups, phases, working, placement); load "auto": eager if it fits."""
    if s.load == "auto":
        eager = _fit(shape, dataclasses.replace(s, load="eager"), free_acc, free_host, reserve, host_reserve)
        if eager[-1].decision != REDUCE:
            return eager
        return _fit(shape, dataclasses.replace(s, load="lazy"), free_acc, free_host, reserve, host_reserve)
    load = s.load
    fixed = host_fixed_bytes(shape, s, load)
    groups = activation_bytes(shape, s)
    phases = working_bytes(shape, s)
    working = max(sum(p.values()) for p in phases.values())
    placement = place(groups, working, free_acc if s.device.startswith("cuda") else None, free_host,
                      sum(fixed.values()), reserve, host_reserve)
    return load, fixed, groups, phases, working, placement


def _largest_fitting(shape, s, name, lo, hi, free_acc, free_host, reserve, host_reserve):
    def fits(v):
        return _fit(shape, dataclasses.replace(s, **{name: v}), free_acc, free_host, reserve,
                    host_reserve)[-1].decision != REDUCE
    if not fits(lo):
        return None
    while lo < hi:  # the largest v in [lo, hi] that fits; memory grows with every setting below
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggest_reductions(shape: ModelShape, s: PlanSettings, free_acc: int | None, free_host: int,
                       reserve: float = 0.9, host_reserve: float = 0.8) -> list[Reduction]:
    """For each setting alone, the largest value at which the run fits (None: it cannot alone)."""
    seq, eval_seq = seqlens(shape, s)
    knobs = [("calib_nsamples", s.calib_nsamples), ("calib_seqlen", seq)]
    if s.eval_windows and s.eval_texts:
        knobs += [("eval_windows", s.eval_windows), ("eval_seqlen", eval_seq), ("eval_stages", s.stages())]
    if s.trains():
        knobs.append(("recovery_batch", s.recovery_batch))
    out = []
    for name, current in knobs:
        low = 0 if name == "eval_windows" else 1  # no evaluation at all is a value; no calibration is not
        if current > low:
            out.append(Reduction(name, current, _largest_fitting(shape, s, name, low, current - 1, free_acc,
                                                                 free_host, reserve, host_reserve)))
    if s.load == "eager":
        lazy = _fit(shape, dataclasses.replace(s, load="lazy"), free_acc, free_host, reserve, host_reserve)[-1]
        out.append(Reduction("load", s.load, "lazy" if lazy.decision != REDUCE else None))
    return out


def plan(config, settings: PlanSettings | None = None, free_accelerator: int | None = None,
         free_host: int | None = None, reserve: float = 0.9, host_reserve: float = 0.8,
         time_estimate: "TimeEstimate | None" = None, name: str | None = None) -> Plan:
    """Everything a run will need, from the config and the settings; no weight is loaded.

    ``free_accelerator`` / ``free_host``: bytes available (None: measured on this machine). A cuda
    plan made where no GPU is and given no ``free_accelerator`` gets the decision "unknown".
    """
    s = settings or PlanSettings()
    cfg = load_config(config, s.trust_remote_code)
    shape = model_shape(cfg, s.layers, s.attention, s.trust_remote_code)
    if free_accelerator is None or free_host is None:
        acc, host = available_memory(s.device if torch.cuda.is_available() else "cpu")
        free_accelerator = acc if free_accelerator is None else free_accelerator
        free_host = host if free_host is None else free_host
    unknown = s.device.startswith("cuda") and free_accelerator is None
    load, fixed, groups, phases, working, placement = _fit(shape, s, 0 if unknown else free_accelerator,
                                                           free_host, reserve, host_reserve)
    if unknown:
        placement = Placement(UNKNOWN, {g: "?" for g in groups}, working + sum(groups.values()), None,
                              placement.host_bytes, placement.host_budget,
                              "no GPU here: give the accelerator's free memory")
    p = Plan(model=name or str(getattr(cfg, "_name_or_path", "") or shape.model_type), settings=s, shape=shape,
             load=load, weights=weight_bytes(shape, s), host_fixed=fixed, activations=groups, phases=phases,
             working=working, placement=placement, free_accelerator=free_accelerator if s.device.startswith("cuda")
             else None, free_host=free_host, time=time_estimate)
    if placement.decision == REDUCE and not unknown:
        p.reductions = suggest_reductions(shape, s, free_accelerator, free_host, reserve, host_reserve)
        if s.device.startswith("cuda") and working > placement.accelerator_budget:
            least = max(sum(ph.values()) for ph in working_bytes(shape, s, batch=1).values())
            p.notes.append(f"the smallest accelerator for this model: {fmt_bytes(math.ceil(least / reserve))} free "
                           f"(recovery batch 1, activations in host memory)")
    if s.recovery == "lora":
        p.notes.append("lora trains the whole model after the walk: its memory is not planned here")
    if shape.attention not in ("sdpa", "eager"):
        p.notes.append(f"attention {shape.attention}: saved activations estimated as for sdpa")
    return p


# ---------------------------------------------------------------------------------------------
# Time: one random block, measured
# ---------------------------------------------------------------------------------------------

@dataclass
class TimeEstimate:
    device: str
    label: str  # what was measured and how far it was extrapolated
    step_seconds: float  # one training step at the recovery batch (scaled from the measured batch)
    forward_seconds_per_window: float  # calibration window, walk batch
    eval_forward_seconds_per_window: float  # evaluation window
    per_block: dict[str, float]
    total_seconds: float
    measured_batch: int
    measured_peak_bytes: int | None = None  # CUDA: peak allocated during training steps (block + state + step)
    predicted_peak_bytes: int | None = None  # the recovery phase's formula at the measured batch


class _Stop(Exception):
    pass


def one_block(config, device, dtype: torch.dtype, attention: str | None = None, seed: int = 0,
              trust_remote_code: bool = False):
    """A 1-block model of the config with random weights on ``device``, a tiny vocabulary, and its block."""
    from transformers import AutoModelForCausalLM

    from .models import find_blocks

    cfg = copy.deepcopy(load_config(config, trust_remote_code))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text.num_hidden_layers = 1
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types[:1])
    text.vocab_size = 256  # the block is what we time; a full vocabulary would only cost memory
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(text, key, None), int) and getattr(text, key) >= 256:
            setattr(text, key, None)
    kwargs = {"attn_implementation": attention} if attention else {}
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs).eval()
    _, blocks = find_blocks(model)
    return model, blocks[0]


def block_inputs(model: nn.Module, block: nn.Module, batch: int, seqlen: int, seed: int = 0):
    """Run the model up to its block on random tokens; return the block's input and call kwargs."""
    got = {}

    def hook(module, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]
        got["kwargs"] = {k: v for k, v in kwargs.items()
                         if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache", "cache")}
        raise _Stop

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seqlen), generator=g)
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids.to(next(model.parameters()).device), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["x"].detach(), got["kwargs"]


def _call(block, x, kwargs):
    out = block(x, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def measure_saved_bytes(block: nn.Module, x: torch.Tensor, kwargs: dict, autocast: torch.dtype | None = None) -> int:
    """Bytes autograd saves for backward in one forward of ``block`` + the MSE loss, measured.

    Counts each distinct storage once (views share one) and leaves out the block's parameters
    (they are counted as weights); the autocast copies of weights are included.
    """
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = _call(block, x, kwargs)
            loss = (out.float() - torch.zeros_like(out, dtype=torch.float32)).square().mean()
    loss.backward()
    return sum(seen.values())


def prepare_training(block: nn.Module, settings: PlanSettings, layers: str | None = None):
    """Make ``block`` look like EBFT's: fp32 trainable linears (and norms), the rest frozen."""
    from .models import find_linears

    linears = find_linears(block, layers)
    params = [p for l in linears.values() for p in (l.weight, l.bias) if p is not None]
    if settings.train_norms:
        params += [p for m in _norm_modules(block) for p in m.parameters(recurse=False)]
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    masks = [(l.weight, (torch.rand_like(l.weight) > 0.5).float()) for l in linears.values()]
    return params, masks


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, iters, warmup):
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / max(iters, 1)


def estimate_time(config, settings: PlanSettings, device: str | torch.device | None = None, measure: bool = True,
                  iters: int = 3, warmup: int = 1, max_tokens: int | None = None) -> TimeEstimate | None:
    """Time one random block of the config on ``device`` and extrapolate to the whole walk.

    ``max_tokens`` caps the tokens of each measured call (batch first, then sequence), the time then
    scaled linearly to the real size; default: no cap on CUDA, 4096 on CPU. Returns None when
    ``measure`` is False.
    """
    if not measure:
        return None
    device = torch.device(device or ("cuda" if settings.device.startswith("cuda") and torch.cuda.is_available()
                                     else "cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the run's RNG alone
        return _measure(config, settings, device, iters, warmup, max_tokens)


def _measure(config, s: PlanSettings, device: torch.device, iters: int, warmup: int,
             max_tokens: int | None) -> TimeEstimate:
    if device.type == "cuda":
        s = dataclasses.replace(s, device=str(device))
    elif s.device.startswith("cuda"):
        s = dataclasses.replace(s, device="cpu", dtype="float32" if s.dtype == "auto" else s.dtype,
                                precision="fp32" if s.precision == "auto" else s.precision)
    cfg = load_config(config, s.trust_remote_code)
    shape = model_shape(cfg, s.layers, s.attention, s.trust_remote_code)
    seq, eval_seq = seqlens(shape, s)
    cap = max_tokens or (None if device.type == "cuda" else 4096)
    dtype = getattr(torch, s.run_dtype())
    amp = getattr(torch, s.autocast_dtype()) if s.autocast_dtype() else None

    def shrink(batch, length):  # the measured (batch, length) and the factor to the real one
        b, l = batch, length
        while cap and b * l > cap and b > 1:
            b = max(1, b // 2)
        if cap and b * l > cap:
            l = max(16, cap // b)
        return b, l, (batch * length) / (b * l)

    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, block = one_block(cfg, device, dtype, s.attention, trust_remote_code=s.trust_remote_code)

    fb, fl, f_scale = shrink(s.walk_batch, seq)
    x, kw = block_inputs(model, block, fb, fl)
    with torch.no_grad():
        t_fwd = _timed(lambda: _call(block, x, kw), device, iters, warmup) * f_scale / s.walk_batch
    eb, el, e_scale = shrink(1, eval_seq)
    xe, kwe = block_inputs(model, block, eb, el)
    with torch.no_grad():
        t_eval = _timed(lambda: _call(block, xe, kwe), device, iters, warmup) * e_scale
    del xe, kwe

    t_step, mb = 0.0, 0
    measured_peak = predicted = None
    if s.trains():
        mb, ml, s_scale = shrink(s.recovery_batch, seq)
        x, kw = block_inputs(model, block, mb, ml)
        y = torch.randn_like(x)
        params, masks = prepare_training(block, s, s.layers)
        try:
            opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
        except (RuntimeError, TypeError, ValueError):
            opt = torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.1)
        snapshot = [p.detach().clone() for p in params]  # EBFT keeps one to restore a rejected block
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = (_call(block, x, kw).float() - y.float()).square().mean()
            loss.backward()
            for w, m in masks:
                w.grad.mul_(m)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_step = _timed(step, device, iters, warmup) * s_scale
        if device.type == "cuda":
            measured_peak = torch.cuda.max_memory_allocated(device) - base
            phase = working_bytes(shape, dataclasses.replace(s, calib_seqlen=ml), batch=mb)["recovery"]
            predicted = sum(phase.values())
        del snapshot, opt
    del model, block, x, kw

    n, L = s.calib_nsamples, shape.layers
    n_train = n - s.holdout
    per_block = {}
    if s.needs_targets() and s.target == "dense-block" or PRUNER_STATS.get(s.pruner, "sq"):
        per_block["stats + targets pass"] = n * t_fwd
    if s.needs_targets() and s.target == "dense-model":
        per_block["dense-model stream"] = n * t_fwd
    if s.trains():
        per_block["loss checks"] = 2 * n * t_fwd  # before and after, training and held-out windows
        per_block["training"] = s.epochs * math.ceil(n_train / s.recovery_batch) * t_step
    per_block["propagation"] = n * t_fwd
    per_block["evaluation streams"] = s.eval_texts * s.stages() * s.eval_windows * t_eval
    total = L * sum(per_block.values())
    measured = f"batch {mb or fb}" + (f", scaled ×{s_scale:.1f} in tokens" if s.trains() and s_scale > 1 else "")
    where = ("measured on " if device.type == "cuda" else "ROUGH ESTIMATE of a CPU run, measured on ") + _device_name(device)
    label = (f"{where}: one random block ({s.run_dtype()}, autocast {s.autocast_dtype() or 'off'}, {measured}) "
             f"× {L} blocks; pruning solves, capture and head not timed")
    return TimeEstimate(device=_device_name(device), label=label, step_seconds=t_step,
                        forward_seconds_per_window=t_fwd, eval_forward_seconds_per_window=t_eval,
                        per_block=per_block, total_seconds=total, measured_batch=mb or fb,
                        measured_peak_bytes=measured_peak, predicted_peak_bytes=predicted)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def plan_to_dict(p: Plan) -> dict:
    """The plan as plain JSON-able data (bytes as integers)."""
    sh = p.shape
    return {
        "model": p.model,
        "settings": dataclasses.asdict(p.settings),
        "dtype": p.settings.run_dtype(), "autocast": p.settings.autocast_dtype(),
        "shape": {k: v for k, v in dataclasses.asdict(sh).items()
                  if k not in ("params_blocks", "linear_params", "mask_params", "norm_params", "linear_inputs")},
        "parameters": {"total": sh.params_total, "per_block": sh.block_params, "blocks": sh.layers,
                       "in_blocks": sh.params_in_blocks, "outside_blocks": sh.params_outside},
        "weights_bytes": p.weights,
        "load": p.load,
        "host_fixed_bytes": p.host_fixed,
        "activations_bytes": p.activations,
        "accelerator_phases_bytes": p.phases,
        "accelerator_working_bytes": p.working,
        "free_accelerator_bytes": p.free_accelerator, "free_host_bytes": p.free_host,
        "placement": dataclasses.asdict(p.placement),
        "reductions": [dataclasses.asdict(r) for r in p.reductions],
        "time": dataclasses.asdict(p.time) if p.time else None,
        "notes": list(p.notes),
    }


def render_plan(p: Plan) -> str:
    """The plan as a short human-readable table."""
    s, sh, pl = p.settings, p.shape, p.placement
    seq, eval_seq = seqlens(sh, s)
    rows: list[tuple[str, str]] = []

    def row(k, v=""):
        rows.append((k, v))

    row("model", f"{p.model} ({sh.model_type}, {sh.layers} blocks, hidden {sh.hidden}, attention {sh.attention})")
    row("parameters", f"{sh.params_total / 1e9:.2f} B = {sh.layers} × {sh.block_params / 1e6:.1f} M per block"
                      f" + {sh.params_outside / 1e6:.1f} M outside")
    row("run", f"{s.device}, {s.run_dtype()}, autocast {s.autocast_dtype() or 'off'}; calibration {s.calib_nsamples}"
               f" × {seq}; {s.pruner} + {s.recovery} (batch {s.recovery_batch}, {s.epochs} epochs, {s.target});"
               f" eval {s.eval_texts} × {s.eval_windows} × {eval_seq} at {s.stages()} stages")
    row("weights", f"{fmt_bytes(p.weights['total'])} ({fmt_bytes(p.weights['block'])} per block)")
    row("host: weights", f"{fmt_bytes(p.weights['eager'])} eager, {fmt_bytes(p.weights['lazy'])} lazy -> {p.load}")
    for k, v in p.host_fixed.items():
        if not k.startswith("weights"):
            row(f"host: {k}", fmt_bytes(v))
    for phase, parts in p.phases.items():
        row(f"{'accelerator' if s.device.startswith('cuda') else 'host working'}: {phase}", fmt_bytes(sum(parts.values())))
        for k, v in parts.items():
            row(f"  {k}", fmt_bytes(v))
    for k, v in p.activations.items():
        row(f"activations: {k}", f"{fmt_bytes(v)} -> {pl.where.get(k, '?')}")
    row("accelerator total", f"{fmt_bytes(pl.accelerator_bytes)} of {fmt_bytes(pl.accelerator_budget)} usable"
                             if pl.accelerator_budget is not None else "none (CPU run)")
    row("host total", f"{fmt_bytes(pl.host_bytes)} of {fmt_bytes(pl.host_budget)} usable")
    row("placement", pl.decision.upper() + (f": {pl.reason}" if pl.reason else ""))
    fitting = [r for r in p.reductions if r.fits_at is not None]
    for r in fitting:
        row(f"  or reduce {r.setting}", f"{r.current} -> {r.fits_at}")
    if p.reductions and not fitting:
        row("  reduce", "no single setting makes it fit")
    if p.time:
        t = p.time
        row("time", f"{_fmt_seconds(t.total_seconds)} ({t.label})")
        row("  per block", ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in t.per_block.items()))
    for note in p.notes:
        row("note", note)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)


def _fmt_seconds(sec: float) -> str:
    if sec < 120:
        return f"{sec:.1f} s"
    if sec < 7200:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def settings_from_run_config(cfg, context: int | None = None, load: str = "auto") -> PlanSettings:
    """A :class:`PlanSettings` from an :class:`ebft.config.RunConfig` (read with ``getattr``, so it
    survives renames of fields it does not use). Evaluation windows per text: the config's cap, else
    :func:`typical_eval_windows` of its largest source at the evaluation length (``context``: the
    model's, for the default lengths min(context, 2048))."""
    from .config import resolve_device

    calib, ev, prune = cfg.calib, cfg.eval, cfg.prune
    rec = cfg.recovery_settings() if hasattr(cfg, "recovery_settings") else cfg.recover  # the recipe resolved
    method = cfg.recover.method
    sources = list(getattr(ev, "sources", None) or [])
    eval_seq = getattr(ev, "seqlen", None) or min(context or 2048, 2048)
    windows = getattr(ev, "windows", None)
    if sources:
        typical = max(typical_eval_windows(src, eval_seq) for src in sources)
        windows = min(windows, typical) if windows else typical
    return PlanSettings(device=resolve_device(getattr(cfg, "device", "auto")), dtype=getattr(cfg, "dtype", "auto"),
                        precision=getattr(rec, "precision", "auto"), load=load, calib_nsamples=calib.nsamples,
                        calib_seqlen=calib.seqlen, eval_texts=len(sources), eval_windows=windows or 0,
                        eval_seqlen=getattr(ev, "seqlen", None), pruner=prune.method, recovery=method,
                        recovery_batch=getattr(rec, "batch_size", 8), epochs=getattr(rec, "epochs", 1),
                        holdout=getattr(rec, "holdout", 0),
                        target=getattr(rec, "target", "dense-block"), train_norms=getattr(rec, "train_norms", False),
                        walk_batch=getattr(cfg, "batch_size", 1), layers=getattr(prune, "layers", None))


def typical_eval_windows(source: str, seqlen: int) -> int:
    """Roughly how many evaluation windows a source yields: WikiText-2 from its token count, c4 256;
    any other source is assumed WikiText-2-sized (a local file's real count needs its tokenizer)."""
    if source in EVAL_WINDOWS:
        return EVAL_WINDOWS[source]
    return max(1, EVAL_TOKENS["wikitext2"] // seqlen)
