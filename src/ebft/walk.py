"""THE walk over the decoder blocks: for each block, load → statistics → prune → recover → check →
propagate → release.

Only one block lives on the accelerator at a time (the K blocks of a joint recovery window, EBFT's
``window``: they are trained together, :class:`Window`). The calibration chain and the evaluation texts
flow through the blocks as *streams* (:mod:`ebft.streams`): the hidden states of their windows,
pushed through each block at the stage of the block's life they measure — ``dense``, ``pruned`` or
``final`` — so the dense, pruned and recovered perplexities of a run come out of one walk, with no
second copy of the model. How each block is really called was captured once (:mod:`ebft.capture`).

The loop in :func:`walk` is the algorithm and nothing else. What a block goes through is
:class:`BlockWork` (the pruner and the recovery with their settings, the statistics and targets they
need); the walk's bookkeeping is :class:`WalkState` (the block store, which reads a lazily loaded
model's blocks and frees them; the checkpoint, which the walk resumes from and writes at block
boundaries; progress; the time budget's share). Under torch.distributed every rank walks its share of
the windows; statistics, gradients and losses are summed over the ranks, and each block's weights are
synchronised from rank 0 when its recovery ends (:mod:`ebft.distributed`).

Pruners and recoveries never move data or loop over blocks: this module does both.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import distributed
from .blockstore import store_for
from .capture import BlockIO
from .checkpoint import NO_CHECKPOINT, Progress, kill_point, rng_state, set_rng_state
from .errors import EbftError
from .masks import Pattern
from .metrics import Probe, Readings, record as record_metrics, take
from .models import find_blocks, find_linears
from .prune import BlockSite
from .recover import BlockContext, get_recovery
from .stats import LayerStats, StatsHooks
from .streams import BLOCK_TARGETS, CHAIN, STAGES, WINDOW_INPUTS, Homes, Stream, Streams, capture_stream
from .system import PhaseClock, timed

log = logging.getLogger(__name__)

MASK_KEY = "mask:"  # a pruned block's snapshot holds its masks under this prefix (names relative to the block)

__all__ = ["STAGES", "PruneSpec", "RecoverSpec", "WalkResult", "walk", "planning_pass", "dense_pass", "measure_after"]


# ----------------------------------------------------------------------------- what the walk is asked to do

@dataclass
class PruneSpec:
    """What to prune: the pruner with its settings, the pattern of every block, which linears.

    ``pattern`` is one :class:`~ebft.masks.Pattern` for every block, or a list with one per block
    (a non-uniform allocation such as OWL's, decided by :mod:`ebft.allocation`)."""

    pruner: object  # ebft.prune.Pruner
    pattern: Pattern | list[Pattern]
    layers: str | None = None  # regex on linear names inside a block
    settings: object = None  # the pruner's own settings (None: its defaults)
    structures: list | None = None  # structured pruners: what each block keeps (ebft.structured.Structure)

    def pattern_for(self, index: int) -> Pattern:
        return self.pattern[index] if isinstance(self.pattern, list) else self.pattern


@dataclass
class RecoverSpec:
    """Which recovery, its own settings, and the run's seed (every random draw of the recovery)."""

    recovery: object = "none"  # ebft.recover.Recovery, or its registered name
    settings: object = None  # the recovery's settings dataclass (None: its defaults)
    seed: int = 0
    budget: float | None = None  # seconds for the whole walk's recovery (each block: what is left / blocks left)
    # the guard's baseline and fallback: also prune each block as pruning alone would (on its own chain, the
    # calibration windows through the blocks so pruned: a `--recover none` run's model), carry the "pruned"
    # stage through those blocks, and keep them
    keep_pruned: bool = False
    # a model-scope recovery (LoRA) changes the blocks after the walk: keep each dense block on the host, to
    # measure the blocks against again once it has (:func:`measure_after`)
    keep_dense: bool = False


@dataclass
class WalkResult:
    blocks: list[dict] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # full linear name -> mask (not kept lazily)
    streams: dict[str, torch.Tensor] = field(default_factory=dict)  # this rank's windows under torchrun
    returns_tuple: bool = False  # how the family's blocks return: for ebft.capture.tail_nll
    # full linear name -> [zeros, weights] of each pruned linear when its block was done: the run
    # record's sparsity when the masks are not kept (a lazy walk frees each block)
    sparsity_counts: dict[str, list[int]] = field(default_factory=dict)
    # block index -> a function giving its tensors as pruning alone leaves it (RecoverSpec.keep_pruned; not
    # kept lazily): read back from the checkpoint folder where the run checkpoints, else held in host memory
    pruned_states: dict[int, Callable[[], dict[str, torch.Tensor]]] = field(default_factory=dict)
    first_block_at: float | None = None  # time.perf_counter() when the walk loaded its first block (this process)
    dense_blocks: dict[int, nn.Module] = field(default_factory=dict)  # RecoverSpec.keep_dense: on the host


# ----------------------------------------------------------------------------- the walk

def walk(model: nn.Module, calib: torch.Tensor | Stream | None, prune: PruneSpec | None,
         recover: RecoverSpec | None = None, eval_ids: dict[str, torch.Tensor] | None = None,
         eval_stages: tuple[str, ...] | dict = ("dense", "final"), device: str | torch.device = "cpu",
         batch_size: int = 1, progress: Callable[..., None] | None = None, *, checkpoint=None,
         placement: dict[str, str] | None = None) -> WalkResult:
    """Prune (and recover) ``model`` in place, block by block; push eval texts through every stage.

    ``calib``: the calibration windows ``[N, S]`` (token ids), or the calibration chain already
    captured (:func:`ebft.streams.capture_stream`, shared with the allocation pass). ``eval_ids`` maps a
    name to ``[windows, seqlen]`` token ids, carried at ``eval_stages`` (or, a dict, at the stages given
    for each name); the result's ``streams`` holds, for each ``"<name>/<stage>"``, the last block's
    outputs (score them with :func:`ebft.capture.tail_nll`).
    With ``prune=None`` the walk only evaluates (every stage is then the dense model).

    ``checkpoint`` (:class:`ebft.checkpoint.RunCheckpoint`): continue from its last state, checkpoint
    as the walk goes, and write each finished block into it (a lazily loaded model's output). Restored
    blocks are reported to ``progress`` as done at once. ``placement`` (``ebft plan``'s arithmetic):
    where each activation group lives (see :class:`ebft.streams.Homes`).
    """
    device, progress, clock = torch.device(device), progress or _noop, PhaseClock(device)
    work = BlockWork(model, prune, recover, progress, clock)
    where = Homes(device, placement)
    chain = work.chain(model, calib, device, batch_size, where)
    streams = Streams.open(model, chain, eval_ids, work.stages(eval_stages), work.target == "dense-model", device,
                           batch_size, where, pruned_alone=work.keep_pruned, clock=clock)
    state = WalkState(model, work, streams, checkpoint, progress, device, clock)
    window = Window(work.window(), state.store.num_blocks, where)
    for index in state.remaining():
        block = state.load(index)
        alone = work.prune_alone(index, block, streams)               # the guard's baseline: pruning alone
        measured = work.measure(index, block, streams.chain, where)   # statistics (and dense-block targets)
        streams.advance("dense", index, block)                        # dense perplexity, dense-model target
        pruned = work.prune(index, block, measured, alone)            # masks or structure, applied and checked
        streams.advance("pruned", index, state.pruned_stage(pruned))  # pruned perplexity
        for blocks in window.complete(pruned, streams):               # a joint window's blocks wait for its last
            readings = work.metrics(blocks, streams)                  # per-block metrics of the pruned block(s)
            records = work.recover(blocks, streams, state.time_share(blocks[0].index, len(blocks)))
            readings.after(records[-1])                               # ... and of the recovered: in the record
            for done, record in zip(blocks, records):
                work.check(done)                                      # every mask and pattern still holds
                streams.advance("final", done.index, done.block)      # propagate: the chain and final streams
                state.done(done.index, done, record, last=done is blocks[-1])  # release, checkpoint, progress
    return state.result()


# ----------------------------------------------------------------------------- what each block goes through

@dataclass
class Measured:
    """A block before pruning: its pruned linears, their input statistics, the dense block's outputs
    (``dense-block`` targets) and the dense weights (for recoveries that change masks or refit)."""

    linears: dict[str, nn.Linear] = field(default_factory=dict)
    stats: dict[str, LayerStats] = field(default_factory=dict)
    targets: torch.Tensor | None = None
    dense_weights: dict[str, torch.Tensor] | None = None
    dense_block: nn.Module | None = None  # a host copy of the dense block (RecoverSpec.keep_dense)


@dataclass
class Pruned:
    """A block after pruning: what recovery and the checks need."""

    index: int
    block: nn.Module
    site: BlockSite | None
    measured: Measured
    linears: dict[str, nn.Linear] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    alone: "Alone | None" = None  # the block as pruning alone leaves it (with the guard: BlockWork.keep_pruned)
    # without the guard, when the run checkpoints the "pruned" stage: this block before recovery, on the host
    stage_snapshot: dict[str, torch.Tensor] | None = None

    @property
    def snapshot(self) -> dict[str, torch.Tensor] | None:
        """The pruned-alone block's weights and masks on the host: what the guard falls back to."""
        return self.alone.snapshot if self.alone is not None else None

    def as_pruned(self) -> nn.Module:
        """The block the "pruned" stage goes through: the pruned-alone one where there is one (handed over
        once, then freed), else this block as pruned, before its recovery."""
        return self.alone.pop() if self.alone is not None else self.block


@dataclass
class Alone:
    """A block as pruning alone leaves it — pruned from its dense weights on the chain of blocks so pruned,
    as a ``--recover none`` run prunes it: the guard's baseline and fallback."""

    block: nn.Module | None
    snapshot: dict[str, torch.Tensor]  # its weights and masks, on the host

    def pop(self) -> nn.Module:
        """The block, once (the "pruned" stage goes through it; then it is freed)."""
        block, self.block = self.block, None
        return block


class BlockWork:
    """The pruner and the recovery with their settings, and what they need of each block."""

    def __init__(self, model: nn.Module, prune: PruneSpec | None, recover: RecoverSpec | None,
                 progress: Callable[..., None], clock: PhaseClock | None = None):
        recover = recover or RecoverSpec()
        self.clock = clock  # each block's time by phase (the methods below are @timed)
        recovery = get_recovery(recover.recovery) if isinstance(recover.recovery, str) else recover.recovery
        if recovery.scope != "block":
            raise ValueError(f"recovery {recovery.name!r} trains the whole model: the walk takes block-scope ones only")
        self.spec, self.recovery, self.seed, self.budget = prune, recovery, recover.seed, recover.budget
        self.keep_pruned = recover.keep_pruned and prune is not None
        self.keep_dense = recover.keep_dense and prune is not None
        self.settings = recover.settings if recover.settings is not None else recovery.default_settings()
        self.pruner_settings = None if prune is None else (
            prune.settings if prune.settings is not None else prune.pruner.default_settings())
        self.target = recovery.target_of(self.settings) if prune is not None else None
        # what the per-block metrics measure against: the recovery's target, else the dense block's outputs
        self.metric_target = (self.target or "dense-block") if prune is not None else None
        self.recovery_needs = recovery.needs_of(self.settings)
        self.needs = frozenset(prune.pruner.needs) | self.recovery_needs if prune is not None else frozenset()
        self.pruner_needs = frozenset(prune.pruner.needs) if prune is not None else frozenset()
        self.config, self.prefix, self.progress = model.config, find_blocks(model)[0], progress

    def stages(self, asked: tuple[str, ...] | dict):
        """The evaluation stages of each text that differ: only "dense" without pruning; no "pruned"
        without recovery."""
        def stages_of(name: str) -> tuple[str, ...]:
            wanted = asked[name] if isinstance(asked, dict) else asked
            if self.spec is None:
                return ("dense",)
            return tuple(s for s in wanted if s != "pruned" or self.recovery.name != "none")
        return stages_of

    def chain(self, model, calib, device, batch_size, where: Homes) -> Stream | None:
        """The calibration chain: as given (already captured), or captured from token ids."""
        if self.spec is None:
            return None
        if isinstance(calib, Stream):
            return calib
        return capture_stream(model, calib, device, batch_size, distributed.current(),
                              to=where.home(CHAIN, None))

    @timed("prune alone (guard)")
    def prune_alone(self, index: int, block: nn.Module, streams: Streams) -> Alone | None:
        """With the guard (``keep_pruned``): a copy of the dense block pruned as a run without recovery prunes
        it — the pruner's statistics on the pruned-alone chain, the same site — before the block's own
        statistics are taken (one set of statistics at a time)."""
        if not self.keep_pruned or self.spec is None:
            return None
        alone = copy.deepcopy(block)
        chain = streams.pruned_alone
        linears = find_linears(alone, self.spec.layers)
        stats, _ = dense_pass(alone, chain.calls[index], chain.x, linears, self.pruner_needs, keep_output=False)
        masks, _ = self.spec.pruner.prune_block(alone, linears, stats, self.site(index), self.pruner_settings)
        del stats
        snapshot = {k: v.detach().to("cpu", copy=True) for k, v in alone.state_dict().items()}
        snapshot.update({f"{MASK_KEY}{n}": m.detach().to("cpu", copy=True) for n, m in masks.items()})
        return Alone(alone, snapshot)

    @timed("statistics")
    def measure(self, index: int, block: nn.Module, chain: Stream | None, where: Homes) -> Measured:
        if self.spec is None:
            return Measured()
        linears = find_linears(block, self.spec.layers)
        stats, targets = dense_pass(block, chain.calls[index], chain.x, linears, self.needs,
                                    keep_output=self.metric_target == "dense-block",
                                    out_device=where.home(BLOCK_TARGETS, chain.x.device))
        dense = ({n: lin.weight.data.to(torch.float32, copy=True) for n, lin in linears.items()}
                 if self.recovery.wants_dense_weights(self.settings) else None)
        return Measured(linears, stats, targets, dense, copy.deepcopy(block).to("cpu") if self.keep_dense else None)

    @timed("prune")
    def prune(self, index: int, block: nn.Module, measured: Measured, alone: Alone | None = None) -> Pruned:
        if self.spec is None:
            return Pruned(index, block, None, measured)
        site = self.site(index)
        masks, record = self.spec.pruner.prune_block(block, measured.linears, measured.stats, site,
                                                      self.pruner_settings)
        linears = find_linears(block) if self.spec.pruner.structured else measured.linears  # shrunk
        for s in measured.stats.values():
            s.keep_only(self.recovery_needs)  # the Hessian is large; free it unless the recovery reads it
        return Pruned(index, block, site, measured, linears, masks, record, alone)

    @timed("recover")
    def recover(self, window: list[Pruned], streams: Streams, time_share: float | None) -> list[dict]:
        """The recovery of one block, or of a joint window of blocks trained together (nothing without
        pruning); each block's record (a window's training is recorded on its last block)."""
        records = [{"index": p.index, **p.record} for p in window]
        if self.spec is None:
            return records
        record, pruned = records[-1], window[-1]
        if len(window) > 1:
            record["window"] = [window[0].index, pruned.index]
            for other in records[:-1]:
                other["window"] = record["window"]
        if time_share is not None:
            record["time_share"] = round(time_share, 3)
        chain = streams.chain
        targets = None if self.target is None else self.targets(window, streams)
        ctx = BlockContext(inputs=chain.windows(), targets=None if targets is None else chain.windows(targets),
                           seed=self.seed, progress=self.progress, time_share=time_share,
                           **(_one_block(pruned, chain.calls) if len(window) == 1 else _joint(window, chain.calls)))
        start = time.perf_counter()
        record.update(self.recovery.fn(ctx, self.settings) or {})
        record["recover_seconds"] = round(time.perf_counter() - start, 3)
        for done in window:  # the same weights and masks on every rank, whatever the kernels did
            distributed.broadcast_([*done.block.state_dict().values(), *done.masks.values()])
            done.measured.targets = done.measured.dense_weights = None
        return records

    @timed("metrics")
    def metrics(self, window: list[Pruned], streams: Streams) -> Readings:
        """The per-block metrics (:mod:`ebft.metrics`) of a pruned block, or joint window, against its target, taken
        before its recovery; ``.after(record)`` takes them after it (nothing to take without pruning)."""
        if self.spec is None:
            return Readings(None)
        parts = _one_block(window[0], streams.chain.calls) if len(window) == 1 else _joint(window, streams.chain.calls)
        probe = Probe(inputs=streams.chain.x, targets=self.targets(window, streams, self.metric_target),
                      **{k: parts[k] for k in ("index", "block", "io", "linears", "masks")})
        return Readings(probe, unchanged=self.recovery.name == "none", clock=self.clock)

    def targets(self, window: list[Pruned], streams: Streams, target: str | None = None) -> torch.Tensor:
        """What the window's (last) block should output: the dense model's activations (``dense-model``) or the
        dense block's outputs on the chain's inputs (``dense-block``); ``target``: default the recovery's."""
        if (target or self.target) == "dense-model":
            return streams.dense_model.x
        return window[-1].measured.targets

    def window(self) -> int:
        """Blocks recovered together (the recovery's ``window``; 1 without pruning)."""
        return 1 if self.spec is None else self.recovery.window_of(self.settings)

    def check(self, pruned: Pruned) -> None:
        if self.spec is not None:
            by = f"after recovery {self.recovery.name!r}" if self.recovery is not None else None
            self.spec.pruner.check_block(pruned.block, pruned.linears, pruned.masks, pruned.site, by)

    def restore_shape(self, index: int, block: nn.Module) -> None:
        """Give a dense block (read back from a checkpoint) the shape its pruning left it in."""
        if self.spec is not None:
            self.spec.pruner.restore_shape(block, self.site(index))

    def site(self, index: int) -> BlockSite:
        return BlockSite(index, f"{self.prefix}.{index}", self.config, self.spec.pattern_for(index),
                         self.spec.structures[index] if self.spec.structures else None)


def _one_block(pruned: Pruned, calls) -> dict:
    """What a recovery of one block is handed (:class:`ebft.recover.BlockContext`), beside the windows."""
    return dict(index=pruned.index, block=pruned.block, linears=pruned.linears, masks=pruned.masks,
                stats=pruned.measured.stats, pattern=pruned.site.pattern, io=calls[pruned.index],
                dense_weights=pruned.measured.dense_weights)


def _joint(window: list[Pruned], calls) -> dict:
    """What a recovery of a joint window is handed: its blocks as one (:class:`JointBlocks`), their linears,
    masks and statistics named ``"<position>.<name>"``; the first block's index (its shuffling's seed)."""
    named = lambda part: {f"{k}.{n}": v for k, p in enumerate(window) for n, v in part(p).items()}  # noqa: E731
    return dict(index=window[0].index, block=JointBlocks([p.block for p in window]),
                linears=named(lambda p: p.linears), masks=named(lambda p: p.masks),
                stats=named(lambda p: p.measured.stats), pattern=window[0].site.pattern,
                io=JointIO([calls[p.index] for p in window]),
                dense_weights=None if window[0].measured.dense_weights is None
                else named(lambda p: p.measured.dense_weights))


class JointBlocks(nn.Module):
    """Consecutive blocks of a joint window as one module (their parameters, by position ``"blocks.<k>"``);
    :class:`JointIO` calls them in turn, each with its own arguments."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)


@dataclass
class JointIO:
    """How a joint window is called: each block with the arguments it really receives, in order."""

    ios: list[BlockIO]

    @property
    def device(self) -> torch.device:
        return self.ios[0].device

    @property
    def batch_size(self) -> int:
        return self.ios[0].batch_size

    def call(self, joint: JointBlocks, x: torch.Tensor) -> torch.Tensor:
        for block, io in zip(joint.blocks, self.ios):
            x = io.call(block, x)
        return x


class Window:
    """Pruned blocks waiting for their joint recovery (a recovery ``window`` of K > 1 blocks). Windows are
    aligned on the block index (blocks jK … jK+K−1, the last one shorter), and the walk checkpoints only when
    a window is done, so a resume starts at a window's first block. With K = 1 every block is its own window."""

    def __init__(self, size: int, num_blocks: int, where: Homes):
        self.size, self.num_blocks, self.where = size, num_blocks, where
        self.blocks: list[Pruned] = []
        self.start: torch.Tensor | None = None  # the chain's inputs at the window's first block

    def complete(self, pruned: Pruned, streams: Streams) -> list[list[Pruned]]:
        """Add ``pruned``; ``[the window's blocks, in order]`` when its window is complete, else ``[]``. Until
        then the calibration chain is pushed on through each pruned block (the next block's statistics are
        taken on it); when the window is complete the chain is put back to the window's inputs, which its
        recovery trains on."""
        self.blocks.append(pruned)
        last = (pruned.index + 1) % self.size == 0 or pruned.index + 1 == self.num_blocks
        if self.size > 1 and not last:
            if self.start is None:
                x = streams.chain.x
                self.start = self.where.pinned(x.to(self.where.home(WINDOW_INPUTS, x.device), copy=True))
            streams.push_chain(pruned.index, pruned.block)
            return []
        if self.start is not None:
            streams.chain.x.copy_(self.start)
            self.start = None
        blocks, self.blocks = self.blocks, []
        return [blocks]


# ----------------------------------------------------------------------------- the walk's bookkeeping

class WalkState:
    """The walk's progress through the blocks: the block store, the checkpoint (resumed from at the
    start, written at block boundaries), records, masks, progress events and the time budget."""

    def __init__(self, model: nn.Module, work: BlockWork, streams: Streams, checkpoint, progress, device,
                 clock: PhaseClock | None = None):
        self.model, self.work, self.streams, self.device = model, work, streams, device
        self.clock = clock or PhaseClock()
        self.store = store_for(model)
        self.checkpoint = checkpoint if checkpoint is not None else NO_CHECKPOINT
        if self.store.lazy and work.spec is not None and checkpoint is None:
            raise ValueError("a lazily loaded model's finished blocks are written as the walk goes: pass the run's "
                             "checkpoint (ebft.checkpoint.RunCheckpoint), whose blocks' shards they are written to")
        self.progress = progress or _noop
        self.keep_masks = not self.store.lazy
        # the "pruned" stage's blocks cannot be rebuilt from the finished ones: a checkpoint keeps them
        self.keeps_pruned_stage = self.checkpoint.saves and streams.carries("pruned")
        self.out = WalkResult()
        self.start, self.saved_tuple = 0, False
        self._started = 0.0
        self.checkpoint.blocks.open()
        self._resume()

    def remaining(self) -> range:
        return range(self.start, self.store.num_blocks)

    def load(self, index: int) -> nn.Module:
        self._started = time.perf_counter()
        if self.out.first_block_at is None:
            self.out.first_block_at = self._started
        self.progress("block_start", index=index, total=self.store.num_blocks)
        self.clock.take()  # what came before the block (a resume's replay) is not its time
        with self.clock.phase("load block"):
            block = self.store.load(index, self.device)
        kill_point("block", index)
        return block

    def time_share(self, index: int, blocks: int = 1) -> float | None:
        """``--recover-budget``: what is left of it, shared over the blocks left from ``index``, for ``blocks``
        of them (a joint window's; rank 0's, under torchrun)."""
        if self.work.budget is None:
            return None
        spent = sum(r.get("recover_seconds", 0.0) for r in self.out.blocks)
        share = max(self.work.budget - spent, 0.0) / (self.store.num_blocks - index)
        return distributed.broadcast_value(share * blocks)

    def pruned_stage(self, pruned: Pruned) -> nn.Module:
        """The block the "pruned" stage goes through (:meth:`Pruned.as_pruned`); without the guard, when the
        run checkpoints that stage, a host copy of it is kept for the checkpoint (written by :meth:`done`)."""
        if self.keeps_pruned_stage and pruned.alone is None and self.work.spec is not None:
            pruned.stage_snapshot = {k: v.detach().to("cpu", copy=True) for k, v in pruned.block.state_dict().items()}
        return pruned.as_pruned()

    def done(self, index: int, pruned: Pruned, record: dict, last: bool = True) -> None:
        """The block is finished: keep its masks, hand it back to the store (written into the
        checkpoint), record it with its time by phase, checkpoint when due (and ``last``: the last block of
        its window), report it."""
        with self.clock.phase("checkpoint"):
            self._keep(index, pruned)
        record["seconds"] = round(time.perf_counter() - self._started, 3)
        record["seconds_by_phase"] = phases = self.clock.take()
        self.out.blocks.append(record)
        log.info("block %d/%d done in %.1f s%s", index + 1, self.store.num_blocks, record["seconds"],
                 f" (loss {record['loss_before']:.4g} -> {record['loss_after']:.4g})" if "loss_after" in record else "")
        kill_point("parts", index)
        if last and self.checkpoint.due(index + 1, self.store.num_blocks):
            with self.clock.phase("checkpoint"):
                self.checkpoint.save(Progress(index + 1, self.out.blocks, self.out.sparsity_counts,
                                              self._returns_tuple(), rng_state()))
            saved = self.clock.take()["checkpoint"]  # (the checkpoint just written has the time before it)
            phases["checkpoint"] = round(phases.get("checkpoint", 0.0) + saved, 3)
            record["seconds"] = round(record["seconds"] + saved, 3)
        self.progress("block_end", **record)

    def _keep(self, index: int, pruned: Pruned) -> None:
        """The finished block's masks, sparsity and pruned-stage snapshot kept; the block handed back to the
        store, which writes it into the checkpoint."""
        prefix = f"{self.work.prefix}.{index}"
        full = {f"{prefix}.{n}": m.cpu() for n, m in pruned.masks.items()}
        self.out.sparsity_counts.update(
            {f"{prefix}.{n}": [int((pruned.linears[n].weight.data == 0).sum()), pruned.linears[n].weight.numel()]
             for n in pruned.masks})
        if self.keep_masks:
            self.out.masks.update(full)
            self.checkpoint.save_masks(index, full)
        if pruned.snapshot is not None and (self.keep_masks or self.keeps_pruned_stage):
            on_disk = self.checkpoint.pruned.save(index, pruned.snapshot)
            if self.keep_masks:  # the guard's fallback (a lazy walk keeps no block to go back to)
                self.out.pruned_states[index] = (functools.partial(self.checkpoint.pruned.load, index) if on_disk
                                                 else functools.partial(dict, pruned.snapshot))
        elif pruned.stage_snapshot is not None:
            self.checkpoint.pruned.save(index, pruned.stage_snapshot)
            pruned.stage_snapshot = None
        if pruned.measured.dense_block is not None:
            self.out.dense_blocks[index], pruned.measured.dense_block = pruned.measured.dense_block, None
        self.store.release(index, write_to=self.checkpoint.blocks.writer)

    def _returns_tuple(self) -> bool:
        return self.saved_tuple or self.streams.returns_tuple

    def result(self) -> WalkResult:
        self.out.streams = self.streams.outputs()
        self.out.returns_tuple = self._returns_tuple()
        return self.out

    def _resume(self) -> None:
        """Bring the walk to its checkpointed state: finished blocks, masks, records and random state; the
        activations rebuilt by running every finished block forward again (:meth:`_replay`)."""
        state = self.checkpoint.restore()
        if state is None:
            return
        self.start, self.saved_tuple = state.next_block, state.returns_tuple
        self.out.blocks = [dict(r) for r in state.records]
        self.out.sparsity_counts = {k: list(v) for k, v in state.sparsity_counts.items()}
        start = time.perf_counter()
        for index in range(state.next_block):
            self._replay(index)
        log.info("resumed: %d finished blocks replayed over the activations in %.1f s", state.next_block,
                 time.perf_counter() - start)
        set_rng_state(state.rng)
        for record in self.out.blocks:
            self.progress("block_start", index=record["index"], total=self.store.num_blocks)
            self.progress("block_end", **record)

    def _replay(self, index: int) -> None:
        """Push every stream through finished block ``index`` at its stage, as the walk did: the dense weights
        (the model's own, or read again from the source when lazy), the block as the "pruned" stage saw it
        (from the checkpoint) and the finished block (from the checkpoint, which the model keeps)."""
        prefix = f"{self.work.prefix}.{index}."
        block = self.store.load(index, self.device)
        if self.work.keep_dense:
            self.out.dense_blocks[index] = copy.deepcopy(block).to("cpu")
        self.streams.advance("dense", index, block)
        if self.streams.carries("pruned"):
            self.streams.advance("pruned", index, self._pruned_block(index, block))
        self.work.restore_shape(index, block)
        _set_block_state_(block, self.checkpoint.blocks.tensors(prefix), prefix)
        self.streams.advance("final", index, block)
        self.store.release(index)
        if self.work.keep_pruned and self.keep_masks:  # ({} if the checkpoint has none: the guard says so)
            self.out.pruned_states[index] = functools.partial(self.checkpoint.pruned.load, index)
        if self.keep_masks and self.work.spec is not None:
            saved = self.checkpoint.masks(index)
            # in the order the walk made them (run.json's sparsity lists the layers in this order)
            order = [k for k in self.out.sparsity_counts if k.startswith(prefix)]
            self.out.masks.update({k: saved[k] for k in order})

    def _pruned_block(self, index: int, dense: nn.Module) -> nn.Module:
        """Block ``index`` as the "pruned" stage saw it, rebuilt from the dense one and the checkpoint."""
        saved = {k: v for k, v in self.checkpoint.pruned.load(index).items() if not k.startswith(MASK_KEY)}
        if not saved:
            raise EbftError(f"resume: the checkpoint {self.checkpoint.folder} lacks block {index} as pruned (the "
                            "pruned stage's activations cannot be rebuilt); pass --no-resume to start over")
        block = copy.deepcopy(dense)
        self.work.restore_shape(index, block)
        _set_block_state_(block, saved, "")
        return block


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


def _noop(*args, **kwargs) -> None:
    return None


# ----------------------------------------------------------------------------- dense passes

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
    with StatsHooks(linears if needs else {}, stats) as hooks:
        out = None
        if keep_output:
            where = x.device if out_device is None else out_device
            pin = where.type == "cpu" and io.device.type == "cuda"
            out = io.forward(block, x, out=torch.empty(x.shape, dtype=x.dtype, device=where, pin_memory=pin))
        else:
            for i in range(0, x.shape[0], io.batch_size):
                io.call(block, x[i:i + io.batch_size].to(io.device, non_blocking=True))
    if needs:
        # a shared one once; every rank holds calibration windows (fewer windows than ranks is refused), so every
        # rank found the same sharing and reduces the same objects in the same order
        for s in hooks.unique():
            s.all_reduce_()
    return stats, out


@torch.no_grad()
def measure_after(model: nn.Module, calib: torch.Tensor, dense_blocks: dict[int, nn.Module], records: list[dict],
                  device: str | torch.device = "cpu", batch_size: int = 1,
                  masks: dict[str, torch.Tensor] | None = None) -> None:
    """The per-block metrics (:mod:`ebft.metrics`) of a model changed after the walk — a model-scope recovery
    such as LoRA trains every block at once: the calibration windows ``calib`` (token ids) through its blocks,
    each block measured against its dense block on the same inputs (``dense_blocks``, which the walk kept:
    :attr:`RecoverSpec.keep_dense`; freed here, one at a time). Each block's record gets its ``<metric>_after``
    anew; its ``<metric>_before`` stays the walk's, the block as pruned. ``masks``: by full linear name."""
    device, store = torch.device(device), store_for(model)
    chain = capture_stream(model, calib, device, batch_size)
    by_index = {r["index"]: r for r in records}
    for index in range(store.num_blocks):
        block, dense, io = store.load(index, device), dense_blocks.pop(index).to(device), chain.calls[index]
        prefix = f"{store.prefix}.{index}."
        own = {name[len(prefix):]: m for name, m in (masks or {}).items() if name.startswith(prefix)}
        probe = Probe(index, block, io, chain.x, io.forward(dense, chain.x), find_linears(block), own)
        record_metrics(by_index[index], take(probe))
        del dense, probe
        io.forward(block, chain.x, out=chain.x)
        store.release(index)


@torch.no_grad()
def planning_pass(model: nn.Module, calib: torch.Tensor | Stream, allocator, device: str | torch.device = "cpu",
                  batch_size: int = 1, progress: Callable | None = None):
    """The dense planning pass: the *unpruned* model over the calibration windows, block by block, for
    an allocation (:class:`ebft.allocation.Allocator`); returns ``allocator.decide(summaries)``.

    ``calib``: token ids ``[N, S]`` or the calibration chain already captured (left as it was: the pass
    pushes a copy). For each block, the input statistics ``allocator.needs`` of its linears matching
    ``allocator.layers`` are collected in one pass and handed to ``allocator.summarise(index, block,
    linears, stats)``, whose (small) result is kept; the statistics are dropped before the next block.
    Nothing is pruned. A lazily loaded model's blocks are read for the pass and freed again (nothing is
    written); under torch.distributed each rank runs its share of the windows and the statistics are
    summed.
    """
    device = torch.device(device)
    progress = progress or _noop
    store = store_for(model)
    chain = calib if isinstance(calib, Stream) else capture_stream(model, calib, device, batch_size,
                                                                   distributed.current())
    x = chain.x.clone()
    summaries = []
    for index in range(store.num_blocks):
        progress("plan_block", index=index, total=store.num_blocks)
        block = store.load(index, device)
        linears = find_linears(block, allocator.layers)
        stats, _ = dense_pass(block, chain.calls[index], x, linears, allocator.needs, keep_output=False)
        summaries.append(allocator.summarise(index, block, linears, stats))
        del stats
        chain.calls[index].forward(block, x, out=x)
        store.release(index)
    return allocator.decide(summaries)
