"""Validation of a run's settings before any model is loaded: each field's type and range (declared, see
:mod:`ebft.settings`), then what no single field can check — a setting given where it does nothing
(:func:`inapplicable`, from the registries and the ``needs`` declarations), the texts, the model, the
output folder, the guard's further texts.

    pattern = validate(config)           # the parsed sparsity Pattern, or one ConfigError line
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

import torch

from . import settings as st
from .allocation import ALLOCATION_SETTINGS, check_allocation
from .config import NAMED_SOURCES, flag_of_key
from .data import AUTO, SELF, VALIDATION_SOURCES
from .data import NAMED_SOURCES as TEXTS
from .errors import ConfigError
from .evaluation.zeroshot import plan_tasks
from .export import check_type
from .models import check_model_source
from .output import check_out, folder_for, is_ebft_output
from .prune import PRUNERS, get_pruner
from .prune.base import SECTION_BASE as PRUNE_BASE
from .recover import RECOVERIES, get_recovery
from .recover.recipes import RECIPES


def inapplicable(config) -> dict[str, str]:
    """Every setting that does nothing in this run, with what it applies with: ``{"section.field":
    "--method sparsegpt"}``. From the declarations: a pruner's, allocation's or recovery's own settings
    apply with it (the registries), a setting declaring ``needs`` where that holds."""
    skip = {f"prune.{k}": v for k, v in _foreign(config, "prune").items()}
    skip.update({f"recover.{k}": v for k, v in _foreign(config, "recover").items()})
    settings = None
    for key, f, _ in config.setting_fields():
        needs = st.needs_of(f)
        if needs is not None and key not in skip:
            settings = settings if settings is not None else config.to_dict()
            if not needs.met(settings):
                skip[key] = needs.text
    return skip

def _foreign(config, section: str) -> dict[str, str]:
    """The settings of the ``prune`` or ``recover`` section that belong to a method this run does not use."""
    if section == "prune":
        pruner = get_pruner(config.prune.method)
        own = {f.name for f in dataclasses.fields(pruner.settings)} | {b[0] for b in PRUNE_BASE} | {"allocation"}
        own |= set(ALLOCATION_SETTINGS.get(config.prune.allocation, ()))
        foreign = {}
        for f in st.fields_of(config.prune):
            if f.name not in own:
                owners = [n for n, p in PRUNERS.items() if f.name in {g.name for g in dataclasses.fields(p.settings)}]
                allocations = [a for a, names in ALLOCATION_SETTINGS.items() if f.name in names]
                foreign[f.name] = (f"--method {' or '.join(owners)}" if owners
                                   else f"--allocation {' or '.join(allocations)}")
        return foreign
    recovery = get_recovery(config.recover.method)
    own = {f.name for f in dataclasses.fields(recovery.settings)} | {"method", "budget"}
    if recovery.guardable:
        own |= {"guard", "guard_texts"}
    if any(name in RECIPES[config.recover.recipe] for name in own):
        own.add("recipe")
    foreign = {}
    for f in st.fields_of(config.recover):
        if f.name not in own:
            owners = [n for n, r in RECOVERIES.items() if f.name in {g.name for g in dataclasses.fields(r.settings)}
                      or (f.name == "recipe" and any(k in RECIPES[config.recover.recipe]
                                                     for k in (g.name for g in dataclasses.fields(r.settings))))
                      or (f.name in ("guard", "guard_texts") and r.guardable)]
            foreign[f.name] = f"--recover {' or '.join(owners)}"
    return foreign

def unused_settings(config) -> dict[str, tuple[object, str]]:
    """Settings given (set to other than their default) where they do nothing (:meth:`inapplicable`):
    ``{"section.field": (value, what it applies with)}``. A flag that would do nothing is refused, like
    ``--recover-budget`` for a recovery that does not train."""
    skip = inapplicable(config)
    return {key: (value, skip[key]) for key, f, value in config.setting_fields()
            if key in skip and config._set(key, value, st.default_of(f))}

def refuse_unused(config, unused: dict | None = None, where: str = "this run") -> None:
    """Refuse, in one line, the first setting that would do nothing in this run."""
    unused = unused_settings(config) if unused is None else unused
    if unused:
        key, (value, needs) = next(iter(unused.items()))
        have = "does not have" if where == "this run" else "has"
        raise ConfigError(f"{flag_of_key(key)} ({key})", value, f"it applies only with {needs}, which {where} "
                          f"{have}: drop it" + (f" (and {len(unused) - 1} more such setting"
                                                     f"{'s' if len(unused) > 2 else ''})" if len(unused) > 1 else ""))

def validate(config, need_out: bool = True, need_device: bool = True, check_unused: bool = True):
    """Check every field; return the parsed sparsity :class:`~ebft.masks.Pattern`. ``need_device=False``
    (``ebft plan``): the run may be planned for a device this machine does not have;
    ``check_unused=False``: settings of stages this run does not have are let through (a sweep's cells
    share settings that only some of them use)."""
    config.check_types()
    if not config.model:
        raise ConfigError("model", config.model, "required: a hub id, a local folder or a .gguf file")
    if need_device:
        check_device(config.device)
    plan_tasks(config.eval.zeroshot, config.eval.task_data)  # names, files and their fields
    pruner = get_pruner(config.prune.method)
    recovery = get_recovery(config.recover.method)
    if config.recover.holdout >= config.calib.nsamples:
        raise ConfigError("recover.holdout", config.recover.holdout,
                          f"must be an integer in [0, nsamples = {config.calib.nsamples})")
    pattern = config.pattern(pruner)
    if config.recover.budget is not None:
        budget_seconds(config.recover.budget)
        if not recovery.trains_blocks:
            raise ConfigError("recover.budget", config.recover.budget, "times block training: use it with "
                              f"recover {' or '.join(n for n, r in RECOVERIES.items() if r.trains_blocks)}")
    recovery.check_window(config.recovery_settings())
    if pattern.structured and not recovery.structured:
        raise ConfigError("recover", config.recover.method, "works on masks, and structured pruning has none: "
                          f"use {', '.join(n for n, r in RECOVERIES.items() if r.structured)}")
    if pattern.structured and config.prune.layers is not None:
        raise ConfigError("prune.layers", config.prune.layers, "structured pruning chooses heads and channels "
                          "over whole blocks; leave layers unset")
    if check_unused and pattern.n and "prune.scope" in getattr(config, "_given", ()):
        raise ConfigError("--scope (prune.scope)", config.prune.scope, f"applies to unstructured sparsity; {pattern.n}:"
                          f"{pattern.m} groups lie inside one row whatever the scope: drop it")
    check_allocation(config.allocation_settings(), pattern)
    if config.export is not None:
        check_type(config.export_type)
    if check_unused:
        refuse_unused(config)
    if config.prune.layers is not None:
        try:
            re.compile(config.prune.layers)
        except re.error as exc:
            raise ConfigError("prune.layers", config.prune.layers, f"not a valid regex ({exc})") from exc
    check_source(config.calib.source, "calib")
    if config.calib.source == SELF and recovery.scope == "model" and recovery.text_windows is None:
        raise ConfigError("calib", SELF, f"recovery {recovery.name} does not declare the windows it trains on "
                          "(text_windows), so they cannot be generated before the walk: give a text")
    for src in config.eval.sources:
        check_source(src, "eval")
    check_guard_texts(config, recovery)
    check_model_source(config.model)
    if need_out:
        if config.resume and not folder_for(config.out).exists() and is_ebft_output(config.out):
            raise ConfigError("resume", True, f"the run in {config.out} is finished: nothing to resume (drop "
                              "--resume; --overwrite runs it again)")
        check_out(config.out, config.overwrite, inputs=config.inputs())
    return pattern

def check_guard_texts(config, recovery) -> None:
    """``--recover-guard-on``: named texts with a validation split, or files; none an evaluation text (the
    guard would choose on the very windows it is then scored on); and a guard to check them."""
    texts = config.recover.guard_texts
    if not texts or not recovery.guardable:  # (not guardable: refused as a setting this run does not use)
        return
    if config.recover.guard == 0:
        raise ConfigError("recover.guard_texts", ",".join(texts), "are scored on --recover-guard windows "
                          "of each, and --recover-guard is 0: give it a number of windows, or drop "
                          "--recover-guard-on")
    for src in texts:
        if src in VALIDATION_SOURCES:  # a split of its own: never the evaluated or the calibration windows
            continue
        if src in NAMED_SOURCES:
            raise ConfigError("recover.guard_texts", src, "has no validation split to guard on: use "
                              f"{', '.join(VALIDATION_SOURCES)} or a local file (e.g. wiki.valid.raw)")
        if not Path(os.path.expanduser(src)).is_file():
            raise ConfigError("recover.guard_texts", src, "no such file; use a local file (a validation split) "
                              f"or one of {', '.join(VALIDATION_SOURCES)}")
        check_source(src, "recover.guard_texts")
        if _same_text(src) in {_same_text(e) for e in config.eval.sources}:
            raise ConfigError("recover.guard_texts", src, "is also an --eval text: the guard would choose on the "
                              "windows the run is then scored on; give another split of it (e.g. "
                              "wiki.valid.raw for wiki.test.raw)")
        if _same_text(src) == _same_text(config.calib.source):
            raise ConfigError("recover.guard_texts", src, "is the calibration text: its held-out windows "
                              "are guarded already (--recover-guard); give another text")
    names = [Path(src).name for src in texts]  # each text's name in run.json: one per text
    if len(set(names)) != len(names):
        raise ConfigError("recover.guard_texts", ",".join(texts), "names a text twice, or two files of one "
                          "name: give each guard text a file name of its own")


def _same_text(source: str) -> str:
    """A source as a name that is equal for the same text (a file by its resolved path)."""
    return source if source in (*NAMED_SOURCES, SELF) else str(Path(os.path.expanduser(source)).resolve())


_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600}
MAX_BUDGET_SECONDS = 366 * 86400  # longer is a typo (and would overflow the schedule's arithmetic)


def budget_seconds(text) -> float:
    """``--recover-budget`` in seconds: a number of seconds, or a number with s, m (min) or h."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|m|min|h)?\s*", str(text), flags=re.I)
    seconds = float(match[1]) * _UNITS[(match[2] or "s").lower()] if match else math.nan
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_BUDGET_SECONDS:
        raise ConfigError("recover.budget", text, "a positive time of at most 366 days: seconds, or a number "
                          "with s, m or h (e.g. 90s, 10m, 1.5h)")
    return seconds


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", device, "CUDA is not available here; use cpu or auto")
        return
    raise ConfigError("device", device, "allowed: auto, cpu, cuda, cuda:N")


def check_source(source: str, field_name: str = "calib") -> None:
    """A text source is a named dataset or an existing, non-empty local file; errors name ``field_name``
    (``calib`` or ``eval``: the flag the user typed)."""
    if source == AUTO and field_name != "eval":
        raise ConfigError(field_name, source, f"auto is for evaluation; use a local file or one of "
                          f"{', '.join(TEXTS)}")
    if source == SELF:
        if field_name == "calib":
            return
        raise ConfigError(field_name, source, "self (the model's own text) is for calibration, --calib self; use a "
                          "local file (./self for a file of that name) or one of " + ", ".join(NAMED_SOURCES))
    if source in NAMED_SOURCES:
        return
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise ConfigError(field_name, source, f"no such file; use a local file or one of {', '.join(NAMED_SOURCES)}")
    if path.stat().st_size == 0:
        raise ConfigError(field_name, source, "the file is empty")


