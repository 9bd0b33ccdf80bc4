"""Save a pruned model with zeros in place, atomically and safely; measure its sparsity.

What an output folder is promised:

* **Complete or absent.** Everything is written into ``.<name>.tmp-<pid>`` beside ``out`` and moved
  into place by one rename. Replacing an older output swaps the two folders with
  ``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem have it (Linux >= 3.15 on ext4,
  xfs, btrfs, tmpfs...): there is no instant at which ``out`` is missing, so even SIGKILL or a
  power cut leaves the old or the new output. Elsewhere the swap is two renames through
  ``.<name>.old-<pid>``; a kill between them leaves ``out`` missing and the complete old output
  aside, which the next start puts back. SIGINT/SIGTERM/SIGHUP that arrive during the swap are held
  until it is over.
* **No leftovers.** The next save to (or :func:`check_out` of) the same ``out`` removes the
  ``.tmp-``/``.old-`` folders of processes that no longer exist.
* **Only ebft's own folders are replaced.** A finished output holds a marker file (``.ebft-output``)
  listing every file ebft wrote into it; ``overwrite`` replaces a folder only when the marker is
  there and the folder holds nothing else (or, for outputs written before the marker existed, an
  ebft ``run.json`` and only the files ebft writes).
* **Normal permissions.** Files get ``0666 & ~umask`` and folders ``0777 & ~umask`` (safetensors
  writes its file 0600), and everything is flushed to disk before the rename.

This module imports torch lazily so that the CLI's checks, and the kill tests, start fast.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .atomic import RENAME_EXCHANGE, fsync_file, fsync_folder, pid_alive, renameat2, write_json
from .errors import ConfigError, EbftError

log = logging.getLogger(__name__)

MARKER = ".ebft-output"  # JSON: {"written_by": "ebft", "version": .., "files": [relative paths]}
RUN_RECORD = "run.json"
# What ebft wrote into an output folder before the marker existed (transformers' save_pretrained,
# the tokenizer, run.json and the loss plot): a legacy folder holding anything else is not replaced.
_LEGACY_FILES = re.compile(
    r"(config\.json|generation_config\.json|run\.json|block_losses\.png|model(-\d+-of-\d+)?\.safetensors"
    r"|model\.safetensors\.index\.json|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json"
    r"|added_tokens\.json|vocab\.json|merges\.txt|chat_template\.(jinja|json))"
)
_IGNORED = {".DS_Store", "Thumbs.db"}  # written by file browsers, not by users
_PID_DIGITS = 7  # Linux pid_max is at most 4194304


def sparsity_report(model, layer_names) -> dict:
    """Fraction of exact zeros per pruned linear (read from the weights themselves) and overall."""
    modules = dict(model.named_modules())
    layers, zeros, total = {}, 0, 0
    for name in layer_names:
        w = modules[name].weight.data
        z = int((w == 0).sum())
        layers[name] = round(z / w.numel(), 6)
        zeros, total = zeros + z, total + w.numel()
    return {"overall": round(zeros / total, 6) if total else 0.0, "layers": layers}


# ----------------------------------------------------------------------------- is it ours?

def _read_json(path: Path):
    """The JSON in a regular file (never through a symlink), or None."""
    try:
        if path.is_symlink() or not path.is_file():
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _files_in(folder: Path) -> tuple[list[str], list[str]]:
    """(regular files, anything else: links, devices...) below ``folder``, as relative POSIX paths."""
    files, others = [], []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        for d in list(dirs):
            if (base / d).is_symlink():  # os.walk lists a link to a folder as a folder; never follow it
                dirs.remove(d)
                others.append((base / d).relative_to(folder).as_posix())
        for n in names:
            p = base / n
            rel = p.relative_to(folder).as_posix()
            (files if p.is_file() and not p.is_symlink() else others).append(rel)
    return files, others


def ebft_output_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` is not a complete output written by ebft (one phrase), or None when it is.

    An output is ebft's when its marker lists every file in it and all of them are there; an output
    written before the marker existed is ebft's when its ``run.json`` has ebft's keys ("config",
    "versions" with "ebft") and every file is one ebft writes. An empty folder is fine (nothing to lose).
    """
    folder = Path(folder)
    if folder.is_symlink():
        return "it is a symbolic link"
    if not folder.is_dir():
        return "it is not a folder"
    try:
        files, others = _files_in(folder)
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    files = [f for f in files if Path(f).name not in _IGNORED]
    if not files and not others:
        return None
    if others:
        return f"it holds links or special files ebft never writes ({', '.join(sorted(others)[:3])})"
    marker = _read_json(folder / MARKER)
    if marker is not None:
        listed = marker.get("files") if isinstance(marker, dict) and marker.get("written_by") == "ebft" else None
        if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
            return f"its {MARKER} file is not ebft's"
        added = marker.get("added") if isinstance(marker.get("added"), list) else []
        extra = sorted(set(files) - set(listed) - set(added) - {MARKER})
        if extra:
            return f"it holds files ebft did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
        missing = sorted(set(listed) - set(files))
        if missing:
            return f"it is incomplete ({', '.join(missing[:3])} missing)"
        return None
    record = _read_json(folder / RUN_RECORD)
    versions = record.get("versions") if isinstance(record, dict) else None
    if not (isinstance(record.get("config") if isinstance(record, dict) else None, dict)
            and isinstance(versions, dict) and isinstance(versions.get("ebft"), str)):
        return f"it has no ebft run record ({RUN_RECORD} written by ebft)"
    extra = sorted(f for f in files if "/" in f or not _LEGACY_FILES.fullmatch(f))
    if extra:
        return f"it holds files ebft did not write ({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''})"
    return None


