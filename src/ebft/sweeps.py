"""``ebft sweep``: the grid pruner × recovery × sparsity on one model; resumable; a table and a plot.

>>> from ebft import RunConfig, SweepConfig, sweep
>>> base = RunConfig(model="builtin:smollm2")
>>> base.calib.nsamples, base.eval.sources = 32, ["offline"]
>>> results = sweep(SweepConfig(base, ["wanda"], [0.5, 0.7], ["none", "ebft"], out="runs/sweep"))

The model is loaded once and its original weights are kept as a CPU copy of the state dict, restored
before every cell (structured cells change the model's shapes: they start from a copy of the whole
unpruned model instead). The calibration and evaluation windows are built once and the dense perplexity is
computed once (cached in ``cells/`` too). Each finished cell is written atomically to
``<out>/cells/<method>-<recover>-<sparsity>-<key>.json`` where ``key`` hashes the settings that can
change the cell (see :func:`cell_key`): a rerun skips the cells whose file exists (an interruption
loses at most the cell in progress), and a changed setting (lr, nsamples, eval text ...) gives new
keys to the cells it concerns, so nothing stale is reused. ``results.md``, ``results.json`` and
``results.png`` are rewritten after every cell. Models are not saved unless ``save_models`` is set (then under ``<out>/models/<cell>/``).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import check_unlocked, take_lock, write_json, write_text
from .config import RunConfig, resolve_device
from .errors import ConfigError, EbftError
from .evaluation.perplexity import model_perplexities
from .models import load_model
from .output import SWEEP_LOCK, atomic_folder, check_out, mark_sweep_folder, save_pretrained, sweep_folder_problem
from .pipeline import check_model_fits, final_stage, guarded, prepare_data, prune_and_recover
from .prune import PRUNERS, get_pruner
from .recover import RECOVERIES
from .report import plot_sweep, sweep_markdown
from .settings import commands_of, default_of, keyed_mode
from .system import seed_everything, versions
from .validate import inapplicable, refuse_unused, unused_settings, validate

log = logging.getLogger(__name__)


@dataclass
class SweepConfig:
    """The grid and the settings all cells share (``base``: model, pattern, calibration, eval, recovery
    hyperparameters; its prune.method, prune.sparsity, recover.method and out are ignored)."""

    base: RunConfig = field(default_factory=RunConfig)
    methods: list[str] = field(default_factory=lambda: ["wanda"])
    sparsities: list[float | None] = field(default_factory=lambda: [0.5])  # [None]: implied by an N:M pattern
    recoveries: list[str] = field(default_factory=lambda: ["none", "ebft"])
    out: str | None = None
    save_models: bool = False

    def cells(self) -> list[RunConfig]:
        """One RunConfig per cell, in table order: pruner, recovery, then sparsity."""
        cells = []
        for method in self.methods:
            for recover in self.recoveries:
                for sparsity in self.sparsities:
                    cell = copy.deepcopy(self.base)
                    cell.prune.method, cell.prune.sparsity, cell.recover.method = method, sparsity, recover
                    cell.out, cell.overwrite = None, False
                    if not _trains_blocks(recover):  # --recover-budget times block training only
                        cell.recover.budget = None
                    cells.append(cell)
        return cells

    def validate(self) -> list[tuple[RunConfig, object]]:
        """Check the lists and every cell before any model is loaded; return ``[(cell, pattern)]``."""
        _check_list("methods", self.methods, PRUNERS)
        _check_list("recover", self.recoveries, RECOVERIES)
        nm = ":" in str(self.base.prune.pattern)
        if not self.sparsities and nm:
            self.sparsities = [None]
        if not self.sparsities:
            raise ConfigError("sparsities", self.sparsities, "give a comma-separated list of numbers in [0, 1)")
        for s in self.sparsities:
            if not (s is None and nm) and (isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1):
                raise ConfigError("sparsities", s, "allowed: numbers in [0, 1), e.g. 0.5,0.6,0.7")
        self.base.check_types()
        check_out(self.out, inputs=self.base.inputs(), reuse=True)  # written into, resumed: never replaced
        checked = [(cell, validate(cell, need_out=False, check_unused=False)) for cell in self.cells()]
        unused = [unused_settings(cell) for cell, _ in checked]  # a setting no cell of the grid uses
        refuse_unused(checked[0][0], {k: v for k, v in unused[0].items() if all(k in u for u in unused)},
                                   where="no cell of this sweep")
        return checked


def parse_list(text: str, field: str, number: bool = False) -> list:
    """``"a,b"`` -> ``["a", "b"]`` (numbers with ``number=True``), empty items dropped, duplicates kept once.

    An empty list is returned as such: :meth:`SweepConfig.validate` says what it may hold."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if number:
        try:
            items = [float(t) for t in items]
        except ValueError:
            raise ConfigError(field, text, "allowed: comma-separated numbers, e.g. 0.5,0.6,0.7") from None
    return list(dict.fromkeys(items))


