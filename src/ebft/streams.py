"""The walk's activations: hidden states of token windows on their way through the blocks.

A :class:`Stream` is ``[windows, seqlen, hidden]`` hidden states of one text, pushed through each
block in turn at one *stage* of the block's life:

- ``"dense"``  — the original weights (dense perplexity; the dense model's own activations, EBFT's
  ``dense-model`` target);
- ``"pruned"`` — right after pruning, before any recovery (the "pruned" perplexity);
- ``"final"``  — after recovery (the calibration chain itself, the final perplexity).

So the dense, pruned and recovered perplexities of a run come out of one walk, with no second copy
of the model. :class:`Streams` holds every stream of a walk and advances those of a stage through a
block (:meth:`Streams.advance`); where each group of them lives (the accelerator, pinned host memory
or host memory) is the :class:`Homes`' decision, made from ``ebft plan``'s arithmetic.

Under torch.distributed each rank holds a contiguous share of every stream's windows
(:meth:`Stream.windows` gives what a recovery indexes by global window id).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .capture import BlockCalls, capture
from .distributed import Shard, ShardedWindows, current
from .models import find_blocks
from .system import timed

STAGES = ("dense", "pruned", "final")
# the activation groups, by the names ebft plan's placement gives them (estimate.memory sizes each)
CHAIN = "calibration chain"
DENSE_MODEL = "dense-model stream"
BLOCK_TARGETS = "targets"  # the dense block's outputs on the chain's inputs (the dense-block target)
EVALUATION = "evaluation streams"
PRUNED_ALONE = "pruned-alone chain"  # the guard's baseline: the calibration windows through the blocks as pruned alone
WINDOW_INPUTS = "joint window inputs"  # a recovery window of K > 1 blocks: the chain at its first block


@dataclass(frozen=True)
class Homes:
    """Where each activation group lives: ``where`` maps a group (:data:`CHAIN`, :data:`DENSE_MODEL`,
    :data:`BLOCK_TARGETS`, :data:`EVALUATION`, :data:`PRUNED_ALONE`, :data:`WINDOW_INPUTS`) to ``"accelerator"``,
    ``"pinned host"`` or ``"host"``; a group it does not name takes the default its caller gives."""

    device: torch.device
    where: dict[str, str] | None = None

    def home(self, group: str, default: torch.device | None) -> torch.device | None:
        where = (self.where or {}).get(group)
        if where == "accelerator":
            return self.device
        if where in ("pinned host", "host"):
            return torch.device("cpu")
        return default

    def pinned(self, x: torch.Tensor) -> torch.Tensor:
        """Host tensors that feed a GPU are pinned (asynchronous copies)."""
        return x.pin_memory() if x.device.type == "cpu" and self.device.type == "cuda" else x


@dataclass
class Stream:
    """Hidden states of some windows on their way through the blocks, at one stage of each block."""

    stage: str
    x: torch.Tensor  # [windows held here, seqlen, hidden]
    calls: BlockCalls | None  # None when this rank holds none of the windows
    start: int = 0  # the global id of the first window held here (torch.distributed)
    total: int = 0  # windows of the whole stream

    def advance(self, index: int, block) -> None:
        """Push the windows through block ``index`` (in place)."""
        if self.calls is not None:
            self.calls[index].forward(block, self.x, out=self.x)

    def windows(self, x: torch.Tensor | None = None):
        """What a recovery indexes by window id: ``x`` (default: this stream's hidden states), or under
        torch.distributed this rank's share of them, indexed by global window id."""
        x = self.x if x is None else x
        if self.x.shape[0] == self.total:
            return x
        return ShardedWindows(x, self.start, self.total)

    def branch(self, stage: str, x: torch.Tensor | None = None) -> "Stream":
        """Another stream of the same windows (the same calls), from ``x`` (default: a copy of these)."""
        return Stream(stage, self.x.clone() if x is None else x, self.calls, self.start, self.total)


def capture_stream(model, ids: torch.Tensor, device: torch.device, batch_size: int = 1, shard: Shard | None = None,
                   to: torch.device | None = None, stage: str = "final") -> Stream:
    """Capture this rank's windows of ``ids`` (all of them outside torch.distributed): block 0's inputs
    and how each block is called (:func:`ebft.capture.capture`)."""
    start, stop = shard.span(ids.shape[0]) if shard else (0, ids.shape[0])
    if stop == start:  # more ranks than windows: this one holds none
        dtype = next(find_blocks(model)[1].parameters()).dtype
        empty = torch.empty(0, ids.shape[1], model.config.hidden_size, dtype=dtype)
        return Stream(stage, empty, None, start, ids.shape[0])
    x, calls = capture(model, ids[start:stop], device, batch_size, to=to)
    return Stream(stage, x, calls, start, ids.shape[0])


class Streams:
    """Every stream of one walk: the calibration chain (stage "final": it carries the pruned and
    recovered blocks' outputs), the dense model's own stream when a recovery trains towards it, and
    each evaluation text at each stage asked for."""

    def __init__(self, chain: Stream | None, named: dict[str, Stream], clock=None):
        self.chain, self.named = chain, named
        self.clock = clock  # ebft.system.PhaseClock: the time of advance() is the "streams" phase

    @classmethod
    def open(cls, model, chain: Stream | None, eval_ids: dict[str, torch.Tensor] | None, stages,
             dense_model: bool, device: torch.device, batch_size: int, placement: Homes,
             pruned_alone: bool = False, clock=None) -> "Streams":
        """Capture the evaluation texts (once each; every stage starts from a copy) at the stages
        ``stages(name)`` gives for each; with ``dense_model``, branch the dense model's stream off the
        chain; with ``pruned_alone``, the calibration windows through the blocks as pruning alone leaves
        them (stage "pruned": what a run without recovery prunes each block on)."""
        shard = current()
        named: dict[str, Stream] = {}
        for name, ids in (eval_ids or {}).items():
            to = placement.home(EVALUATION, torch.device("cpu") if chain is not None else None)
            first = capture_stream(model, ids, device, batch_size, shard, to=to)
            for i, stage in enumerate(stages(name)):
                named[f"{name}/{stage}"] = first.branch(stage, first.x if i == 0 else None)
        if dense_model:  # the dense model's own activations, carried beside the sparse chain
            dense = placement.pinned(chain.x.to(placement.home(DENSE_MODEL, chain.x.device), copy=True))
            named["calib/dense"] = chain.branch("dense", dense)
        if pruned_alone and chain is not None:
            named["calib/pruned"] = chain.branch("pruned", placement.pinned(
                chain.x.to(placement.home(PRUNED_ALONE, chain.x.device), copy=True)))
        return cls(chain, named, clock)

    @timed("streams")
    def advance(self, stage: str, index: int, block) -> None:
        """Push every stream at ``stage`` (the chain is "final") through block ``index``."""
        for stream in self._all():
            if stream.stage == stage:
                stream.advance(index, block)

    @timed("streams")
    def push_chain(self, index: int, block) -> None:
        """Push the calibration chain alone through block ``index`` (a joint window's pruned blocks, before
        its recovery)."""
        self.chain.advance(index, block)

    @property
    def dense_model(self) -> Stream | None:
        return self.named.get("calib/dense")

    @property
    def pruned_alone(self) -> Stream | None:
        return self.named.get("calib/pruned")

    def _all(self) -> list[Stream]:
        return ([self.chain] if self.chain is not None else []) + list(self.named.values())

    @property
    def returns_tuple(self) -> bool:
        """How the family's blocks return (a tuple or a tensor): learnt on their first call."""
        return any(s.calls.returns_tuple for s in self._all() if s.calls is not None)

    def carries(self, stage: str) -> bool:
        """Whether any stream goes through the blocks at ``stage``."""
        return any(stream.stage == stage for stream in self._all())

    def outputs(self) -> dict[str, torch.Tensor]:
        """``{"<text>/<stage>": the last block's outputs}`` of the evaluation streams."""
        return {k: s.x for k, s in self.named.items() if not k.startswith("calib/")}
