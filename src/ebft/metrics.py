"""Per-block metrics: what is measured of every block before and after its recovery, registered by name.

The walk takes every registered metric of each pruned block (or joint window of blocks, recorded on its last
block) against its target, right before its recovery and again right after it, and records
``<name>_before`` and ``<name>_after`` in the block's record in ``run.json`` — for every recovery: ``none``
(nothing changes the block: the same numbers, measured once), DSnoT, the block-training ones, and a
model-scope recovery such as LoRA, whose blocks are measured again once it has trained the whole model
(:func:`ebft.walk.measure_after`). ``ebft plan`` counts what the measurements cost (``passes`` forward
passes over the calibration windows per measurement) and the block plot (:func:`ebft.report.plot_block_losses`)
draws every metric's before and after.

The target is the recovery's own: the dense block on the chain's inputs (``dense-block``), or the dense
model's activations (``dense-model``); a recovery that trains towards none (``none``, DSnoT, LoRA) is
measured against the dense block. A measurement changes nothing the run computes: no random draw, no
weight, no stream; its forward passes run without autocast, in the block's own dtype.

A metric is a function of a :class:`Probe` — the block, how it is called, the calibration windows it
receives and its targets — returning a number; adding one is this::

    @register_metric("relative_error", summary="‖B(X) − Y‖ / ‖Y‖ of each batch, averaged over the windows")
    def relative_error(probe: Probe) -> float:
        return probe.average(lambda out, y: (out.float() - y.float()).norm() / y.float().norm())
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .distributed import all_reduce_sums
from .recover.training import reconstruction_loss


@dataclass
class Probe:
    """One block (or joint window) as a metric sees it: on its device, with the calibration windows this
    process holds and what the block should output on them."""

    index: int  # the block's position in the model (a joint window's first block)
    block: nn.Module
    io: object  # ebft.capture.BlockIO (ebft.walk.JointIO for a window): how the block is called
    inputs: torch.Tensor  # [windows held here, S, H] the calibration chain's inputs to the block
    targets: torch.Tensor  # [windows held here, S, H] the recovery's target (dense-block, or dense-model)
    linears: dict[str, nn.Linear] = field(default_factory=dict)  # the pruned linears, by name inside the block
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> bool keep mask

    @property
    def device(self) -> torch.device:
        return self.io.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.io.call(self.block, x)

    @torch.no_grad()
    def average(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """The mean over the calibration windows (of every rank) of ``fn(outputs, targets)``, a batch's mean:
        the block runs on the windows in the walk's batches, each batch's value weighs its windows."""
        total, n = torch.zeros((), device=self.device), self.inputs.shape[0]
        for i in range(0, n, self.io.batch_size):
            x = self.inputs[i:i + self.io.batch_size].to(self.device, non_blocking=True)
            y = self.targets[i:i + self.io.batch_size].to(self.device, non_blocking=True)
            total += fn(self.forward(x), y).float() * len(x)
        total, count = all_reduce_sums(total.item(), n)  # one host sync per measurement
        return total / max(count, 1)


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Probe], float]
    passes: int = 1  # forward passes over the calibration windows one measurement takes (ebft plan)
    summary: str = ""


METRICS: dict[str, Metric] = {}


def register_metric(name: str, passes: int = 1, summary: str = ""):
    """Decorator: measure ``fn(probe) -> float`` of every block before and after its recovery, recorded as
    ``<name>_before`` and ``<name>_after``; ``passes``: its forward passes over the windows (``ebft plan``)."""
    if not name.isidentifier():
        raise ValueError(f"metric {name!r}: the name must be an identifier (it names run.json keys)")

    def wrap(fn):
        if name in METRICS:
            raise ValueError(f"metric {name!r} is registered twice")
        METRICS[name] = Metric(name, fn, passes, summary)
        return fn
    return wrap


def unregister_metric(name: str) -> None:
    """Remove a registered metric (a plugin or a test that registered its own)."""
    METRICS.pop(name, None)


def metric_passes() -> int:
    """Forward passes over the calibration windows that one measurement of every metric takes."""
    return sum(m.passes for m in METRICS.values())


def take(probe: Probe) -> dict[str, float]:
    """Every registered metric of ``probe``: THE one place per-block measurements are taken."""
    return {name: float(metric.fn(probe)) for name, metric in METRICS.items()}


def record(block_record: dict, after: dict[str, float], before: dict[str, float] | None = None) -> None:
    """``<name>_before`` (with ``before``) and ``<name>_after`` of every metric, into a block's record."""
    for name, value in after.items():
        if before is not None:
            block_record[f"{name}_before"] = before[name]
        block_record[f"{name}_after"] = value


class Readings:
    """The metrics of one pruned block (or joint window) before its recovery; :meth:`after` takes them again
    once it is recovered (or, when the recovery cannot change it, reuses them) and records both."""

    def __init__(self, probe: Probe | None, unchanged: bool = False, clock=None):
        self.probe, self.unchanged, self.clock = probe, unchanged, clock
        self.before = take(probe) if probe is not None else {}

    def after(self, block_record: dict) -> None:
        if self.probe is None:
            return
        with self.clock.phase("metrics") if self.clock is not None else nullcontext():
            after = self.before if self.unchanged else take(self.probe)
        record(block_record, after, self.before)
        self.probe = None  # (its targets are freed with it)


@register_metric("reconstruction_error", summary="the block's output MSE against its target, over the calibration "
                 "windows (the block objective's mse)")
def reconstruction_error(probe: Probe) -> float:
    """‖B(X) − Y‖² / (windows · tokens · hidden): EBFT's block objective (``--loss mse``) on every calibration
    window, held-out ones included, without autocast."""
    return probe.average(reconstruction_loss)
