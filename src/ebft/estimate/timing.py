"""Time: ONE decoder block built from the config with random weights, measured, extrapolated to the walk.

The block is called the way the walk calls it (:func:`ebft.capture.capture` records its arguments),
trained with the recovery's real step (:func:`ebft.recover.training.training_step`: autocast, masked
gradients, clipping, AdamW) on EBFT's trainable parameters, and the time is extrapolated to the whole
walk: ``blocks × (stats pass + dense-model stream + the loss checks + epochs × steps + the per-block metrics +
propagation + evaluation streams)``, and with a refit (:mod:`ebft.recover.refit`) its solver: the masked
[out, in] × [in, in] product of each linear, timed, × :data:`REFIT_ITERATIONS`. Pruning itself (SparseGPT's
solve), the capture and the head are not timed. On a CPU it is a rough estimate, labelled so.

``--calib self`` adds its generation before the walk: ``windows / batch × seqlen`` decode steps, each one
token of every window of a batch through every block with a KV cache, then the head and the sampler.
One decode step of the random block is timed with a cache of half a window (capped on a CPU), scaled to
the blocks and to the head by its share of the weights; the sampler is timed on logits of the real
vocabulary (with the sort top-p needs). None of it when the windows are cached.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..capture import BlockIO, capture
from ..models import find_blocks, find_linears
from ..recover import BlockContext
from ..recover.ebft import trainable_parameters
from ..recover.training import BlockTrainingSettings, make_adamw, training_step
from ..selfcalib import Sampling, decode_step, sample_next
from .memory import RunSizes, disk_bytes, seqlens, working_bytes
from .shape import load_config, model_shape


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
    generation_seconds: float = 0.0  # --calib self: generating the windows, before the walk (in total_seconds)


def one_block(config, device, dtype: torch.dtype, attention: str | None = None, seed: int = 0,
              trust_remote_code: bool = False):
    """A 1-block model of the config with random weights on ``device``, a tiny vocabulary, and its block."""
    from transformers import AutoModelForCausalLM

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


def block_inputs(model: nn.Module, batch: int, seqlen: int, seed: int = 0) -> tuple[torch.Tensor, BlockIO]:
    """The first block's inputs on ``batch × seqlen`` random tokens, and how the walk calls it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, seqlen), generator=g)
    device = next(model.parameters()).device
    x, calls = capture(model, ids, device, batch_size=batch, to=device)
    return x, calls[0]


def measure_saved_bytes(block: nn.Module, x: torch.Tensor, io: BlockIO, autocast: torch.dtype | None = None) -> int:
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
            out = io.call(block, x)
            loss = (out.float() - torch.zeros_like(out, dtype=torch.float32)).square().mean()
    loss.backward()
    return sum(seen.values())


def prepare_training(block: nn.Module, train_norms: bool, layers: str | None = None):
    """Make ``block`` look like EBFT's: its trainable parameters (:func:`ebft.recover.ebft.trainable_parameters`)
    in fp32, the rest frozen; random half masks on the linears' weights. Returns ``(params, weight masks)``."""
    linears = find_linears(block, layers)
    params = trainable_parameters(block, linears, train_norms)
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


