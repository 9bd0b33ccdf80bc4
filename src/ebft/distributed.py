"""Several processes through ``torch.distributed``: ``torchrun --nproc-per-node N -m ebft run ...``.

**What is split.** The calibration windows and the evaluation windows: rank r holds a contiguous
share of every stream (:meth:`Shard.span`: window ids ``[start, stop)``, sizes differing by at most
one), so each rank keeps 1/N of the calibration chain, the targets, the dense-model stream and the
evaluation streams. Every rank holds the model (or, with ``--lazy``, the current block) and pushes its
windows through each block.

**What is reduced** (sums, so the result is the single-process one up to fp32 summation order):

- the pruners' input statistics (:meth:`ebft.stats.LayerStats.all_reduce_`: ‖X_j‖², Σx, XᵀX and the
  token count), so every rank prunes with the statistics of all windows;
- EBFT's and mask tuning's gradients, every step. The global batch is unchanged: every rank draws the
  same shuffled order (the generator is seeded from the run's seed and the block), takes the same
  ``batch_size`` window ids, and computes the loss over the ones it holds, weighted by its share of the
  batch (``local mean × n_local / n_batch``); the all-reduced gradient is then the gradient of the
  batch mean exactly as one process computes it. A rank holding none of a batch's windows adds zeros;
- the recorded losses (loss before/after, each epoch's) and the evaluation NLL (sum and token count).

Every rank therefore takes the same optimizer steps and ends each block with the same weights; the
block's tensors (and masks) are broadcast from rank 0 after each block all the same, so that
non-deterministic kernels can never let the ranks drift apart. Rank 0 alone writes (checkpoints, the
output folder) and prints; the other ranks are quiet.

Backends: NCCL on CUDA (rank r uses ``cuda:LOCAL_RANK``), gloo on the CPU. Outside torchrun (no
``WORLD_SIZE`` > 1 in the environment) nothing here does anything.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import EbftError

log = logging.getLogger(__name__)

# A rank may wait while rank 0 writes a checkpoint or evaluates; the default 10-30 minutes is too
# short for a 70B model's checkpoint.
TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` ranks, and which windows of a stream it holds."""

    rank: int
    world: int

    def span(self, n: int) -> tuple[int, int]:
        """Window ids ``[start, stop)`` of ``n`` held here: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        start, stop = self.span(t.shape[0])
        return t[start:stop]

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """How many ranks torchrun started (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_main_process() -> bool:
    """Rank 0, or no torchrun at all: the process that prints and writes."""
    return env_rank() == 0


def current() -> Shard | None:
    """The shard of this process when torch.distributed runs with more than one rank, else None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return Shard(dist.get_rank(), dist.get_world_size())


def rank_device(device: str) -> str:
    """``cuda`` (or ``cuda:N``) becomes ``cuda:LOCAL_RANK`` under torchrun: one GPU per rank."""
    if env_world_size() > 1 and torch.device(device).type == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def check_environment() -> None:
    """What torchrun (or another launcher) put in the environment makes sense, before anything starts:
    integer ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, and a rank below the world size."""
    values = {}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        text = os.environ.get(key)
        if text is None:
            continue
        try:
            values[key] = int(text)
        except ValueError:
            raise EbftError(f"{key}: got {text!r} in the environment; it must be an integer (set by torchrun)") from None
    world, rank = values.get("WORLD_SIZE", 1), values.get("RANK", 0)
    if world < 1:
        raise EbftError(f"WORLD_SIZE: got {world} in the environment; it must be at least 1")
    if not 0 <= rank < world:
        raise EbftError(f"RANK: got {rank} in the environment with WORLD_SIZE {world}; a rank is in [0, {world})")


def setup(device: str, timeout: float = 600.0) -> bool:
    """Start the process group when torchrun started several ranks (NCCL for CUDA devices, gloo
    otherwise); return True when this call started it (and :func:`teardown` should end it).

    The ranks meet within ``timeout`` seconds, or this one stops with one line (a peer that never comes:
    ``WORLD_SIZE`` 2 with one process, a wrong address). The meeting runs in a helper thread so that
    SIGINT and SIGTERM stop a waiting rank at once, as any other stage; once met, collectives wait up to
    :data:`TIMEOUT` (a rank may wait hours while rank 0 writes a 70B checkpoint)."""
    import torch.distributed as dist

    if env_world_size() < 2 or (dist.is_available() and dist.is_initialized()):
        return False
    rank, world = env_rank(), env_world_size()
    outcome: dict = {}

    def meet() -> None:
        try:
            if torch.device(device).type == "cuda":
                torch.cuda.set_device(torch.device(device))
                dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device(device))
            else:
                dist.init_process_group("gloo", timeout=TIMEOUT)
            outcome["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = exc

    helper = threading.Thread(target=meet, name="ebft-rendezvous", daemon=True)
    helper.start()
    start, told = time.monotonic(), False
    while helper.is_alive():
        helper.join(0.2)  # short waits: the main thread keeps handling signals
        waited = time.monotonic() - start
        if helper.is_alive() and not told and waited > 5:
            log.warning("rank %d of %d: waiting for the other ranks (MASTER_ADDR=%s, MASTER_PORT=%s; at most %.0f s)",
                        rank, world, os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), timeout)
            told = True
        if helper.is_alive() and waited > timeout:
            raise EbftError(f"rank {rank} of {world}: the other ranks did not join within {timeout:g} s "
                            f"(MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}); "
                            "start every rank (torchrun --nproc-per-node N), or raise --rank-timeout")
    if "error" in outcome:
        exc = outcome["error"]
        raise EbftError(f"rank {rank} of {world}: could not join the other ranks ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return True


@contextmanager
def process_group(device: str, timeout: float = 600.0):
    """Within the block, the process group of torchrun's ranks (started here, ended on the way out);
    nothing outside torchrun."""
    started = setup(device, timeout)
    try:
        yield
    finally:
        if started:
            teardown()


def agree(what: dict) -> None:
    """Every rank must run the same thing: ``what`` (the resolved settings, the model's files, the
    versions) is compared with rank 0's, and every rank stops with one line naming the first difference.
    Ranks started by hand (several nodes, another launcher) with different flags would otherwise train
    different things, or hang in a collective. Nothing outside torch.distributed."""
    if current() is None:
        return
    import torch.distributed as dist

    mine = json.dumps(what, sort_keys=True, default=str)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    reference = json.loads(everyone[0])
    for rank, text in enumerate(everyone):
        if text != everyone[0]:
            key, ours, theirs = _first_difference(reference, json.loads(text))
            key = key.removeprefix("config.")
            raise EbftError(f"rank {rank} runs {key} = {theirs!r} where rank 0 runs {ours!r}: every rank must be "
                            "started with the same settings and model files")


def _first_difference(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
    return prefix.rstrip("."), a, b


def teardown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if current() is not None:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- collectives

def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``tensor`` over the ranks in place; nothing outside torch.distributed."""
    if current() is None:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_reduce_sums(*values: float) -> list[float]:
    """Python numbers summed over the ranks in float64 (losses, NLL sums, counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    return [float(v) for v in all_reduce_(t).cpu()]


def collective_device() -> torch.device:
    import torch.distributed as dist

    if current() is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_gradients_(params) -> None:
    """Sum every parameter's gradient over the ranks, in place.

    A rank that held none of a step's windows has no gradients: it adds zeros. A parameter that no
    rank gave a gradient keeps none (the optimizer then skips it, as in one process)."""
    if current() is None:
        return
    params = list(params)
    device = params[0].device if params else collective_device()
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    all_reduce_(present, "max")
    for p, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce_(p.grad)


def broadcast_(tensors, src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s (bool tensors travel as uint8)."""
    if current() is None:
        return
    import torch.distributed as dist

    for t in tensors:
        if t.dtype == torch.bool:
            tmp = t.to(torch.uint8)
            dist.broadcast(tmp, src)
            t.copy_(tmp.bool())
        else:
            dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src)


def broadcast_value(value: float, src: int = 0) -> float:
    """Rank ``src``'s Python number, on every rank (a decision all ranks must share); unchanged outside
    torch.distributed."""
    if current() is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    broadcast_([t], src)
    return float(t[0])


class ShardedWindows:
    """A rank's share of a ``[windows, seqlen, hidden]`` stream, indexed by *global* window ids.

    What a recovery sees as ``ctx.inputs`` / ``ctx.targets`` under torch.distributed: ``shape[0]`` is
    the number of windows of the whole run (holdout splits and shuffles are drawn over all of them)
    and ``windows[idx]`` returns, in ``idx``'s order, the windows among ``idx`` that this rank holds —
    possibly none (a ``[0, seqlen, hidden]`` tensor). The training loop weighs each rank's loss by its
    share of the batch and sums the gradients (:mod:`ebft.recover.training`).
    """

    sharded = True

    def __init__(self, local: torch.Tensor, start: int, total: int):
        self.local, self.start, self.total = local, start, total

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.total, *self.local.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.dim() != 1:
            raise TypeError("ShardedWindows is indexed by a 1-D tensor of window ids")
        mine = idx[(idx >= self.start) & (idx < self.start + self.local.shape[0])] - self.start
        return self.local[mine]
