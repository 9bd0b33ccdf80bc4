"""Capture and replay: how each block is really called, and the model's own head on stored hidden states.

**Capture.** One pass runs the model's own forward with every block replaced by a recorder, which
notes the positional and keyword arguments that block receives (attention mask, rotary embeddings,
...) and hands the hidden states on unchanged. Families that alternate attention types (Gemma 2/3
sliding and global layers with local and global rotary, Qwen2/3 and Mistral sliding windows) give
different arguments to different blocks; each block is later called with its own
(:class:`BlockIO`). Block 0's recorder also keeps the hidden states: the inputs of the chain.

**Replay** (:func:`tail_nll`). The model's own forward computes the final norm and head, whatever
they are for the family: its blocks are replaced by stand-ins, block 0 returning stored hidden
states (the last block's outputs), the others passing them through.

Nothing here depends on a family: no file per architecture.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import EbftError
from .models import find_blocks
from .system import accelerator_free

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
    free = accelerator_free(device)
    if free is not None and nbytes < free * reserve:
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
