"""THE walk over the decoder blocks: capture, statistics, targets, prune, recover, propagate.

Only one block lives on the accelerator at a time. Activations flow as *streams*: a tensor of
hidden states ``[windows, seqlen, hidden]`` per text, pushed through each block in turn. Each stream
sees the block at one *stage* of its life:

- ``"dense"``  — the original weights (dense perplexity, the dense-model target of EBFT);
- ``"pruned"`` — right after pruning, before any recovery (the "pruned" perplexity);
- ``"final"``  — after recovery (the calibration chain itself, the final perplexity).

So the dense, pruned and recovered perplexities of a run come out of one walk, with no second
copy of the model and no full-model forward on the accelerator. Pruners and recoveries never move
data or loop over blocks: this module does both.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import masks as masklib
from .models import find_blocks, find_linears
from .stats import LayerStats

log = logging.getLogger(__name__)

STAGES = ("dense", "pruned", "final")
_DROP_KWARGS = {"cache", "past_key_values", "past_key_value", "use_cache", "output_attentions"}


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for block 0: records what the block would receive, then stops the forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.inputs: list[torch.Tensor] = []
        self.kwargs: dict | None = None

    def forward(self, hidden_states, *args, **kwargs):
        self.inputs.append(hidden_states.detach())
        if self.kwargs is None:
            self.kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        raise _StopForward


class _Replay(nn.Module):
    """Stands in for a block in the tail pass: block 0 injects stored hidden states, others pass through."""

    def __init__(self, hidden: torch.Tensor | None = None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.hidden is None else self.hidden


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


@contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device):
    """Temporarily move everything except the blocks (embeddings, norms, head) to ``device``."""
    in_blocks = set(blocks.modules())
    outside = [m for m in model.modules() if m not in in_blocks and m is not blocks]
    home = next(model.parameters()).device

    def move(dev):
        for m in outside:
            for name, p in m.named_parameters(recurse=False):
                p.data = p.data.to(dev)
            for name, b in m.named_buffers(recurse=False):
                if b is not None:
                    m._buffers[name] = b.to(dev)

    if home == device:
        yield
        return
    move(device)
    try:
        yield
    finally:
        move(home)


@contextmanager
def _swapped_blocks(blocks: nn.ModuleList, replacements: list[nn.Module]):
    originals = list(blocks)
    for i, r in enumerate(replacements):
        blocks[i] = r
    try:
        yield
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


@dataclass
class BlockIO:
    """How to call one block: the keyword arguments block 0 really received, on the device."""

    kwargs: dict
    device: torch.device
    batch_size: int = 1

    def call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        kwargs = _map_tensors(self.kwargs, lambda t: t.expand(n, *t.shape[1:]) if t.dim() and t.shape[0] == 1 else t)
        out = block(x, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def forward(self, block: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``block`` to every window of ``x`` in batches; write into ``out`` (may be ``x``)."""
        out = torch.empty_like(x) if out is None else out
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i:i + self.batch_size].to(self.device, non_blocking=True)
            out[i:i + self.batch_size] = self.call(block, xb).to(out.device, out.dtype)
        return out


