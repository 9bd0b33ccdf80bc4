"""LoRA recovery of the whole pruned model (Hu et al., 2021), merged back with the masks re-applied.

The baseline of the Wanda paper (Sun et al., 2024, §5): low-rank adapters ΔW = (α/r)·B·A, rank
r = 8, α = 16, dropout 0.05, on ``q_proj`` and ``v_proj`` (``targets="qv"``) or on every linear
of the decoder blocks (``"all"``), trained with the causal-LM loss on windows of the calibration
source's train split, with the pruned weights frozen. Unlike EBFT this is not block-wise: the whole
model sits on the device and the loss is the model's own next-token loss.

Afterwards the adapters are merged into the weights, W ← W + ΔW, and the masks are applied again,
W ← M ⊙ W, so the saved model is exactly as sparse as before (checked). ΔW is dense, so the merge
drops its part on pruned positions: the record reports the held-out LM loss of the pruned model
(``loss_before``), of the trained adapters (``loss_adapter``) and of the merged, re-masked model
(``loss_after``), which measures what re-masking costs.

Training: one pass over ``lora_steps × lora_batch_size`` windows of the calibration length (the
first ones are the calibration windows themselves: same draw, same seed), AdamW (β = 0.9, 0.999,
no weight decay), learning rate decayed linearly to zero, gradient-norm clip 1.0; train mode, so
the LoRA dropout is active. Precision as EBFT: fp32 on CPU, bf16/fp16 autocast on GPUs.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass

import torch

from .. import masks as masklib
from ..errors import ConfigError
from ..models import find_blocks, find_linears
from ..settings import option
from . import ModelContext, register_recovery
from .training import autocast_dtype, optimizer_step, precision_option

log = logging.getLogger(__name__)

TARGET_PRESETS = ("qv", "all")
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


@torch.no_grad()
def lm_loss(model, windows: torch.Tensor, device: torch.device, batch_size: int, amp) -> float:
    """Mean next-token cross-entropy of ``model`` over ``windows`` (``[n, seqlen]`` token ids)."""
    total = torch.zeros((), device=device)
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            total += model(input_ids=x, labels=x, use_cache=False).loss.float() * len(x)
    return total.item() / max(len(windows), 1)


def _reapply_masks(model, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        weight.data.mul_(mask.to(weight.device, weight.dtype))
        masklib.check_weight(weight.data, mask.to(weight.device), name)


def _train(peft_model, train: torch.Tensor, settings: LoraSettings, device, amp, ctx: ModelContext) -> list[float]:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lora_lr, betas=(0.9, 0.999), weight_decay=0.0)
    steps, batch = settings.lora_steps, settings.lora_batch_size
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    curve, running = [], torch.zeros((), device=device)
    peft_model.train()
    ctx.report("lora_start", steps=steps)
    for step in range(steps):
        x = train[step * batch:(step + 1) * batch].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = peft_model(input_ids=x, labels=x, use_cache=False).loss
        (scaler.scale(loss) if scaler else loss).backward()
        optimizer_step(params, optimizer, scaler, 1.0, [])
        schedule.step()
        running += loss.detach().float()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            chunk = (step % LOG_EVERY) + 1
            curve.append(running.item() / chunk)  # one host sync per LOG_EVERY steps
            running.zero_()
            ctx.report("lora_step", step=step + 1, steps=steps, loss=curve[-1])
    peft_model.eval()
    del optimizer, scaler
    return curve


@register_recovery("lora", settings=LoraSettings, needs_targets=False, scope="model")
def lora(ctx: ModelContext, settings: LoraSettings) -> dict:
    """Train LoRA adapters on the pruned model, merge them in, re-apply the masks; return the record."""
    from peft import LoraConfig, get_peft_model

    model, masks, device = ctx.model, ctx.masks, torch.device(ctx.device)
    amp = autocast_dtype(device, settings.precision)
    n_train = settings.lora_steps * settings.lora_batch_size
    targets = resolve_targets(model, settings.lora_targets)
    windows = ctx.text.windows(ctx.tokenizer, n_train + HELDOUT_WINDOWS)
    train, heldout = windows[:n_train], windows[n_train:]
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    home = next(model.parameters()).device
    torch.manual_seed(ctx.seed)  # adapter init and dropout: the run's seed
    model.to(device)
    try:
        with warnings.catch_warnings():  # peft calls a deprecated transformers property
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, config)
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        log.info("LoRA: %d trainable parameters on %s; %d steps of %d windows", trainable,
                 ", ".join(targets), settings.lora_steps, settings.lora_batch_size)
        record = {"trainable_params": trainable, "lora_targets": targets,
                  "loss_before": lm_loss(peft_model, heldout, device, settings.lora_batch_size, amp)}
        curve = _train(peft_model, train, settings, device, amp, ctx)
        record["loss_adapter"] = lm_loss(peft_model, heldout, device, settings.lora_batch_size, amp)
        peft_model.merge_and_unload()  # the adapters go into ``model``'s own linears
        _reapply_masks(model, masks)
        record["loss_after"] = lm_loss(model, heldout, device, settings.lora_batch_size, amp)
    finally:
        model.to(home)
        model.eval()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, True))
    record.update(step_losses=curve, train_windows=n_train, heldout_windows=len(heldout))
    return record
