"""The memory a run needs, in bytes: arithmetic on the model's shape and the run's sizes.

Nothing here loads a weight: the counts come from :mod:`.shape`, the sizes from the run's
:class:`~ebft.config.RunConfig` (:meth:`RunSizes.of`, which reads each method's declarations: the
statistics it needs, its optimiser state per parameter, its training target). In bytes:

``b``  bytes of the run dtype (weights and stored activations: 4 fp32, 2 bf16/fp16)
``a``  bytes of the training compute dtype (the autocast dtype; 4 without autocast)
``N, S``  calibration windows × tokens; ``B`` the recovery batch (windows per step); ``T = B·S``
``W, Sₑ``  evaluation windows per text × tokens; ``k`` stages carried (dense / pruned / final)
``H, I``  hidden and MLP widths; ``q = heads·d``, ``kv = kv_heads·d`` attention widths
``P``  parameters (``P_blk`` one block, ``P_lin`` its linears, ``P_t`` what EBFT trains)

**Weights.** ``b·P_total`` in all; host memory holds that when loading eagerly, and
``b·(max P_blk + P_outside)`` when loading lazily (one block plus embeddings, final norm, head);
plus ``Σ P_mask`` bytes for the bool masks the walk keeps of every finished block (``keep_masks``);
plus, with a model-scope recovery (LoRA), ``b·Σ P_blk`` for the dense blocks the walk keeps on the host to
measure the per-block metrics against once that recovery has changed every block.

**Activations** (stored in the run dtype, resident for the whole walk)::

    calibration chain   N·S·H·b       the inputs of the current block, updated in place
    targets             N·S·H·b       dense-block: the dense block's outputs (one copy per block)
                                      dense-model: the dense model's own stream, carried beside the chain
                                      (a recovery without a target: the dense block's outputs all the same,
                                      what the per-block metrics of :mod:`ebft.metrics` measure against)
    evaluation streams  texts·k·W·Sₑ·H·b + 2·G·(S + g·Sₑ)·H·b
                                      with the guard: G windows of the calibration text and of each of its g
                                      further texts, at two stages
    pruned-alone chain  N·S·H·b       with the guard: the calibration windows through the blocks as pruned alone
    joint window inputs N·S·H·b       a recovery window of K > 1 blocks: the chain at the window's first block

A joint recovery window of K blocks (EBFT's ``window``) holds K blocks' weights, trained state, masks,
autocast copies and saved activations at once: those terms below are multiplied by K.

**Accelerator working memory** is the largest of three phases (activations come on top; a CPU run
counts the same in host memory, less what the host's weights already hold):

- *recovery* (a training recovery, per block): the untrained weights ``b·(P_blk − P_t)`` + its declared
  state bytes per trained parameter (EBFT 16: the fp32 master copy 4 that replaces the trained
  weights, fp32 gradients 4, AdamW's two moments 8; mask tuning 24) + the bool masks ``P_mask`` (they
  multiply the gradients as they are); the fp32 snapshot EBFT restores a rejected block from ``4·P_t``
  lives in host memory
  + one training step: the activations autograd saves for backward (formula below) + the autocast
  weight copies ``a·(P_lin − P_qkv)`` (bf16 casts of the fp32 master weights that backward needs;
  q/k/v read the block's input, which needs no gradient, so their casts are not saved) + the batch's
  inputs and targets ``2·T·H·b`` + a backward workspace ``3·T·a·I + a·max P_linear`` (gradients of the
  MLP's widest tensors while they are still saved; an estimate).
- *pruning and forward passes*: block weights + the statistics the pruner and the recovery declare
  (``sq`` and ``mean``: ``4·Σ in`` each; ``hessian``: a fp32 Hessian per linear ``4·Σ in²`` plus
  ``4·max in²`` for its inverse and ``4·max P_linear`` for a fp32 weight copy) + one no-grad forward
  batch of the walk
  (:func:`forward_transient_bytes`, an estimate).
- *refit* (EBFT's ``refit``, ``--recover refit``): the Hessians kept from the dense pass until the block's
  recovery ``4·K·Σ in²``, the block's dense weights in fp32 ``4·K·P_lin`` and the solver's [out, in]
  tensors ``28·max P_linear`` (K: the joint window's blocks).
- *head*: embeddings, final norm and head ``b·P_outside`` + the logits of one evaluation window and
  their fp32 copy and log-softmax ``Sₑ·V·(b + 8)``.
- *self-calibration* (``--calib self``, before the walk): the whole model on the accelerator ``b·P_total``
  + the KV cache of one generation batch ``G·S·L·2·kv·b`` (``G`` windows at once, ``L`` blocks; sliding-window
  layers counted whole) + the sampler's ``G·V·28`` (fp32 logits, scores, probabilities and CDF, int64 order).

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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import RunConfig, resolve_device
from ..data import SELF
from ..metrics import metric_passes
from ..prune import get_pruner
from ..recover import get_recovery
from ..streams import BLOCK_TARGETS, CHAIN, DENSE_MODEL, EVALUATION, PRUNED_ALONE, WINDOW_INPUTS
from .shape import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Tokens of the WikiText-2 test split with the Llama-2 tokenizer (83 windows of 4096, 166 of 2048);
# c4 evaluation takes 256 windows (SparseGPT's protocol). Other tokenizers differ by ~15 %.
EVAL_TOKENS = {"wikitext2": 341_469}
EVAL_WINDOWS = {"c4": 256}


@dataclass(frozen=True)
class RunSizes:
    """The numbers the arithmetic reads, all from one run's settings (:meth:`of`) and what it will find:
    how many evaluation windows, whether the model loads lazily."""

    device: str = "cuda"  # cpu | cuda (the plan may be made elsewhere)
    dtype: str = "auto"  # run dtype: auto (cuda: bfloat16, cpu: float32) | float32 | bfloat16 | float16
    precision: str = "auto"  # recovery compute: auto (cuda: bf16 autocast, cpu: fp32) | fp32 | bf16 | fp16
    load: str = "auto"  # eager | lazy | auto (eager if it fits)
    calib_nsamples: int = 128
    calib_seqlen: int | None = None  # None: min(model context, 2048)
    eval_texts: int = 1
    eval_windows: int = 0  # windows per text
    eval_seqlen: int | None = None  # None: min(model context, 2048)
    eval_stages: int = 3  # streams carried per text: dense, pruned, final
    needs: frozenset[str] = frozenset({"sq"})  # statistics the pruner and the recovery declare
    prunes: bool = True  # keeps masks of finished blocks
    trains: bool = True  # the recovery trains blocks (its state bytes below)
    state_bytes: int = 16  # the recovery's optimiser state per trained parameter
    target: str | None = "dense-block"  # the recovery's training target (None: it needs none)
    recovers: bool = True  # a recovery other than none (the walk carries a "pruned" stage apart)
    whole_model: str | None = None  # a recovery that trains the whole model after the walk (not planned)
    recovery_batch: int = 8
    window: int = 1  # blocks trained together (a joint window: K blocks' weights, state and saved activations)
    epochs: int = 10
    holdout: int = 0
    guard: int = 0  # the end-to-end guard's held-out windows (0: no guard, and no pruned-alone chain)
    guard_texts: int = 0  # further texts the guard checks, ``guard`` windows each (--recover-guard-on)
    train_norms: bool = False
    walk_batch: int = 1  # windows per forward pass in the walk (stats, propagation, evaluation)
    layers: str | None = None  # regex on linear names inside a block: the pruned (and trained) ones
    attention: str | None = None  # attention implementation; None: what transformers picks for the config
    keep_masks: bool = True  # the walk keeps every finished block's bool masks on the host (run record, LoRA)
    checkpoint: bool = True  # the walk writes its checkpoint (finished blocks, masks, pruned-stage blocks)
    trust_remote_code: bool = False  # for configs whose model code lives on the hub
    methods: str = "wanda + ebft"  # the pruner and the recovery, for the table
    self_windows: int = 0  # --calib self: windows generated (whole batches; 0: another calibration text)
    self_batch: int = 16  # --calib self: windows generated at once
    metric_passes: int = 1  # forward passes over the calibration windows of one measurement of every metric
    recovery_needs: frozenset = frozenset()  # the input statistics the recovery itself reads (in ``needs`` too)
    dense_weights: bool = False  # the recovery is handed the block's dense weights (fp32)

    def refits(self) -> bool:
        """Whether the recovery solves for the kept weights in closed form (EBFT's refit, ``refit``): it reads the
        layers' Hessians and the dense weights."""
        return "hessian" in self.recovery_needs and self.dense_weights

    def metric_target(self) -> str | None:
        """What the per-block metrics measure against: the recovery's target, else the dense block's outputs."""
        return (self.target or "dense-block") if self.prunes else None

    def measurements(self) -> int:
        """Measurements of every metric the walk takes per block: before and after a recovery that changes the
        block inside the walk, once for ``none`` and a model-scope recovery (measured again after it)."""
        return 2 if self.recovers and not self.whole_model else 1

    def guard_text_windows(self) -> int:
        """The guard's windows of its further texts (``guard`` of each, of the evaluation length)."""
        return self.guard * self.guard_texts

    @classmethod
    def of(cls, config: RunConfig, context: int | None = None, load: str = "auto", **found) -> "RunSizes":
        """The sizes of ``config``'s run, from its settings and its methods' declarations. Evaluation
        windows per text: the config's cap, else :func:`typical_eval_windows` of its largest source at the
        evaluation length (``context``: the model's, for the default lengths min(context, 2048));
        ``found`` overrides what the run knows better (its real lengths and window counts)."""
        recovery = get_recovery(config.recover.method)
        settings = config.recovery_settings()  # the recipe resolved
        training = dataclasses.asdict(settings)
        sources = list(config.eval.sources or [])
        eval_seq = config.eval.seqlen or min(context or 2048, 2048)
        windows = config.eval.windows
        if sources:
            typical = max(typical_eval_windows(src, eval_seq) for src in sources)
            windows = min(windows, typical) if windows else typical
        sizes = cls(device=resolve_device(config.device), dtype=config.dtype,
                    precision=training.get("precision", "auto"), load=load, calib_nsamples=config.calib.nsamples,
                    calib_seqlen=config.calib.seqlen, eval_texts=len(sources), eval_windows=windows or 0,
                    eval_seqlen=config.eval.seqlen, eval_stages=3 if config.eval.pruned else 2,
                    needs=frozenset(get_pruner(config.prune.method).needs) | recovery.needs_of(settings),
                    trains=recovery.trains_blocks and recovery.state_bytes > 0, state_bytes=recovery.state_bytes,
                    target=recovery.target_of(settings) if recovery.scope == "block" else None,
                    recovers=recovery.name != "none", whole_model=recovery.name if recovery.scope == "model" else None,
                    recovery_batch=training.get("batch_size", 8), epochs=training.get("epochs", 1),
                    window=recovery.window_of(settings) if recovery.scope == "block" else 1,
                    holdout=training.get("holdout", 0), train_norms=training.get("train_norms", False),
                    guard=config.recover.guard if recovery.guardable and config.lazy is not True else 0,
                    guard_texts=len(config.recover.guard_texts) if recovery.guardable else 0,
                    walk_batch=config.batch_size, layers=config.prune.layers, checkpoint=config.checkpoint,
                    trust_remote_code=config.trust_remote_code,
                    methods=f"{config.prune.method} + {recovery.name}",
                    self_windows=self_calibration_windows(config), self_batch=config.calib.self_batch_size,
                    metric_passes=metric_passes(),
                    recovery_needs=recovery.needs_of(settings), dense_weights=recovery.wants_dense_weights(settings))
        return dataclasses.replace(sizes, **found)

    def run_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"

    def autocast_dtype(self) -> str | None:
        """The recovery's autocast dtype, or None (fp32 compute: CPU, or precision fp32)."""
        if self.precision == "fp32" or (self.precision == "auto" and not self.device.startswith("cuda")):
            return None
        return "float16" if self.precision == "fp16" else "bfloat16"

    def stages(self) -> int:
        """Evaluation streams per text: without recovery 'pruned' and 'final' are the same stream."""
        return self.eval_stages if self.recovers else min(self.eval_stages, 2)


def self_calibration_windows(config: RunConfig) -> int:
    """The windows ``--calib self`` generates for ``config`` when nothing is cached: every window the run takes,
    in whole batches (0 for another calibration text)."""
    if config.calib.source != SELF:
        return 0
    batch = config.calib.self_batch_size
    return -(-config.windows_drawn() // batch) * batch


def typical_eval_windows(source: str, seqlen: int) -> int:
    """Roughly how many evaluation windows a source yields: WikiText-2 from its token count, c4 256;
    any other source is assumed WikiText-2-sized (a local file's real count needs its tokenizer)."""
    if source in EVAL_WINDOWS:
        return EVAL_WINDOWS[source]
    return max(1, EVAL_TOKENS["wikitext2"] // seqlen)



def dtype_bytes(name: str | torch.dtype | None) -> int:
    if name is None:
        return 4
    if isinstance(name, torch.dtype):
        return name.itemsize
    return DTYPE_BYTES[str(name).replace("torch.", "")]


def seqlens(shape: ModelShape, s: RunSizes) -> tuple[int, int]:
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


def training_step_bytes(shape: ModelShape, s: RunSizes, batch: int | None = None) -> dict[str, int]:
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
        "saved activations": s.window * tokens * saved_bytes_per_token(shape, a, seq, s.train_norms),
        "autocast weight copies": s.window * max(casts, 0),
        "batch inputs and targets": 2 * tokens * shape.hidden * b,
        "backward workspace": 3 * tokens * a * shape.intermediate + a * shape.max_linear,
    }


def optimizer_bytes(shape: ModelShape, s: RunSizes) -> dict[str, int]:
    """EBFT's state for the largest block: master weights, gradients, moments, restore snapshot, masks."""
    if not s.trains:
        return {}
    trained = trained_params(shape, s)
    masked = s.window * max(shape.mask_params)
    per = s.state_bytes
    out = {"fp32 master weights": 4 * trained, "fp32 gradients": 4 * trained, "AdamW moments": 8 * trained}
    if per > 16:  # beyond weights, gradients and moments: EBFT's restore snapshot, mask tuning's frozen weights
        out["other state (restore snapshot, frozen weights)"] = (per - 16) * trained
    out["masks (bool)"] = masked
    return out


def statistics_bytes(shape: ModelShape, s: RunSizes) -> int:
    """The input statistics the pruner and the recovery declare, for one block's linears — one set per distinct
    input (q/k/v share one): ``sq`` and ``mean`` a fp32 vector over inputs each; ``hessian`` a fp32 Hessian,
    its inverse's workspace and a fp32 weight copy."""
    ins = shape.stats_inputs or shape.linear_inputs
    total = 4 * sum(ins) * len(s.needs & {"sq", "mean"})
    if "hessian" in s.needs:
        total += 4 * sum(i * i for i in ins) + 4 * max(ins, default=0) ** 2 + 4 * shape.max_linear
    return total


def forward_transient_bytes(shape: ModelShape, s: RunSizes) -> int:
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


def activation_bytes(shape: ModelShape, s: RunSizes) -> dict[str, int]:
    """The activation groups the walk keeps resident, in placement priority order."""
    b = dtype_bytes(s.run_dtype())
    seq, eval_seq = seqlens(shape, s)
    chain = s.calib_nsamples * seq * shape.hidden * b
    groups = {CHAIN: chain}
    if s.metric_target() is not None:  # the recovery's target, or the metrics' (ebft.metrics)
        groups[DENSE_MODEL if s.metric_target() == "dense-model" else BLOCK_TARGETS] = chain
    # with the guard, its held-out windows travel with the evaluation texts (as pruned alone and as recovered)
    evals = (s.eval_texts * s.stages() * s.eval_windows * eval_seq + 2 * s.guard * seq
             + 2 * s.guard_text_windows() * eval_seq) * shape.hidden * b
    if evals:
        groups[EVALUATION] = evals
    if s.guard:  # the calibration windows through the blocks as pruned alone (the guard's baseline)
        groups[PRUNED_ALONE] = chain
    if s.window > 1 and s.trains:  # the chain at a joint window's first block, kept until the window is trained
        groups[WINDOW_INPUTS] = chain
    return groups


def weight_bytes(shape: ModelShape, s: RunSizes) -> dict[str, int]:
    b = dtype_bytes(s.run_dtype())
    return {"total": b * shape.params_total, "block": b * shape.block_params, "outside blocks": b * shape.params_outside,
            "eager": b * shape.params_total, "lazy": b * (shape.block_params + shape.params_outside)}


def trained_params(shape: ModelShape, s: RunSizes) -> int:
    """What EBFT trains at once: the largest block's selected linears (+ norms with ``train_norms``), times the
    blocks of a joint window."""
    return s.window * max(lp + (np if s.train_norms else 0) for lp, np in zip(shape.linear_params, shape.norm_params))


def working_bytes(shape: ModelShape, s: RunSizes, batch: int | None = None) -> dict[str, dict[str, int]]:
    """Working memory per phase, activations not included: on the accelerator for a GPU run; for a CPU
    run the extra host memory (the block and the head are then already among the host's weights)."""
    b = dtype_bytes(s.run_dtype())
    _, eval_seq = seqlens(shape, s)
    gpu = s.device.startswith("cuda")
    block = {"block weights": b * shape.block_params} if gpu else {}
    phases = {"pruning and forward passes": {**block, "input statistics": statistics_bytes(shape, s),
                                             "one forward batch (estimate)": forward_transient_bytes(shape, s)}}
    if s.guard:  # the block is pruned twice: the copy pruning alone leaves (the guard's fallback)
        phases["pruning and forward passes"]["the block pruned alone (guard)"] = b * shape.block_params
    if s.refits():  # the Hessians kept until the recovery, the dense weights, the solver's [out, in] tensors
        ins = shape.stats_inputs or shape.linear_inputs
        phases["refit (closed form)"] = {**block, "Hessians kept for the refit": 4 * s.window * sum(i * i for i in ins),
                                         "dense weights (fp32)": 4 * s.window * max(shape.linear_params),
                                         "solver workspace": 4 * 7 * shape.max_linear}
    if s.trains:
        state = optimizer_bytes(shape, s)
        trained = trained_params(shape, s)
        if gpu:  # the trained weights become the fp32 master copy; the rest stay in the run dtype
            block = {"block weights (frozen part)": b * (s.window * shape.block_params - trained)}
        else:  # on the CPU the master copy is the weights themselves unless they are half precision
            state["fp32 master weights"] = (4 - b) * trained
        phases["recovery"] = {**block, **state, **training_step_bytes(shape, s, batch)}
    if s.eval_windows:
        phases["head"] = {**({"embeddings and head": b * shape.params_outside} if gpu else {}),
                          "logits of one window": eval_seq * shape.vocab * (b + 8)}
    if s.self_windows:
        phases["self-calibration"] = generation_bytes(shape, s)
    return phases


def generation_bytes(shape: ModelShape, s: RunSizes) -> dict[str, int]:
    """``--calib self``'s generation: the whole model on the accelerator (on the CPU it is among the host's
    weights), one batch's KV cache at the full window length, the sampler's tensors over the vocabulary."""
    b = dtype_bytes(s.run_dtype())
    seq, _ = seqlens(shape, s)
    weights = {"the whole model": b * shape.params_total} if s.device.startswith("cuda") else {}
    return {**weights, "KV cache of one generation batch": s.self_batch * seq * shape.layers * 2 * shape.kv_heads
            * shape.head_dim * b, "sampling over the vocabulary": s.self_batch * shape.vocab * 28}


def disk_bytes(shape: ModelShape, s: RunSizes, load: str) -> dict[str, int]:
    """The disk a run writes and needs at its peak (when the output is being saved beside the whole
    checkpoint): the checkpoint holds every finished block in the run dtype, its masks packed 8 to a byte and,
    when the "pruned" stage is carried (the guard's baseline, or the pruned perplexity), each block as that
    stage saw it; the output is the model in the run dtype (a lazy run's output links the checkpoint's block
    shards instead of writing them again). No activations are written."""
    b = dtype_bytes(s.run_dtype())
    blocks = b * shape.params_in_blocks
    masks = sum(shape.mask_params) // 8 if s.prunes else 0
    pruned_stage = s.prunes and s.recovers and (s.guard > 0 or s.stages() > 2)
    ckpt = {}
    if s.checkpoint or load == "lazy":
        ckpt = {"checkpoint: finished blocks": blocks, "checkpoint: masks (1 bit each)": masks if s.checkpoint else 0}
        if s.checkpoint and pruned_stage:
            ckpt["checkpoint: blocks as pruned (the pruned stage)"] = blocks + (masks if s.guard else 0)
    output = b * (shape.params_outside if load == "lazy" else shape.params_total)
    out = {**ckpt, "output: the saved model" + (" (block shards linked from the checkpoint)" if load == "lazy"
                                                 else ""): output}
    out["written in all"] = sum(out.values())
    out["peak"] = out["written in all"]  # the checkpoint goes only once the output is saved
    return out


def host_fixed_bytes(shape: ModelShape, s: RunSizes, load: str) -> dict[str, int]:
    w = weight_bytes(shape, s)
    out = {f"weights ({load})": w[load]}
    if s.keep_masks and s.prunes and load != "lazy":  # a lazy walk writes each block out and keeps no masks
        out["masks of finished blocks (bool)"] = sum(shape.mask_params)
    if s.trains:  # the block as pruned, to restore a block whose training made it worse
        out["restore snapshot of one block (fp32)" if s.window == 1 else
            f"restore snapshot of one window of {s.window} blocks (fp32)"] = 4 * trained_params(shape, s)
    if s.whole_model and s.prunes:  # what its blocks are measured against after it (ebft.metrics)
        out[f"dense blocks (per-block metrics after {s.whole_model})"] = dtype_bytes(s.run_dtype()) * shape.params_in_blocks
    return out


