"""The document loader the ``ebft_*`` task configs name as ``custom_dataset``.

lm-eval calls it with the TaskManager's metadata and the task's ``dataset_kwargs``: the task's short
name comes from its YAML (``ebft_task``) and the file from the run (``ebft_task_data``), so one set of
shipped configs serves any local copy of the data. Plain Python, no ebft import: the folder also
works with ``lm_eval --include_path``.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_records(path: str | Path) -> list[dict]:
    """Records of a ``.jsonl`` file (one JSON object a line) or a ``.json`` file holding a list.

    A line that is not JSON raises ``ValueError("<path> line <n>: ...")`` with the file's own line number."""
    text = Path(path).expanduser().read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        records = json.loads(text)
        return records if isinstance(records, list) else [records]
    records = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
    return records


def load_local(ebft_task: str, ebft_task_data: dict | None = None, **_unused):
    """``DatasetDict({"test": ...})`` of the local file given for ``ebft_task``."""
    import datasets

    path = (ebft_task_data or {}).get(ebft_task)
    if not path:
        raise ValueError(f"ebft_{ebft_task}: no local file; pass metadata "
                         f"{{'ebft_task_data': {{'{ebft_task}': 'path/{ebft_task}.jsonl'}}}}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_records(path))})
