"""THE walk over the decoder blocks: capture, per-block statistics, prune, recover, check, propagate.

Only one block lives on the accelerator at a time. Activations flow as *streams*: a tensor of
hidden states ``[windows, seqlen, hidden]`` per text, pushed through each block in turn. Each stream
sees the block at one *stage* of its life:

- ``"dense"``  — the original weights (dense perplexity, the dense-model target of EBFT);
- ``"pruned"`` — right after pruning, before any recovery (the "pruned" perplexity);
- ``"final"``  — after recovery (the calibration chain itself, the final perplexity).

So the dense, pruned and recovered perplexities of a run come out of one walk, with no second
copy of the model and no full-model forward on the accelerator.

**How each block is called.** One *capture* pass runs the model's own forward with every block
replaced by a recorder, which notes the positional and keyword arguments that block receives
(attention mask, rotary embeddings, ...) and hands the hidden states on unchanged. Families that
alternate attention types (Gemma 2/3 sliding and global layers with local and global rotary,
Qwen2/3 and Mistral sliding windows) give different arguments to different blocks; each block is
later called with its own. Block 0's recorder also keeps the hidden states: the chain's inputs.

Pruners and recoveries never move data or loop over blocks: this module does both.
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
from .distributed import current
from .errors import EbftError
from .lazy import store_for
from .models import find_blocks, find_linears
from .stats import LayerStats

log = logging.getLogger(__name__)

STAGES = ("dense", "pruned", "final")
# Arguments that concern generation, never a block's output on a full window.
_DROP_KWARGS = {"cache", "past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions"}


class _StopForward(Exception):
    pass


def _map_tensors(obj, fn, memo: dict | None = None):
    """Apply ``fn`` to every tensor inside ``obj``; a tensor shared by several places is mapped once."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, fn(obj))  # keep obj alive so its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(_map_tensors(o, fn, memo) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    return obj


def _is_cache(obj) -> bool:
    return type(obj).__name__.endswith("Cache") and not isinstance(obj, torch.Tensor)


