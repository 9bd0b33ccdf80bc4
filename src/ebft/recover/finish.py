"""The finish: a short end-to-end stage after the block-wise walk, masks fixed.

Block-wise recovery makes each block reproduce its dense twin on the chain's inputs; the errors
that remain compound through the model, and no block sees the model's output. The finish trains
the whole pruned model a few steps on the calibration windows against either

- ``kd``: the dense model's next-token distribution, KL(p_dense ‖ p_sparse) at a temperature T
  (Hinton et al., 2015; the loss is scaled by T² so its gradients keep their size), or
- ``lm``: the causal-LM loss on the windows' own next tokens,

through one of two parameterisations (``train``):

- ``weights``: the kept weights of every block linear (and biases), masked gradients and AdamW
  without weight decay, as EBFT trains a block: a masked weight has zero gradient, zero moments and
  a zero update, so it stays exactly 0.0. fp32 master weights under autocast. Memory: ≈ 17 bytes per
  trained parameter (weight, gradient, two moments, mask) beside the model, and a CPU copy of the
  block linears (to restore them);
- ``lora``: sparsity-preserving LoRA (:class:`.lora.LoraLinear` with the linear's mask) on every
  block linear, merged exactly. Memory: the adapters' few parameters, but the same compute per step
  as ``weights`` ((B A) ⊙ M is not low-rank: its gradient is a full out×in product).
- ``auto`` (default): ``weights`` when its optimizer state fits in memory, else ``lora``. Training
  the kept weights has no rank bottleneck and costs no more compute than the masked LoRA; LoRA's
  only advantage here is memory.

**The dense teacher without a second model.** The walk prunes the model in place, so the dense
model's distributions are computed once *before* the walk (:func:`prepare_finish`, which the
pipeline calls on the dense model) and kept on the CPU: for each token of each window the teacher's
``topk`` log-probabilities at temperature T, their token ids and the log-mass of the rest of the
vocabulary, N·S·(8·k + 4) bytes (128 windows × 2048 tokens × k = 64: 134 MB), or N·S·V·4 bytes
with ``topk = 0`` (the full vocabulary: 33 GB at the same size with a 32k vocabulary; only for
small runs). The KL is then taken over k + 1 outcomes — the teacher's top-k tokens and "any other
token" — which is exact for the top-k and lower-bounds the full KL.

**Never worse, silently.** The stage measures its objective on ``holdout`` further windows of the
calibration text (drawn after the calibration windows; the teacher covers them too) before and after
training; if the loss rose or became non-finite, the pre-finish model is kept and the record says
why (``restored``), like EBFT's per-block rejection. With ``holdout = 0`` the training windows decide.

:func:`finish` returns its record: the parameterisation and why, steps, seconds, the loss curve,
held-out loss (and LM loss) before and after, ``restored``, trainable parameters, the teacher's cost.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models import find_blocks, find_linears
from ..settings import Needs, option
from ..system import free_memory, work_counter
from .base import ModelContext, TrainingText
from .lora import LOG_EVERY, add_adapters, check_masks, freeze, remove_adapters, train_steps
from .training import autocast_dtype, rejection

log = logging.getLogger(__name__)

FINISH_METHODS = ("none", "kd", "lm")
TRAIN_MODES = ("auto", "weights", "lora")
DEFAULT_LR = {"weights": 5e-4, "lora": 1e-3}  # weights: the best of 2e-5, 1e-4, 5e-4 on SmolLM2 (kd alone)
MIN_LOG = -100.0  # log-probabilities are clamped here (a -inf would turn 0·log 0 into nan)
MEMORY_FRACTION = 0.8  # auto: the optimizer state must fit in this share of the free memory
BYTES_PER_WEIGHT = 17  # training the kept weights: fp32 weight, gradient, two AdamW moments, bool mask


_FINISHING = Needs("finish.method", lambda method: method != "none", "--finish kd or lm")


@dataclass
class FinishSettings:
    """The optional end-to-end stage after the walk (``finish:`` in YAML, ``--finish*`` flags)."""

    method: str = option("none", "end-to-end finish after the walk, masks fixed: {choices} (kd: KL to the dense "
                         "model's next-token distribution, computed before pruning; lm: the causal-LM loss)",
                         flag="--finish", choices=FINISH_METHODS, keyed="set")
    steps: int = option(32, "finish optimizer steps (cycling over the calibration windows)", low=1,
                        flag="--finish-steps", needs=_FINISHING)
    lr: float | None = option(None, "finish AdamW learning rate, decayed linearly to 0", low=0, low_open=True,
                              flag="--finish-lr", needs=_FINISHING, default_text=f"{DEFAULT_LR['weights']:g} weights, "
                              f"{DEFAULT_LR['lora']:g} lora")
    batch_size: int = option(4, "finish windows per step", low=1, flag="--finish-batch-size", needs=_FINISHING)
    train: str = option("auto", "what the finish trains: {choices} (weights: the kept weights, masked gradients; "
                        "lora: a masked LoRA update merged exactly; auto: weights when AdamW's ≈17 bytes per "
                        "weight fit in memory, else lora)", choices=TRAIN_MODES, flag="--finish-train", needs=_FINISHING)
    temperature: float = option(1.0, "kd: softmax temperature of teacher and student (the loss is scaled by T²)",
                                low=0, low_open=True, flag="--finish-temperature", needs=_FINISHING)
    topk: int = option(64, "kd: the teacher's top-k tokens kept per position, the rest as one outcome (0: the "
                       "full vocabulary, N·S·V·4 bytes of CPU memory)", low=0, flag="--finish-topk", needs=_FINISHING)
    holdout: int = option(4, "further calibration-text windows on which the finish must lower its loss, "
                          "else the pre-finish model is kept (0: the training windows decide)", low=0,
                          flag="--finish-holdout", needs=_FINISHING)
    lora_rank: int = option(16, "finish with lora: the rank (alpha = 2 × rank)", low=1, flag="--finish-lora-rank", needs=_FINISHING)


# ----------------------------------------------------------------------------- the dense teacher

@dataclass
class TeacherTargets:
    """The dense model's next-token distribution at temperature T on ``[N, S]`` windows, kept on the CPU.

    ``logprobs[n, s]``: log-probabilities of the teacher's top-k tokens ``indices[n, s]`` (or of the
    whole vocabulary when ``indices`` is None); ``rest[n, s]``: the log-mass of every other token."""

    logprobs: torch.Tensor  # [N, S, k] float32
    indices: torch.Tensor | None  # [N, S, k] int32, or None: k is the vocabulary
    rest: torch.Tensor | None  # [N, S] float32, or None with the full vocabulary
    temperature: float
    seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.logprobs, self.indices, self.rest) if t is not None)

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple:
        pick = lambda t: None if t is None else t[idx].to(device, non_blocking=True)  # noqa: E731
        return pick(self.logprobs), pick(self.indices), pick(self.rest)


def _log_rest(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log Σ p over the tokens *not* in ``indices`` (exact: a logsumexp with the top-k set to -inf)."""
    return logprobs.scatter(-1, indices, float("-inf")).logsumexp(-1)


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: torch.Tensor, temperature: float = 1.0, topk: int = 64,
                    device: str | torch.device = "cpu", batch_size: int = 1, progress=None) -> TeacherTargets:
    """The (dense) ``model``'s distributions on ``windows`` ``[N, S]``: call before the walk prunes it.

    The whole model goes to ``device`` for one forward per batch (the finish trains it there anyway)
    and back; the result stays on the CPU (pinned when the device is a GPU)."""
    start = time.perf_counter()
    device = torch.device(device)
    home = next(model.parameters()).device
    model.to(device)
    outs: list[tuple] = []
    try:
        report = work_counter(progress, "finish: dense teacher", len(windows))
        for i in range(0, len(windows), batch_size):
            report(i + len(windows[i:i + batch_size]))
            logits = model(input_ids=windows[i:i + batch_size].to(device), use_cache=False).logits
            logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
            if topk and topk < logprobs.shape[-1]:
                top, idx = logprobs.topk(topk, dim=-1)
                outs.append((top, idx.int(), _log_rest(logprobs, idx)))
            else:
                outs.append((logprobs, None, None))
            outs[-1] = tuple(None if t is None else t.clamp_min(MIN_LOG).cpu() if t.is_floating_point() else t.cpu()
                             for t in outs[-1])
    finally:
        model.to(home)
    cat = lambda k: None if outs[0][k] is None else torch.cat([o[k] for o in outs])  # noqa: E731
    parts = [cat(k) for k in range(3)]
    if device.type == "cuda":
        parts = [None if t is None else t.pin_memory() for t in parts]
    return TeacherTargets(*parts, temperature=temperature, seconds=round(time.perf_counter() - start, 3))


