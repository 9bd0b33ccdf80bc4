"""What the block-wise training recoveries share: settings, loss, the masked AdamW step, the epoch loop,
and the one wrapper around them (:func:`train_block`).

EBFT (:mod:`.ebft`) trains a pruned block's kept weights, the moving mask (:mod:`.gradual`) its weights
while its mask tightens and mask tuning (:mod:`.mask_tuning`) its mask scores, all against the same block
objective and through :func:`train_block` (the loss before, what trains, the epochs, the loss after, the
training undone when that is worse, the record), each saying only what it trains (a :class:`Trainee`);
LoRA (:mod:`.lora`) reuses the optimiser step and the precision rule. Precision: fp32 on CPU; on CUDA bf16 autocast where the GPU has it, else fp16
autocast with a GradScaler that *unscales before clipping* (the reference clips scaled fp16
gradients, which makes its clip threshold meaningless). No host synchronisation inside an epoch:
losses accumulate on the device and are read once per epoch.

Under torch.distributed (``ctx.inputs`` is then a :class:`~ebft.distributed.ShardedWindows`: each
rank holds some of the windows, indexed by global window id) every rank draws the same order and the
same batches; a rank's loss is its windows' mean weighted by their share of the batch, the gradients
are summed over the ranks before each step, and the recorded losses are summed over the ranks too —
the global batch and the objective are one process's (see :mod:`ebft.distributed`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..distributed import all_reduce_, reduce_gradients_
from ..settings import option
from .base import TARGETS
from .steps import Batches, StepRunner, tf32_on_cuda

log = logging.getLogger(__name__)

LOSSES = ("mse", "token-norm")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def precision_option():
    return option("auto", "training precision: {choices} (auto: fp32 on CPU, bf16 autocast on GPUs that have "
                  "it, else fp16 + GradScaler)", choices=PRECISIONS)


@dataclass
class BlockTrainingSettings:
    """The block objective and its loop, shared by EBFT and mask tuning (the EBFT reference code's values)."""

    epochs: int = option(10, "epochs over the calibration windows per block (EBFT and mask tuning)", low=1)
    batch_size: int = option(8, "calibration windows per training step (EBFT and mask tuning)", low=1,
                             flag="--recover-batch-size")
    grad_clip: float | None = option(1.0, "gradient-norm clip (null in YAML: none)", low=0, low_open=True)
    target: str = option("dense-block", "what a block learns to output: {choices} (dense-block: the dense block "
                         "on the sparse chain's inputs, as the reference; dense-model: the dense model's own "
                         "activations)", choices=TARGETS)
    loss: str = option("mse", "block loss: {choices} (token-norm: per-token normalised MSE, weighs tokens "
                       "with massive activations like the others)", choices=LOSSES)
    holdout: int = option(0, "calibration windows held out of training, to report held-out reconstruction "
                          "loss", low=0)
    precision: str = precision_option()


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mse``: mean squared error over all tokens and features (the paper's objective).

    ``token-norm``: each token's squared error divided by its target's mean square, averaged over
    tokens. A few tokens with massive activations (the first token, delimiters) otherwise dominate
    the MSE of some blocks by orders of magnitude; this weighs every token alike.
    """
    out, target = out.float(), target.float()
    if kind == "mse":
        return (out - target).square().mean()
    err = (out - target).square().mean(-1)
    return (err / target.square().mean(-1).clamp_min(1e-6)).mean()


def optimizer_step(params, optimizer, scaler, clip: float | None, masks: list[tuple[nn.Parameter, torch.Tensor]]):
    """One update after ``backward``: unscale (fp16) → mask gradients → clip → step.

    Unscaling comes first so that the clip threshold applies to the true gradients.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    for weight, mask in masks:
        if weight.grad is not None:
            weight.grad.mul_(mask)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def mask_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the masks that multiply gradients: bool on an accelerator (1 byte a weight; the product
    promotes in one kernel), fp32 on the CPU (where a float-by-bool product is an order of magnitude slower).
    The products are the same numbers either way."""
    return torch.bool if device.type != "cpu" else torch.float32


def rejection(failed: bool, after: float, before: float) -> str | None:
    """Why a block's recovery must be undone (a non-finite or a worse final loss), or None."""
    if failed or not math.isfinite(after):
        return "non-finite loss"
    if after > before:
        return "loss increased"
    return None


def make_adamw(params, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with the reference's betas (0.9, 0.95); the fused kernel where torch has it.

    Fused AdamW is ~5x faster per step than the per-tensor loop on CPU (the default there) and
    keeps masked weights exactly at zero just the same (zero gradient, zero moments, zero update).
    """
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch or an unsupported device/dtype
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def autocast_dtype(device: torch.device, precision: str, model_dtype: torch.dtype | None = None) -> torch.dtype | None:
    """``auto``: fp32 on CPU (but the model's own dtype when it runs in bf16/fp16 there: trained
    weights are fp32 masters, the rest of the block and its inputs are not); bf16 on GPUs that have
    it, else fp16."""
    if precision == "auto" and device.type == "cpu" and model_dtype in (torch.bfloat16, torch.float16):
        return model_dtype
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def split_holdout(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training windows and of the last ``holdout`` windows, kept out of training."""
    holdout = min(holdout, n - 1) if holdout else 0
    return torch.arange(n - holdout), torch.arange(n - holdout, n)


def _sharded(ctx) -> bool:
    """Whether ``ctx``'s windows are shared among torch.distributed ranks."""
    return getattr(ctx.inputs, "sharded", False)


@torch.no_grad()
def evaluate_loss(ctx, index: torch.Tensor, settings: BlockTrainingSettings, amp) -> float:
    """The block loss over the windows ``index`` (mean over windows; over all ranks' windows)."""
    total = torch.zeros((), device=ctx.device)
    batches = Batches(ctx, settings.batch_size)
    batches.epoch(index)
    with tf32_on_cuda(ctx.device, amp):
        for i in range(0, len(index), settings.batch_size):
            x, y = batches.get(i, i + settings.batch_size)
            if not len(x):  # none of these windows is held here (torch.distributed)
                continue
            total += block_loss(ctx, x, y, settings, amp) * len(x)
    if _sharded(ctx):
        all_reduce_(total)
    return total.item() / max(len(index), 1)


def block_loss(ctx, x: torch.Tensor, y: torch.Tensor, settings: BlockTrainingSettings, amp) -> torch.Tensor:
    """The block's loss on the windows ``x`` against ``y`` under the training precision. On CUDA the autocast
    keeps no cast cache (a captured graph must not hold one; each weight is cast once per forward anyway)."""
    with torch.autocast(ctx.device.type, dtype=amp, enabled=amp is not None,
                        **({"cache_enabled": False} if ctx.device.type == "cuda" else {})):
        return reconstruction_loss(ctx.forward(x), y, settings.loss)


@dataclass
class Training:
    """What a :class:`Trainee` trains once it is set up: the parameters, their optimiser, the (weight, mask)
    pairs whose gradients are masked, and a hook called after every step (``on_step(step, total_steps)``)."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    weight_masks: list[tuple[nn.Parameter, torch.Tensor]] = ()
    on_step: Callable[[int, int], None] | None = None


class Trainee:
    """What one block-training recovery trains and how it is set up, kept or undone: the hooks
    :func:`train_block` calls, in this order. Only :meth:`start` must be written; the others do nothing."""

    undone = "restoring the pruned weights"  # what the warning says when the training is undone

    def prepare(self) -> None:
        """Before the starting loss is measured (EBFT: the fp32 master weights it is measured with)."""

    def start(self) -> Training:
        """After the starting loss, every parameter of the block frozen: set up and unfreeze what trains."""
        raise NotImplementedError

    def trained(self) -> None:
        """After the last epoch, before the final loss (the moving mask: its target exactly)."""

    def stop(self) -> None:
        """Always, once the final loss is measured or training failed with an error (mask tuning: its
        parametrization removed)."""

    def undo(self) -> None:
        """The training made the block worse (or not finite): put back what the block was."""

    def keep(self, record: dict) -> None:
        """The training is kept (a mask-tuning method: its new masks, counted in ``record``)."""

    def finish(self, record: dict) -> None:
        """Always, last (EBFT: the weights back in the model's dtype; the trained parameters counted)."""


def train_block(ctx, settings: BlockTrainingSettings, trainee: Trainee) -> dict:
    """The one wrapper of the block-training recoveries: the block loss before (and on the held-out windows),
    ``trainee``'s parameters trained for the epochs (:func:`train_epochs`), the loss after, and the training
    undone (``trainee.undo``) when that loss is higher or not finite — a recovered block is never worse on its
    training windows than pruning left it. The block's parameters leave with the ``requires_grad`` they came
    with. Returns the block's record: ``loss_before``, ``loss_after``, ``epoch_losses``, ``restored`` (why the
    training was undone, or None), ``train_seconds``, ``steps``, ``holdout_loss_*`` and the trainee's own."""
    train_idx, hold_idx = split_holdout(ctx.inputs.shape[0], settings.holdout)
    amp = autocast_dtype(ctx.device, settings.precision, next(ctx.block.parameters()).dtype)
    trainee.prepare()
    record = {"loss_before": evaluate_loss(ctx, train_idx, settings, amp)}
    if len(hold_idx):
        record["holdout_loss_before"] = evaluate_loss(ctx, hold_idx, settings, amp)
    grads = {p: p.requires_grad for p in ctx.block.parameters()}  # given back as they were
    for p in grads:
        p.requires_grad_(False)
    try:
        run = trainee.start()
        start = time.perf_counter()
        epoch_losses, failed = train_epochs(ctx, train_idx, run.params, run.optimizer, settings, amp, run.weight_masks,
                                            run.on_step, record=record)
        trainee.trained()
        record["train_seconds"] = round(time.perf_counter() - start, 3)  # the epochs alone (ends on a host sync)
        after = float("nan") if failed else evaluate_loss(ctx, train_idx, settings, amp)
    finally:
        trainee.stop()
        for p, g in grads.items():
            p.requires_grad_(g)
    restored = rejection(failed, after, record["loss_before"])
    if restored:
        log.warning("block %d: %s; %s", ctx.index, restored, trainee.undone)
        trainee.undo()
        after = record["loss_before"]
    else:
        trainee.keep(record)
    trainee.finish(record)
    record.update(loss_after=after, epoch_losses=epoch_losses, restored=restored)
    if len(hold_idx):
        record["holdout_loss_after"] = evaluate_loss(ctx, hold_idx, settings, amp)
    return record


def train_epochs(ctx, train_idx, params, optimizer, settings: BlockTrainingSettings, amp,
                 weight_masks=(), on_step=None, record: dict | None = None) -> tuple[list[float], bool]:
    """``settings.epochs`` shuffled passes over ``train_idx`` minimising the block loss; the learning
    rate decays linearly to 0. The shuffling derives from the run's seed and the block's index.
    Returns (mean loss of each epoch, whether a loss was non-finite); ``record`` (the block's) gets how the
    steps ran (``steps``: eager or a CUDA graph, see :mod:`.steps`).

    With a time share (``ctx.time_share``, from ``--recover-budget``) ``settings.epochs`` is a cap: the
    first few steps are timed (:data:`TIMED_STEPS`, the first of them not counted: warm-up), and as many
    epochs as fit in the share run (at least one), the learning-rate schedule set to end at 0 after the
    last of them (decided before the rate has moved by more than a few steps' worth). Under
    torch.distributed the slowest rank's steps decide, so every rank runs the same epochs.

    ``on_step(step, total_steps)`` is called after every optimiser step (a recovery whose mask moves
    during training tightens it there)."""
    device = ctx.device
    steps_per_epoch = math.ceil(len(train_idx) / settings.batch_size)
    epochs = settings.epochs
    total = {"steps": max(epochs * steps_per_epoch, 1)}
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    share = getattr(ctx, "time_share", None)
    timed = min(TIMED_STEPS, total["steps"])  # the budget's decision comes after this many steps
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    generator = torch.Generator().manual_seed(ctx.seed + ctx.index)

    sharded = _sharded(ctx)
    batches = Batches(ctx, settings.batch_size)
    runner = StepRunner(lambda x, y, batch: step_on(ctx, x, y, batch, params, optimizer, scaler, settings, amp,
                                                    weight_masks, sharded),
                        lambda x, y: _no_grad(block_loss, ctx, x, y, settings, amp), device, optimizer,
                        settings.batch_size, blocked=_graphs_blocked(scaler, sharded, on_step, share))
    epoch_losses, failed = [], False
    ctx.block.train(False)  # no dropout: reconstruct the deterministic block
    epoch, step, clock = 0, 0, [_now(device)]
    with tf32_on_cuda(device, amp):
        while epoch < epochs:
            running = torch.zeros((), device=device)
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
            order = train_idx[torch.randperm(len(train_idx), generator=generator)]
            batches.epoch(order)
            for i in range(0, len(order), settings.batch_size):
                batch = min(settings.batch_size, len(order) - i)  # windows of this step, over all ranks
                x, y = batches.get(i, i + batch)
                loss = runner.step(x, y, batch)
                if loss is not None:
                    running += loss * batch
                    nonfinite |= ~torch.isfinite(loss)
                step += 1
                _set_lr(optimizer, base_lrs, max(0.0, 1 - step / total["steps"]))
                if on_step is not None:
                    on_step(step, total["steps"])
                if share is not None and step <= timed:
                    clock.append(_now(device))
                    if step == timed:  # steps after the first (warm-up) say how long an epoch takes
                        per_step = (clock[-1] - clock[1]) / (timed - 1) if timed > 1 else clock[1] - clock[0]
                        epochs = epochs_within(share, per_step * steps_per_epoch, settings.epochs, device, sharded)
                        total["steps"] = max(epochs * steps_per_epoch, 1)
            if sharded:
                all_reduce_(running)
                nonfinite = all_reduce_(nonfinite.float(), "max").bool()
            epoch_loss = running.item() / len(train_idx)  # one host sync per epoch
            epoch_losses.append(epoch_loss)
            ctx.report("epoch", epoch=epoch + 1, epochs=epochs, loss=epoch_loss)
            if nonfinite.item():
                failed = True
                break
            epoch += 1
    if record is not None:
        record["steps"] = runner.describe()
    return epoch_losses, failed


def _set_lr(optimizer, base_lrs: list[float], factor: float) -> None:
    """The linear decay: each group's rate ``base · factor`` (filled in place where it is a device tensor, which a
    captured step reads)."""
    for group, base in zip(optimizer.param_groups, base_lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(base * factor)
        else:
            group["lr"] = base * factor


def _graphs_blocked(scaler, sharded: bool, on_step, share) -> str | None:
    """Why this block's steps cannot be one captured graph, or None."""
    if scaler is not None:
        return "fp16: the GradScaler reads its scale on the host every step"
    if sharded:
        return "torch.distributed: gradients are all-reduced between steps"
    if on_step is not None:
        return "the recovery changes its mask between steps"
    if share is not None:
        return "--recover-budget times the first steps one by one"
    return None


@torch.no_grad()
def _no_grad(fn, *args):
    return fn(*args)


def training_step(ctx, idx: torch.Tensor, params, optimizer, scaler, settings: BlockTrainingSettings, amp,
                  weight_masks=(), sharded: bool = False) -> torch.Tensor | None:
    """One optimiser step on the windows ``idx`` (:func:`step_on`). What ``ebft plan`` times is this function."""
    x = ctx.inputs[idx].to(ctx.device, non_blocking=True)
    y = ctx.targets[idx].to(ctx.device, non_blocking=True)
    return step_on(ctx, x, y, len(idx), params, optimizer, scaler, settings, amp, weight_masks, sharded)


def step_on(ctx, x: torch.Tensor, y: torch.Tensor, batch: int, params, optimizer, scaler,
            settings: BlockTrainingSettings, amp, weight_masks=(), sharded: bool = False) -> torch.Tensor | None:
    """One optimiser step on the windows ``x`` (targets ``y``) of a batch of ``batch``: the block loss under
    autocast, backward, (torch.distributed: gradients summed over the ranks), then :func:`optimizer_step`.
    Returns the loss (detached), or None when this rank held none of the batch's windows."""
    loss = None
    if len(x):  # under torch.distributed a rank may hold none of the batch
        loss = block_loss(ctx, x, y, settings, amp)
        if sharded:  # this rank's share of the batch mean
            loss = loss * (len(x) / batch)
        (scaler.scale(loss) if scaler else loss).backward()
        loss = loss.detach()
    elif scaler is not None:  # a scaler must have scaled before it may unscale the (zero) gradients
        scaler.scale(torch.zeros((), device=ctx.device))
    if sharded:
        reduce_gradients_(params)
    optimizer_step(params, optimizer, scaler, settings.grad_clip, weight_masks)
    return loss


TIMED_STEPS = 4  # --recover-budget: steps timed before deciding the epochs (the first is warm-up)


def _now(device: torch.device) -> float:
    """Wall time once the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def epochs_within(share: float, epoch_seconds: float, cap: int, device, sharded: bool = False) -> int:
    """How many epochs (at least 1, at most ``cap``) fit in ``share`` seconds when one takes
    ``epoch_seconds``; under torch.distributed the slowest rank's time decides."""
    if sharded:
        epoch_seconds = float(all_reduce_(torch.tensor(epoch_seconds, device=device), "max"))
    return max(1, min(cap, int(share // max(epoch_seconds, 1e-9))))