SWEEP_MARKER = ".ebft-sweep"  # JSON: {"written_by": "ebft", "kind": "sweep", "version": ..}
SWEEP_LOCK = "lock"  # held by the sweep running in the folder
# what a sweep writes into its folder (a folder holding only these, written before the marker existed, is one)
_SWEEP_FILES = re.compile(r"(cells|models|lock|results\.(json|md|png)|\.results\.(json|md|png)\.tmp-\d+)")


def sweep_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot take (or go on taking) a sweep's cells and results, or None when it can:
    it is missing or empty, or a sweep made it (its marker; or, from before the marker, a ``cells``
    folder and nothing but what a sweep writes)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    entries = sorted(e.name for e in os.scandir(folder) if e.name not in _IGNORED)
    if not entries:
        return None
    marker = _read_json(folder / SWEEP_MARKER)
    if isinstance(marker, dict) and marker.get("written_by") == "ebft" and marker.get("kind") == "sweep":
        return None
    if ebft_output_problem(folder) is None:
        return "is the output folder of an ebft run, not a sweep's"
    foreign = [name for name in entries if not _SWEEP_FILES.fullmatch(name)]
    if not foreign and not (folder / "cells").is_dir():  # a sweep's folder from before the marker has its cells
        foreign = entries
    if foreign:
        return f"holds files an ebft sweep did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"
    return None


def note_added_file(path: str | os.PathLike) -> bool:
    """Before ebft writes the file ``path`` into a complete ebft output (``ebft export RUN --out
    RUN/model.gguf``), list it in the output's marker as added, so that a later ``--overwrite`` still knows
    the folder as its own (an added file may be missing: deleted since, or never written by a failed export).
    False, writing nothing, when ``path``'s folder is not a complete ebft output."""
    path = Path(path)
    folder = path.parent
    if ebft_output_problem(folder) is not None or not (folder / MARKER).is_file():
        return False
    marker = _read_json(folder / MARKER)
    added = [f for f in marker.get("added") or [] if isinstance(f, str)]
    if path.name not in added and path.name not in marker["files"]:
        write_json(folder / MARKER, {**marker, "added": sorted({*added, path.name})}, durable=False)
    return True


def mark_sweep_folder(folder: str | os.PathLike) -> None:
    """Create a sweep's folder (if needed) and mark it as a sweep's, so that later sweeps may resume in it
    and runs never replace it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SWEEP_MARKER).exists():
        write_json(folder / SWEEP_MARKER, {"written_by": "ebft", "kind": "sweep", "version": __version__})


def is_ebft_output(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a complete output that ebft wrote (see :func:`ebft_output_problem`)."""
    return ebft_output_problem(folder) is None


# ----------------------------------------------------------------------------- checked up front

