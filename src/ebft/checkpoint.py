"""Resume a killed run: the walk's state, checkpointed atomically beside the output folder.

``ebft run --out runs/x`` keeps a checkpoint in ``runs/.x.ckpt/`` while it runs and removes it once
``runs/x`` is saved. Run the same command again after a kill (SIGKILL included, at any moment) and
the run continues from the last checkpoint; it ends with exactly the result of an uninterrupted run
(on the CPU in fp32: the same weights, perplexities and run.json apart from times and peak memory).

**What it holds: only what resume cannot recompute** — never the activations, which a forward pass over
the finished blocks rebuilds (:meth:`ebft.walk.WalkState` replays them on resume)::

    checkpoint.json          what the run is (its settings, versions, data), the allocation, the progress
    state-<k>[-rank<r>].pt   the random state before block k (one small file per rank under torchrun)
    blocks/model-part-*.safetensors   every finished block's tensors, one shard per block (a lazy run's output)
    masks/block-<i>.safetensors       every finished block's masks (eager runs)
    pruned/block-<i>.safetensors      each block as the "pruned" stage saw it, when that stage is carried
                                      (the guard's fallback, or the pruned perplexity): it is not recomputable
                                      from the finished block
    lock                     held while a run uses the folder

Three classes share the folder: :class:`RunCheckpoint`, the resume state (``checkpoint.json``, the random
state, the masks, the lock: what is resumed and when it is written), which holds :class:`BlockShards`
(``blocks/``: written as blocks finish, read back on resume, linked into a lazy run's output) and
:class:`PrunedBlocks` (``pruned/``: the blocks as pruned alone).

So a checkpoint costs about one block's weights per block, written once (LLaMA-7B in bf16: 0.4 GB a block,
where the activations at three stages were 10 GB a block). On resume the finished blocks run forward again
over the calibration chain and every evaluation stream: on the CPU the rebuilt activations are bit-identical
(the same kernels on the same inputs); on a GPU they are what the same kernels give again, which for the
walk's deterministic forward passes is the same tensors in practice, not a guarantee.

**When.** The finished blocks' tensors are written as each block ends; ``checkpoint.json`` and the random
state after every block (``--checkpoint-every 0``, the default) or after the first block that ends
``--checkpoint-every`` seconds after the previous checkpoint; always after the last block.

**Atomic.** Every file is written under a temporary name and renamed (a kill leaves the old file or the
new one; nothing is fsynced: the rename is what a kill cannot cut, and a power cut that truncates a
shard is found by its size check on resume); ``checkpoint.json`` is replaced last and names the state
file it goes with, and the previous state file is deleted only after it. A resumed run deletes the block
shards and state files written after that checkpoint, so a kill at any instant leaves a consistent
checkpoint (or none, and the run starts over).

**Same run only.** The checkpoint records the run's settings (all but ``resume``, ``checkpoint``,
``checkpoint_every``, ``overwrite`` and ``save_dtype``, which do not change what the walk computes),
the device, lazy loading, the number of ranks, the ebft, torch and transformers versions and a hash of
the calibration and evaluation windows. If any of these differ, the run refuses to resume, with one
line naming the first difference; ``--no-resume`` discards the checkpoint and starts over,
``--resume`` insists on one (an error if there is none). A checkpoint of an earlier format (which held
activations) is discarded with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import distributed
from .allocation import Allocation
from .atomic import check_unlocked, take_lock, write_atomic, write_json
from .errors import EbftError
from .masks import pack_bits, unpack_bits
from .data import SELF
from .config import compared_settings
from .models import check_safetensors, model_files_fingerprint
from .output import folder_for
from .system import versions
from .weights import FLOAT_CODES, SAFETENSORS_DTYPES, ShardWriter, read_safetensors_header, trim_parts, write_safetensors

log = logging.getLogger(__name__)

FORMAT = 3  # 2: the allocation under its own name; 3: no activations (rebuilt on resume)
STATE_JSON = "checkpoint.json"
LOCK = "lock"
_OURS = {STATE_JSON, LOCK, "blocks", "masks", "pruned"}  # what a checkpoint folder may hold (besides state files)
_STATE_FILE = re.compile(r"\.?state-\d+(-rank\d+)?\.pt(\.tmp(-\d+)?)?")


# ----------------------------------------------------------------------------- test hook

kill_hook = None  # tests: a function (point, index) called at every kill point


def kill_point(point: str, index: int | None = None) -> None:
    """Tests only: SIGKILL this process when ``EBFT_TEST_KILL`` names this point (``"<point>"`` or
    ``"<point>:<index>"``), so a kill-and-resume test stops the run at a known instant, not by timing.

    Points: ``block`` (block ``index`` loaded, nothing of it done), ``parts`` (block ``index``'s shard
    written, its checkpoint not), ``state`` (state file of the checkpoint before block ``index`` written,
    checkpoint.json not), ``saved`` (checkpoint before block ``index`` complete), ``output`` (the walk
    done and evaluated, the output folder being written). ``kill_hook``, when set, is called at every
    point first (in-process tests make it raise)."""
    if kill_hook is not None:
        kill_hook(point, index)
    wanted = os.environ.get("EBFT_TEST_KILL")
    if not wanted:
        return
    name, _, at = wanted.partition(":")
    if name == point and (not at or (index is not None and int(at) == index)):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- what the run is

def _flatten(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def fingerprint(config, resolved: dict) -> dict:
    """What must be equal for a checkpoint to resume: the settings (but those that never change the
    result; local paths resolved, so that ``runs/x`` and its absolute path are one run), what was resolved
    from them (device, lazy loading, ranks) and the package versions. The model's files are compared
    apart (:func:`ebft.models.model_files_fingerprint`)."""
    found = versions()
    found.pop("python", None)
    return {"config": settings_of(config.to_dict()), "resolved": resolved, "versions": found}


def settings_of(config: dict) -> dict:
    """A run's settings as a checkpoint compares them: those that change its result or its evaluation where
    they apply (:func:`ebft.config.compared_settings`), and ``--out`` (the checkpoint is its folder's);
    local paths made absolute."""
    settings = json.loads(json.dumps(compared_settings(config)))
    settings["model"] = _absolute_if_local(settings.get("model"))
    settings["out"] = os.path.abspath(os.path.expanduser(config["out"])) if config.get("out") else None
    calib, ev = settings.get("calib") or {}, settings.get("eval") or {}
    if "source" in calib and calib["source"] != SELF:
        calib["source"] = _absolute_if_local(calib["source"])
    if isinstance(ev.get("sources"), list):
        ev["sources"] = [_absolute_if_local(src) for src in ev["sources"]]
    if isinstance(ev.get("task_data"), str):
        ev["task_data"] = ",".join(_task_item(item) for item in ev["task_data"].split(","))
    return settings


def _absolute_if_local(value):
    if isinstance(value, str) and value and os.path.exists(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return value


def _task_item(item: str) -> str:
    task, eq, path = item.strip().rpartition("=")
    return f"{task}={_absolute_if_local(path.strip())}" if eq else _absolute_if_local(path.strip())


def data_hashes(calib: torch.Tensor | None, evals: dict[str, torch.Tensor]) -> dict:
    """A short hash of every token-window tensor: a changed text file changes the run."""
    def digest(t):
        return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]

    out = {"calib": digest(calib) if calib is not None else None}
    out.update({f"eval.{name}": digest(ids) for name, ids in evals.items()})
    return out


_NOT_RECORDED = "<not recorded>"  # a key one side does not have (a checkpoint of another ebft version)


def first_difference(saved: dict, now: dict) -> tuple[str, object, object, int] | None:
    """``(key, saved value, current value, how many keys differ)`` or None when equal; a version named first
    (it explains the others: a newer ebft records settings an older one did not have)."""
    a, b = _flatten(saved), _flatten(now)
    keys = [k for k in sorted(set(a) | set(b), key=lambda k: (not k.startswith("versions."), k))
            if a.get(k, _NOT_RECORDED) != b.get(k, _NOT_RECORDED)]
    if not keys:
        return None
    k = keys[0]
    return k, a.get(k, _NOT_RECORDED), b.get(k, _NOT_RECORDED), len(keys)


def _refuse(folder: Path, what: str, diff) -> EbftError:
    key, old, new, count = diff
    key = key.removeprefix("config.")
    more = f" (and {count - 1} more difference{'s' if count > 2 else ''})" if count > 1 else ""
    return EbftError(f"resume: the checkpoint {folder} was made with {what}{key} = {_shown(old)}, this run has "
                     f"{_shown(new)}{more}; run the same command to resume it, or pass --no-resume to discard it "
                     "and start over")


def _shown(value) -> str:
    return "unset" if value is None else "nothing (not recorded)" if value == _NOT_RECORDED else repr(value)


# ----------------------------------------------------------------------------- the walk's state

@dataclass
class Progress:
    """The walk before block ``next_block``: what it recorded and the random state (this rank's). The
    activations are not kept: the finished blocks rebuild them."""

    next_block: int
    records: list[dict]
    sparsity_counts: dict[str, list[int]]
    returns_tuple: bool
    rng: dict = field(default_factory=dict)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class BlockShards:
    """The finished blocks' tensors in the checkpoint folder's ``blocks/``, one safetensors shard per block:
    written by rank 0 as each block ends (:attr:`writer`), read back by every rank of a resumed walk
    (:meth:`tensors`), and linked into a lazy run's output, whose blocks they are (:meth:`link_into`)."""

    def __init__(self, checkpoint: Path, checkpointed: int | None, main: bool):
        self.checkpoint, self.folder, self.main = checkpoint, checkpoint / "blocks", main
        self.checkpointed = checkpointed  # the shards the last checkpoint names (None: there is none yet)
        self.writer: ShardWriter | None = None  # rank 0's, once opened

    @property
    def parts(self) -> int:
        """The shards written so far (what a checkpoint records)."""
        return self.writer.parts if self.writer is not None else 0

    def open(self) -> None:
        """The shard writer of the finished blocks (rank 0), continuing after the last checkpoint."""
        if not self.main:
            return
        if self.checkpointed is None:
            _remove(self.folder)
        else:
            trim_parts(self.folder, self.checkpointed)
        for part in sorted(self.folder.glob("model-part-*.safetensors")):
            try:
                check_safetensors(part)  # header and size: a shard cut short is found now, not in the output
            except EbftError as exc:
                raise _damaged(part, exc) from None
        self.writer = ShardWriter(self.folder, resume=True)
        if self.checkpointed is not None and self.writer.parts != self.checkpointed:
            raise EbftError(f"resume: the checkpoint {self.checkpoint} names {self.checkpointed} finished blocks' "
                            f"shards but holds {self.writer.parts}; pass --no-resume to start over")

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors the checkpoint holds for the block whose names start with ``prefix`` (e.g.
        ``model.layers.3.``)."""
        out = {}
        for k in range(1, (self.checkpointed or 0) + 1):
            path = self.folder / f"model-part-{k:05d}.safetensors"
            try:
                with safe_open(path, "pt") as f:
                    for key in f.keys():
                        if key.startswith(prefix):
                            out[key] = f.get_tensor(key).clone()
            except Exception as exc:  # SafetensorError: truncated or not safetensors
                raise _damaged(path, exc) from None
        return out

    def link_into(self, folder: Path, dtype: torch.dtype | None = None) -> None:
        """Put the finished blocks' shards into ``folder`` (the output being written) as hard links
        (copies where the filesystem has none); the checkpoint keeps its own until it is removed.
        With a ``dtype`` other than theirs, each shard is rewritten cast instead (one block in memory)."""
        for k in range(1, self.writer.parts + 1):
            name = f"model-part-{k:05d}.safetensors"
            src, dst = self.folder / name, Path(folder) / name
            codes = {e["dtype"] for e in read_safetensors_header(src).values()} & FLOAT_CODES
            if dtype is not None and codes - {SAFETENSORS_DTYPES[dtype]}:
                tensors = load_file(src)
                write_safetensors({n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()},
                                  dst, metadata={"format": "pt"})
                del tensors
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)


class PrunedBlocks:
    """Each block as the "pruned" stage saw it (the guard's fallback, with its masks; or the block before
    recovery) in the checkpoint folder's ``pruned/``, rather than in memory: it cannot be recomputed from the
    finished block. ``writes``: whether this process writes them (rank 0 of a checkpointed run)."""

    def __init__(self, checkpoint: Path, writes: bool):
        self.folder, self.writes = checkpoint / "pruned", writes

    def _path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def save(self, index: int, tensors: dict[str, torch.Tensor]) -> bool:
        """Keep block ``index`` as pruned; whether it was kept (only a process that :attr:`writes` keeps it)."""
        if not self.writes:
            return False
        self.folder.mkdir(exist_ok=True)
        _save_packed(self._path(index), tensors)
        return True

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index`` as pruned (``{}``: not kept)."""
        path = self._path(index)
        if not path.exists():
            return {}
        return _load_packed(path)

    def check(self, finished: int) -> None:
        """The finished blocks' copies as pruned are whole, or the resume is refused before the next block:
        they cannot be recomputed without redoing the blocks (headers and sizes are read, not the weights; a
        missing copy is refused where it is read)."""
        for index in range(finished):
            path = self._path(index)
            if not path.exists():
                continue
            try:
                check_safetensors(path)
            except EbftError as exc:
                raise EbftError(f"resume: block {index} as pruned (kept for the guard and the pruned stage; it "
                                f"cannot be recomputed) is damaged in the checkpoint: {exc}; pass --no-resume to "
                                "start over") from None


class RunCheckpoint:
    """The resume state of one run (see the module docstring): its checkpoint folder, ``checkpoint.json``, the
    random state, the masks; and, in the same folder and gone with it, the finished blocks' shards
    (:attr:`blocks`, a :class:`BlockShards`: also a lazy run's output) and the blocks as pruned alone
    (:attr:`pruned`, a :class:`PrunedBlocks`).

    ``saves``: whether the walk's state is checkpointed (``--checkpoint``); without it the folder
    still holds a lazy run's finished blocks until they are moved into the output. Under
    torch.distributed every rank has one (it writes its own state file); rank 0 alone writes the
    shared files (checkpoint.json, blocks, masks) and holds the lock."""

    def __init__(self, folder: Path, info: dict, every: float, saves: bool, shard=None):
        self.folder, self.every, self.saves, self.shard = folder, every, saves, shard
        self.main = shard is None or shard.main
        self.info = info  # checkpoint.json
        self.blocks = BlockShards(folder, (info.get("progress") or {}).get("parts"), self.main)
        self.pruned = PrunedBlocks(folder, self.main and saves)
        self._lock_fd: int | None = None
        self._fresh = True
        self._last_save = time.monotonic()

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, config, resolved: dict, lazy: bool, shard=None) -> "RunCheckpoint | NoCheckpoint":
        """The checkpoint of ``config``'s run: a resumable one found beside ``config.out`` (checked
        against this run), or a new one; :data:`NO_CHECKPOINT` when the run needs none (no
        ``--checkpoint``, not lazy). Fails with one line when a checkpoint of different settings is
        there, or ``--resume`` finds none. Nothing is written until :meth:`begin` (a checkpoint the run
        does not resume is discarded then); without ``--checkpoint`` a leftover checkpoint stays until a
        run with checkpoints replaces it."""
        folder = folder_for(config.out)
        main = shard is None or shard.main
        if config.resume and not config.checkpoint:
            raise EbftError("resume: --resume continues from a checkpoint, and --no-checkpoint turns them off; "
                            "drop one of the two")
        found = _found_checkpoint(folder, config.resume is not False)
        info = {"format": FORMAT, "written_by": "ebft", "fingerprint": fingerprint(config, resolved),
                "model_files": model_files_fingerprint(config.model), "data": None, "allocation_done": False,
                "allocation": None, "extras": {}, "progress": None}
        resuming = bool(found) and config.checkpoint and config.resume is not False
        if resuming:
            diff = first_difference(found["fingerprint"], info["fingerprint"])
            if diff is not None:
                raise _refuse(folder, "", diff)
            _check_model_files(folder, found.get("model_files"), info["model_files"])
            info = found
        elif config.resume:
            if _read_json_plain(Path(config.out) / "run.json") is not None:
                raise EbftError(f"resume: the run in {config.out} is finished: nothing to resume (drop --resume; "
                                "--overwrite runs it again)")
            raise EbftError(f"resume: there is no checkpoint of this run to resume ({folder} "
                            f"{'holds none' if folder.exists() else 'does not exist'}); drop --resume to start it")
        if folder.exists() and main:
            _check_ours(folder)
            check_unlocked(folder / LOCK, _busy(folder))  # before the model loads: another run of this --out holds it
        if not (config.checkpoint or lazy):
            return NO_CHECKPOINT
        ckpt = cls(folder, info, float(config.checkpoint_every), bool(config.checkpoint), shard)
        ckpt._fresh = not resuming
        distributed.barrier()  # every rank has read the checkpoint before rank 0 may clear it (begin)
        return ckpt

    def begin(self) -> None:
        """Take the folder (once the run's input checked out: a refused run writes nothing): lock it,
        empty it unless resuming, record what the run is."""
        if self.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_fd = take_lock(self.folder / LOCK, True, _busy(self.folder))
            if self._fresh:
                self._clear()
            self._write_info()
        distributed.barrier()
        if not self._fresh:
            done = (self.info.get("progress") or {}).get("next_block", 0)
            log.warning("resuming from the checkpoint %s (%d blocks done)", self.folder, done)

    def _clear(self) -> None:
        """Start afresh: everything but the lock goes, ``checkpoint.json`` first (a kill in the middle
        then leaves no checkpoint that names files already gone)."""
        _remove(self.folder / STATE_JSON)
        for entry in self.folder.iterdir():
            if entry.name != LOCK:
                _remove(entry)

    def _write_info(self) -> None:
        write_json(self.folder / STATE_JSON, self.info, durable=False)

    def check_data(self, calib: torch.Tensor | None, evals: dict[str, torch.Tensor]) -> None:
        """The token windows must be the checkpoint's (a changed text file changes the run)."""
        hashes = data_hashes(calib, evals)
        saved = self.info.get("data")
        if saved is not None:
            diff = first_difference(saved, hashes)
            if diff is not None:
                raise _refuse(self.folder, "token windows ", diff)
        else:
            self.info["data"] = hashes  # written by begin()

    # ---- what is decided once: the allocation, the dense model's zero-shot and speed ---------
    def allocation(self, decide):
        """The allocation the checkpoint holds, else ``decide()`` (kept in the checkpoint)."""
        if self.info.get("allocation_done"):
            data = self.info.get("allocation")
            return None if data is None else Allocation.from_json(data)
        allocation = decide()
        self.info["allocation"] = None if allocation is None else allocation.to_json()
        self.info["allocation_done"] = True
        if self.main and self.saves:
            self._write_info()
        return allocation

    def once(self, key: str, compute):
        """``compute()``, kept in the checkpoint so that a resumed run does not redo it."""
        extras = self.info.setdefault("extras", {})
        if key not in extras:
            extras[key] = json.loads(json.dumps(compute()))
            if self.main and self.saves:
                self._write_info()
        return extras[key]

    # ---- the walk ------------------------------------------------------------------------
    def restore(self) -> Progress | None:
        """The walk's state at the last checkpoint (this rank's random state), or None to start at block 0."""
        progress = self.info.get("progress")
        if progress is None:
            return None
        path = self.folder / self._state_name(progress["next_block"])
        if not path.exists():
            raise EbftError(f"resume: the checkpoint {self.folder} lacks {path.name}; pass --no-resume to start over")
        try:
            rng = torch.load(path, map_location="cpu", weights_only=True)["rng"]
        except Exception as exc:  # truncated, empty, not a torch file, not what ebft writes
            raise _damaged(path, exc) from None
        self.pruned.check(progress["next_block"])
        return Progress(progress["next_block"], progress["records"], progress["sparsity_counts"],
                        progress["returns_tuple"], rng)

    def save_masks(self, index: int, masks: dict[str, torch.Tensor]) -> None:
        if not (self.main and self.saves) or not masks:
            return
        folder = self.folder / "masks"
        folder.mkdir(exist_ok=True)
        _save_packed(folder / f"block-{index:05d}.safetensors", {k: m.to(torch.bool) for k, m in masks.items()})

    def masks(self, index: int) -> dict[str, torch.Tensor]:
        path = self.folder / "masks" / f"block-{index:05d}.safetensors"
        if not path.exists():
            return {}
        masks = _load_packed(path)
        if any(m.dtype != torch.bool for m in masks.values()):
            raise _damaged(path, ValueError("masks that are not boolean"))
        return masks

    def due(self, next_block: int, total: int) -> bool:
        """Whether to checkpoint now, after block ``next_block - 1``: every block with
        ``checkpoint_every`` 0, else once that many seconds passed; always after the last block.
        Under torch.distributed rank 0 decides for all (the ranks' clocks differ)."""
        if not self.saves:
            return False
        due = self.every <= 0 or next_block == total or time.monotonic() - self._last_save >= self.every
        if self.shard is not None:
            flag = torch.tensor([1 if due else 0], dtype=torch.int32, device=distributed.collective_device())
            distributed.broadcast_([flag])
            due = bool(flag.item())
        return due

    def save(self, progress: Progress) -> None:
        """Checkpoint the walk before block ``progress.next_block`` (see the module docstring)."""
        k = progress.next_block
        name = self._state_name(k)
        write_atomic(self.folder / name, lambda tmp: torch.save({"rng": progress.rng}, tmp), durable=False)
        kill_point("state", k)
        distributed.barrier()  # every rank's state file is in place before checkpoint.json names it
        self.info["progress"] = {"next_block": k, "records": progress.records,
                                 "sparsity_counts": progress.sparsity_counts,
                                 "returns_tuple": progress.returns_tuple,
                                 "parts": self.blocks.parts}
        if self.main:
            self._write_info()
        distributed.barrier()
        self._drop_states(keep=name)
        self._last_save = time.monotonic()
        kill_point("saved", k)

    def _state_name(self, next_block: int) -> str:
        rank = "" if self.shard is None else f"-rank{self.shard.rank}"
        return f"state-{next_block:05d}{rank}.pt"

    def _drop_states(self, keep: str) -> None:
        rank = "" if self.shard is None else f"-rank{self.shard.rank}"
        for path in self.folder.glob(f"state-*{rank}.pt"):
            if path.name != keep and (rank or "-rank" not in path.name):
                path.unlink(missing_ok=True)

    # ---- the end -------------------------------------------------------------------------
    def failed(self) -> None:
        """The run failed (an error, not an interruption): a checkpoint with no finished block is of no use
        and would only make a corrected rerun refuse to start, so it goes; one with finished blocks stays,
        for the same command to resume (``--no-resume`` discards it)."""
        if not self.main or not self.folder.exists():
            return
        done = (self.info.get("progress") or {}).get("next_block", 0)
        if done == 0:
            _remove(self.folder)
        else:
            log.warning("the checkpoint %s keeps %d finished blocks: rerun the same command to resume them, or "
                        "pass --no-resume to start over", self.folder, done)

    def remove(self) -> None:
        """The run is saved: the checkpoint goes (rank 0)."""
        if self.main:
            _remove(self.folder)
        self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class _NoBlocks:
    """No finished blocks' shards: nothing is written (a run loaded whole keeps its blocks in the model)."""

    writer = None

    def open(self) -> None:
        pass


class _NoPrunedBlocks:
    """No blocks as pruned on disk: the walk keeps them in memory."""

    def save(self, index: int, tensors) -> bool:
        return False

    def load(self, index: int) -> dict:
        return {}


class NoCheckpoint:
    """The run keeps no checkpoint (``--no-checkpoint`` on a run loaded whole): the same interface, doing nothing."""

    saves = False
    blocks = _NoBlocks()
    pruned = _NoPrunedBlocks()

    def begin(self) -> None:
        pass

    def check_data(self, calib, evals) -> None:
        pass

    def allocation(self, decide):
        return decide()

    def once(self, key: str, compute):
        return compute()

    def restore(self) -> None:
        return None

    def save_masks(self, index: int, masks) -> None:
        pass

    def due(self, next_block: int, total: int) -> bool:
        return False

    def failed(self) -> None:
        pass

    def remove(self) -> None:
        pass

    def close(self) -> None:
        pass


NO_CHECKPOINT = NoCheckpoint()


def _busy(folder: Path) -> str:
    return (f"out: another ebft run is using the checkpoint {folder} (the same --out); wait for it to finish or "
            "give another --out")


def _found_checkpoint(folder: Path, resuming: bool) -> dict | None:
    """The checkpoint.json in ``folder`` (None: there is none, or one of another format, discarded with a
    warning). An empty or unreadable one is an error unless the run starts over anyway (``--no-resume``)."""
    path = folder / STATE_JSON
    if not folder.is_dir() or not path.exists():
        return None
    found = _read_json(path)
    if found is None:
        if resuming:
            raise EbftError(f"resume: {path} is empty or damaged; pass --no-resume to discard the checkpoint and "
                            "start over")
        return None
    if found.get("format") != FORMAT:
        log.warning("discarding the checkpoint %s: it was written by another version of ebft", folder)
        return None
    return found


def _check_model_files(folder: Path, saved: dict | None, now: dict) -> None:
    if saved is None or saved == now:
        return
    changed = sorted(set(saved) ^ set(now)) or sorted(k for k in now if saved.get(k) != now[k])
    what = "files added or removed" if set(saved) != set(now) else "size, time or content"
    raise EbftError(f"resume: the model's files changed since the checkpoint {folder} was made ({changed[0]}: "
                    f"{what}); pass --no-resume to start over with the model as it is now")


def _save_packed(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as one safetensors file, its boolean ones (masks) packed 8 to a byte (their shapes in the
    file's metadata): a LLaMA-7B block's masks are 25 MB instead of 200 MB."""
    shapes = {k: list(t.shape) for k, t in tensors.items() if t.dtype == torch.bool}
    plain = {k: pack_bits(t) if k in shapes else t.detach().to("cpu").contiguous() for k, t in tensors.items()}
    write_atomic(path, lambda tmp: save_file(plain, tmp, metadata={"packed_bool_shapes": json.dumps(shapes)}),
                 durable=False)


def _load_packed(path: Path) -> dict[str, torch.Tensor]:
    """What :func:`_save_packed` wrote (the booleans unpacked); one line naming the file if it is damaged."""
    try:
        with safe_open(path, "pt") as f:
            shapes = json.loads((f.metadata() or {}).get("packed_bool_shapes", "{}"))
            return {k: unpack_bits(f.get_tensor(k), shapes[k]) if k in shapes else f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated, not safetensors, packed bytes that do not fit their shape
        raise _damaged(path, exc) from None


def _damaged(path: Path, exc: BaseException) -> EbftError:
    return EbftError(f"resume: the checkpoint file {path} is damaged ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}); pass --no-resume to start over")


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "ebft" else None


def _check_ours(folder: Path) -> None:
    """Refuse to touch a folder by the checkpoint's name that ebft did not write."""
    if folder.is_symlink() or not folder.is_dir():
        raise EbftError(f"out: {folder} (where ebft keeps this run's checkpoint) exists and is not a folder ebft "
                        "wrote; move it away")
    for entry in folder.iterdir():
        name = entry.name
        if not (name in _OURS or _STATE_FILE.fullmatch(name) or name.startswith(f".{STATE_JSON}.tmp-")):
            raise EbftError(f"out: {folder} (where ebft keeps this run's checkpoint) holds {name}, which ebft did "
                            "not write; move it away")


def discard_if_finished(out: str | os.PathLike) -> None:
    """A run killed between saving its output and removing its checkpoint leaves both; the output is
    complete, so the checkpoint is of no use: remove it (when it is a checkpoint of that very run and
    older than the output)."""
    folder = folder_for(out)
    found = _read_json(folder / STATE_JSON) if folder.is_dir() else None
    record = _read_json_plain(Path(out) / "run.json")
    if found is None or record is None:
        return
    if (Path(out) / "run.json").stat().st_mtime < (folder / STATE_JSON).stat().st_mtime:
        return  # the checkpoint is newer: a rerun with --overwrite in progress, not a finished one
    saved = found["fingerprint"]["config"]
    if isinstance(record.get("config"), dict) and settings_of(record["config"]) == saved:
        log.info("removing %s, the checkpoint of the finished run in %s", folder, out)
        _remove(folder)


def _read_json_plain(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)