def estimate_time(config, sizes: RunSizes, device: str | torch.device | None = None, measure: bool = True,
                  iters: int = 3, warmup: int = 1, max_tokens: int | None = None) -> TimeEstimate | None:
    """Time one random block of the config on ``device`` and extrapolate to the whole walk.

    ``max_tokens`` caps the tokens of each measured call (batch first, then sequence), the time then
    scaled linearly to the real size; default: no cap on CUDA, 4096 on CPU. Returns None when
    ``measure`` is False.
    """
    if not measure:
        return None
    device = torch.device(device or ("cuda" if sizes.device.startswith("cuda") and torch.cuda.is_available()
                                     else "cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # leave the run's RNG alone
        return _measure(config, sizes, device, iters, warmup, max_tokens)


def _shrinker(cap: int | None):
    def shrink(batch, length):  # the measured (batch, length) and the factor to the real one
        b, l = batch, length
        while cap and b * l > cap and b > 1:
            b = max(1, b // 2)
        if cap and b * l > cap:
            l = max(16, cap // b)
        return b, l, (batch * length) / (b * l)
    return shrink


def _measure(config, s: RunSizes, device: torch.device, iters: int, warmup: int,
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
    shrink = _shrinker(cap)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, block = one_block(cfg, device, getattr(torch, s.run_dtype()), s.attention,
                             trust_remote_code=s.trust_remote_code)

    fb, fl, f_scale = shrink(s.walk_batch, seq)
    x, io = block_inputs(model, fb, fl)
    with torch.no_grad():
        t_fwd = _timed(lambda: io.call(block, x), device, iters, warmup) * f_scale / s.walk_batch
    eb, el, e_scale = shrink(1, eval_seq)
    xe, ioe = block_inputs(model, eb, el)
    with torch.no_grad():
        t_eval = _timed(lambda: ioe.call(block, xe), device, iters, warmup) * e_scale
    del xe, ioe

    t_gen = _generation_seconds(model, shape, s, device, seq, iters, warmup, cap) if s.self_windows else 0.0
    t_step, mb, s_scale, peaks = 0.0, 0, 1.0, (None, None)
    if s.trains:
        mb, ml, s_scale = shrink(s.recovery_batch, seq)
        t_step, peaks = _time_training(model, block, shape, s, device, mb, ml, iters, warmup, base)
        t_step *= s_scale
    t_refit = _refit_seconds(block, s, device, iters, warmup) if s.refits() else 0.0
    del model, block, x, io
    per_block = _per_block(s, t_fwd, t_eval, t_step)
    if t_refit:
        per_block[f"refit ({REFIT_ITERATIONS} solver iterations, typical)"] = t_refit
    disk = disk_bytes(shape, s, "eager")
    written = sum(v for k, v in disk.items() if k.startswith("checkpoint"))
    if written:  # the block's weights (and masks, and its pruned-stage copy) as each block ends
        per_block[f"checkpoint (at {DISK_BYTES_PER_S / 1e9:g} GB/s, assumed)"] = written / shape.layers / DISK_BYTES_PER_S
    total = shape.layers * sum(per_block.values()) + t_gen
    measured = f"batch {mb or fb}" + (f", scaled ×{s_scale:.1f} in tokens" if s.trains and s_scale > 1 else "")
    where = ("measured on " if device.type == "cuda" else "ROUGH ESTIMATE of a CPU run, measured on ") + _device_name(device)
    label = (f"{where}: one random block ({s.run_dtype()}, autocast {s.autocast_dtype() or 'off'}, {measured}) "
             f"× {shape.layers} blocks; pruning solves, capture and head not timed")
    return TimeEstimate(device=_device_name(device), label=label, step_seconds=t_step,
                        forward_seconds_per_window=t_fwd, eval_forward_seconds_per_window=t_eval,
                        per_block=per_block, total_seconds=total, measured_batch=mb or fb,
                        measured_peak_bytes=peaks[0], predicted_peak_bytes=peaks[1], generation_seconds=t_gen)


@torch.no_grad()
def _generation_seconds(model, shape, s: RunSizes, device, seq: int, iters: int, warmup: int,
                        cap: int | None) -> float:
    """``--calib self``'s generation (see the module docstring): decode steps × (the block's step × (blocks +
    the head's share of a block's weights) + the sampler's step)."""
    batch = s.self_batch
    context = max(1, min(seq // 2, cap // batch if cap else seq))
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, context),
                        generator=torch.Generator().manual_seed(0)).to(device)
    _, cache = decode_step(model, ids)
    t_block = _timed(lambda: decode_step(model, ids[:, -1:], cache), device, iters, warmup)
    logits, noise = torch.randn(batch, shape.vocab, device=device), torch.rand(batch, device=device)
    banned = torch.zeros(shape.vocab, dtype=torch.bool, device=device)
    t_sample = _timed(lambda: sample_next(logits, noise, banned, Sampling(batch=batch)), device, iters, warmup)
    step = t_block * (shape.layers + shape.vocab * shape.hidden / shape.block_params) + t_sample
    return s.self_windows // batch * seq * step


REFIT_ITERATIONS = 40  # what a refit's solver typically takes (SmolLM2, Wanda 50-70 %: 20-70; its cap is 100)


@torch.no_grad()
def _refit_seconds(block, s: RunSizes, device, iters: int, warmup: int) -> float:
    """The closed-form refit of one block (:mod:`ebft.recover.refit`): :data:`REFIT_ITERATIONS` iterations of its
    solver, each one masked [out, in] × [in, in] product per linear, timed on the block's own shapes."""
    total = 0.0
    for lin in find_linears(block, s.layers).values():
        w = torch.randn(lin.weight.shape, device=device)
        h = torch.randn(lin.in_features, lin.in_features, device=device)
        mask = torch.rand(lin.weight.shape, device=device) > 0.5
        total += _timed(lambda: mask * (w @ h), device, iters, warmup)
    return total * REFIT_ITERATIONS


DISK_BYTES_PER_S = 1e9  # what `ebft plan` assumes a checkpoint's writes cost (page cache, then the disk)


def _time_training(model, block, shape, s: RunSizes, device, batch: int, length: int, iters: int, warmup: int,
                   base: int) -> tuple[float, tuple]:
    """Seconds of one training step at ``batch × length`` (the recovery's own step), and on CUDA the
    peak memory measured and predicted."""
    x, io = block_inputs(model, batch, length)
    params, masks = prepare_training(block, s.train_norms, s.layers)
    ctx = BlockContext(index=0, block=block, linears=find_linears(block, s.layers), inputs=x,
                       targets=torch.randn_like(x), masks={}, stats={}, pattern=None, io=io)
    settings = BlockTrainingSettings(batch_size=batch)
    amp = getattr(torch, s.autocast_dtype()) if s.autocast_dtype() else None
    optimizer = make_adamw(params, 1e-6, 0.1)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    snapshot = [p.detach().clone() for p in params]  # EBFT keeps one to restore a rejected block
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    idx = torch.arange(batch)
    seconds = _timed(lambda: training_step(ctx, idx, params, optimizer, scaler, settings, amp, masks), device,
                     iters, warmup)
    peaks = (None, None)
    if device.type == "cuda":
        phase = working_bytes(shape, dataclasses.replace(s, calib_seqlen=length, window=1), batch=batch)["recovery"]
        peaks = (torch.cuda.max_memory_allocated(device) - base, sum(phase.values()))
    del snapshot, optimizer
    return seconds, peaks


def _per_block(s: RunSizes, t_fwd: float, t_eval: float, t_step: float) -> dict[str, float]:
    n = s.calib_nsamples
    per_block = {}
    if s.metric_target() == "dense-block" or s.needs:
        per_block["stats + targets pass"] = n * t_fwd
    if s.target == "dense-model":
        per_block["dense-model stream"] = n * t_fwd
    if s.trains:
        per_block["loss checks"] = 2 * n * t_fwd  # before and after, training and held-out windows
        per_block["training"] = s.epochs * math.ceil((n - s.holdout) / s.recovery_batch) * t_step
    if s.metric_passes:  # ebft.metrics: each block measured before and after its recovery (or once)
        per_block["per-block metrics"] = s.measurements() * s.metric_passes * n * t_fwd
    if s.whole_model:  # measured again after it: the dense block's outputs, the metrics, the propagation
        per_block[f"per-block metrics after {s.whole_model}"] = (2 + s.metric_passes) * n * t_fwd
    per_block["propagation"] = n * t_fwd
    if s.window > 1 and s.trains:  # inside a joint window the chain also goes through each block as pruned
        per_block["joint window: chain through the pruned block"] = n * t_fwd * (s.window - 1) / s.window
    per_block["evaluation streams"] = s.eval_texts * s.stages() * s.eval_windows * t_eval
    if s.guard:  # the pruned-alone chain: its statistics pass and its propagation; the held-out windows twice
        per_block["guard: the model pruned alone"] = ((2 * n + 2 * s.guard) * t_fwd
                                                      + 2 * s.guard_text_windows() * t_eval)
    return per_block


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
