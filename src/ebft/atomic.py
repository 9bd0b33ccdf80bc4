"""One way to write a file: under a temporary name beside it, flushed, then renamed into place.

A reader (or a process started after a kill) sees the old file or the new one, never half of one.
Temporary names carry the writer's pid (``.<name>.tmp-<pid>``), so two processes never share one,
and a temporary file left by a process that no longer exists is removed by the next writer.
Folders (a whole output) are :func:`ebft.output.atomic_folder`'s business; this is for files.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Callable


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (someone else's process, or one we cannot ask about, counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True
    return True


def temporary_name(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}"


def _clean_dead(path: Path) -> None:
    for entry in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = entry.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            entry.unlink(missing_ok=True)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk (silently skipped where the file cannot be opened or flushed)."""
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:
        pass


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename is durable once its folder is); silently skipped where the
    filesystem cannot."""
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


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``durable``: flush the file to disk before the rename (a power cut then leaves the old or the new
    file). If ``write`` raises (or the process is interrupted), ``path`` is untouched and the temporary
    file is removed."""
    path = Path(path)
    _clean_dead(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def write_json(path: str | os.PathLike, data, *, durable: bool = True) -> Path:
    """``data`` as indented JSON (paths, tensors and dtypes written as plain values), atomically."""
    return write_text(path, json.dumps(data, indent=2, default=_jsonable), durable=durable)


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    kind = type(obj).__module__.split(".")[0]
    if kind == "torch":
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.tolist()
        if isinstance(obj, torch.dtype):
            return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