def kd_loss(logits: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor | None, rest: torch.Tensor | None,
            temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) per token, averaged over tokens; over the teacher's top-k tokens plus
    one outcome for the rest of the vocabulary when ``indices`` is given, else over the full vocabulary."""
    student = F.log_softmax(logits.float() / temperature, dim=-1)
    if indices is None:
        kl = (logprobs.exp() * (logprobs - student.clamp_min(MIN_LOG))).sum(-1)
    else:
        indices = indices.long()
        top = student.gather(-1, indices).clamp_min(MIN_LOG)
        student_rest = _log_rest(student, indices).clamp_min(MIN_LOG)
        kl = (logprobs.exp() * (logprobs - top)).sum(-1) + rest.exp() * (rest - student_rest)
    return kl.mean() * temperature ** 2


# ----------------------------------------------------------------------------- before the walk

@dataclass
class FinishData:
    """What the finish trains and checks on, made before the walk: windows and (kd) the teacher."""

    train: torch.Tensor  # [n, S] the calibration windows
    heldout: torch.Tensor  # [h, S] the next windows of the same draw
    teacher: TeacherTargets | None  # kd: over train, then heldout windows

    def teacher_batch(self, which: str, idx: torch.Tensor, device: torch.device) -> tuple:
        offset = 0 if which == "train" else len(self.train)
        return self.teacher.batch(idx + offset, device)


def finish_windows(nsamples: int, settings: FinishSettings) -> int:
    """How many windows of the calibration text's draw the finish takes: the ``nsamples`` calibration
    windows, then ``holdout`` more (0 without a finish)."""
    return 0 if settings.method == "none" else nsamples + settings.holdout


def prepare_finish(model: nn.Module, tokenizer, text: TrainingText, nsamples: int, settings: FinishSettings,
                   device: str | torch.device = "cpu", batch_size: int = 1, progress=None) -> FinishData | None:
    """Draw the windows (the ``nsamples`` calibration windows, then ``settings.holdout`` more) and, for
    ``kd``, the dense teacher's targets on all of them. Call on the *dense* model, before the walk."""
    if settings.method == "none":
        return None
    windows = text.windows(tokenizer, finish_windows(nsamples, settings))
    teacher = None
    if settings.method == "kd":
        teacher = teacher_targets(model, windows, settings.temperature, settings.topk, device, batch_size, progress)
        log.info("finish: dense teacher on %d windows, top-%s, %.1f MiB in %.1f s", len(windows),
                 settings.topk or "all", teacher.nbytes / 2**20, teacher.seconds)
    return FinishData(windows[:nsamples], windows[nsamples:], teacher)


