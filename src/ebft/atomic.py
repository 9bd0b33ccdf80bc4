"""One way to write a file: under a temporary name beside it, flushed, then renamed into place.

A reader (or a process started after a kill) sees the old file or the new one, never half of one.
Temporary names carry the writer's pid (``.<name>.tmp-<pid>``), so two processes never share one,
and a temporary file left by a process that no longer exists is removed by the next writer.
The destination is checked when the file is renamed into place, not only when the work starts: a
file that appeared meanwhile (another process, the user) is replaced only where the caller says so.
Folders (a whole output) are :func:`ebft.output.atomic_folder`'s business; this is for files.
"""
from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Union

from .errors import EbftError

log = logging.getLogger(__name__)

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_renameat2 = None

#: ``write_atomic(replace=...)``: True replaces whatever is there (ebft's own files, in a folder ebft
#: owns); False never replaces anything; a callable is asked, at the moment of the rename, about the file
#: found there: None to replace it, else why not.
Replace = Union[bool, Callable[[Path], Union[str, None]]]


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


def clean_dead(folder: Path, pattern: str) -> list[Path]:
    """Remove what dead processes left in ``folder``: the files and folders whose whole name matches the
    regular expression ``pattern``, whose first group is the pid of the process that made them. Each is
    logged (name, size); returns them. Used where a kill -9 can leave a large file under another name than
    the next write's (an export to another ``.gguf``)."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = re.fullmatch(pattern, entry.name)
        if not m or not m.group(1).isdigit() or pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        try:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if entry.is_dir(
                follow_symlinks=False) else entry.stat(follow_symlinks=False).st_size
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as error:
            log.warning("could not remove %s, left by an interrupted process (%s)", path, error)
            continue
        log.warning("removed %s (%.1f MB), left by an interrupted process (pid %s)", path, size / 1e6, m.group(1))
        removed.append(path)
    return removed


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux's ``renameat2(src, dst, flags)`` (``RENAME_NOREPLACE``, ``RENAME_EXCHANGE``): True when done,
    False where unsupported (other systems, old kernels or C libraries, filesystems without it), OSError
    otherwise (``FileExistsError`` for ``RENAME_NOREPLACE`` onto an existing path)."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` only if nothing is at ``dst`` (``FileExistsError`` otherwise), in one atomic
    step: ``renameat2(RENAME_NOREPLACE)``, else a hard link then removing ``src``; where neither exists
    (filesystems without hard links), a check then a rename."""
    if renameat2(src, dst, RENAME_NOREPLACE):
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


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


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, durable: bool = True,
                 replace: Replace = True) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``durable``: flush the file to disk before the rename (a power cut then leaves the old or the new
    file). ``replace`` (:data:`Replace`) decides, at the rename, about a file already at ``path``; one
    that may not be replaced raises :class:`EbftError` and is left as it is. If ``write`` raises (or the
    process is interrupted), ``path`` is untouched and the temporary file is removed."""
    path = Path(path)
    clean_dead(path.parent, re.escape(f".{path.name}.tmp-") + r"(\d+)")
    tmp = temporary_name(path)
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        if replace is True:
            os.replace(tmp, path)
        else:
            _rename_checked(tmp, path, replace)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _rename_checked(tmp: Path, path: Path, replace: Replace) -> None:
    try:
        rename_new(tmp, path)
        return
    except FileExistsError:
        pass
    why = replace(path) if callable(replace) else "it appeared while ebft was writing it"
    if why is not None:
        raise EbftError(f"not replacing {path}: {why}")
    os.replace(tmp, path)


def take_lock(path: Path, create: bool, busy: str) -> int | None:
    """An exclusive lock on the file ``path`` (its file descriptor: close it to release; the system
    releases it when the process dies), None when ``path`` does not exist and ``create`` is False, and
    :class:`EbftError` with the line ``busy`` when another process holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise EbftError(busy) from None
        raise
    return fd


def check_unlocked(path: Path, busy: str) -> None:
    """:class:`EbftError` with the line ``busy`` when another process holds the lock ``path``."""
    fd = take_lock(path, create=False, busy=busy)
    if fd is not None:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True, replace: Replace = True) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable, replace=replace)


def write_json(path: str | os.PathLike, data, *, durable: bool = True, replace: Replace = True) -> Path:
    """``data`` as indented JSON (paths, tensors and dtypes written as plain values), atomically."""
    return write_text(path, json.dumps(data, indent=2, default=_jsonable), durable=durable, replace=replace)


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