def store_device(nbytes: int, device: torch.device, reserve: float = 0.5) -> torch.device:
    """Keep activations on the accelerator when they fit in ``reserve`` of its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < free * reserve:
            return device
    return torch.device("cpu")


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, device: torch.device,
            batch_size: int = 1, to: torch.device | None = None) -> tuple[torch.Tensor, BlockIO]:
    """Run the model up to block 0 on each window; return its inputs ``[N, S, H]`` and how to call blocks."""
    _, blocks = find_blocks(model)
    catcher = _Catcher(blocks[0])
    hidden, dtype = model.config.hidden_size, next(blocks.parameters()).dtype
    n, s = input_ids.shape
    to = to or store_device(n * s * hidden * dtype.itemsize, device)
    with _outside_blocks_on(model, blocks, device), _swapped_blocks(blocks, [catcher]):
        for i in range(0, n, batch_size):
            try:
                model(input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    x = torch.cat([t.to(to) for t in catcher.inputs])
    if to.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()
    kwargs = _map_tensors(catcher.kwargs, lambda t: t[:1].to(device) if t.dim() and t.shape[0] > 1 else t.to(device))
    return x, BlockIO(kwargs, device, batch_size)


@torch.no_grad()
def tail_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, device: torch.device) -> float:
    """Mean next-token NLL of ``input_ids`` given the last block's outputs ``hidden``.

    The model's own forward computes the final norm and head (whatever they are for the family):
    its blocks are replaced by stand-ins, block 0 returning the stored hidden states.
    """
    _, blocks = find_blocks(model)
    total, count = 0.0, 0
    with _outside_blocks_on(model, blocks, device):
        for i in range(hidden.shape[0]):
            replay = [_Replay(hidden[i:i + 1].to(device))] + [_Replay() for _ in range(len(blocks) - 1)]
            with _swapped_blocks(blocks, replay):
                logits = model(input_ids[i:i + 1].to(device), use_cache=False).logits
            shift = logits[:, :-1].float().flatten(0, 1)
            target = input_ids[i:i + 1, 1:].to(device).flatten()
            total += torch.nn.functional.cross_entropy(shift, target, reduction="sum").item()
            count += target.numel()
    return total / max(count, 1)


@dataclass
class PruneSpec:
    """What the walk needs from the run config, already validated."""

    pruner: object  # ebft.prune.Pruner
    pattern: masklib.Pattern
    layers: str | None = None  # regex on linear names inside a block


@dataclass
class RecoverSpec:
    method: str = "none"
    settings: object = None  # the recovery's own settings (e.g. RecoverConfig)
    target: str = "dense-block"  # or "dense-model"


@dataclass
class WalkResult:
    blocks: list[dict] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)


def _apply_mask_(linear: nn.Linear, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    w = linear.weight.data if weight is None else weight.to(linear.weight.dtype)
    linear.weight.data = w * mask.to(w.device, w.dtype)


def prune_block(block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, LayerStats],
                spec: PruneSpec, prefix: str) -> dict[str, torch.Tensor]:
    """Choose and apply a mask (and, for SparseGPT, new kept weights) for each linear; check them."""
    masks = {}
    for name, linear in linears.items():
        full = f"{prefix}.{name}"
        result = spec.pruner.fn(linear.weight.data.float(), stats.get(name), spec.pattern)
        _apply_mask_(linear, result.mask, result.weight)
        masklib.check_mask(result.mask, spec.pattern, full)
        masklib.check_weight(linear.weight.data, result.mask, full)
        masks[name] = result.mask
    return masks


def walk(model: nn.Module, calib_ids: torch.Tensor | None, prune: PruneSpec | None,
         recover: RecoverSpec | None = None, eval_ids: dict[str, torch.Tensor] | None = None,
         eval_stages: tuple[str, ...] = ("dense", "final"), device: str | torch.device = "cpu",
         batch_size: int = 1, progress: Callable[..., None] | None = None) -> WalkResult:
    """Prune (and recover) ``model`` in place, block by block; push eval texts through every stage.

    ``eval_ids`` maps a name to ``[windows, seqlen]`` token ids; the result's ``streams`` holds,
    for each ``"<name>/<stage>"``, the last block's outputs (pass them to :func:`tail_nll`).
    With ``prune=None`` the walk only evaluates (all stages are then the dense model).
    """
    from .recover import get_recovery

    device = torch.device(device)
    recover = recover or RecoverSpec()
    recovery = get_recovery(recover.method)
    if recovery.scope != "block":
        raise ValueError(f"recovery {recover.method!r} trains the whole model: the walk takes block-scope ones only")
    prefix, blocks = find_blocks(model)
    result = WalkResult()
    progress = progress or (lambda *a, **k: None)

    streams: dict[str, tuple[str, torch.Tensor, BlockIO]] = {}  # key -> (stage, hidden, how to call)
    for name, ids in (eval_ids or {}).items():
        x, eval_io = capture(model, ids, device, batch_size, to=torch.device("cpu") if prune else None)
        stages = eval_stages if prune else ("dense",)
        if recover.method == "none":
            stages = tuple(s for s in stages if s != "pruned")
        for i, stage in enumerate(stages):
            streams[f"{name}/{stage}"] = (stage, x if i == 0 else x.clone(), eval_io)
    calib = io = None
    dense_model_targets = prune is not None and recovery.needs_targets and recover.target == "dense-model"
    if prune is not None:
        calib, io = capture(model, calib_ids, device, batch_size)
        if dense_model_targets:  # the dense model's own activations, carried beside the sparse chain
            streams["calib/dense"] = ("dense", calib.clone(), io)
    needs = set(prune.pruner.needs) if prune else set()

    def push(stage: str, block: nn.Module) -> None:
        for st, x, stream_io in streams.values():
            if st == stage:
                stream_io.forward(block, x, out=x)

    for index, block in enumerate(blocks):
        start = time.perf_counter()
        progress("block_start", index=index, total=len(blocks))
        block.to(device)
        record: dict = {"index": index}
        if prune is None:
            push("dense", block)
        else:
            linears = find_linears(block, prune.layers)
            stats = {n: LayerStats(l.in_features, frozenset(needs), device) for n, l in linears.items()}
            hooks = [l.register_forward_hook(lambda m, a, o, s=stats[n]: s.update(a[0]))
                     for n, l in linears.items()] if needs else []
            dense_block_targets = recovery.needs_targets and recover.target == "dense-block"
            try:  # one dense pass over the calibration chain: pruner statistics and EBFT targets
                targets = io.forward(block, calib) if dense_block_targets or needs else None
            finally:
                for h in hooks:
                    h.remove()
            push("dense", block)
            if dense_model_targets:
                targets = streams["calib/dense"][1]
            elif not dense_block_targets:
                targets = None
            # a mask-tuning recovery may grow pruned weights back: it gets their dense values
            extra = {"dense_weights": {n: l.weight.data.to(torch.float32, copy=True) for n, l in linears.items()},
                     "pattern": prune.pattern} if recovery.changes_masks else {}
            masks = prune_block(block, linears, stats, prune, f"{prefix}.{index}")
            del stats
            push("pruned", block)
            recover_start = time.perf_counter()
            record.update(recovery.fn(block, calib, targets, masks, linears, io, recover.settings,
                                      index=index, progress=progress, **extra) or {})
            record["recover_seconds"] = round(time.perf_counter() - recover_start, 3)
            del extra
            for name, mask in masks.items():
                full = f"{prefix}.{index}.{name}"
                masklib.check_mask(mask, prune.pattern, full)
                masklib.check_weight(linears[name].weight.data, mask, full)
                result.masks[full] = mask.cpu()
            del targets
            io.forward(block, calib, out=calib)
        push("final", block)
        if device.type != "cpu":
            block.to("cpu")
        record["seconds"] = round(time.perf_counter() - start, 3)
        result.blocks.append(record)
        log.info("block %d/%d done in %.1f s%s", index + 1, len(blocks), record["seconds"],
                 f" (loss {record['loss_before']:.4g} -> {record['loss_after']:.4g})" if "loss_after" in record else "")
        progress("block_end", **record)

    result.streams = {k: x for k, (stage, x, _) in streams.items() if not k.startswith("calib/")}
    return result