# ----------------------------------------------------------------------------- the stage

def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every block linear by full name (pruned or not; structured models: their shrunk linears)."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{name}": lin for i, block in enumerate(blocks) for name, lin in find_linears(block).items()}


def choose_training(model: nn.Module, settings: FinishSettings, device: torch.device) -> tuple[str, str]:
    """``(weights | lora, why)``: ``auto`` trains the kept weights when AdamW's state for them fits."""
    if settings.train != "auto":
        return settings.train, "asked"
    n = sum(p.numel() for lin in block_linears(model).values() for p in lin.parameters())
    moving = next(model.parameters()).device != device
    need = BYTES_PER_WEIGHT * n + (sum(p.numel() * p.element_size() for p in model.parameters()) if moving else 0)
    free = free_memory(device)
    if free is None or need <= MEMORY_FRACTION * free:
        return "weights", f"auto: ≈{need / 2**30:.2f} GiB needed, {'?' if free is None else f'{free / 2**30:.1f}'} GiB free"
    return "lora", f"auto: the kept weights' AdamW state needs ≈{need / 2**30:.2f} GiB, {free / 2**30:.1f} GiB free"


@torch.no_grad()
def evaluate(model: nn.Module, data: FinishData, which: str, device: torch.device, batch_size: int,
             amp, progress=None) -> dict[str, float]:
    """``{"lm": mean LM loss, "kd": mean KD loss (with a teacher)}`` on the train or held-out windows."""
    windows = data.train if which == "train" else data.heldout
    totals = {"lm": 0.0, **({"kd": 0.0} if data.teacher is not None else {})}
    report = work_counter(progress, f"finish: loss on the {which} windows", len(windows))
    for i in range(0, len(windows), batch_size):
        idx = torch.arange(i, min(i + batch_size, len(windows)))
        report(int(idx[-1]) + 1)
        x = windows[idx].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(input_ids=x, labels=x, use_cache=False)
        totals["lm"] += out.loss.float().item() * len(idx)
        if data.teacher is not None:
            totals["kd"] += kd_loss(out.logits, *data.teacher_batch(which, idx, device),
                                    data.teacher.temperature).item() * len(idx)
    return {k: v / max(len(windows), 1) for k, v in totals.items()}


