"""Resume (ebft.checkpoint): a killed `ebft run` continues from its checkpoint and ends bit-identical
to an uninterrupted run (CPU, fp32): the same saved tensors, perplexities and run.json but times."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, block_training
from ebft import checkpoint as ckpt
from ebft.cli import main

TIMES = {"seconds", "seconds_by_phase", "phases", "recover_seconds", "train_seconds", "refit_seconds", "wall_seconds", "peak_memory_bytes", "prefill_tokens_per_s",
         "generate_tokens_per_s"}
SRC = Path(__file__).resolve().parents[1] / "src"


def _args(root, out, *extra):
    return ["run", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--nsamples", "8",
            "--seqlen", "32", "--eval", str(root / "text.txt"), "--eval-seqlen", "64", "--eval-windows", "4",
            *block_training(extra, "--epochs", "2", "--recover-batch-size", "4"), "--out", str(out), *extra]


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _untimed(obj):
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if k not in TIMES}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


def _assert_same_run(a, b, ignore=("config.out",)):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    ra, rb = (json.loads((Path(f) / "run.json").read_text()) for f in (a, b))
    for path in ignore:  # settings that say how it ran, not what it computed
        for r in (ra, rb):
            *parents, leaf = path.split(".")
            node = r
            for p in parents:
                node = node[p]
            node.pop(leaf, None)
    assert _untimed(ra) == _untimed(rb)
    # byte for byte too, once the times are out: the same key order, the same float text
    assert json.dumps(_untimed(ra)) == json.dumps(_untimed(rb))


class SimulatedKill(BaseException):
    """What the in-process tests raise at a kill point: like SIGKILL, nothing of ebft's handles it (an
    error, an ``Exception``, would make the run clean up a checkpoint without finished blocks)."""


def _fail_at(monkeypatch, point, index=None):
    """Make the run raise at a kill point: in-process stand-in for a SIGKILL (the checkpoint stays)."""
    def hook(p, i=None):
        if p == point and (index is None or i == index):
            raise SimulatedKill(f"injected failure at {p}:{i}")
    monkeypatch.setattr(ckpt, "kill_hook", hook)


# ----------------------------------------------------------------------------- a real SIGKILL

def test_sigkill_at_several_moments_then_rerun_is_bit_identical(four_blocks, tmp_path):
    """`ebft run` in a subprocess, SIGKILLed (by itself, at a named instant: no timing) after block 1's
    shard is written but not its checkpoint, then again while the output is written; the same command
    then finishes with the uninterrupted run's result."""
    root = four_blocks
    assert main(_args(root, tmp_path / "ref")) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}  # tiny model: one thread is fastest
    for point in ("parts:1", "output"):
        done = subprocess.run([sys.executable, "-m", "ebft", *_args(root, out)], capture_output=True, text=True,
                              env={**env, "EBFT_TEST_KILL": point}, timeout=300)
        assert done.returncode == -9, (point, done.stderr[-2000:])
        assert not out.exists() and not list(tmp_path.glob(".killed.tmp-*")) or point == "output"
        assert (tmp_path / ".killed.ckpt" / "checkpoint.json").exists()
    done = subprocess.run([sys.executable, "-m", "ebft", *_args(root, out)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from the checkpoint" in done.stderr and "(4 blocks done)" in done.stderr
    assert not (tmp_path / ".killed.ckpt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".killed")]
    _assert_same_run(tmp_path / "ref", out)


# ----------------------------------------------------------------------------- in-process failures

CASES = {
    "ebft": [],
    "ebft-no-guard": ["--recover-guard", "0"],  # the "pruned" stage rebuilt from the blocks before recovery
    "ebft-dense-model-holdout": ["--target", "dense-model", "--holdout", "2"],
    "ebft-mask": ["--recover", "ebft-mask", "--method", "magnitude", "--pattern", "2:4"],
    "dsnot-owl": ["--recover", "dsnot", "--allocation", "owl", "--sparsity", "0.6"],
    "sparsegpt-none": ["--method", "sparsegpt", "--recover", "none"],
    "flap": ["--method", "flap", "--sparsity", "0.3"],
    "lazy": ["--lazy"],
    "lazy-no-guard": ["--lazy", "--recover-guard", "0"],
    "lora": ["--recover", "lora", "--lora-steps", "3"],
    "ebft-gradual": ["--recover", "ebft-gradual", "--sparsity", "0.7"],
    "ebft-window": ["--recover-window", "2"],  # blocks 0-1 and 2-3 trained jointly
    "lazy-window": ["--lazy", "--recover-window", "2"],
}


# failing as block 2 starts (checkpoint before it complete), and between block 3's state file and its
# checkpoint.json (the checkpoint before block 2 is then the last complete one)
RUNS = [(case, "block", 2) for case in CASES] + [("ebft", "state", 3), ("lazy", "state", 3)]
RUNS += [("ebft-window", "block", 3)]  # inside the window 2-3: the checkpoint is the one before block 2


@pytest.mark.parametrize("case,point,index", RUNS, ids=[f"{c}-{p}{i}" for c, p, i in RUNS])
def test_resumed_run_equals_uninterrupted(four_blocks, tmp_path, monkeypatch, case, point, index):
    root, extra = four_blocks, CASES[case]
    assert main(_args(root, tmp_path / "ref", *extra)) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_at(m, point, index)
        with pytest.raises(SimulatedKill, match="injected"):
            main(_args(root, out, *extra))
    saved = json.loads((tmp_path / ".run.ckpt" / "checkpoint.json").read_text())
    assert saved["progress"]["next_block"] == 2  # "state 3": block 3's state file, not its checkpoint.json
    assert not out.exists()
    assert main(_args(root, out, *extra)) == 0
    assert not (tmp_path / ".run.ckpt").exists()
    _assert_same_run(tmp_path / "ref", out)


def test_checkpoint_every_interval_resumes_from_the_last_one(four_blocks, tmp_path, monkeypatch):
    """With an hour between checkpoints only the plan and the blocks' shards are there at block 3:
    the rerun walks from block 0 again (dropping the stale shards) and ends the same."""
    root = four_blocks
    assert main(_args(root, tmp_path / "ref")) == 0
    out = tmp_path / "run"
    args = _args(root, out, "--checkpoint-every", "3600")
    with monkeypatch.context() as m:
        _fail_at(m, "block", 3)
        with pytest.raises(SimulatedKill):
            main(args)
    folder = tmp_path / ".run.ckpt"
    assert json.loads((folder / "checkpoint.json").read_text())["progress"] is None
    assert not list(folder.glob("state-*.pt")) and len(list((folder / "blocks").glob("*.safetensors"))) == 3
    assert main(args) == 0
    _assert_same_run(tmp_path / "ref", out, ignore=["config.out", "config.checkpoint_every"])


# ----------------------------------------------------------------------------- what is refused

def _leave_checkpoint(root, out, monkeypatch, *extra):
    with monkeypatch.context() as m:
        _fail_at(m, "block", 2)
        with pytest.raises(SimulatedKill):
            main(_args(root, out, *extra))


@pytest.mark.parametrize("change,needle", [
    (["--sparsity", "0.6"], "prune.sparsity = unset, this run has 0.6"),
    (["--epochs", "3"], "recover.epochs = 2, this run has 3"),
    (["--no-lazy", "--batch-size", "2"], "batch_size = 1, this run has 2"),
])
def test_different_settings_are_refused_in_one_line(four_blocks, tmp_path, monkeypatch, capsys, change, needle):
    out = tmp_path / "run"
    _leave_checkpoint(four_blocks, out, monkeypatch)
    capsys.readouterr()
    assert main(_args(four_blocks, out, *change)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "--no-resume" in err, err
    assert (tmp_path / ".run.ckpt" / "checkpoint.json").exists()  # left as it was


def test_changed_text_is_refused(four_blocks, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _leave_checkpoint(four_blocks, out, monkeypatch)
    (tmp_path / "other.txt").write_text(TEXT.replace("fox", "cat"))
    args = _args(four_blocks, out)
    args[args.index("--eval") + 1] = str(four_blocks / "text.txt")
    args[args.index("--calib") + 1] = str(tmp_path / "other.txt")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "calib.source" in err  # the path differs first; the windows' hash would too


def test_no_resume_starts_over_and_resume_needs_a_checkpoint(four_blocks, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_args(four_blocks, out, "--resume")) == 2
    assert "no checkpoint of this run" in capsys.readouterr().err
    assert not (tmp_path / ".run.ckpt").exists() and not out.exists()
    _leave_checkpoint(four_blocks, out, monkeypatch)
    capsys.readouterr()
    assert main(_args(four_blocks, out, "--no-resume", "--sparsity", "0.6")) == 0
    assert "resuming" not in capsys.readouterr().err
    assert not (tmp_path / ".run.ckpt").exists()
    assert json.loads((out / "run.json").read_text())["config"]["prune"]["sparsity"] == 0.6
    assert main(_args(four_blocks, tmp_path / "x", "--resume", "--no-checkpoint")) == 2


def test_no_checkpoint_writes_none_and_a_finished_run_leaves_none(four_blocks, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_at(m, "block", 2)
        with pytest.raises(SimulatedKill):
            main(_args(four_blocks, out, "--no-checkpoint"))
    assert not (tmp_path / ".run.ckpt").exists()
    assert main(_args(four_blocks, out)) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_checkpoint_left_beside_a_finished_output_is_removed(four_blocks, tmp_path, monkeypatch):
    """Killed after the output was committed, before the checkpoint went: the next run with that --out
    removes the useless checkpoint (and then refuses the existing output as usual)."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(ckpt.RunCheckpoint, "remove", lambda self: self.close())
        assert main(_args(four_blocks, out)) == 0
    assert (tmp_path / ".run.ckpt").exists()
    assert main(_args(four_blocks, out)) == 2  # exists: --overwrite needed
    assert not (tmp_path / ".run.ckpt").exists()


def test_a_foreign_folder_by_the_checkpoint_name_is_not_touched(four_blocks, tmp_path, capsys):
    folder = tmp_path / ".run.ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(_args(four_blocks, tmp_path / "run")) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "mine"


def test_two_runs_of_one_out_do_not_share_a_checkpoint(four_blocks, tmp_path):
    import fcntl

    out = tmp_path / "run"
    folder = tmp_path / ".run.ckpt"
    folder.mkdir()
    with open(folder / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        from ebft import run
        from ebft.cli import build_parser, config_from_args
        from ebft.errors import EbftError

        with pytest.raises(EbftError, match="another ebft run is using the checkpoint"):
            run(config_from_args(build_parser().parse_args(_args(four_blocks, out))))


def test_a_checkpoint_missing_a_finished_blocks_shard_is_refused(four_blocks, tmp_path, monkeypatch, capsys):
    """A checkpoint whose shards do not match what it names (a file lost, a half-cleared folder) is refused
    in one line before any block is walked, never resumed into a model with a block missing."""
    root = four_blocks
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_at(m, "block", 3)
        with pytest.raises(SimulatedKill, match="injected"):
            main(_args(root, out, "--lazy"))
    parts = sorted((tmp_path / ".run.ckpt" / "blocks").glob("*.safetensors"))
    assert len(parts) >= 2
    parts[1].unlink()
    capsys.readouterr()
    assert main(_args(root, out, "--lazy")) == 2
    err = capsys.readouterr().err
    assert "--no-resume" in err and err.count("\n") == 1
    assert main(_args(root, out, "--lazy", "--no-resume")) == 0


def test_a_checkpoint_holds_no_activations(four_blocks, tmp_path, monkeypatch):
    """What resume cannot recompute, and nothing else: the state files hold the random state alone (the
    activations are rebuilt by replaying the finished blocks), so a checkpoint is about the finished blocks'
    weights, their masks and the blocks as the "pruned" stage saw them."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_at(m, "block", 3)
        with pytest.raises(SimulatedKill):
            main(_args(four_blocks, out, "--recover-guard", "0"))
    folder = tmp_path / ".run.ckpt"
    (state,) = folder.glob("state-*.pt")
    assert set(torch.load(state, weights_only=True)) == {"rng"} and state.stat().st_size < 20_000
    assert sorted(p.name for p in (folder / "pruned").iterdir()) == [f"block-{i:05d}.safetensors" for i in range(3)]
    blocks = sum(p.stat().st_size for p in (folder / "blocks").iterdir())
    pruned = sum(p.stat().st_size for p in (folder / "pruned").iterdir())
    assert abs(pruned - blocks) < 0.05 * blocks  # one copy of each finished block, as it was before recovery


def test_a_checkpoint_missing_a_pruned_block_is_refused(four_blocks, tmp_path, monkeypatch, capsys):
    """The "pruned" stage's activations cannot be rebuilt without the block as it was pruned: a checkpoint that
    lost one is refused in one line, never resumed into other perplexities."""
    out = tmp_path / "run"
    args = _args(four_blocks, out, "--recover-guard", "0")
    with monkeypatch.context() as m:
        _fail_at(m, "block", 2)
        with pytest.raises(SimulatedKill):
            main(args)
    (tmp_path / ".run.ckpt" / "pruned" / "block-00001.safetensors").unlink()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block 1 as pruned" in err and "--no-resume" in err
    assert main([*args, "--no-resume"]) == 0


def test_a_checkpoint_of_the_earlier_format_is_discarded(four_blocks, tmp_path, monkeypatch, caplog):
    """Format 2 held the activations: such a checkpoint is discarded with a warning and the run starts over."""
    out = tmp_path / "run"
    _leave_checkpoint(four_blocks, out, monkeypatch)
    path = tmp_path / ".run.ckpt" / "checkpoint.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "format": 2}))
    assert main(_args(four_blocks, out)) == 0
    assert "written by another version of ebft" in caplog.text
    _assert_same_run(out, out)


def test_a_damaged_pruned_copy_is_refused_before_any_work(four_blocks, tmp_path, monkeypatch, capsys):
    """The guard's fallback (each finished block as pruned) cannot be recomputed: a checkpoint whose copy is cut
    short is refused when the resume starts, never found after the work (when the guard would have to save
    the model it had just rejected)."""
    out = tmp_path / "run"
    _leave_checkpoint(four_blocks, out, monkeypatch)
    copy = tmp_path / ".run.ckpt" / "pruned" / "block-00001.safetensors"
    copy.write_bytes(copy.read_bytes()[:-100])
    capsys.readouterr()
    assert main(_args(four_blocks, out)) == 2  # refused as the walk resumes, before block 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block 1 as pruned" in err and "damaged" in err and "--no-resume" in err


def test_a_weight_file_written_with_its_time_set_back_is_found(tmp_path):
    """What the fingerprint promises: a write anywhere in a weight file is found, even outside the three
    sampled MiB and with the modification time restored (the change time moves and cannot be set back)."""
    from ebft.models import model_files_fingerprint

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(5 * 2**20))
    before = model_files_fingerprint(str(folder))
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.seek(int(1.5 * 2**20))  # between the start and middle samples
        f.write(b"\x01")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert model_files_fingerprint(str(folder)) != before


def test_a_checkpoint_of_another_ebft_version_is_refused_naming_the_version_first(tmp_path):
    """A newer ebft records settings an older one did not have (0.2.0: recover.refit): the refusal names the
    version, and a key one side lacks reads "not recorded", not "unset"."""
    from ebft.checkpoint import _refuse, first_difference
    saved = {"config": {"recover": {"method": "ebft"}}, "versions": {"ebft": "0.1.0"}}
    now = {"config": {"recover": {"method": "ebft", "refit": None}}, "versions": {"ebft": "0.2.0"}}
    assert first_difference(saved, now) == ("versions.ebft", "0.1.0", "0.2.0", 2)
    message = str(_refuse(tmp_path, "", first_difference(saved, {**now, "versions": saved["versions"]})))
    assert "recover.refit = nothing (not recorded), this run has unset" in message
