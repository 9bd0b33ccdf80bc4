"""Resume a killed run: the walk's state, checkpointed atomically beside the output folder.

``ebft run --out runs/x`` keeps a checkpoint in ``runs/.x.ckpt/`` while it runs and removes it once
``runs/x`` is saved. Run the same command again after a kill (SIGKILL included, at any moment) and
the run continues from the last checkpoint; it ends with exactly the result of an uninterrupted run
(on the CPU in fp32: the same weights, perplexities and run.json apart from times and peak memory).

What the folder holds::

    checkpoint.json          what the run is (its settings, versions, data), the plan, the progress
    state-<k>[-rank<r>].pt   the walk before block k: calibration chain, evaluation streams, the
                             dense-model stream, random state (one file per rank under torchrun)
    blocks/model-part-*.safetensors   every finished block's tensors, one shard per block
    masks/block-<i>.safetensors       every finished block's masks (eager runs)
    lock                     held while a run uses the folder

**When.** After every block (``--checkpoint-every 0``, the default) or, for large models whose
activations take a while to write, after the first block that ends ``--checkpoint-every`` seconds after
the previous checkpoint; always after the last block. The finished blocks' tensors are written as each
block ends (a lazy run writes its output that way anyway), the activations at checkpoints only.

**Atomic.** Every file is written under a temporary name and renamed; ``checkpoint.json`` is
replaced last and names the state file it goes with, and the previous state file is deleted only
after it. A resumed run deletes the block shards and state files written after that checkpoint, so a
kill at any instant leaves a consistent checkpoint (or none, and the run starts over).

**Same run only.** The checkpoint records the run's settings (all but ``resume``, ``checkpoint``,
``checkpoint_every``, ``overwrite`` and ``save_dtype``, which do not change what the walk computes),
the device, lazy loading, the number of ranks, the ebft, torch and transformers versions and a hash of
the calibration and evaluation windows. If any of these differ, the run refuses to resume, with one
line naming the first difference; ``--no-resume`` discards the checkpoint and starts over,
``--resume`` insists on one (an error if there is none).
"""
from __future__ import annotations

import dataclasses
import errno
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

from .errors import EbftError

log = logging.getLogger(__name__)

FORMAT = 1
STATE_JSON = "checkpoint.json"
LOCK = "lock"
# settings that never change what the walk computes
IGNORED = ("resume", "checkpoint", "checkpoint_every", "overwrite", "save_dtype")
_OURS = {STATE_JSON, LOCK, "blocks", "masks"}  # what a checkpoint folder may hold (besides state files)
_STATE_FILE = re.compile(r"\.?state-\d+(-rank\d+)?\.pt(\.tmp)?")


def folder_for(out: str | os.PathLike) -> Path:
    """``runs/x`` -> ``runs/.x.ckpt`` (absolute)."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    return out.parent / f".{out.name}.ckpt"


# ----------------------------------------------------------------------------- test hook

def kill_point(point: str, index: int | None = None) -> None:
    """Tests only: SIGKILL this process when ``EBFT_TEST_KILL`` names this point (``"<point>"`` or
    ``"<point>:<index>"``), so a kill-and-resume test stops the run at a known instant, not by timing.

    Points: ``block`` (block ``index`` loaded, nothing of it done), ``parts`` (block ``index``'s shard
    written, its checkpoint not), ``state`` (state file of the checkpoint before block ``index`` written,
    checkpoint.json not), ``saved`` (checkpoint before block ``index`` complete), ``output`` (the walk
    done and evaluated, the output folder being written)."""
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
    result), what was resolved from them (device, lazy loading, ranks) and the package versions."""
    from .pipeline import versions

    settings = {k: v for k, v in config.to_dict().items() if k not in IGNORED}
    found = versions()
    found.pop("python", None)
    return {"config": json.loads(json.dumps(settings)), "resolved": resolved, "versions": found}


def data_hashes(calib: torch.Tensor | None, evals: dict[str, torch.Tensor]) -> dict:
    """A short hash of every token-window tensor: a changed text file changes the run."""
    def digest(t):
        return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]

    out = {"calib": digest(calib) if calib is not None else None}
    out.update({f"eval.{name}": digest(ids) for name, ids in evals.items()})
    return out