def _check_list(name: str, values: list[str], registry: dict) -> None:
    allowed = f"allowed: a comma-separated list of {', '.join(sorted(registry))}"
    if not values:
        raise ConfigError(name, values, allowed)
    for v in values:
        if v not in registry:
            raise ConfigError(name, v, allowed)


# ----------------------------------------------------------------------------- cells

def cell_key(cell: RunConfig) -> str:
    """A hash of everything that can change a cell's numbers, from the settings' declarations
    (:mod:`ebft.settings`): each setting the sweep takes, where it applies to the cell (of the pruning and
    recovery sections only what the cell's own pruner and recovery declare: tuning LoRA never reruns an
    EBFT cell), as its ``keyed`` mode says; a setting the sweep does not take counts as its default (it
    cannot change a cell); the recovery's settings as the recipe resolves them (the recipe is in its values)."""
    skip = inapplicable(cell)
    own = cell.recovery_settings()
    resolved = {f"recover.{k}": v for k, v in dataclasses.asdict(own).items()}
    # a recipe-controlled field's default in the section is "from the recipe"; the method's own default is its default
    method_defaults = {f"recover.{f.name}": default_of(f) for f in dataclasses.fields(own)}
    settings: dict = {}
    for key, f, value in cell.setting_fields():
        default = method_defaults.get(key, default_of(f))
        if "sweep" not in commands_of(f):
            value = default
        elif key in skip and keyed_mode(f) != "always":
            continue
        value = resolved.get(key, value)
        if key == "recover.recipe" or (keyed_mode(f) == "set" and value == default):
            continue
        section, _, name = key.rpartition(".")
        (settings.setdefault(section, {}) if section else settings)[name] = value
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _trains_blocks(method: str) -> bool:
    recovery = RECOVERIES.get(method)
    return recovery is not None and recovery.trains_blocks


def column_label(cell: RunConfig) -> str:
    """The sparsity column a cell belongs to: ``50%`` or, for N:M, the pattern (``2:4``)."""
    if ":" in str(cell.prune.pattern):
        return str(cell.prune.pattern)
    return f"{cell.prune.sparsity * 100:g}%"


def cell_name(cell: RunConfig) -> str:
    label = column_label(cell).replace(":", "of").replace("%", "")
    return f"{cell.prune.method}-{cell.recover.method}-{label}-{cell_key(cell)}"


_CELL_KEYS = ("method", "recover", "sparsity", "column", "perplexity", "recovery", "sparsity_measured", "seconds",
              "key")