def folder_for(out: str | os.PathLike) -> Path:
    """Where the run at ``out`` keeps its checkpoint (:mod:`ebft.checkpoint`): ``runs/x`` -> ``runs/.x.ckpt``
    (absolute)."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    return out.parent / f".{out.name}.ckpt"



def _absolute(out: str | os.PathLike) -> Path:
    """Absolute, with ``~`` expanded and ``..`` folded, but links not followed (the name we write)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(out))))


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_out(out, overwrite: bool = False, inputs=(), *, reuse: bool = False, field: str = "out") -> Path:
    """Check that ``out`` can receive a new output, before any model is loaded; return it absolute.

    ``inputs``: every local path the run reads (model folder or .gguf, calibration and evaluation
    files, task-data folder); names that are not existing paths (hub ids, "wikitext2") are skipped.
    ``reuse``: ``out`` is a folder written into rather than replaced (a sweep's folder, resumed).

    Refused with one :class:`ConfigError` line naming ``field``: an empty or impossible name; the
    current folder or one above it; a path inside a regular file; an existing file or link; a
    folder that is, holds or lies inside an input; an existing folder without ``overwrite``
    (unless empty) or, with it, one that ebft did not write; a destination where nothing can be
    created (read-only, no permission, name too long). Stale temporary folders of dead processes
    are cleaned first (see :func:`clean_stale`).
    """
    if out is None or (isinstance(out, str) and not out.strip()):
        raise ConfigError(field, out, "required: the folder to write the model and run.json into")
    if not isinstance(out, (str, os.PathLike)):
        raise ConfigError(field, out, "must be a folder path")
    if "\0" in str(os.fspath(out)):
        raise ConfigError(field, out, "a path cannot contain a NUL character")
    path = _absolute(out)
    if path == path.parent:
        raise ConfigError(field, out, "is the root folder; give a new folder to write the output into")
    real = _real(path)
    cwd = _real(os.getcwd())
    if not reuse and _within(cwd, real):
        what = "the current folder" if real == cwd else f"a folder above the current folder ({cwd})"
        raise ConfigError(field, out, f"is {what}; ebft will not replace it: give a new folder")

    # the nearest existing folder above `out` must be a folder, and writable
    above = path.parent
    while not os.path.lexists(above):
        above = above.parent
    if not above.is_dir():
        kind = "a broken link" if above.is_symlink() else "a file"
        raise ConfigError(field, out, f"{above} is {kind}, so nothing can be written inside it")
    _check_names(field, out, path, above)
    if above == path.parent:
        clean_stale(path)

    if path.is_symlink():
        raise ConfigError(field, out, "is a symbolic link; give the folder it points to, or a new folder")
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(field, out, "exists and is a file; give a folder to write the output into")

    for given in inputs or ():
        if not isinstance(given, (str, os.PathLike)) or not os.path.exists(os.path.expanduser(os.fspath(given))):
            continue
        source = _real(given)
        if source == real:
            raise ConfigError(field, out, f"is an input of this run ({given}); give a new folder for the output")
        if _within(source, real) and not reuse:
            raise ConfigError(field, out, f"holds an input of this run ({given}); give a new folder for the output")
        if source.is_dir() and _within(real, source):
            raise ConfigError(field, out, f"is inside an input folder of this run ({given}); write the output elsewhere")

    if path.is_dir() and reuse:
        problem = sweep_folder_problem(path)
        if problem is not None:
            raise ConfigError(field, out, f"{problem}; give the sweep a new folder (or an empty one)")
    if path.is_dir() and not reuse:
        empty = not any(os.scandir(path))
        if not empty and not overwrite:
            raise ConfigError(field, out, "already exists; pass --overwrite to replace an output ebft wrote, "
                                          "or give a new folder")
        problem = ebft_output_problem(path)
        if problem is not None:
            raise ConfigError(field, out, f"exists and ebft did not write it: {problem}; --overwrite only "
                                          "replaces a folder ebft wrote (move it away or give a new folder)")
        if not os.access(path, os.W_OK | os.X_OK):  # the old output must be deletable after the swap
            raise ConfigError(field, out, "exists and cannot be modified (no write permission)")

    _probe(field, out, path, above, inside=reuse and path.is_dir())
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _check_names(field: str, out, path: Path, above: Path) -> None:
    """Each folder to create, and the temporary names beside ``out``, fit the filesystem's limit."""
    name_max = _name_max(above)
    missing = path.relative_to(above).parts
    for part in missing:
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(field, out, f"the name {part[:40]!r}... is too long ({len(part)} characters; "
                                          f"at most {name_max})")
    temporary = f".{path.name}.old-{'9' * _PID_DIGITS}"
    if len(os.fsencode(temporary)) > name_max:
        raise ConfigError(field, out, f"the name {path.name[:40]!r}... is too long: ebft needs "
                                      f"{len(temporary) - len(path.name)} more characters for its temporary "
                                      f"folder (at most {name_max - len(temporary) + len(path.name)})")


