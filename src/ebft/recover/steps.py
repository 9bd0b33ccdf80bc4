"""How a block's training steps reach the device: batches without host syncs, and on CUDA one captured graph.

At the sizes block-wise training runs (a batch of 8 windows through one block), a step is a few hundred small
kernels: on a GPU the host's launches, not the kernels, set its pace, and every host synchronisation stalls the
queue. So:

- :class:`Batches` hands each step its windows on the device without synchronising the host. Windows that live
  on the device are gathered there with the epoch's order moved to the device once; windows in (pinned) host
  memory are gathered into one of two pinned staging buffers and copied asynchronously (a plain ``x[idx]`` of
  pinned memory is pageable again, and its copy blocks the host).
- :class:`StepRunner` runs the steps: eagerly, or on CUDA as one CUDA graph captured per block after a few eager
  warm-up steps (torch's recipe: a side stream, then capture) and replayed for every full batch — the forward,
  the loss, the backward, the gradient masks, the clip and a fused AdamW step with ``capturable=True`` (its
  learning rate a device tensor the schedule fills). A partial last batch runs eagerly. The first replay of each
  block is checked against an eager forward of the same batch (same weights); if the two disagree, or capture
  fails, the block continues eagerly and its record says why. Where graphs cannot apply — the CPU, fp16 (the
  GradScaler reads its scale on the host), torch.distributed (gradients all-reduced between steps), a recovery
  whose mask moves between steps — the steps are eager and the record says why. ``EBFT_CUDA_GRAPHS=0`` turns
  graphs off (a troubleshooting switch: results are the same either way, up to the kernels' rounding).
- fp32 training on CUDA uses TF32 matmuls (:func:`tf32_on_cuda`), as the reference loops do.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

log = logging.getLogger(__name__)

WARMUP_STEPS = 3  # eager steps on a side stream before capture (torch's CUDA-graph recipe)


@contextlib.contextmanager
def tf32_on_cuda(device: torch.device, amp):
    """fp32 training on CUDA (no autocast): TF32 tensor-core matmuls inside, as the reference loops use."""
    if device.type != "cuda" or amp is not None:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class Batches:
    """The windows of each step (``ctx.inputs`` / ``ctx.targets`` at the epoch's order) on ``ctx.device``,
    without a host sync. :meth:`epoch` takes an epoch's window order (drawn on the host) and moves it once to
    the devices the windows are gathered on; :meth:`get` gives the windows at positions ``[start, stop)`` of it."""

    def __init__(self, ctx, batch_size: int):
        self.device = ctx.device
        self.feeds = [_Feed(ctx.inputs, ctx.device, batch_size), _Feed(ctx.targets, ctx.device, batch_size)]
        self.order: torch.Tensor | None = None
        self.on: dict[torch.device, torch.Tensor] = {}

    def epoch(self, order: torch.Tensor) -> None:
        self.order = order
        self.on = {f.home: order.to(f.home) for f in self.feeds if f.on_device}

    def get(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(f.get(self.on.get(f.home, self.order)[start:stop]) for f in self.feeds)


class _Feed:
    """One stream of windows (inputs or targets) and how a batch of it reaches the device: gathered where it
    lives if that is an accelerator; through two pinned staging buffers if it is host memory feeding a GPU;
    else plainly indexed (the CPU, and torch.distributed's sharded windows)."""

    def __init__(self, windows, device: torch.device, batch_size: int):
        self.windows, self.device = windows, device
        sharded = getattr(windows, "sharded", False)
        self.home = windows.device
        self.on_device = not sharded and self.home.type != "cpu"
        self.buffers: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []
        self.next = 0
        if not sharded and self.home.type == "cpu" and device.type == "cuda":
            shape = (batch_size, *windows.shape[1:])
            self.buffers = [(torch.empty(shape, dtype=windows.dtype, pin_memory=True), None) for _ in range(2)]

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.buffers or len(idx) > self.buffers[0][0].shape[0]:
            return self.windows[idx].to(self.device, non_blocking=True)
        buffer, done = self.buffers[self.next]
        if done is not None:
            done.synchronize()  # the copy out of this buffer, two batches ago, has finished
        staged = buffer[:len(idx)]
        torch.index_select(self.windows, 0, idx, out=staged)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.buffers[self.next] = (buffer, event)
        self.next = 1 - self.next
        return out


class StepRunner:
    """Runs a block's training steps (``step(x, y, batch)`` -> the detached loss, or None): eagerly through
    ``eager_step(x, y, batch)`` (``batch``: the step's windows over all ranks; ``x`` holds this rank's), or on
    CUDA through a graph captured from it (see the module docstring). ``mode`` and ``why`` say which and why."""

    def __init__(self, eager_step, forward_loss, device: torch.device, optimizer, batch_size: int, *,
                 blocked: str | None = None, capture=None):
        self.eager_step, self.forward_loss, self.device = eager_step, forward_loss, device
        self.optimizer, self.batch_size = optimizer, batch_size
        self.capture = capture or cuda_capture  # (tests: a stand-in that replays eagerly, on the CPU)
        self.why = blocked or (None if capture is not None else _graphs_unavailable(device))
        self.mode = "eager" if self.why else "cuda-graph"
        self.graph = None  # the captured step's replay
        self.replays = self.warmed = 0
        if self.mode == "cuda-graph":
            _capturable(optimizer, device)

    def describe(self) -> dict:
        out = {"steps": self.mode, "replays": self.replays}
        if self.why:
            out["why"] = self.why
        return out

    def step(self, x: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor | None:
        if self.mode != "cuda-graph" or x.shape[0] != self.batch_size:
            return self.eager_step(x, y, batch)
        if self.graph is None and self.warmed < WARMUP_STEPS:
            self.warmed += 1
            return self._on_side_stream(x, y)
        if self.graph is None:
            return self._capture_and_check(x, y)
        self.static_x.copy_(x, non_blocking=True)
        self.static_y.copy_(y, non_blocking=True)
        self.graph()
        self.replays += 1
        return self.static_loss

    def _on_side_stream(self, x, y):
        if self.device.type != "cuda":
            return self.eager_step(x, y, x.shape[0])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self.eager_step(x, y, x.shape[0])
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _capture_and_check(self, x, y):
        self.static_x, self.static_y = x.clone(), y.clone()
        try:
            expected = self.forward_loss(self.static_x, self.static_y)  # no grad: the weights before this step
            self.optimizer.zero_grad(set_to_none=True)
            replay, self.static_loss = self.capture(lambda: self.eager_step(self.static_x, self.static_y,
                                                                             self.batch_size))
            replay()
            got, want = float(self.static_loss), float(expected)  # one host sync per block
        except Exception as exc:  # an op that cannot be captured: this block goes on eagerly
            self._fall_back(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})")
            return self.eager_step(x, y, x.shape[0])
        if not (math.isfinite(got) and abs(got - want) <= 1e-2 * abs(want) + 1e-6):
            # the step was taken from the graph's loss; the block's loss check after training still guards it
            self._fall_back(f"the first replay's loss {got:.6g} differs from an eager forward's {want:.6g}")
            return self.static_loss.clone()
        self.graph, self.replays = replay, 1
        return self.static_loss

    def _fall_back(self, why: str) -> None:
        log.warning("training step: %s; this block's steps run eagerly", why)
        self.mode, self.why, self.graph = "eager", why, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def cuda_capture(step):
    """``(replay, output)``: ``step()`` captured as a CUDA graph (nothing runs until ``replay()``, which
    rewrites ``output`` in place)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    return graph.replay, output


def _graphs_unavailable(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "not a CUDA device"
    if os.environ.get("EBFT_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "EBFT_CUDA_GRAPHS=0"
    return None


def _capturable(optimizer, device: torch.device) -> None:
    """The optimizer made replayable: its learning rate a device tensor (the schedule fills it in place) and
    ``capturable=True`` (its step counters stay on the device)."""
    for group in optimizer.param_groups:
        if not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["capturable"] = True
