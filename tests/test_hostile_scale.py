"""Hostile input to resume, lazy loading and ranks: a changed model, a damaged checkpoint or shard, ranks
started by hand with different settings or never joined. No data loss, no silently wrong result, no hang:
one line and exit code 2, naming the file or the flag that fixes it."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_tiny_model, one_line as _one_line, small_run_args as _args
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




def _killed(root, out, monkeypatch, *extra, at=2):
    """A run stopped at block ``at`` (its checkpoint left as a kill leaves it)."""
    with monkeypatch.context() as m:
        _kill_at(m, "block", at)
        with pytest.raises(SimulatedKill):
            main(_args(root, out, *extra))
    return out.parent / f".{out.name}.ckpt"


# ----------------------------------------------------------------------------- data loss and wrong results, silently


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


def test_resume_on_a_finished_run_says_there_is_nothing_to_resume(four_blocks, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(four_blocks, out, "--recover", "none")) == 0
    capsys.readouterr()
    assert main([*_args(four_blocks, out, "--recover", "none"), "--resume"]) == 2
    assert "nothing to resume" in _one_line(capsys)


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


# ----------------------------------------------------------------------------- damaged checkpoints and shards


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


# ----------------------------------------------------------------------------- ranks


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