def _probe(field: str, out, path: Path, above: Path, inside: bool) -> None:
    """Create and remove a folder where the output will be created: the only test that also holds
    for root (for whom ``os.access`` says yes to a chmod'ed folder), read-only mounts and quotas."""
    name_max = _name_max(above)
    missing = path.relative_to(above).parts
    where = path if inside else above
    name = f".{path.name if inside else missing[0]}.tmp-{os.getpid()}"  # what clean_stale removes
    probe = where / (name if len(os.fsencode(name)) <= name_max else f".ebft.tmp-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except FileExistsError:
        pass  # a folder of ours by that name: creating one works
    except OSError as error:
        raise ConfigError(field, out, f"cannot write in {where} ({error.strerror or error})") from None


# ----------------------------------------------------------------------------- leftovers

def _stale_name(out: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` folders of dead processes beside ``out``.

    If ``out`` is missing and a complete ``.old-<pid>`` is there (a process killed in the middle of
    a two-rename swap), it is renamed back to ``out`` first: the last complete output comes back.
    Returns what was removed or restored.
    """
    out = _absolute(out)
    pattern = _stale_name(out)
    try:
        entries = [(m.group(1), int(m.group(2)), Path(e.path))
                   for e in os.scandir(out.parent) if (m := pattern.fullmatch(e.name))]
    except OSError:
        return []
    stale = [(kind, path) for kind, pid, path in entries if not pid_alive(pid)]
    touched = []
    if not os.path.lexists(out):
        olds = [p for kind, p in stale if kind == "old" and is_ebft_output(p) and any(os.scandir(p))]
        if olds:
            newest = max(olds, key=lambda p: p.stat().st_mtime)
            try:
                os.rename(newest, out)
                log.warning("restored %s from an interrupted overwrite (%s)", out, newest.name)
                touched.append(out)
                stale = [(k, p) for k, p in stale if p != newest]
            except OSError as error:
                log.warning("could not restore %s from %s: %s", out, newest, error)
    for _, path in stale:
        log.info("removing %s, left by an interrupted run", path)
        _remove_tree(path)
        touched.append(path)
    return touched


def _remove_tree(path: Path) -> None:
    """Delete a folder; its marker and run record go first, so a half-deleted folder never looks
    like a complete output."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    for name in (MARKER, RUN_RECORD):
        try:
            (path / name).unlink()
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- the save

@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it becomes ``out`` in one atomic step.

    If the body raises (or the process is interrupted), ``out`` is left as it was and the
    temporary folder is removed. With ``overwrite`` an existing ``out`` is replaced only if ebft
    wrote it (else :class:`EbftError`); an existing empty folder is always replaced. Stale
    temporary folders of dead processes are cleaned first.
    """
    out = _absolute(out)
    created = [p for p in reversed(out.parents) if not os.path.lexists(p)]
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    _remove_tree(tmp)
    tmp.mkdir()
    done = False
    try:
        yield tmp
        _seal(tmp)
        with _signals_held():
            _commit(tmp, out, overwrite)
        done = True
    finally:
        _remove_tree(tmp)  # a partial output; after a commit there is nothing left here
        if not done:
            for folder in reversed(created):  # the folders made for it, if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _seal(folder: Path) -> None:
    """Normal permissions, the marker listing every file, everything flushed to disk."""
    mask = _umask()
    files, others = _files_in(folder)
    if others:
        raise EbftError(f"the output holds links or special files ({', '.join(others[:3])}); not saving it")
    for root, dirs, _ in os.walk(folder):
        for d in dirs:
            os.chmod(Path(root) / d, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
    files = sorted(f for f in files if f != MARKER)
    marker = {"written_by": "ebft", "version": __version__, "files": files}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    for rel in [*files, MARKER]:
        path = folder / rel
        os.chmod(path, 0o666 & ~mask)
        fsync_file(path)
    for root, _, _ in os.walk(folder, topdown=False):
        fsync_folder(Path(root))


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    if not os.path.lexists(out) or (out.is_dir() and not out.is_symlink() and not any(os.scandir(out))):
        try:
            _rename(tmp, out)  # replaces an empty folder too, atomically
        except OSError as error:
            raise EbftError(f"could not save to {out} ({error.strerror or error}); "
                            "did something else write there during the run?") from None
        fsync_folder(out.parent)
        return
    if not overwrite:
        raise EbftError(f"{out} appeared while the run was going; not replacing it (pass --overwrite)")
    problem = ebft_output_problem(out)
    if problem is not None:
        raise EbftError(f"not replacing {out}: ebft did not write it ({problem})")
    if _exchange(tmp, out):  # out is the new output now; tmp holds the old one
        fsync_folder(out.parent)
        _remove_tree(tmp)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    _remove_tree(old)
    _rename(out, old)
    try:
        _rename(tmp, out)
    except BaseException:
        _rename(old, out)
        raise
    fsync_folder(out.parent)
    _remove_tree(old)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's ``renameat2(RENAME_EXCHANGE)``; False where unsupported
    (other systems, old kernels or C libraries, filesystems without it such as some network mounts)."""
    return renameat2(a, b, RENAME_EXCHANGE)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (changing it, even briefly,
    would affect files other threads create meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- signals

_HELD = ("SIGINT", "SIGTERM", "SIGHUP")


class Interrupted(KeyboardInterrupt):
    """A termination signal turned into KeyboardInterrupt, so ``finally`` clauses clean up."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextmanager
def interrupt_on_signals(names=("SIGTERM", "SIGHUP")):
    """Within the block, SIGTERM (and SIGHUP: the terminal closed) raise :class:`Interrupted`, a
    KeyboardInterrupt, exactly as Ctrl-C does, so temporary files are removed on the way out.
    ``exc.signum`` gives the exit code ``128 + signum``. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in names:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's ignored SIGHUP stays so
            previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def _signals_held():
    """Hold SIGINT/SIGTERM/SIGHUP during the commit and deliver them after it, so a Ctrl-C never
    lands between the two renames of a swap."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {}
    for name in _HELD:
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if received:
            signum = received[0]
            handler = previous.get(signum)
            if callable(handler):
                handler(signum, None)
            elif handler != signal.SIG_IGN:  # the default action
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signum)


# ----------------------------------------------------------------------------- files

def save_dtype(model, requested: str = "auto", run_dtype: str = "auto"):
    """The dtype a model is saved in: ``requested`` (float32 | bfloat16 | float16), else the run's
    ``--dtype`` when one was given, else the dtype the model came as (its checkpoint's; bfloat16 for a
    dequantised GGUF), else the dtype it has."""
    import torch

    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if requested in names:
        return names[requested]
    if run_dtype in names:
        return names[run_dtype]
    return getattr(model, "_ebft_source_dtype", None) or next(model.parameters()).dtype


def save_pretrained(model, tokenizer, folder: Path, dtype=None) -> None:
    """safetensors weights (zeros in place) in ``dtype`` (None: as the model is) + config + tokenizer.

    The model in memory is left as it is (a cast copy of the weights is written); the saved config
    says ``use_cache: true`` (the walk turns the cache off, a user generating text wants it on).
    Casting never turns a zero into anything else, so the masks hold in the saved file."""
    config = model.config
    use_cache, config_dtype = getattr(config, "use_cache", None), getattr(config, "dtype", None)
    state = None
    if dtype is not None and any(p.dtype != dtype and p.is_floating_point() for p in model.parameters()):
        cast: dict = {}  # tied weights (embeddings and head) stay one tensor
        state = {k: cast.setdefault(v.data_ptr(), v.to(dtype)) if v.is_floating_point() else v
                 for k, v in model.state_dict().items()}
    try:
        config.use_cache = True
        if dtype is not None:
            config.dtype = dtype
        model.save_pretrained(folder, safe_serialization=True, **({"state_dict": state} if state else {}))
    finally:
        config.use_cache = use_cache
        if dtype is not None:
            config.dtype = config_dtype
    if dtype is not None:  # transformers writes the in-memory dtype; the file holds ``dtype``
        path = Path(folder) / "config.json"
        saved = json.loads(path.read_text())
        saved["dtype"] = str(dtype).removeprefix("torch.")
        path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
