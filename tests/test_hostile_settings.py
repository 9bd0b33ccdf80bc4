"""Hostile settings, plans, sweep folders and task files: what passes a parser but would do nothing,
overflow, write into a user's folder or be scored wrong is refused before any work, in one line and exit code
2, naming the flag that fixes it; long stages show progress."""
from __future__ import annotations

import json
import os

import pytest

from conftest import make_tiny_model, one_line as _one_line, small_run_args as _args
from ebft.cli import main



# ----------------------------------------------------------------------------- sweep folders


def test_a_sweep_never_writes_into_a_users_folder_or_a_runs_output(four_blocks, tmp_path, capsys):
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "results.md").write_text("mine")
    sweep = ["sweep", *_args(four_blocks, mine, "--recover", "none")[1:]]
    assert main(sweep) == 2
    assert "did not write (results.md)" in _one_line(capsys)
    assert (mine / "results.md").read_text() == "mine" and sorted(os.listdir(mine)) == ["results.md"]
    run_out = tmp_path / "x"
    assert main(_args(four_blocks, run_out, "--recover", "none")) == 0
    capsys.readouterr()
    assert main(["sweep", *_args(four_blocks, run_out, "--recover", "none")[1:]]) == 2
    assert "output folder of an ebft run" in _one_line(capsys)
    assert not (run_out / "cells").exists()
    assert main([*_args(four_blocks, run_out, "--recover", "none"), "--overwrite"]) == 0  # still replaceable


# ----------------------------------------------------------------------------- settings that pass but would do nothing or overflow


@pytest.mark.parametrize("budget", ["1e308", "1e308s", "9999999h"])
def test_absurd_budgets_are_refused_before_any_work(four_blocks, tmp_path, capsys, budget):
    assert main(_args(four_blocks, tmp_path / "out", "--recover-budget", budget)) == 2
    assert "366 days" in _one_line(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,needle", [
    (["--finish-steps", "64"], "--finish-steps"), (["--lora-rank", "4"], "--lora-rank"),
    (["--recover", "dsnot", "--lr", "0.01"], "--lr"), (["--owl-lambda", "0.05"], "--owl-lambda"),
    (["--atp-beta", "0.01"], "--atp-beta"), (["--allocation", "owl", "--atp-beta", "0.01"], "--atp-beta"),
    (["--allocation", "atp", "--owl-lambda", "0.05"], "--owl-lambda"),
    (["--sparsegpt-damp", "0.1"], "--sparsegpt-damp"), (["--zeroshot-limit", "5"], "--zeroshot-limit"),
    (["--no-checkpoint", "--checkpoint-every", "60"], "--checkpoint-every"),
    (["--recover", "none", "--recipe", "paper"], "--recipe"), (["--recover", "lora", "--recover-guard", "8"],
                                                                  "--recover-guard"),
    (["--recover", "none", "--gradual-updates", "3"], "--gradual-updates"),
    (["--export-type", "q8_0"], "--export-type")])
def test_flags_of_a_stage_that_does_not_run_are_refused(four_blocks, tmp_path, capsys, extra, needle):
    assert main(_args(four_blocks, tmp_path / "out", *extra)) == 2
    line = _one_line(capsys)
    assert line.startswith(f"ebft: error: {needle} ") and "applies only with --" in line  # and says which
    assert not list(tmp_path.iterdir())


def test_flap_bias_compensation_is_auto_per_family(tmp_path, text_file, capsys, caplog):
    from conftest import build_tokenizer

    tok = build_tokenizer()
    folder = tmp_path / "mistral"
    make_tiny_model("mistral", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    base = ["run", "--model", str(folder), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--method", "flap",
            "--recover", "none"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0  # no bias slot in Mistral: off, said once
    record = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert record["resolved"]["pruner_settings"]["bias_compensation"] is False
    assert record["config"]["prune"]["bias_compensation"] is None
    capsys.readouterr()
    assert main([*base, "--bias-compensation", "--out", str(tmp_path / "on")]) == 2
    assert "--no-bias-compensation" in _one_line(capsys)


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("flag,value,needle", [
    ("--free-host", "nan", "not a size"), ("--free-host", "-1GB", "not a size"), ("--free-host", "lots", "not a size"),
    ("--free-accelerator", "1e30GB", "not a size"), ("--free-accelerator", "99999999PB", "1 EiB")])
def test_plan_sizes_that_are_not_sizes(four_blocks, capsys, flag, value, needle):
    assert main(["plan", "--model", str(four_blocks / "model"), f"{flag}={value}"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"ebft: error: {flag}: got") and needle in line


def test_plan_json_must_be_a_file_in_an_existing_folder(four_blocks, tmp_path, capsys):
    for target, needle in ((tmp_path, "not a folder"), (tmp_path / "no" / "plan.json", "does not exist")):
        assert main(["plan", "--model", str(four_blocks / "model"), "--plan-json", str(target)]) == 2
        assert needle in _one_line(capsys)
    assert main(["plan", "--model", str(four_blocks / "model"), "--plan-json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["parameters"]["total"] > 0


def test_plan_names_trust_remote_code(tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "nobody-knows-me", "auto_map": {
        "AutoConfig": "configuration_x.XConfig"}}))
    assert main(["plan", "--model", str(folder)]) == 2
    assert "--trust-remote-code" in _one_line(capsys)


# ----------------------------------------------------------------------------- task files and progress


def test_malformed_task_records_are_named_by_line(tiny_model_dir, tmp_path, capsys):
    good = {"query": "Question: which?", "choices": ["a", "b"], "gold": 0}
    for bad, needle in (({**good, "choices": "ab"}, "choices must be a list"), ({**good, "gold": 2}, "gold 2"),
                        ({**good, "gold": "0"}, "gold must be an integer"), ({**good, "query": ""}, "query")):
        path = tmp_path / "piqa.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + json.dumps(bad) + "\n")
        assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "piqa", "--task-data",
                     f"piqa={path}", "--limit", "2"]) == 2
        line = _one_line(capsys)
        assert "line 3" in line and needle in line, line


def test_a_long_finish_stage_shows_progress(four_blocks, tmp_path):
    from ebft import RunConfig, run

    cfg = RunConfig(model=str(four_blocks / "model"), out=str(tmp_path / "out"))
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = str(four_blocks / "text.txt"), 4, 32
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = [str(four_blocks / "text.txt")], 32, 2
    cfg.recover.method, cfg.finish.method, cfg.finish.steps, cfg.finish.holdout = "none", "kd", 1, 6
    events = []
    run(cfg, progress=lambda event, **info: events.append((event, info)))
    names = {info["name"] for event, info in events if event == "work_start"}
    assert {"finish: dense teacher", "finish: loss on the heldout windows"} <= names
    steps = [info["done"] for event, info in events if event == "work_step" and "heldout" in info["name"]]
    assert steps and max(steps) == 6
