"""Hostile input, round three: the newer features (sweep output, resume, ranks, plan, task data) held to
the same standard as `ebft run`: no data loss, no silently wrong result, no hang, one line and exit code 2
for bad input, and a message that names the flag that fixes it."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEXT, make_tiny_model
from ebft import checkpoint as ckpt
from ebft.cli import main

SRC = Path(ckpt.__file__).resolve().parents[1]  # the tree whose ebft this test imports


class SimulatedKill(BaseException):
    """Raised at a kill point: like SIGKILL, nothing in ebft handles it, so the checkpoint stays."""


def _kill_at(monkeypatch, point, index):
    def hook(p, i=None):
        if p == point and i == index:
            raise SimulatedKill(f"{p}:{i}")
    monkeypatch.setattr(ckpt, "kill_hook", hook)


def _args(root, out, *extra):
    return ["run", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(root / "text.txt"), "--eval-seqlen", "32", "--eval-windows", "2",
            "--out", str(out), *extra]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("ebft")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _killed(root, out, monkeypatch, *extra, at=2):
    """A run stopped at block ``at`` (its checkpoint left as a kill leaves it)."""
    with monkeypatch.context() as m:
        _kill_at(m, "block", at)
        with pytest.raises(SimulatedKill):
            main(_args(root, out, *extra))
    return out.parent / f".{out.name}.ckpt"


# ----------------------------------------------------------------------------- data loss

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


# ----------------------------------------------------------------------------- wrong results, silently

def test_resume_refuses_a_model_whose_files_changed(tmp_path, monkeypatch, capsys):
    from conftest import tiny_run_folder

    root = tiny_run_folder(tmp_path, 4)
    out = tmp_path / "out"
    _killed(root, out, monkeypatch)
    make_tiny_model("llama", vocab_size=320, layers=4, seed=1).save_pretrained(root / "model")  # same path
    assert main(_args(root, out)) == 2
    line = _one_line(capsys)
    assert "model's files changed" in line and "--no-resume" in line and not out.exists()
    assert main([*_args(root, out), "--no-resume"]) == 0


def test_resume_takes_the_same_folder_relative_or_absolute(four_blocks, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    _killed(four_blocks, Path("out"), monkeypatch)
    assert main(_args(four_blocks, tmp_path / "out")) == 0
    assert "resuming from the checkpoint" in caplog.text


def _torchrun_env(rank: int, world: int, port: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flag,values", [("--seed", ("0", "1")), ("--sparsity", ("0.5", "0.6"))])
def test_ranks_started_by_hand_with_different_settings_all_stop_in_one_line(four_blocks, tmp_path, flag, values):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "ebft", *_args(four_blocks, tmp_path / "out", "--recover", "none",
                                                                     flag, value, "--rank-timeout", "60")],
                              env=_torchrun_env(rank, 2, port), stderr=subprocess.PIPE, text=True)
             for rank, value in enumerate(values)]
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    for code, err in results:
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert "rank 1 runs " in err and flag.lstrip("-") in err and "same settings" in err
    assert not (tmp_path / "out").exists()


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


# ----------------------------------------------------------------------------- hangs

def test_a_rank_beyond_the_world_size_stops_at_once(four_blocks, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    assert main(_args(four_blocks, tmp_path / "out")) == 2
    assert "RANK: got 2" in _one_line(capsys)


def test_a_rank_whose_peers_never_come_stops_in_bounded_time(four_blocks, tmp_path):
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ebft", *_args(four_blocks, tmp_path / "out", "--rank-timeout", "3")],
                          env=_torchrun_env(0, 2, _free_port()), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "did not join within 3 s" in done.stderr and "--rank-timeout" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - start < 60


def test_a_waiting_rank_stops_on_sigterm(four_blocks, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ebft", *_args(four_blocks, tmp_path / "out")],
                            env=_torchrun_env(0, 2, _free_port()), stderr=subprocess.PIPE, text=True)
    time.sleep(12)  # imports, validation, then the wait for the peer
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert code == 128 + signal.SIGTERM, proc.stderr.read()[-2000:]


# ----------------------------------------------------------------------------- tracebacks

def _damage(folder: Path, what: str) -> Path:
    if what in ("truncated state", "empty state"):
        path = next(folder.glob("state-*.pt"))
        path.write_bytes(path.read_bytes()[:200] if what == "truncated state" else b"")
    elif what == "truncated block shard":
        path = sorted((folder / "blocks").glob("*.safetensors"))[0]
        path.write_bytes(path.read_bytes()[:-100])
    elif what == "garbage mask file":
        path = next((folder / "masks").glob("*.safetensors"))
        path.write_bytes(os.urandom(300))
    else:
        path = folder / "checkpoint.json"
        path.write_text("" if what == "empty checkpoint.json" else "{not json")
    return path


@pytest.mark.parametrize("what", ["truncated state", "empty state", "truncated block shard", "garbage mask file",
                                  "empty checkpoint.json", "unreadable checkpoint.json"])
def test_a_damaged_checkpoint_is_named_in_one_line_and_no_resume_starts_over(four_blocks, tmp_path, monkeypatch,
                                                                             capsys, what):
    out = tmp_path / "out"
    folder = _killed(four_blocks, out, monkeypatch)
    damaged = _damage(folder, what)
    assert main(_args(four_blocks, out)) == 2
    line = _one_line(capsys)
    assert damaged.name in line and "--no-resume" in line, line
    assert not out.exists()
    assert main([*_args(four_blocks, out), "--no-resume"]) == 0


def test_lazy_with_a_truncated_shard_is_one_line(four_blocks, tmp_path, capsys):
    """A shard the walk reaches late (block 3's) cut short: found before any work, as an eager load finds it."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(four_blocks / "model").save_pretrained(model, max_shard_size="150KB")
    shutil.copy(four_blocks / "model" / "tokenizer.json", model)
    shutil.copy(four_blocks / "model" / "tokenizer_config.json", model)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 2
    shard = shards[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    args = _args(four_blocks, tmp_path / "out", "--lazy")
    args[args.index("--model") + 1] = str(model)
    assert main(args) == 2
    assert shard.name in _one_line(capsys)


@pytest.mark.parametrize("budget", ["1e308", "1e308s", "9999999h"])
def test_absurd_budgets_are_refused_before_any_work(four_blocks, tmp_path, capsys, budget):
    assert main(_args(four_blocks, tmp_path / "out", "--recover-budget", budget)) == 2
    assert "366 days" in _one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_a_failed_run_leaves_no_checkpoint_that_blocks_a_corrected_rerun(four_blocks, tmp_path, monkeypatch, capsys):
    import dataclasses

    from ebft.recover import RECOVERIES

    out = tmp_path / "out"

    def broken(ctx, settings):
        raise RuntimeError("something went wrong in block 0")

    with monkeypatch.context() as m:  # an error (not a kill) before any block is done
        m.setitem(RECOVERIES, "ebft", dataclasses.replace(RECOVERIES["ebft"], fn=broken))
        with pytest.raises(RuntimeError):
            main(_args(four_blocks, out))
    assert not (tmp_path / ".out.ckpt").exists()
    assert main([*_args(four_blocks, out), "--epochs", "1"]) == 0  # the corrected rerun is not refused


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


# ----------------------------------------------------------------------------- unclear or silent

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


def test_plan_names_trust_remote_code(tmp_path, capsys):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "nobody-knows-me", "auto_map": {
        "AutoConfig": "configuration_x.XConfig"}}))
    assert main(["plan", "--model", str(folder)]) == 2
    assert "--trust-remote-code" in _one_line(capsys)


def test_resume_on_a_finished_run_says_there_is_nothing_to_resume(four_blocks, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(four_blocks, out, "--recover", "none")) == 0
    capsys.readouterr()
    assert main([*_args(four_blocks, out, "--recover", "none"), "--resume"]) == 2
    assert "nothing to resume" in _one_line(capsys)


@pytest.mark.parametrize("extra,needle", [
    (["--finish-steps", "64"], "--finish-steps"), (["--lora-rank", "4"], "--lora-rank"),
    (["--recover", "dsnot", "--lr", "0.01"], "--lr"), (["--owl-lambda", "0.05"], "--owl-lambda"),
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
