"""What the run needs to know about the machine and the process: versions, memory, seeds.

One reader of available memory (host and accelerator), one of the process's peak memory; every
other module asks here.
"""
from __future__ import annotations

import functools
import os
import platform
import random
import re
import resource
import time
from pathlib import Path

import torch

from . import __version__


def versions() -> dict:
    import transformers

    return {"ebft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- memory available

def host_available() -> int | None:
    """Host memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def accelerator_free(device: str | torch.device) -> int | None:
    """Free bytes on a CUDA device (None on the CPU or where there is none)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def free_memory(device: str | torch.device) -> int | None:
    """What a tensor placed on ``device`` can still take: free accelerator memory, or available host memory."""
    device = torch.device(device)
    return accelerator_free(device) if device.type == "cuda" else host_available()


# ----------------------------------------------------------------------------- peak memory

def peak_memory(device: str) -> dict:
    """Peak memory so far: on CUDA the allocator's peak since the last reset (the run's start); on CPU
    the process's peak resident set size since :func:`reset_host_peak` (the start of a run; in a
    sweep, since the process started: every earlier cell included). Linux's ``VmHWM`` is read, which
    unlike ``ru_maxrss`` does not start from the parent's peak in a subprocess; elsewhere ``ru_maxrss``."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "cuda"}
    rss = _status_bytes("VmHWM")
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_bytes": rss, "peak_memory_of": "process RSS"}


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_host_peak() -> None:
    """Restart the host peak-memory measurement at the current resident set (Linux: writing 5 to
    ``/proc/self/clear_refs`` resets ``VmHWM``; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


_malloc_trim = None


def trim_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A freed block's tensors go back to the C allocator, which keeps most of that memory for reuse
    instead of returning it; block after block the process then grows as if nothing had been freed
    (measured: +13 MiB per 16 MiB block). Trimming after each release keeps the peak at one block.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


# ----------------------------------------------------------------------------- sizes

GiB = 1024 ** 3
MAX_BYTES = 2 ** 60  # 1 EiB: larger than any machine; a size above it is a typo
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(i?)B?\s*", re.IGNORECASE)


def parse_bytes(text: str | int) -> int:
    """``"80GB"`` → 80·10⁹, ``"16GiB"`` → 16·2³⁰, ``"512M"``, ``"5gb"``; plain integers are bytes.

    Raises ``ValueError`` (one line saying what a size looks like) for anything else: words, ``nan``,
    negative or fractional bytes, sizes above 1 EiB."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        if not match:
            raise ValueError(f"not a size: {text!r} (use e.g. 80GB, 16GiB, 512M or a number of bytes)")
        power = "KMGTP".find(match[2].upper()) + 1 if match[2] else 0
        value = int(float(match[1]) * (1024 if match[3] else 1000) ** power)
    if value < 0 or value > MAX_BYTES:
        raise ValueError(f"not a sensible size: {text!r} (between 0 and 1 EiB)")
    return value


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024 ** 2:.1f} MiB"


class PhaseClock:
    """Seconds spent in named phases (a run's load, tokenize, capture, plan...; a block's statistics, prune,
    recover, streams, checkpoint), for run.json. On a GPU each phase ends with a synchronisation, so that the
    work it queued is counted in it (a handful per block: nothing next to a block's training steps)."""

    def __init__(self, device: str | torch.device | None = None):
        device = torch.device(device) if device is not None else None
        self.sync = device is not None and device.type == "cuda" and torch.cuda.is_available()
        self.device = device
        self.seconds: dict[str, float] = {}

    def phase(self, name: str):
        return _Phase(self, name)

    def take(self) -> dict[str, float]:
        """The phases so far, rounded, and a fresh start."""
        out, self.seconds = {k: round(v, 3) for k, v in self.seconds.items()}, {}
        return out


class _Phase:
    def __init__(self, clock: PhaseClock, name: str):
        self.clock, self.name = clock, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.clock.sync:
            torch.cuda.synchronize(self.clock.device)
        seconds = self.clock.seconds
        seconds[self.name] = seconds.get(self.name, 0.0) + time.perf_counter() - self.start
        return False


def work_counter(progress, what: str, total: int, unit: str = "window"):
    """``report(done)``: ``work_start`` once, then ``work_step`` events for a progress bar over ``total``
    ``unit``s (the CLI draws it); nothing without a ``progress`` callback."""
    if progress is None:
        return lambda done: None
    progress("work_start", name=what, total=total, unit=unit)
    return lambda done: progress("work_step", name=what, done=done, total=total)


def timed(name: str):
    """Decorator for a method whose object has a ``clock`` (:class:`PhaseClock`, or None): its time goes to
    phase ``name``. Keeps the walk's loop the algorithm, with the timing beside it."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            clock = getattr(self, "clock", None)
            if clock is None:
                return fn(self, *args, **kwargs)
            with clock.phase(name):
                return fn(self, *args, **kwargs)
        return inner
    return wrap

