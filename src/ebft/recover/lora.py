"""LoRA recovery of the whole pruned model (Hu et al., 2021), with a sparsity-preserving update.

The baseline of the Wanda paper (Sun et al., 2024, §5): low-rank adapters ΔW = (α/r)·B·A, rank
r = 8, α = 16, dropout 0.05, on ``q_proj`` and ``v_proj`` (``targets="qv"``) or on every linear
of the decoder blocks (``"all"``), trained with the causal-LM loss on windows of the calibration
source's train split, with the pruned weights frozen. Unlike EBFT this is not block-wise: the whole
model sits on the device and the loss is the model's own next-token loss.

Two ways to keep the merged model exactly as sparse as the pruner left it (``lora_merge``):

- ``masked`` (default): the update is trained already masked, y = W x + ((α/r)·B·A ⊙ M) x with M
  the linear's keep mask, so the merge W ← W + (α/r)·(B·A) ⊙ M is exact: it adds exact zeros where W
  is zero, and the merged model computes what the adapters computed (``loss_after`` equals
  ``loss_adapter`` up to float rounding). (B·A) ⊙ M is not low-rank, so its gradient is a full
  out×in product per step — the compute of training the kept weights directly; what LoRA still
  saves is optimizer memory (2·r·(in + out) moments per linear instead of out·in). Each adapted
  linear's mask sits on the device beside it (bool: 1 byte per weight).
- ``remask``: the usual dense update B·A, merged, then the masks applied again, W ← M ⊙ (W + ΔW):
  the merge drops the update's part on pruned positions, which ``loss_after`` − ``loss_adapter``
  measures (the Wanda paper's LoRA, and this module's behaviour before the masked update).

A linear with no mask (structured pruning shrinks the linears instead, or a linear the ``--layers``
regex left dense) gets a plain dense update in both modes. The record reports the held-out LM loss
of the pruned model (``loss_before``), of the trained adapters (``loss_adapter``) and of the merged
model (``loss_after``).

The adapters are a small module of this file (:class:`LoraLinear`), not peft: peft computes
B(A x) and never forms B·A, so a masked update cannot be expressed through its forward without
patching its internals; here it is one autograd function that recomputes the masked product in its
backward instead of keeping one out×in tensor per adapted linear alive for the whole forward.

Training: one pass over ``lora_steps × lora_batch_size`` windows of the calibration length (the
first ones are the calibration windows themselves: same draw, same seed), AdamW (β = 0.9, 0.999,
no weight decay), learning rate decayed linearly to zero, gradient-norm clip 1.0; train mode, so
the LoRA dropout is active. Precision as EBFT: fp32 on CPU, bf16/fp16 autocast on GPUs.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks as masklib
from ..errors import ConfigError
from ..models import find_blocks, find_linears
from ..settings import option
from .base import ModelContext, register_recovery
from .training import autocast_dtype, make_adamw, optimizer_step, precision_option

log = logging.getLogger(__name__)

TARGET_PRESETS = ("qv", "all")
MERGES = ("masked", "remask")
HELDOUT_WINDOWS = 4  # windows drawn beyond the training ones, to measure the LM loss
LOG_EVERY = 10  # steps per entry of the recorded loss curve (and per host sync)


@dataclass
class LoraSettings:
    """The Wanda paper's LoRA setup: rank 8, alpha 16, dropout 0.05 on q_proj and v_proj."""

    lora_steps: int = option(200, "LoRA optimizer steps, one pass over steps × batch windows of the calibration "
                             "text's train split", low=1)
    lora_lr: float = option(2e-4, "LoRA AdamW learning rate, decayed linearly to 0", low=0, low_open=True)
    lora_targets: str = option("qv", "LoRA adapters on: qv (q_proj, v_proj, as Wanda) | all (every block "
                               "linear) | a comma list of linear names")
    lora_rank: int = option(8, "LoRA rank", low=1)
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha/rank", low=0, low_open=True)
    lora_dropout: float = option(0.05, "LoRA dropout", low=0, high=1, high_open=True)
    lora_batch_size: int = option(4, "LoRA windows per step", low=1)
    lora_merge: str = option("masked", "how LoRA keeps the sparsity: {choices} (masked: the update is trained "
                             "masked, (BA) ⊙ M, so the merge is exact; remask: a dense update, merged, then "
                             "the masks re-applied, losing its part on pruned weights)", choices=MERGES)
    precision: str = precision_option()

    def check_more(self, prefix: str) -> None:
        check_targets(self.lora_targets, f"{prefix}lora_targets")


def check_targets(targets: str, name: str = "recover.lora_targets") -> None:
    """``qv``, ``all``, or a comma list of linear names (suffixes such as ``o_proj``, ``mlp.down_proj``)."""
    if targets in TARGET_PRESETS:
        return
    if not isinstance(targets, str) or not re.fullmatch(r"\s*[\w.]+\s*(,\s*[\w.]+\s*)*", targets):
        raise ConfigError(name, targets,
                          "allowed: qv (q_proj, v_proj), all (every block linear), or a comma list of linear names")