def first_difference(saved: dict, now: dict) -> tuple[str, object, object, int] | None:
    """``(key, saved value, current value, how many keys differ)`` or None when equal."""
    a, b = _flatten(saved), _flatten(now)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]
    if not keys:
        return None
    k = keys[0]
    return k, a.get(k, "<unset>"), b.get(k, "<unset>"), len(keys)


def _refuse(folder: Path, what: str, diff) -> EbftError:
    key, old, new, count = diff
    key = key.removeprefix("config.")
    more = f" (and {count - 1} more difference{'s' if count > 2 else ''})" if count > 1 else ""
    return EbftError(f"resume: the checkpoint {folder} was made with {what}{key} = {_shown(old)}, this run has "
                     f"{_shown(new)}{more}; run the same command to resume it, or pass --no-resume to discard it "
                     "and start over")


def _shown(value) -> str:
    return "unset" if value is None else repr(value)


# ----------------------------------------------------------------------------- the plan as JSON

def plan_to_json(plan) -> dict | None:
    if plan is None:
        return None
    return {"patterns": [dataclasses.asdict(p) for p in plan.patterns], "record": plan.record,
            "structures": None if plan.structures is None else [dataclasses.asdict(s) for s in plan.structures]}


def plan_from_json(data: dict | None):
    if data is None:
        return None
    from .masks import Pattern
    from .plan import Plan
    from .structured.flap import Structure

    structures = None
    if data["structures"] is not None:
        structures = [Structure(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                      for s in data["structures"]]
    return Plan([Pattern(**p) for p in data["patterns"]], data["record"], structures)


# ----------------------------------------------------------------------------- the walk's state

@dataclass
class Progress:
    """The walk before block ``next_block``: what it recorded, and its activations (``tensors``:
    ``"calib"`` and ``"stream/<name>/<stage>"``, this rank's windows; loaded memory-mapped)."""

    next_block: int
    records: list[dict]
    sparsity_counts: dict[str, list[int]]
    returns_tuple: bool
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
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


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunCheckpoint:
    """The checkpoint folder of one run (see the module docstring), as the pipeline and the walk use it.

    ``saves``: whether the walk's state is checkpointed (``--checkpoint``); without it the folder
    still holds a lazy run's finished blocks until they are moved into the output. Under
    torch.distributed every rank has one (it writes its own state file); rank 0 alone writes the
    shared files (checkpoint.json, blocks, masks) and holds the lock."""

    def __init__(self, folder: Path, info: dict, every: float, saves: bool, shard=None):
        self.folder, self.every, self.saves, self.shard = folder, every, saves, shard
        self.main = shard is None or shard.main
        self.info = info  # checkpoint.json
        self.writer = None  # ShardWriter of the finished blocks (rank 0)
        self._lock_fd: int | None = None
        self._fresh = True
        self._last_save = time.monotonic()

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, config, resolved: dict, lazy: bool, shard=None) -> "RunCheckpoint | None":
        """The checkpoint of ``config``'s run: a resumable one found beside ``config.out`` (checked
        against this run), or a new one; None when the run needs none (no ``--checkpoint``, not lazy).
        Fails with one line when a checkpoint of different settings is there, or ``--resume`` finds none.
        Nothing is written until :meth:`begin` (a checkpoint the run does not resume is discarded then);
        without ``--checkpoint`` a leftover checkpoint stays until a run with checkpoints replaces it."""
        folder = folder_for(config.out)
        main = shard is None or shard.main
        if config.resume and not config.checkpoint:
            raise EbftError("resume: --resume continues from a checkpoint, and --no-checkpoint turns them off; "
                            "drop one of the two")
        found = _read_json(folder / STATE_JSON) if folder.is_dir() else None
        if found is not None and found.get("format") != FORMAT:
            found = None
        info = {"format": FORMAT, "written_by": "ebft", "fingerprint": fingerprint(config, resolved),
                "data": None, "plan_done": False, "plan": None, "extras": {}, "progress": None}
        resuming = bool(found) and config.checkpoint and config.resume is not False
        if resuming:
            diff = first_difference(found["fingerprint"], info["fingerprint"])
            if diff is not None:
                raise _refuse(folder, "", diff)
            info = found
        elif config.resume:
            raise EbftError(f"resume: there is no checkpoint of this run to resume ({folder} "
                            f"{'holds none' if folder.exists() else 'does not exist'}); drop --resume to start it")
        if folder.exists() and main:
            _check_ours(folder)
            _check_unlocked(folder)  # before the model loads: another run of this --out holds it
        if not (config.checkpoint or lazy):
            return None
        ckpt = cls(folder, info, float(config.checkpoint_every), bool(config.checkpoint), shard)
        ckpt._fresh = not resuming
        from .distributed import barrier

        barrier()  # every rank has read the checkpoint before rank 0 may clear it (begin)
        return ckpt

    def begin(self) -> None:
        """Take the folder (once the run's input checked out: a refused run writes nothing): lock it,
        empty it unless resuming, record what the run is."""
        from .distributed import barrier

        if self.main:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock()
            if self._fresh:
                self._clear()
            self._write_info()
        barrier()
        if not self._fresh:
            done = (self.info.get("progress") or {}).get("next_block", 0)
            log.warning("resuming from the checkpoint %s (%d blocks done)", self.folder, done)

    def _lock(self) -> None:
        self._lock_fd = _take_lock(self.folder, create=True)

    def _clear(self) -> None:
        """Start afresh: everything but the lock goes, ``checkpoint.json`` first (a kill in the middle
        then leaves no checkpoint that names files already gone)."""
        _remove(self.folder / STATE_JSON)
        for entry in self.folder.iterdir():
            if entry.name != LOCK:
                _remove(entry)

    def _write_info(self) -> None:
        from .export import write_json

        write_json(self.folder / STATE_JSON, self.info)
        _fsync_folder(self.folder)

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

    # ---- what is decided once: the plan, the dense model's zero-shot and speed -------------
    @property
    def has_plan(self) -> bool:
        return bool(self.info.get("plan_done"))

    def plan(self):
        return plan_from_json(self.info.get("plan"))

    def save_plan(self, plan) -> None:
        self.info["plan"], self.info["plan_done"] = plan_to_json(plan), True
        if self.main and self.saves:
            self._write_info()

    def extra(self, key: str, default=None):
        return self.info.get("extras", {}).get(key, default)

    def save_extra(self, key: str, value) -> None:
        self.info.setdefault("extras", {})[key] = json.loads(json.dumps(value))
        if self.main and self.saves:
            self._write_info()

    # ---- the walk ------------------------------------------------------------------------
    def open_writer(self) -> None:
        """The shard writer of the finished blocks (rank 0), continuing after the last checkpoint."""
        from .lazy import ShardWriter, trim_parts

        if not self.main:
            return
        blocks = self.folder / "blocks"
        progress = self.info.get("progress")
        if progress is None:
            _remove(blocks)
        else:
            trim_parts(blocks, progress["parts"])
        self.writer = ShardWriter(blocks, resume=True)
        if progress is not None and self.writer.parts != progress["parts"]:
            raise EbftError(f"resume: the checkpoint {self.folder} names {progress['parts']} finished blocks' "
                            f"shards but holds {self.writer.parts}; pass --no-resume to start over")

    def restore(self) -> Progress | None:
        """The walk's state at the last checkpoint (this rank's activations), or None to start at block 0."""
        progress = self.info.get("progress")
        if progress is None:
            return None
        path = self.folder / self._state_name(progress["next_block"])
        if not path.exists():
            raise EbftError(f"resume: the checkpoint {self.folder} lacks {path.name}; pass --no-resume to start over")
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return Progress(progress["next_block"], progress["records"], progress["sparsity_counts"],
                        progress["returns_tuple"], data["tensors"], data.get("rng", {}))

    def block_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors written for the block whose names start with ``prefix`` (e.g. ``model.layers.3.``)."""
        from safetensors import safe_open

        parts = (self.info.get("progress") or {}).get("parts", 0)
        out = {}
        for k in range(1, parts + 1):
            with safe_open(self.folder / "blocks" / f"model-part-{k:05d}.safetensors", "pt") as f:
                for key in f.keys():
                    if key.startswith(prefix):
                        out[key] = f.get_tensor(key).clone()
        return out

    def save_masks(self, index: int, masks: dict[str, torch.Tensor]) -> None:
        if not (self.main and self.saves) or not masks:
            return
        from safetensors.torch import save_file

        folder = self.folder / "masks"
        folder.mkdir(exist_ok=True)
        path = folder / f"block-{index:05d}.safetensors"
        tmp = folder / f".{path.name}.tmp"
        save_file({k: m.detach().to("cpu", torch.bool).contiguous() for k, m in masks.items()}, tmp)
        os.replace(tmp, path)

    def masks(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.folder / "masks" / f"block-{index:05d}.safetensors"
        return load_file(path) if path.exists() else {}

    def due(self, next_block: int, total: int) -> bool:
        """Whether to checkpoint now, after block ``next_block - 1``: every block with
        ``checkpoint_every`` 0, else once that many seconds passed; always after the last block.
        Under torch.distributed rank 0 decides for all (the ranks' clocks differ)."""
        if not self.saves:
            return False
        due = self.every <= 0 or next_block == total or time.monotonic() - self._last_save >= self.every
        if self.shard is not None:
            from .distributed import broadcast_

            flag = torch.tensor([1 if due else 0], dtype=torch.int32, device=_device_of_group())
            broadcast_([flag])
            due = bool(flag.item())
        return due

    def save(self, progress: Progress) -> None:
        """Checkpoint the walk before block ``progress.next_block`` (see the module docstring)."""
        from .distributed import barrier

        k = progress.next_block
        name = self._state_name(k)
        path, tmp = self.folder / name, self.folder / f".{name}.tmp"
        torch.save({"tensors": progress.tensors, "rng": progress.rng}, tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        kill_point("state", k)
        barrier()  # every rank's state file is in place before checkpoint.json names it
        self.info["progress"] = {"next_block": k, "records": progress.records,
                                 "sparsity_counts": progress.sparsity_counts,
                                 "returns_tuple": progress.returns_tuple,
                                 "parts": self.writer.parts if self.writer is not None else 0}
        if self.main:
            self._write_info()
        barrier()
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
    def link_blocks_into(self, folder: Path, dtype: torch.dtype | None = None) -> None:
        """Put the finished blocks' shards into ``folder`` (the output being written) as hard links
        (copies where the filesystem has none); the checkpoint keeps its own until :meth:`remove`.
        With a ``dtype`` other than theirs, each shard is rewritten cast instead (one block in memory)."""
        from safetensors.torch import load_file

        from .lazy import FLOAT_CODES, SAFETENSORS_DTYPES, read_safetensors_header, write_safetensors

        for k in range(1, self.writer.parts + 1):
            name = f"model-part-{k:05d}.safetensors"
            src, dst = self.folder / "blocks" / name, Path(folder) / name
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

    def remove(self) -> None:
        """The run is saved: the checkpoint goes (rank 0)."""
        if self.main:
            _remove(self.folder)
        self.close()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _take_lock(folder: Path, create: bool) -> int | None:
    """An exclusive lock on ``folder/lock`` (its file descriptor), or one line if another run holds it."""
    import fcntl

    try:
        fd = os.open(folder / LOCK, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise EbftError(f"out: another ebft run is using the checkpoint {folder} (the same --out); "
                            "wait for it to finish or give another --out") from None
        raise
    return fd


def _check_unlocked(folder: Path) -> None:
    fd = _take_lock(folder, create=False)
    if fd is not None:
        os.close(fd)


def _device_of_group() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


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
    saved = {k: v for k, v in found["fingerprint"]["config"].items()}
    done = {k: v for k, v in (record.get("config") or {}).items() if k not in IGNORED}
    if json.loads(json.dumps(done)) == saved:
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
