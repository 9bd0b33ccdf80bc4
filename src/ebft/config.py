"""A run as dataclasses (prune / recover / calibration / eval), YAML in and out, validated up front.

The CLI flags mirror these fields one to one (see :data:`FLAGS` in :mod:`ebft.cli`), and a YAML file
holds the same nested keys, e.g.::

    model: builtin:smollm2
    prune: {method: wanda, sparsity: 0.5}
    calib: {source: offline, nsamples: 64, seqlen: 512}
    eval: {sources: [offline], windows: 8}
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError

NAMED_SOURCES = ("c4", "wikitext2", "ptb", "offline", "offline-c4")


@dataclass
class CalibConfig:
    source: str = "offline"  # c4 | wikitext2 | ptb | offline | offline-c4 | a local file
    nsamples: int = 128
    seqlen: int | None = None  # None: min(model context, 2048)


@dataclass
class PruneConfig:
    method: str = "wanda"
    sparsity: float | None = None  # None: 0.5 unstructured, or implied by an N:M pattern
    pattern: str = "unstructured"  # unstructured | N:M (N kept of every M)
    scope: str | None = None  # row | layer (unstructured); None: the method's own default
    layers: str | None = None  # regex on linear names inside a block; None: all of them


TARGETS = ("dense-block", "dense-model")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class RecoverConfig:
    """Recovery after pruning each block. Defaults are the EBFT reference code's."""

    method: str = "ebft"  # ebft | ebft-mask | dsnot | none
    epochs: int = 10
    lr: float = 2e-4
    batch_size: int = 8
    weight_decay: float = 0.1  # reference: 0.1 on every trained parameter
    grad_clip: float | None = 1.0
    target: str = "dense-block"  # dense block on the sparse chain's inputs | dense model's own outputs
    train_norms: bool = False
    loss: str = "mse"  # mse | token-norm (per-token normalised)
    holdout: int = 0  # calibration windows held out of training to measure generalisation
    precision: str = "auto"  # auto (fp32 on CPU, bf16/fp16 autocast on GPU) | fp32 | bf16 | fp16
    seed: int = 0
    # dsnot (training-free prune-and-grow); defaults from the DSnoT paper
    dsnot_cycles: int = 50  # swap cycles per layer at most
    dsnot_threshold: float = 0.1  # stop a row when |expected error| (summed over a window) is below
    dsnot_power: float = 1.0  # growing criterion divides by variance ** power
    dsnot_skip_mlp: bool = False  # refine attention linears only (the reference code's default)
    # ebft-mask (learned masks, weights frozen: pruned values where kept, dense where grown); uses epochs/batch_size too
    mask_lr: float = 1e-3  # AdamW lr on the mask scores (normalised to [0, 1] per row); 5e-3 overfit (README)
    # lora (whole pruned model, after the walk); rank/alpha/dropout/targets: the Wanda paper's setup
    lora_steps: int = 200  # optimizer steps; one pass over lora_steps * lora_batch_size windows
    lora_lr: float = 2e-4  # AdamW, decayed linearly to 0
    lora_targets: str = "qv"  # qv (q_proj, v_proj) | all (every block linear) | comma list of names
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_batch_size: int = 4  # windows of the calibration length per step


@dataclass
class EvalConfig:
    sources: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int | None = None  # None: min(model context, 2048)
    windows: int | None = None  # cap on windows per source, for quick runs
    zeroshot: list[str] = field(default_factory=list)  # lm-eval task names; "paper": the paper's seven
    task_data: str | None = None  # offline task files: a folder of <task>.jsonl, or task=path pairs
    zeroshot_limit: int | None = None  # first N items of each zero-shot task, for quick runs


