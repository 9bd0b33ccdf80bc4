"""Zero-shot accuracy through lm-evaluation-harness, on the hub's tasks or on local files.

The in-memory model is wrapped in lm-eval's own ``HFLM`` and scored by ``lm_eval.simple_evaluate``:
0-shot, log-likelihood of each choice as a continuation of the prompt, ``acc`` and (where lm-eval
reports it) ``acc_norm``. Nothing is re-saved and the harness is not forked.

Two sources of tasks:

- **hub**: any lm-eval task by its own name (``piqa``, ``hellaswag``, ``storycloze_2016``...);
  lm-eval downloads the data from the Hugging Face hub.
- **local**: with ``task_data`` (a folder of ``<task>.jsonl`` files, or ``task=path`` pairs), the
  tasks in :data:`LOCAL_TASKS` run as ``ebft_<task>``: YAML configs shipped in
  ``ebft/evaluation/tasks`` and registered with ``TaskManager(include_path=...)``, with the prompt and
  target of lm-eval's own task (see each YAML for the one place the local files differ: BoolQ).
  The user keeps the plain name: ``piqa`` with ``task_data`` means ``ebft_piqa``.

Results are keyed by the plain name, so a table mixes hub and local tasks and compares runs.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import hub
from ..errors import ConfigError, EbftError

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
OFFLINE_HINT = "--task-data ../shared/data/zeroshot"
METRICS = ("acc", "acc_norm", "perplexity")  # what lm-eval reports for these tasks, in table order


@dataclass(frozen=True)
class TaskSpec:
    """One requested task: the plain name results are keyed by, and where its data comes from."""

    name: str  # e.g. "piqa"
    lm_eval_task: str  # "piqa" (hub) or "ebft_piqa" (local)
    data: str | None = None  # the local file, None for a hub task

    def describe(self) -> dict:
        return {"lm_eval_task": self.lm_eval_task, "data": self.data or "hub"}


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
    """``--task-data`` → ``{task: file}``: a folder of ``<task>.jsonl``/``<task>.json`` files,
    ``task=path`` pairs, or both, comma-separated. Only :data:`LOCAL_TASKS` have offline configs."""
    if spec is None:
        return {}
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("eval.task_data", spec, "must be a folder or task=path pairs, comma-separated")
    files: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
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
            raise ConfigError("eval.task_data", item, "no such folder (give a folder of <task>.jsonl files "
                              "or task=path pairs)")
        found = {t: folder / f"{t}{ext}" for t in LOCAL_TASKS for ext in (".json", ".jsonl")
                 if (folder / f"{t}{ext}").is_file()}
        if not found:
            raise ConfigError("eval.task_data", item, f"holds none of {', '.join(f'{t}.jsonl' for t in LOCAL_TASKS)}")
        for name, file in found.items():
            files.setdefault(name, str(file))
    return files


def plan_tasks(tasks, task_data: str | None = None) -> list[TaskSpec]:
    """Resolve the requested names against the local files; ``"paper"`` is the paper's seven tasks.

    With ``task_data``, a task that has a local file runs offline (``ebft_<task>``); the ``paper``
    set then keeps only the tasks found locally (a warning names the others). A task without a
    local file is an lm-eval hub task.
    """
    names = parse_task_list(tasks)
    files = parse_task_data(task_data)
    if names and importlib.util.find_spec("lm_eval") is None:
        raise EbftError("zero-shot tasks need lm-evaluation-harness: pip install 'ebft[zeroshot]' (or lm-eval)")
    specs: list[TaskSpec] = []
    for name in names:
        if name == DEFAULT_ALIAS:
            wanted = [t for t in PAPER_TASKS if not files or t in files]
            if files and len(wanted) < len(PAPER_TASKS):
                log.warning("zero-shot: no local data for %s; the default set runs without them",
                            ", ".join(t for t in PAPER_TASKS if t not in wanted))
            names_here = wanted
        else:
            names_here = [name]
        for n in names_here:
            plain = n.removeprefix(LOCAL_PREFIX)
            if n.startswith(LOCAL_PREFIX) and plain not in files:
                raise ConfigError("eval.zeroshot", n, f"an offline task needs its file: pass --task-data "
                                  f"with {plain}.jsonl (e.g. {OFFLINE_HINT})")
            if any(s.name == plain for s in specs):
                continue
            spec = TaskSpec(plain, LOCAL_PREFIX + plain, files[plain]) if plain in files else TaskSpec(plain, plain)
            if spec.data:
                check_task_file(plain, spec.data)
            specs.append(spec)
    return specs


def check_task_file(task: str, path: str) -> None:
    """Every record of a local file parses and holds the fields the task's config reads; an error names
    the file and the record's line (``.jsonl``) or index (``.json``)."""
    from .tasks.local_docs import read_records

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
        if not isinstance(record, dict) or any(k not in record for k in need):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            where = f"line {lines[i]}" if lines else f"item {i}"
            raise ConfigError("eval.task_data", path, f"{where}: {task} records need the fields "
                              f"{', '.join(need)}; got {got}")