class _StandIn(nn.Module):
    """Stands in for a block; attributes it lacks are read from the block (a model's forward may
    ask a layer for its attention type)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the stand-in owns no weights

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


class _Recorder(_StandIn):
    def __init__(self, block, index: int, capture: "_Capture"):
        super().__init__(block)
        self.index = index
        object.__setattr__(self, "capture", capture)

    def forward(self, hidden_states, *args, **kwargs):
        return self.capture.seen(self.index, hidden_states, args, kwargs)


class _Capture:
    """What the recorders share: block 0's inputs for every batch, each block's call from the first."""

    def __init__(self, n_blocks: int, store: torch.device):
        self.calls: list[tuple[tuple, dict] | None] = [None] * n_blocks
        self.inputs: list[torch.Tensor] = []
        self.store = store
        self.first = True

    def seen(self, index, hidden, args, kwargs):
        if index == 0:
            self.inputs.append(hidden.detach().to(self.store))
        if not self.first:
            raise _StopForward  # later batches: only block 0's inputs are new
        batch = hidden.shape[0]
        args = tuple(None if _is_cache(a) else a for a in args)
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS and not _is_cache(v)}
        self.calls[index] = (args, kwargs, batch)
        if index == len(self.calls) - 1:
            raise _StopForward
        return hidden


class _Replay(_StandIn):
    """Stands in for a block in the tail pass: block 0 injects stored hidden states, others pass through."""

    def __init__(self, block, hidden: torch.Tensor | None = None, as_tuple: bool = False):
        super().__init__(block)
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.hidden is None else self.hidden
        return (out,) if self.as_tuple else out


@contextmanager
def _outside_blocks_on(model: nn.Module, blocks: nn.ModuleList, device: torch.device):
    """Temporarily move everything except the blocks (embeddings, norms, head) to ``device``.

    Their home is where their own parameters are (a lazily loaded model's blocks may be on ``meta``)."""
    in_blocks = set(blocks.modules())
    outside = [m for m in model.modules() if m not in in_blocks and m is not blocks]
    params = [p for m in outside for p in m.parameters(recurse=False)]
    home = params[0].device if params else device

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
    """How to call one block: the positional and keyword arguments it really receives, on the device.

    Tensors recorded with a leading batch dimension of 1 are expanded to each call's batch."""

    args: tuple
    kwargs: dict
    device: torch.device
    batch_size: int = 1
    shape: dict = field(default_factory=dict)  # what the block returns: {"tuple": bool}, learnt on first call

    def call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        expand = lambda t: t.expand(n, *t.shape[1:]) if t.dim() and t.shape[0] == 1 and n != 1 else t  # noqa: E731
        out = block(x, *_map_tensors(self.args, expand), **_map_tensors(self.kwargs, expand))
        as_tuple = isinstance(out, (tuple, list))
        self.shape.setdefault("tuple", as_tuple)
        return out[0] if as_tuple else out

    @torch.no_grad()
    def forward(self, block: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``block`` to every window of ``x`` in batches; write into ``out`` (may be ``x``)."""
        out = torch.empty_like(x) if out is None else out
        for i in range(0, x.shape[0], self.batch_size):
            xb = x[i:i + self.batch_size].to(self.device, non_blocking=True)
            out[i:i + self.batch_size] = self.call(block, xb).to(out.device, out.dtype)
        return out


@dataclass
class BlockCalls:
    """Each block's :class:`BlockIO` for one stream (calls depend on the window length)."""

    ios: list[BlockIO]

    def __getitem__(self, index: int) -> BlockIO:
        return self.ios[index]

    @property
    def returns_tuple(self) -> bool:
        return any(io.shape.get("tuple") for io in self.ios)


def store_device(nbytes: int, device: torch.device, reserve: float = 0.5) -> torch.device:
    """Keep activations on the accelerator when they fit in ``reserve`` of its free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes < free * reserve:
            return device
    return torch.device("cpu")


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, device: torch.device, batch_size: int = 1,
            to: torch.device | None = None) -> tuple[torch.Tensor, BlockCalls]:
    """Run the model's own forward with recorders for blocks: block 0's inputs ``[N, S, H]`` for all
    windows and, from the first batch, how every block is called."""
    _, blocks = find_blocks(model)
    hidden, dtype = model.config.hidden_size, next(blocks.parameters()).dtype
    n, s = input_ids.shape
    to = to or store_device(n * s * hidden * dtype.itemsize, device)
    state = _Capture(len(blocks), to)
    recorders = [_Recorder(b, i, state) for i, b in enumerate(blocks)]
    with _outside_blocks_on(model, blocks, device), _swapped_blocks(blocks, recorders):
        for i in range(0, n, batch_size):
            try:
                model(input_ids[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            state.first = False
    if any(c is None for c in state.calls):
        missing = [i for i, c in enumerate(state.calls) if c is None]
        raise EbftError(f"{type(model).__name__}: blocks {missing} were never called by the model's forward; "
                        "this family's layer loop is not supported")
    x = torch.cat(state.inputs)
    if to.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()
    memo: dict = {}
    ios = []
    for args, kwargs, batch in state.calls:
        one = lambda t, b=batch: (t[:1] if t.dim() and b > 1 and t.shape[0] == b else t).to(device)  # noqa: E731
        ios.append(BlockIO(_map_tensors(args, one, memo), _map_tensors(kwargs, one, memo), device, batch_size))
    return x, BlockCalls(ios)


@torch.no_grad()
def tail_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, device: torch.device,
             as_tuple: bool = False) -> float:
    """Mean next-token NLL of ``input_ids`` given the last block's outputs ``hidden``.

    The model's own forward computes the final norm and head (whatever they are for the family):
    its blocks are replaced by stand-ins, block 0 returning the stored hidden states (as a 1-tuple
    when the family's blocks return tuples).
    """
    total, count = tail_nll_sum(model, hidden, input_ids, device, as_tuple)
    return total / max(count, 1)


@torch.no_grad()
def tail_nll_sum(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, device: torch.device,
                 as_tuple: bool = False) -> tuple[float, int]:
    """``(summed next-token NLL, tokens)`` of :func:`tail_nll` (ranks add theirs under torch.distributed)."""
    _, blocks = find_blocks(model)
    total, count = 0.0, 0
    with _outside_blocks_on(model, blocks, device):
        for i in range(hidden.shape[0]):
            replay = [_Replay(blocks[0], hidden[i:i + 1].to(device), as_tuple)]
            replay += [_Replay(b, None, as_tuple) for b in list(blocks)[1:]]
            with _swapped_blocks(blocks, replay):
                logits = model(input_ids[i:i + 1].to(device), use_cache=False).logits
            shift = logits[:, :-1].float().flatten(0, 1)
            target = input_ids[i:i + 1, 1:].to(device).flatten()
            total += torch.nn.functional.cross_entropy(shift, target, reduction="sum").item()
            count += target.numel()
    return total, count


# ----------------------------------------------------------------------------- what the walk is asked to do

@dataclass
class PruneSpec:
    """What to prune: the pruner with its settings, the pattern of every block, which linears.

    ``pattern`` is one :class:`~ebft.masks.Pattern` for every block, or a list with one per block
    (a non-uniform allocation such as OWL's, decided by :mod:`ebft.plan`)."""

    pruner: object  # ebft.prune.Pruner
    pattern: masklib.Pattern | list[masklib.Pattern]
    layers: str | None = None  # regex on linear names inside a block
    settings: object = None  # the pruner's own settings (None: its defaults)
    structures: list | None = None  # structured pruners: what each block keeps (ebft.structured.Structure)

    def pattern_for(self, index: int) -> masklib.Pattern:
        return self.pattern[index] if isinstance(self.pattern, list) else self.pattern


@dataclass
class RecoverSpec:
    """Which recovery, its own settings, and the run's seed (every random draw of the recovery)."""

    recovery: object = "none"  # ebft.recover.Recovery, or its registered name
    settings: object = None  # the recovery's settings dataclass (None: its defaults)
    seed: int = 0
    budget: float | None = None  # seconds for the whole walk's recovery (each block: what is left / blocks left)


@dataclass
class WalkResult:
    blocks: list[dict] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # full linear name -> mask (not kept lazily)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's windows under torchrun
    returns_tuple: bool = False  # how the family's blocks return: for :func:`tail_nll`
    # full linear name -> [zeros, weights] of each pruned linear when its block was done: the run
    # record's sparsity when the masks are not kept (a lazy walk frees each block)
    sparsity_counts: dict[str, list[int]] = field(default_factory=dict)


def _apply_mask_(linear: nn.Linear, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    w = linear.weight.data if weight is None else weight.to(linear.weight.dtype)
    linear.weight.data = w * mask.to(w.device, w.dtype)


def prune_block(linears: dict[str, nn.Linear], stats: dict[str, LayerStats], spec: PruneSpec,
                pattern: masklib.Pattern, prefix: str) -> dict[str, torch.Tensor]:
    """Choose and apply a mask (and, for SparseGPT, new kept weights) for each linear; check them."""
    masks = {}
    settings = spec.settings if spec.settings is not None else spec.pruner.default_settings()
    for name, linear in linears.items():
        full = f"{prefix}.{name}"
        result = spec.pruner(linear.weight.data.float(), stats.get(name), pattern, settings)
        _apply_mask_(linear, result.mask, result.weight)
        masklib.check_mask(result.mask, pattern, full)
        masklib.check_weight(linear.weight.data, result.mask, full)
        masks[name] = result.mask
    return masks


@torch.no_grad()
def dense_pass(block: nn.Module, io: BlockIO, x: torch.Tensor, linears: dict[str, nn.Linear], needs,
               keep_output: bool = True, out_device: torch.device | None = None
               ) -> tuple[dict[str, LayerStats], torch.Tensor | None]:
    """Run ``block`` over ``x`` once, collecting the input statistics ``needs`` of each linear.

    Returns ``(statistics per linear, the block's outputs ``[N, S, H]`` or None)``, the outputs on
    ``out_device`` (default: where ``x`` is; host memory is pinned when the block runs on a GPU). Under
    torch.distributed the statistics are summed over the ranks (each ran its own windows)."""
    stats = {n: LayerStats(l.in_features, frozenset(needs), io.device) for n, l in linears.items()}
    if not keep_output and not needs:
        return stats, None
    hooks = [l.register_forward_hook(lambda m, a, o, s=stats[n]: s.update(a[0]))
             for n, l in linears.items()] if needs else []
    try:
        out = None
        if keep_output:
            where = x.device if out_device is None else out_device
            pin = where.type == "cpu" and io.device.type == "cuda"
            out = io.forward(block, x, out=torch.empty(x.shape, dtype=x.dtype, device=where, pin_memory=pin))
        else:
            for i in range(0, x.shape[0], io.batch_size):
                io.call(block, x[i:i + io.batch_size].to(io.device, non_blocking=True))
    finally:
        for h in hooks:
            h.remove()
    if needs:
        for s in stats.values():
            s.all_reduce_()
    return stats, out


def shrink_block(block: nn.Module, config, spec: PruneSpec, index: int, stats) -> dict:
    """A structured pruner's step: remove the units the plan drops from this block; check the shapes."""
    from .structured import block_layout

    structure = spec.structures[index]
    settings = spec.settings if spec.settings is not None else spec.pruner.default_settings()
    spec.pruner.fn(block, config, structure, stats, settings)
    check_structure(block, config, structure, f"block {index}")
    layout = block_layout(block, config)
    return {"kv_groups_kept": layout.num_kv_heads, "channels_kept": layout.intermediate_size}


def check_structure(block: nn.Module, config, structure, name: str) -> None:
    """A structured block must have exactly the units its structure keeps (the structured twin of the
    mask checks)."""
    from .structured import block_layout

    layout = block_layout(block, config)
    if (layout.num_kv_heads, layout.intermediate_size) != (len(structure.attention_keep), len(structure.mlp_keep)):
        raise masklib.MaskError(f"{name}: {layout.num_kv_heads} KV groups and {layout.intermediate_size} channels, "
                                f"expected {len(structure.attention_keep)} and {len(structure.mlp_keep)}")


def _noop(*args, **kwargs) -> None:
    return None


@torch.no_grad()
def plan_pass(model: nn.Module, calib_ids: torch.Tensor, layers: str | None, needs, summarise: Callable,
              device: str | torch.device = "cpu", batch_size: int = 1, progress: Callable | None = None) -> list:
    """The dense planning pass: the *unpruned* model over the calibration windows, block by block.

    For each block, the input statistics ``needs`` of its linears are collected in one pass and
    handed to ``summarise(index, block, linears, stats)``, whose (small) result is kept; the
    statistics are dropped before the next block. Nothing is pruned. Returns the summaries in order.
    A lazily loaded model's blocks are read for the pass and freed again (nothing is written); under
    torch.distributed each rank runs its share of the windows and the statistics are summed.
    """
    device = torch.device(device)
    progress = progress or _noop
    store, shard = store_for(model), current()
    x, calls = capture(model, shard.take(calib_ids) if shard else calib_ids, device, batch_size)
    summaries = []
    for index in range(store.num_blocks):
        progress("plan_block", index=index, total=store.num_blocks)
        block = store.load(index, device)
        linears = find_linears(block, layers)
        stats, _ = dense_pass(block, calls[index], x, linears, needs, keep_output=False)
        summaries.append(summarise(index, block, linears, stats))
        del stats
        calls[index].forward(block, x, out=x)
        store.release(index)
    return summaries


@dataclass
class _Stream:
    """Hidden states of some windows on their way through the blocks, at one stage of each block."""

    stage: str
    x: torch.Tensor  # [windows held here, seqlen, hidden]
    calls: BlockCalls | None  # None when this rank holds none of the windows
    start: int = 0  # the global id of the first window held here (torch.distributed)
    total: int = 0  # windows of the whole stream

    def windows(self):
        """What a recovery indexes by window id: the tensor, or this rank's share of the windows."""
        if self.x.shape[0] == self.total:
            return self.x
        from .distributed import ShardedWindows

        return ShardedWindows(self.x, self.start, self.total)


def _capture_stream(model, ids: torch.Tensor, device, batch_size: int, shard, to=None) -> _Stream:
    """Capture this rank's windows of ``ids`` (all of them outside torch.distributed)."""
    start, stop = shard.span(ids.shape[0]) if shard else (0, ids.shape[0])
    if stop == start:  # more ranks than windows: this one holds none
        dtype = next(find_blocks(model)[1].parameters()).dtype
        empty = torch.empty(0, ids.shape[1], model.config.hidden_size, dtype=dtype)
        return _Stream("", empty, None, start, ids.shape[0])
    x, calls = capture(model, ids[start:stop], device, batch_size, to=to)
    return _Stream("", x, calls, start, ids.shape[0])


def _set_block_state_(block: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Put checkpointed tensors (full names starting with ``prefix``) into ``block`` in place: copied
    where shapes match; set anew where structured pruning changed a shape or added a bias."""
    for full, t in tensors.items():
        path, _, attr = full[len(prefix):].rpartition(".")
        module = block.get_submodule(path) if path else block
        old = module._parameters.get(attr, module._buffers.get(attr))
        if old is not None and old.shape == t.shape and old.device.type != "meta":
            old.data.copy_(t)
        elif attr in module._parameters or attr not in module._buffers:
            grad = old.requires_grad if old is not None else True
            module._parameters[attr] = nn.Parameter(t.to(old.dtype if old is not None else t.dtype),
                                                    requires_grad=grad)
        else:
            module._buffers[attr] = t


def _sparsity_counts(linears: dict[str, nn.Linear], names, prefix: str) -> dict[str, list[int]]:
    return {f"{prefix}.{n}": [int((linears[n].weight.data == 0).sum()), linears[n].weight.numel()] for n in names}


def walk(model: nn.Module, calib_ids: torch.Tensor | None, prune: PruneSpec | None,
         recover: RecoverSpec | None = None, eval_ids: dict[str, torch.Tensor] | None = None,
         eval_stages: tuple[str, ...] = ("dense", "final"), device: str | torch.device = "cpu",
         batch_size: int = 1, progress: Callable[..., None] | None = None, *, checkpoint=None,
         placement: dict[str, str] | None = None) -> WalkResult:
    """Prune (and recover) ``model`` in place, block by block; push eval texts through every stage.

    ``eval_ids`` maps a name to ``[windows, seqlen]`` token ids; the result's ``streams`` holds,
    for each ``"<name>/<stage>"``, the last block's outputs (pass them to :func:`tail_nll`).
    With ``prune=None`` the walk only evaluates (all stages are then the dense model).

    **Scale.** The blocks come from the model's block store (:func:`ebft.lazy.store_for`): a model
    loaded lazily has each block read from its shards when the walk reaches it and written + freed
    when it is done (into ``checkpoint.writer``), and keeps no masks (``sparsity_counts`` says how
    sparse each linear ended). Under torch.distributed every rank walks its share of the windows
    (:mod:`ebft.distributed`); ``streams`` then hold this rank's windows.

    ``checkpoint`` (:class:`ebft.checkpoint.RunCheckpoint`): continue from its last state, and
    checkpoint as the walk goes. Restored blocks are reported to ``progress`` as done at once.

    ``placement`` (:attr:`ebft.budget.Placement.where`, the plan's arithmetic): where each activation
    group lives — ``"calibration chain"``, ``"dense-model stream"``, ``"targets"`` (the dense block's
    outputs, ``dense-block`` target), ``"evaluation streams"`` on the
    ``"accelerator"``, in ``"pinned host"`` or ``"host"`` memory; a group it does not name: the
    calibration chain on the accelerator when it fits in half its free memory, evaluation streams of a
    pruning walk in host memory.
    """
    from .checkpoint import kill_point
    from .recover import BlockContext, get_recovery

    device = torch.device(device)
    recover = recover or RecoverSpec()
    recovery = get_recovery(recover.recovery) if isinstance(recover.recovery, str) else recover.recovery
    if recovery.scope != "block":
        raise ValueError(f"recovery {recovery.name!r} trains the whole model: the walk takes block-scope ones only")
    settings = recover.settings if recover.settings is not None else recovery.default_settings()
    prefix, blocks = find_blocks(model)
    store, shard = store_for(model), current()
    keep_masks = not store.lazy
    if store.lazy and prune is not None and checkpoint is None:
        raise ValueError("a lazily loaded model's finished blocks are written as the walk goes: pass the run's "
                         "checkpoint (ebft.checkpoint.RunCheckpoint), which holds their writer")
    result = WalkResult()
    progress = progress or _noop

    def home(group: str, default: torch.device | None) -> torch.device | None:
        where = (placement or {}).get(group)
        return device if where == "accelerator" else torch.device("cpu") if where in ("pinned host", "host") else default

    streams: dict[str, _Stream] = {}
    for name, ids in (eval_ids or {}).items():
        first = _capture_stream(model, ids, device, batch_size, shard,
                                to=home("evaluation streams", torch.device("cpu") if prune else None))
        stages = eval_stages if prune else ("dense",)
        if recovery.name == "none":
            stages = tuple(s for s in stages if s != "pruned")
        for i, stage in enumerate(stages):
            x = first.x if i == 0 else first.x.clone()
            streams[f"{name}/{stage}"] = _Stream(stage, x, first.calls, first.start, first.total)
    calib = calib_calls = chain = None
    target = getattr(settings, "target", "dense-block")
    dense_model_targets = prune is not None and recovery.needs_targets and target == "dense-model"
    dense_block_targets = prune is not None and recovery.needs_targets and target == "dense-block"
    if prune is not None:
        chain = _capture_stream(model, calib_ids, device, batch_size, shard, to=home("calibration chain", None))
        calib, calib_calls = chain.x, chain.calls
        if dense_model_targets:  # the dense model's own activations, carried beside the sparse chain
            dense = calib.to(home("dense-model stream", calib.device), copy=True)
            if dense.device.type == "cpu" and device.type == "cuda":
                dense = dense.pin_memory()
            streams["calib/dense"] = _Stream("dense", dense, calib_calls, chain.start, chain.total)
    needs = (set(prune.pruner.needs) | set(recovery.needs)) if prune else set()

    def push(stage: str, index: int, block: nn.Module) -> None:
        for st in streams.values():
            if st.stage == stage and st.calls is not None:
                st.calls[index].forward(block, st.x, out=st.x)

    def returns_tuple() -> bool:
        calls = [st.calls for st in streams.values()] + [calib_calls]
        return any(c.returns_tuple for c in calls if c is not None)

    start = 0
    saved_tuple = False
    if checkpoint is not None:
        checkpoint.open_writer()
        state = checkpoint.restore()
        if state is not None:
            start, saved_tuple = state.next_block, state.returns_tuple
            _restore(model, prefix, blocks, store, prune, checkpoint, state, streams, calib, result, keep_masks)
            for record in result.blocks:
                progress("block_start", index=record["index"], total=len(blocks))
                progress("block_end", **record)

    for index in range(start, len(blocks)):
        started = time.perf_counter()
        progress("block_start", index=index, total=len(blocks))
        block = store.load(index, device)
        kill_point("block", index)
        record: dict = {"index": index}
        if prune is None:
            push("dense", index, block)
        else:
            io = calib_calls[index]
            pattern = prune.pattern_for(index)
            linears = find_linears(block, prune.layers)
            # one dense pass over the calibration chain: every statistic anyone needs, and the targets
            stats, targets = dense_pass(block, io, calib, linears, needs, keep_output=dense_block_targets,
                                        out_device=home("targets", calib.device))
            push("dense", index, block)
            if dense_model_targets:
                targets = streams["calib/dense"].x
            dense_weights = ({n: l.weight.data.to(torch.float32, copy=True) for n, l in linears.items()}
                             if recovery.changes_masks else None)
            if prune.pruner.structured:  # whole units go: no masks, smaller linears
                record.update(shrink_block(block, model.config, prune, index, stats))
                linears, masks = find_linears(block), {}
            else:
                masks = prune_block(linears, stats, prune, pattern, f"{prefix}.{index}")
            for s in stats.values():
                s.keep_only(recovery.needs)  # the Hessian is large; free it unless the recovery reads it
            push("pruned", index, block)
            recover_start = time.perf_counter()
            inputs = chain.windows()
            if targets is not None and getattr(inputs, "sharded", False):
                from .distributed import ShardedWindows

                targets = ShardedWindows(targets, chain.start, chain.total)
            share = None
            if recover.budget is not None:  # what is left of the budget, shared over the blocks left
                spent = sum(r.get("recover_seconds", 0.0) for r in result.blocks)
                share = max(recover.budget - spent, 0.0) / (len(blocks) - index)
                if shard is not None:  # each rank timed its own blocks: rank 0's share, so all run the same epochs
                    from .distributed import broadcast_value

                    share = broadcast_value(share)
                record["time_share"] = round(share, 3)
            ctx = BlockContext(index=index, block=block, linears=linears, inputs=inputs, targets=targets,
                               masks=masks, stats=stats, pattern=pattern, io=io, seed=recover.seed,
                               dense_weights=dense_weights, progress=progress, time_share=share)
            record.update(recovery.fn(ctx, settings) or {})
            record["recover_seconds"] = round(time.perf_counter() - recover_start, 3)
            if shard is not None:  # the same weights and masks on every rank, whatever the kernels did
                from .distributed import broadcast_

                broadcast_([*block.state_dict().values(), *masks.values()])
            full_masks = {}
            for name, mask in masks.items():
                full = f"{prefix}.{index}.{name}"
                masklib.check_mask(mask, pattern, full)
                masklib.check_weight(linears[name].weight.data, mask, full)
                full_masks[full] = mask.cpu()
            result.sparsity_counts.update(_sparsity_counts(linears, masks, f"{prefix}.{index}"))
            if keep_masks:
                result.masks.update(full_masks)
                if checkpoint is not None:
                    checkpoint.save_masks(index, full_masks)
            if prune.pruner.structured:
                check_structure(block, model.config, prune.structures[index], f"{prefix}.{index}")
            del ctx, targets, stats, dense_weights, full_masks
            io.forward(block, calib, out=calib)
        push("final", index, block)
        store.release(index, write_to=checkpoint.writer if checkpoint is not None else None)
        record["seconds"] = round(time.perf_counter() - started, 3)
        result.blocks.append(record)
        log.info("block %d/%d done in %.1f s%s", index + 1, len(blocks), record["seconds"],
                 f" (loss {record['loss_before']:.4g} -> {record['loss_after']:.4g})" if "loss_after" in record else "")
        if checkpoint is not None:
            kill_point("parts", index)
            if checkpoint.due(index + 1, len(blocks)):
                tensors = {f"stream/{k}": st.x for k, st in streams.items()}
                if calib is not None:
                    tensors["calib"] = calib
                checkpoint.save(_progress(index + 1, result, saved_tuple or returns_tuple(), tensors))
        progress("block_end", **record)

    result.streams = {k: st.x for k, st in streams.items() if not k.startswith("calib/")}
    result.returns_tuple = saved_tuple or returns_tuple()
    return result


def _progress(next_block: int, result: WalkResult, as_tuple: bool, tensors: dict):
    from .checkpoint import Progress, rng_state

    return Progress(next_block, result.blocks, result.sparsity_counts, as_tuple, tensors, rng_state())


def _restore(model, prefix, blocks, store, prune, checkpoint, state, streams, calib, result, keep_masks) -> None:
    """Bring the walk to its checkpointed state: finished blocks (an eager model's; a lazy model's are
    in the writer already), masks, records, activations and random state."""
    from .checkpoint import set_rng_state

    result.blocks = [dict(r) for r in state.records]
    result.sparsity_counts = {k: list(v) for k, v in state.sparsity_counts.items()}
    tensors = dict(state.tensors)
    for key, st in streams.items():
        saved = tensors.pop(f"stream/{key}", None)
        if saved is None or saved.shape != st.x.shape:
            raise EbftError(f"resume: the checkpoint {checkpoint.folder} holds no matching {key} activations; "
                            "pass --no-resume to start over")
        st.x.copy_(saved)
    if calib is not None:
        saved = tensors.pop("calib", None)
        if saved is None or saved.shape != calib.shape:
            raise EbftError(f"resume: the checkpoint {checkpoint.folder} holds no matching calibration chain; "
                            "pass --no-resume to start over")
        calib.copy_(saved)
    del tensors
    if not store.lazy:
        for index in range(state.next_block):
            block = blocks[index]
            if prune is not None and prune.pruner.structured:
                from .structured import shrink_block_

                shrink_block_(block, model.config, prune.structures[index], None)
            _set_block_state_(block, checkpoint.block_tensors(f"{prefix}.{index}."), f"{prefix}.{index}.")
            if keep_masks and prune is not None:
                saved = checkpoint.masks(index)
                # in the order the walk made them (run.json's sparsity lists the layers in this order)
                order = [k for k in result.sparsity_counts if k.startswith(f"{prefix}.{index}.")]
                result.masks.update({k: saved[k] for k in order})
    set_rng_state(state.rng)