def _trainable(model: nn.Module, masks: dict, mode: str, settings: FinishSettings, device: torch.device):
    """What the finish trains: ``(params, adapters, saved copies, dtypes, weight masks, trainable count)``.
    ``lora``: masked adapters on every block linear; ``weights``: the kept weights in fp32 (master
    weights under autocast), their pre-finish values saved on the CPU to restore."""
    if mode == "lora":
        adapters = add_adapters(model, list(find_linears(find_blocks(model)[1][0])), masks, settings.lora_rank,
                                2.0 * settings.lora_rank)
        params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
        return params, adapters, [], [], [], sum(p.numel() for p in params)
    linears = block_linears(model)
    params = [p for lin in linears.values() for p in lin.parameters()]
    saved = [p.detach().to("cpu", copy=True) for p in params]  # the pre-finish model, to restore
    dtypes = [p.dtype for p in params]
    for p in params:  # fp32 master weights under autocast
        p.data = p.data.float()
        p.requires_grad_(True)
    weight_masks = [(linears[name].weight, m.to(device)) for name, m in masks.items()]  # bool: 1 byte each
    trainable = sum(p.numel() for p in params) - sum(int((~m).sum()) for m in masks.values())
    return params, {}, saved, dtypes, weight_masks, trainable


def finish(ctx: ModelContext, settings: FinishSettings, data: FinishData | None) -> dict:
    """Train the whole pruned ``ctx.model`` end to end, masks fixed; keep the result only if its held-out
    loss fell. Returns the stage's record (``{}`` with ``method none``)."""
    if settings.method == "none" or data is None:
        return {}
    if settings.method == "kd" and data.teacher is None:
        raise ValueError("finish kd needs the dense teacher: call prepare_finish before the walk")
    start = time.perf_counter()
    model, masks, device = ctx.model, ctx.masks, torch.device(ctx.device)
    amp = autocast_dtype(device, "auto", next(model.parameters()).dtype)  # a bf16 model on CPU: bf16 autocast
    mode, why = choose_training(model, settings, device)
    lr = settings.lr or DEFAULT_LR[mode]
    which = "heldout" if len(data.heldout) else "train"
    home = next(model.parameters()).device
    model.to(device)
    unfreeze = freeze(model)
    model.eval()  # deterministic: the model's own dropout (if any) stays off, as in EBFT
    torch.manual_seed(ctx.seed)  # LoRA's initialisation
    params, adapters, saved, dtypes, weight_masks, trainable = _trainable(model, masks, mode, settings, device)
    record = {"method": settings.method, "train": mode, "train_reason": why, "lr": lr, "steps": settings.steps,
              "batch_size": settings.batch_size, "trainable_params": trainable, "train_windows": len(data.train),
              "heldout_windows": len(data.heldout), "checked_on": which}
    if data.teacher is not None:
        topk = 0 if data.teacher.indices is None else data.teacher.indices.shape[-1]
        record.update(temperature=data.teacher.temperature, teacher_topk=topk,
                      teacher_bytes=data.teacher.nbytes, teacher_seconds=data.teacher.seconds)
    log.info("finish %s: %s (%s), %d trainable parameters, %d steps of %d windows, lr %g", settings.method, mode,
             why, trainable, settings.steps, settings.batch_size, lr)
    try:
        before = evaluate(model, data, which, device, settings.batch_size, amp, ctx.progress)
        order = _order(len(data.train), settings.steps * settings.batch_size, ctx.seed)

        def step_loss(step: int) -> torch.Tensor:
            idx = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            x = data.train[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if settings.method == "lm":
                    return model(input_ids=x, labels=x, use_cache=False).loss
                logits = model(input_ids=x, use_cache=False).logits
            return kd_loss(logits, *data.teacher_batch("train", idx, device), data.teacher.temperature)

        train_start = time.perf_counter()
        curve, failed = train_steps(params, step_loss, settings.steps, lr, device, amp, ctx.report, "finish",
                                    weight_masks, betas=(0.9, 0.95))
        record["train_seconds"] = round(time.perf_counter() - train_start, 3)
        for p, dt in zip(params if mode == "weights" else [], dtypes):
            p.data = p.data.to(dt)  # the model's own dtype again, before it is judged
        after = evaluate(model, data, which, device, settings.batch_size, amp, ctx.progress)
        restored = rejection(failed, after[settings.method], before[settings.method])
        if restored:
            log.warning("finish: %s loss on the %s windows %.4g -> %.4g (%s); keeping the model from before "
                        "the finish", settings.method, which, before[settings.method], after[settings.method], restored)
            for p, s in zip(params if mode == "weights" else [], saved):
                p.data.copy_(s.to(p.device))
        else:
            for adapter in adapters.values():  # lora: exact (the adapters' loss is the merged model's)
                adapter.merge()
        remove_adapters(model, adapters)
        check_masks(model, masks)
    finally:
        remove_adapters(model, adapters)
        for p, dt in zip(params if mode == "weights" else [], dtypes):
            p.data = p.data.to(dt)
        unfreeze()
        model.to(home)
        model.eval()
    final = before if restored else after
    record.update(step_losses=curve, log_every=LOG_EVERY, restored=restored,
                  heldout_loss_before=before[settings.method], heldout_loss_trained=after[settings.method],
                  heldout_loss_after=final[settings.method], heldout_lm_loss_before=before["lm"],
                  heldout_lm_loss_after=final["lm"], seconds=round(time.perf_counter() - start, 3))
    return record


def _order(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` window indices: shuffled passes over ``range(n)``, from the run's seed."""
    generator = torch.Generator().manual_seed(seed)
    passes = math.ceil(count / n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])[:count]