def _record_lines(path: str) -> list[int]:
    with open(path, encoding="utf-8") as fh:
        return [n for n, line in enumerate(fh.read().split("\n"), start=1) if line.strip()]


# ---- building the tasks (reads local files or downloads from the hub) ----------------------------

def load_tasks(specs: list[TaskSpec]) -> Suite:
    """Build the lm-eval tasks once, before any model is loaded, so a missing hub fails early."""
    from lm_eval.tasks import TaskManager

    online = [s for s in specs if s.data is None]
    if online:
        _check_hub(online[0])  # one quick request, not datasets' half a minute of retries
    files = {s.name: s.data for s in specs if s.data}
    # lm-eval's own index (thousands of YAML files, seconds) is only needed for hub tasks.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=bool(online),
                          metadata={"ebft_task_data": files})
    suite = Suite(specs, manager)
    for spec in online:
        if spec.lm_eval_task not in manager.all_subtasks:
            offline = f"; offline tasks: {', '.join(LOCAL_TASKS)} ({OFFLINE_HINT})"
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
    alt = (f"run it offline from local files with {OFFLINE_HINT}" if spec.name in LOCAL_TASKS else
           f"no offline copy ships for it; offline tasks: {', '.join(LOCAL_TASKS)} ({OFFLINE_HINT})")
    return EbftError(f"zero-shot task {spec.name!r}: could not load its data from the Hugging Face hub "
                     f"({reason}); {alt}")


# ---- evaluation ----------------------------------------------------------------------------------

def evaluate_suite(model, tokenizer, suite: Suite, limit: int | None = None, device: str = "cpu",
                   batch_size: int = 1) -> dict[str, dict]:
    """``{task: {"acc": .., "acc_norm": .., "acc_stderr": .., "n": ..}}`` of ``model`` on the suite.

    The whole model sits on ``device`` while it is scored (and goes back where it was after);
    ``limit`` takes the first ``limit`` items of each task.
    """
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    home = next(model.parameters()).device
    model.to(device)
    try:
        # HFLM sets a pad token on the tokenizer it gets: give it a copy, the run saves the original.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        tasks = [suite.tasks[s.name] for s in suite.specs]
        for task in tasks:  # 0-shot whatever a hub task's YAML says
            task.set_config(key="num_fewshot", value=0)
        with torch.no_grad():
            out = simple_evaluate(
                lm, tasks=tasks, task_manager=suite.manager, limit=limit, bootstrap_iters=0, log_samples=False,
                # 0-shot scoring draws nothing at random; leave the caller's RNG streams alone
                random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
    finally:
        model.to(home)
    results = {}
    for spec in suite.specs:
        raw = out["results"][spec.lm_eval_task]
        n = int(out["n-samples"][spec.lm_eval_task]["effective"])
        metrics = {m: round(float(raw[f"{m},none"]), 6) for m in METRICS if f"{m},none" in raw}
        for m in ("acc", "acc_norm"):  # lm-eval's closed form for a mean: sample std / sqrt(n)
            if m in metrics and n > 1:
                p = metrics[m]
                metrics[f"{m}_stderr"] = round(math.sqrt(p * (1 - p) / (n - 1)), 6)
        metrics["n"] = n
        results[spec.name] = metrics
        log.info("zero-shot %s: %s", spec.name, metrics)
    return results


def average(results: dict[str, dict], metric: str = "acc") -> float | None:
    """Mean ``metric`` over the tasks that report it (the papers' "average" column uses acc)."""
    values = [m[metric] for m in results.values() if metric in m]
    return round(sum(values) / len(values), 6) if values else None


def zeroshot(model, tokenizer, tasks=DEFAULT_ALIAS, task_data: str | None = None, limit: int | None = None,
             device: str = "cpu", batch_size: int = 1) -> dict[str, dict]:
    """Plan, build and score in one call: ``zeroshot(model, tok, "piqa,arc_easy", "data/zeroshot")``."""
    return evaluate_suite(model, tokenizer, load_tasks(plan_tasks(tasks, task_data)), limit, device, batch_size)