@dataclass
class RunConfig:
    model: str = ""
    out: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    batch_size: int = 1  # windows per forward pass in the walk
    overwrite: bool = False
    calib: CalibConfig = field(default_factory=CalibConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # ---- YAML in and out -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return _build(cls, data or {}, "")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", str(path), "no such file")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError("config", str(path), f"not valid YAML ({str(exc).splitlines()[0]})") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError("config", str(path), "must hold a mapping of settings")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def _validate_recover(self) -> None:
        _validate_recover_impl(self.recover, self.calib.nsamples)

    # ---- validation, before any model is loaded ---------------------------------------------
    def validate(self, need_out: bool = True):
        """Check every field; return the parsed sparsity :class:`~ebft.masks.Pattern`."""
        from .masks import parse_pattern
        from .models import DTYPE_CHOICES, check_model_source
        from .prune import get_pruner
        from .recover import get_recovery

        if not self.model:
            raise ConfigError("model", self.model, "required: a hub id, a local folder or a .gguf file")
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError("dtype", self.dtype, f"allowed: {', '.join(DTYPE_CHOICES)}")
        check_device(self.device)
        _positive("batch_size", self.batch_size)
        _positive("calib.nsamples", self.calib.nsamples)
        _positive("calib.seqlen", self.calib.seqlen, optional=True)
        _positive("eval.seqlen", self.eval.seqlen, optional=True)
        _positive("eval.windows", self.eval.windows, optional=True)
        _positive("eval.zeroshot_limit", self.eval.zeroshot_limit, optional=True)
        from .evaluate.zeroshot import plan_tasks

        plan_tasks(self.eval.zeroshot, self.eval.task_data)  # names, files and their fields
        pruner = get_pruner(self.prune.method)
        get_recovery(self.recover.method)
        self._validate_recover()
        sparsity = self.prune.sparsity
        if sparsity is None and ":" not in str(self.prune.pattern):
            sparsity = 0.5
        pattern = parse_pattern(self.prune.pattern, sparsity, self.prune.scope, pruner.default_scope)
        if self.prune.layers is not None:
            import re
            try:
                re.compile(self.prune.layers)
            except re.error as exc:
                raise ConfigError("prune.layers", self.prune.layers, f"not a valid regex ({exc})") from exc
        for src in [self.calib.source, *self.eval.sources]:
            check_source(src)
        check_model_source(self.model)
        if need_out:
            check_out(self.out, self.overwrite)
        return pattern


def _validate_recover_impl(r: "RecoverConfig", nsamples: int) -> None:
    from .recover.ebft import LOSSES

    _positive("recover.epochs", r.epochs)
    _positive("recover.batch_size", r.batch_size)
    for name in ("lr", "weight_decay"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"recover.{name}", value, "must be a number >= 0")
    if r.grad_clip is not None and (isinstance(r.grad_clip, bool) or not isinstance(r.grad_clip, (int, float)) or r.grad_clip <= 0):
        raise ConfigError("recover.grad_clip", r.grad_clip, "must be a positive number (or null for no clipping)")
    if r.target not in TARGETS:
        raise ConfigError("recover.target", r.target, f"allowed: {', '.join(TARGETS)}")
    if r.loss not in LOSSES:
        raise ConfigError("recover.loss", r.loss, f"allowed: {', '.join(LOSSES)}")
    if r.precision not in PRECISIONS:
        raise ConfigError("recover.precision", r.precision, f"allowed: {', '.join(PRECISIONS)}")
    if isinstance(r.holdout, bool) or not isinstance(r.holdout, int) or not 0 <= r.holdout < nsamples:
        raise ConfigError("recover.holdout", r.holdout, f"must be an integer in [0, nsamples = {nsamples})")
    if not isinstance(r.train_norms, bool):
        raise ConfigError("recover.train_norms", r.train_norms, "must be true or false")
    _positive("recover.dsnot_cycles", r.dsnot_cycles)
    for name in ("dsnot_threshold", "dsnot_power"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"recover.{name}", value, "must be a number >= 0")
    if not isinstance(r.dsnot_skip_mlp, bool):
        raise ConfigError("recover.dsnot_skip_mlp", r.dsnot_skip_mlp, "must be true or false")
    if isinstance(r.mask_lr, bool) or not isinstance(r.mask_lr, (int, float)) or not r.mask_lr > 0:
        raise ConfigError("recover.mask_lr", r.mask_lr, "must be a number > 0")
    _validate_lora(r)


def _validate_lora(r: "RecoverConfig") -> None:
    from .recover.lora import check_targets

    for name in ("lora_steps", "lora_rank", "lora_batch_size"):
        _positive(f"recover.{name}", getattr(r, name))
    for name in ("lora_lr", "lora_alpha"):
        value = getattr(r, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"recover.{name}", value, "must be a number > 0")
    d = r.lora_dropout
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise ConfigError("recover.lora_dropout", d, "must be a number in [0, 1)")
    check_targets(r.lora_targets)


def check_device(device: str) -> None:
    import torch

    if device in ("auto", "cpu"):
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", device, "CUDA is not available here; use cpu or auto")
        return
    raise ConfigError("device", device, "allowed: auto, cpu, cuda, cuda:N")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_source(source: str) -> None:
    """A text source is a named dataset or an existing, non-empty local file."""
    if source in NAMED_SOURCES:
        return
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise ConfigError("data", source, f"no such file; use a local file or one of {', '.join(NAMED_SOURCES)}")
    if path.stat().st_size == 0:
        raise ConfigError("data", source, "the file is empty")


def check_out(out: str | None, overwrite: bool) -> None:
    if not out:
        raise ConfigError("out", out, "required: the folder to write the model and run.json into")
    path = Path(out)
    if path.exists() and not overwrite:
        raise ConfigError("out", out, "already exists; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise ConfigError("out", out, "exists and is not a folder")


def _positive(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "must be a positive integer")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", data, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", value, f"unknown setting; known: {', '.join(fields)}")
        sub = _SECTIONS.get(key) if cls is RunConfig else None
        kwargs[key] = _build(sub, value, f"{key}.") if sub else value
    return cls(**kwargs)


_SECTIONS = {"calib": CalibConfig, "prune": PruneConfig, "recover": RecoverConfig, "eval": EvalConfig}
