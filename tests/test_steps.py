"""The training step's machinery (ebft.recover.steps): on the CPU every step is eager and the record says why;
the CUDA-graph path — warm-up, capture, static buffers, replays, the tensor learning rate, the first replay's
check and the fall-backs — is exercised here with a stand-in capture that replays the step eagerly, so that its
bookkeeping is tested without a GPU (benchmarks/gpu_check.py runs the real graphs)."""
from __future__ import annotations

import json

import pytest
import torch

from ebft.cli import main
from ebft.recover import steps


def _run(model_dir, text_file, out, *extra):
    args = ["run", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "12", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "4", "--epochs", "3",
            "--recover-batch-size", "4", "--recover-guard", "0", "--out", str(out), *extra]
    assert main(args) == 0
    return json.loads((out / "run.json").read_text())


def _stand_in(corrupt: float = 1.0):
    """A capture that records nothing and replays the step eagerly on the static buffers (as a CUDA graph
    replays its kernels on them); ``corrupt`` scales the replayed loss (a capture that went wrong)."""
    def capture(step):
        output = torch.zeros(())

        def replay():
            output.copy_(step() * corrupt)
        return replay, output
    return capture


def test_cpu_steps_are_eager_and_say_why(tiny_model_dir, text_file, tmp_path):
    record = _run(tiny_model_dir, text_file, tmp_path / "eager")
    assert all(b["steps"] == {"steps": "eager", "replays": 0, "why": "not a CUDA device"} for b in record["blocks"])


def test_graph_bookkeeping_trains_as_the_eager_steps(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """12 windows, batch 4, 3 epochs: 9 steps per block; 3 eager warm-up steps, the 4th captured and replayed,
    5 more replays. The model trained through the replays is the eager one (the learning rate a tensor the
    schedule fills, the batches copied into the static buffers before each replay)."""
    eager = _run(tiny_model_dir, text_file, tmp_path / "eager")
    monkeypatch.setattr(steps, "_graphs_unavailable", lambda device: None)
    monkeypatch.setattr(steps, "cuda_capture", _stand_in())
    graphed = _run(tiny_model_dir, text_file, tmp_path / "graphed")
    for a, b in zip(eager["blocks"], graphed["blocks"]):
        assert b["steps"] == {"steps": "cuda-graph", "replays": 6}
        assert b["epoch_losses"] == pytest.approx(a["epoch_losses"], rel=1e-5)
        assert b["loss_after"] == pytest.approx(a["loss_after"], rel=1e-5)
    for name, by_stage in eager["perplexity"].items():
        assert graphed["perplexity"][name]["recovered"] == pytest.approx(by_stage["recovered"], rel=1e-5)


def test_a_partial_last_batch_runs_eagerly(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """10 windows, batch 4: batches of 4, 4, 2 — the batch of 2 cannot replay a graph of 4."""
    monkeypatch.setattr(steps, "_graphs_unavailable", lambda device: None)
    monkeypatch.setattr(steps, "cuda_capture", _stand_in())
    record = _run(tiny_model_dir, text_file, tmp_path / "g", "--nsamples", "10")
    # 3 epochs × 2 full batches = 6: 3 warm-up, 1 captured and replayed, 2 replays
    assert all(b["steps"] == {"steps": "cuda-graph", "replays": 3} for b in record["blocks"])


def test_a_replay_that_disagrees_with_eager_falls_back(tiny_model_dir, text_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(steps, "_graphs_unavailable", lambda device: None)
    monkeypatch.setattr(steps, "cuda_capture", _stand_in(corrupt=2.0))
    record = _run(tiny_model_dir, text_file, tmp_path / "g")
    for b in record["blocks"]:
        assert b["steps"]["steps"] == "eager" and "first replay's loss" in b["steps"]["why"]
    assert "this block's steps run eagerly" in caplog.text


def test_a_capture_that_fails_falls_back(tiny_model_dir, text_file, tmp_path, monkeypatch):
    def failing(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(steps, "_graphs_unavailable", lambda device: None)
    monkeypatch.setattr(steps, "cuda_capture", failing)
    eager = _run(tiny_model_dir, text_file, tmp_path / "eager-ref")
    record = _run(tiny_model_dir, text_file, tmp_path / "g")
    for a, b in zip(eager["blocks"], record["blocks"]):
        assert b["steps"]["steps"] == "eager" and "capture failed (RuntimeError: operation not permitted" in b[
            "steps"]["why"]
        assert b["loss_after"] == pytest.approx(a["loss_after"], rel=1e-5)


def test_graphs_are_refused_where_they_cannot_apply(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(steps, "_graphs_unavailable", lambda device: None)
    monkeypatch.setattr(steps, "cuda_capture", _stand_in())
    record = _run(tiny_model_dir, text_file, tmp_path / "g", "--recover", "ebft-gradual", "--sparsity", "0.7")
    assert all(b["steps"] == {"steps": "eager", "replays": 0, "why": "the recovery changes its mask between steps"}
               for b in record["blocks"])
    record = _run(tiny_model_dir, text_file, tmp_path / "b", "--recover-budget", "60s")
    assert all("--recover-budget" in b["steps"]["why"] for b in record["blocks"])


def test_the_switch_turns_graphs_off(monkeypatch):
    monkeypatch.setenv("EBFT_CUDA_GRAPHS", "0")
    assert steps._graphs_unavailable(torch.device("cuda")) == "EBFT_CUDA_GRAPHS=0"
    monkeypatch.setenv("EBFT_CUDA_GRAPHS", "1")
    assert steps._graphs_unavailable(torch.device("cpu")) == "not a CUDA device"


def test_batches_gather_on_the_device_without_changing_the_windows():
    from types import SimpleNamespace

    x, y = torch.randn(10, 3, 2), torch.randn(10, 3, 2)
    ctx = SimpleNamespace(inputs=x, targets=y, device=torch.device("cpu"))
    batches = steps.Batches(ctx, 4)
    batches.epoch(torch.tensor([3, 1, 7, 0, 9]))
    got_x, got_y = batches.get(0, 4)
    assert torch.equal(got_x, x[[3, 1, 7, 0]]) and torch.equal(got_y, y[[3, 1, 7, 0]])
    assert torch.equal(batches.get(4, 8)[0], x[[9]])