def resolve_targets(model, targets: str) -> list[str]:
    """The linear names (relative to a block) that get adapters; checked against block 0."""
    _, blocks = find_blocks(model)
    names = list(find_linears(blocks[0]))
    wanted = {"qv": ["q_proj", "v_proj"], "all": names}.get(targets)
    if wanted is None:
        wanted = [t.strip() for t in targets.split(",")]
    missing = [t for t in wanted if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ConfigError("recover.lora_targets", targets,
                          f"this model's blocks have no linear named {', '.join(missing)}; they have "
                          f"{', '.join(names)} (use all, or a comma list of these)")
    return wanted


# ----------------------------------------------------------------------------- the adapters

class _MaskedUpdate(torch.autograd.Function):
    """``x @ (s·(B A) ⊙ M)ᵀ``. The out×in product is recomputed in backward rather than saved, so the
    forward keeps only ``x`` per linear (as any LoRA does), not a dense matrix the size of the weight."""

    @staticmethod
    def forward(ctx, x, a, b, mask, scale):
        ctx.save_for_backward(x, a, b, mask)
        ctx.scale = scale
        return F.linear(x, masked_product(a, b, mask, scale))

    @staticmethod
    def backward(ctx, grad):
        x, a, b, mask = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ masked_product(a, b, mask, ctx.scale).to(grad.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # d loss / d (B A) = s·(gᵀ x) ⊙ M: a full out×in product, as for a dense weight's gradient
            g = grad.reshape(-1, grad.shape[-1])
            g_product = (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).float().mul_(mask).mul_(ctx.scale)
            grad_a = b.t() @ g_product
            grad_b = g_product @ a.t()
        return grad_x, grad_a, grad_b, None, None


def masked_product(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``s·(B A) ⊙ M`` (fp32): exact zeros wherever the mask prunes."""
    product = (b.float() @ a.float()).mul_(scale)
    return product if mask is None else product.mul_(mask)


class LoraLinear(nn.Module):
    """A frozen linear plus a trainable low-rank update: ``base(x) + (s·(B A) ⊙ M) dropout(x)``, s = α/r.

    ``mask``: the base weight's keep mask (bool, on the weight's device), or None for a dense update.
    A, B are fp32 (the master weights under autocast); A ~ Kaiming-uniform and B = 0, as Hu et al.
    (and peft), so training starts from the pruned model itself."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 mask: torch.Tensor | None = None):
        super().__init__()
        device = base.weight.device
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.register_buffer("mask", None if mask is None else mask.to(device, torch.bool), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # e.g. fp32 training of a bf16 model
            h = h.to(self.lora_A.dtype)
        if self.mask is None:
            update = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale
        else:
            update = _MaskedUpdate.apply(h, self.lora_A, self.lora_B, self.mask, self.scale)
        return out + update.to(out.dtype)

    def update(self) -> torch.Tensor:
        """The trained update, fp32, shaped like the base weight (zero wherever the mask prunes)."""
        return masked_product(self.lora_A.detach(), self.lora_B.detach(), self.mask, self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + update, summed in fp32 then cast to the weight's dtype (0 + exact 0 stays 0)."""
        weight = self.base.weight
        weight.data = (weight.data.float() + self.update()).to(weight.dtype)


def add_adapters(model: nn.Module, targets: list[str], masks: dict[str, torch.Tensor], rank: int, alpha: float,
                 dropout: float = 0.0) -> dict[str, LoraLinear]:
    """Replace each block linear whose name matches ``targets`` by a :class:`LoraLinear` around it.

    ``masks``: full linear name -> keep mask; a linear found there gets the masked update, any other a
    dense one. Returns ``{full name: adapter}``; :func:`remove_adapters` puts the linears back."""
    prefix, blocks = find_blocks(model)
    adapters = {}
    for index, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            if not any(name == t or name.endswith(f".{t}") for t in targets):
                continue
            full = f"{prefix}.{index}.{name}"
            adapters[full] = LoraLinear(linear, rank, alpha, dropout, masks.get(full))
            _set_submodule(model, full, adapters[full])
    return adapters


def remove_adapters(model: nn.Module, adapters: dict[str, LoraLinear]) -> None:
    """Put every wrapped linear back (merged or not: whatever its weight holds now)."""
    for full, adapter in adapters.items():
        if model.get_submodule(full) is adapter:
            _set_submodule(model, full, adapter.base)


def _set_submodule(model: nn.Module, full: str, module: nn.Module) -> None:
    parent, _, child = full.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def freeze(model: nn.Module) -> Callable[[], None]:
    """Freeze every parameter; return the function that gives each its ``requires_grad`` back."""
    states = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in states:
        p.requires_grad_(False)

    def restore() -> None:
        for p, state in states:
            p.requires_grad_(state)
    return restore


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Every weight a mask prunes is exactly zero (raises :class:`~ebft.masks.MaskError` otherwise)."""
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.data
        masklib.check_weight(weight, mask.to(weight.device), name)


def _reapply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        weight.data.mul_(mask.to(weight.device, weight.dtype))


# ----------------------------------------------------------------------------- training

@torch.no_grad()
def lm_loss(model, windows: torch.Tensor, device: torch.device, batch_size: int, amp) -> float:
    """Mean next-token cross-entropy of ``model`` over ``windows`` (``[n, seqlen]`` token ids)."""
    total = torch.zeros((), device=device)
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total += model(input_ids=x, labels=x, use_cache=False).loss.float() * len(x)
    return total.item() / max(len(windows), 1)


def train_steps(params: list[nn.Parameter], step_loss: Callable[[int], torch.Tensor], steps: int, lr: float,
                device: torch.device, amp, report: Callable[..., None], event: str, weight_masks=(),
                betas=(0.9, 0.999), clip: float | None = 1.0) -> tuple[list[float], bool]:
    """``steps`` AdamW steps (no weight decay, lr decayed linearly to 0) on ``step_loss(step)``, the
    loss of one batch computed under autocast by the caller; gradients of ``weight_masks``' weights are
    masked before each step (see :func:`.training.optimizer_step`). One host sync per ``LOG_EVERY``
    steps; stops at the first sync that sees a non-finite loss. Returns (loss curve: the mean of each
    ``LOG_EVERY`` steps, whether a loss was non-finite). ``report(f"{event}_step", ...)`` per entry."""
    optimizer = make_adamw(params, lr, 0.0, betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    curve, running = [], torch.zeros((), device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    report(f"{event}_start", steps=steps)
    for step in range(steps):
        loss = step_loss(step)
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(params, optimizer, scaler, clip, list(weight_masks))
        schedule.step()
        running += loss.detach().float()
        nonfinite |= ~torch.isfinite(loss.detach())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            curve.append(running.item() / ((step % LOG_EVERY) + 1))
            running.zero_()
            report(f"{event}_step", step=step + 1, steps=steps, loss=curve[-1])
            if nonfinite.item():
                break
    del optimizer, scaler
    return curve, bool(nonfinite.item())


def text_windows(settings: LoraSettings) -> int:
    """The windows LoRA takes from the calibration text's draw: steps × batch to train on, then 4 held out."""
    return settings.lora_steps * settings.lora_batch_size + HELDOUT_WINDOWS


@register_recovery("lora", settings=LoraSettings, target=None, scope="model",
                   summary="lora: LoRA on the whole pruned model, merged with its masks kept exact",
                   text_windows=text_windows)
def lora(ctx: ModelContext, settings: LoraSettings) -> dict:
    """Train LoRA adapters on the pruned model and merge them, keeping every mask exact; return the record."""
    model, masks, device = ctx.model, ctx.masks, torch.device(ctx.device)
    amp = autocast_dtype(device, settings.precision)
    masked = settings.lora_merge == "masked"
    steps, batch = settings.lora_steps, settings.lora_batch_size
    n_train = steps * batch
    targets = resolve_targets(model, settings.lora_targets)
    windows = ctx.text.windows(ctx.tokenizer, text_windows(settings))
    train, heldout = windows[:n_train], windows[n_train:]
    home = next(model.parameters()).device
    model.to(device)
    unfreeze = freeze(model)
    torch.manual_seed(ctx.seed)  # adapter init and dropout: the run's seed
    adapters = add_adapters(model, targets, masks if masked else {}, settings.lora_rank, settings.lora_alpha,
                            settings.lora_dropout)
    try:
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        trainable = sum(p.numel() for p in params)
        log.info("LoRA (%s): %d trainable parameters on %s; %d steps of %d windows", settings.lora_merge,
                 trainable, ", ".join(targets), steps, batch)
        record = {"trainable_params": trainable, "lora_targets": targets, "lora_merge": settings.lora_merge,
                  "loss_before": lm_loss(model, heldout, device, batch, amp)}

        def step_loss(step: int) -> torch.Tensor:
            x = train[step * batch:(step + 1) * batch].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                return model(input_ids=x, labels=x, use_cache=False).loss

        model.train()
        curve, _ = train_steps(params, step_loss, steps, settings.lora_lr, device, amp, ctx.report, "lora")
        model.eval()
        record["loss_adapter"] = lm_loss(model, heldout, device, batch, amp)
        for adapter in adapters.values():
            adapter.merge()
        remove_adapters(model, adapters)
        if not masked:
            _reapply_masks(model, masks)
        check_masks(model, masks)  # masked: exact by construction, checked all the same
        record["loss_after"] = lm_loss(model, heldout, device, batch, amp)
    finally:
        remove_adapters(model, adapters)
        unfreeze()
        model.to(home)
        model.eval()
    record.update(step_losses=curve, train_windows=n_train, heldout_windows=len(heldout))
    return record