def _read_cell(path: Path, required=_CELL_KEYS) -> dict | None:
    """A finished cell's record, or None if there is none or it is not one (empty, truncated, ``{}``,
    a list, random bytes: the cell is run again, with one warning)."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or any(k not in record for k in required) or (
            "key" in required and not path.stem.endswith(str(record["key"]))):
        if path not in _WARNED:
            _WARNED.add(path)
            log.warning("sweep: %s is not a finished cell record; running that cell again", path)
        return None
    return record


_WARNED: set[Path] = set()


def _run_cell(model, tokenizer, cell: RunConfig, pattern, data, device: str, progress, key: str) -> dict:
    start = time.perf_counter()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(cell.seed)
    outcome = prune_and_recover(model, tokenizer, cell, pattern, data, device, progress, stages=("final",))
    final = final_stage(cell)
    return {
        "method": cell.prune.method, "recover": cell.recover.method, "sparsity": cell.prune.sparsity,
        "column": column_label(cell), "pattern": str(pattern), "key": key,
        "perplexity": {name: stages[final] for name, stages in outcome.perplexity.items()},
        "recovery": outcome.cost,
        "sparsity_measured": outcome.sparsity_measured(model),  # structured: of block parameters
        "seconds": round(time.perf_counter() - start, 2),
        "plan": outcome.plan,
        "blocks": outcome.result.blocks,
        "config": cell.to_dict(),
        "versions": versions(),
    }


def _dense_path(base: RunConfig, folder: Path) -> Path:
    """Where the dense perplexity is cached: keyed by the model and the evaluation settings."""
    settings = [base.model, base.dtype, base.device, base.eval.sources, base.eval.seqlen, base.eval.windows]
    return folder / f"dense-{hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]}.json"


def _dense_perplexity(model, evals, base: RunConfig, device: str) -> dict[str, float]:
    """Perplexity of the unpruned model on each eval text (an eval-only walk)."""
    return model_perplexities(model, evals, device, base.batch_size)


# ----------------------------------------------------------------------------- the sweep

def sweep(config: SweepConfig, progress=None) -> dict:
    """Run every cell of the grid not already in ``<out>/cells``; write results.md/.json/.png.

    ``progress(event, **info)`` gets ``cell_start`` / ``cell_end`` / ``cell_skip`` with ``index``,
    ``total`` and ``name``, and the walk's own events in between. Returns the results dict.
    """
    cells = config.validate()
    if config.base.eval.zeroshot:
        log.warning("sweep: zero-shot tasks are not run per cell; use ebft eval on a saved model")
    dense, finished = run_cells(config.base, cells, Path(config.out), progress, config.save_models,
                                on_cell=lambda dense, done: write_results(Path(config.out), config, dense, done))
    return write_results(Path(config.out), config, dense, finished)


def run_cells(base: RunConfig, cells: list[tuple[RunConfig, object]], out: Path, progress=None,
              save_models: bool = False, on_cell=None) -> tuple[dict, list[dict]]:
    """Run each ``(cell, pattern)`` not already finished in ``out/cells`` on one loaded model.

    The cells share the model, its dtype and device (``base``'s); each may have its own calibration
    windows (the windows for one calibration setting are drawn once, as many as the cell that takes the
    most needs: ``--calib self`` generates them once for all cells) and evaluation texts.
    ``on_cell(dense, finished)`` is called after every finished cell. Returns ``(dense perplexity,
    finished records in cell order)``; a rerun with nothing to do does not load the model.
    """
    progress = progress or (lambda *a, **k: None)
    problem = sweep_folder_problem(out)
    if problem is not None:
        raise EbftError(f"out: {out} {problem}; give the sweep a new folder (or an empty one)")
    folder = out / "cells"
    device = resolve_device(base.device)
    names = [cell_name(c) for c, _ in cells]  # keyed on the settings as given (before auto ones are resolved)
    todo = [(c, p) for (c, p), name in zip(cells, names) if _read_cell(folder / f"{name}.json") is None]
    dense = (_read_cell(_dense_path(base, folder), ("perplexity",)) or {}).get("perplexity")
    log.info("sweep: %d cells, %d already finished", len(cells), len(cells) - len(todo))

    datasets: dict[str, object] = {}
    # one draw of the calibration text for every cell (--calib self generates it once): the most any cell takes
    need = max(cell.windows_drawn() for cell in (base, *(c for c, _ in cells)))

    def data_for(cell: RunConfig):
        key = json.dumps([dataclasses.asdict(cell.calib), dataclasses.asdict(cell.eval), cell.seed,
                          [cell.recover.guard, cell.recover.guard_texts] if guarded(cell) else 0], default=str)
        if key not in datasets:  # (on the dense model: the weights are restored before each cell)
            datasets[key] = prepare_data(model, tokenizer, cell, device=device, progress=progress, need=need)
        return datasets[key]

    lock, busy = None, f"out: another ebft sweep is using {out}; wait for it to finish or give another --out"
    if todo or dense is None:
        check_unlocked(out / SWEEP_LOCK, busy)  # before the model loads
        model, tokenizer = load_model(base.model, base.dtype, device, trust_remote_code=base.trust_remote_code)
        for cell, pattern in todo:
            check_model_fits(model, pattern, cell)
        original = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        pristine = copy.deepcopy(model) if any(p.structured for _, p in todo) else None
        mark_sweep_folder(out)
        lock = take_lock(out / SWEEP_LOCK, True, busy)
    try:
        if lock is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if dense is None:
            dense = _dense_perplexity(model, data_for(base).evals, base, device)
            write_json(_dense_path(base, folder), {"model": base.model, "perplexity": dense})
        finished = []
        for index, (cell, pattern) in enumerate(cells):
            name = names[index]
            path = folder / f"{name}.json"
            record = _read_cell(path)
            if record is not None:
                finished.append(record)
                progress("cell_skip", index=index, total=len(cells), name=name)
                continue
            progress("cell_start", index=index, total=len(cells), name=name)
            if pristine is not None:  # a structured cell may have shrunk the model: start from the whole one
                model = copy.deepcopy(pristine)
            else:
                model.load_state_dict(original)
            record = _run_cell(model, tokenizer, cell, pattern, data_for(cell), device, progress, name.rsplit("-", 1)[1])
            if save_models:
                get_pruner(cell.prune.method).make_saveable(model)
                with atomic_folder(out / "models" / name, overwrite=True) as tmp:
                    save_pretrained(model, tokenizer, tmp)
            write_json(path, record)
            finished.append(record)
            progress("cell_end", index=index, total=len(cells), name=name, seconds=record["seconds"],
                     perplexity=record["perplexity"])
            if on_cell is not None:
                on_cell(dense, finished)
    finally:
        if lock is not None:
            os.close(lock)
    return dense, finished


def write_results(out: Path, config: SweepConfig, dense: dict | None, cells: list[dict]) -> dict:
    """``results.json``, ``results.md`` (one table per eval text, then the recovery cost) and ``results.png``."""
    mark_sweep_folder(out)
    columns = list(dict.fromkeys(column_label(c) for c in config.cells()))
    results = {
        "model": config.base.model,
        "pattern": config.base.prune.pattern,
        "grid": {"methods": config.methods, "recover": config.recoveries, "columns": columns},
        "dense": dense or {},
        "cells": [{k: c[k] for k in ("method", "recover", "sparsity", "column", "perplexity", "recovery",
                                     "sparsity_measured", "seconds", "key")} for c in cells],
    }
    write_json(out / "results.json", results)
    write_text(out / "results.md", sweep_markdown(results))
    plot_sweep(results, out / "results.png")
    return results
