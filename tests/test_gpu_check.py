"""benchmarks/gpu_check.py: the GPU check runs on CPU at a tiny size (CUDA checks skipped, with reasons), and
the pieces it relies on on a GPU (GradScaler counting, forcing the activations' placement, budgets) work."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_cpu_smoke_writes_which_checks_ran_and_why_others_were_skipped(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}  # as on the device machine: the JSON goes to $OUT
    env.pop("EBFT_CACHE", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = {c["name"]: c for c in record["checks"]}
    assert record["mode"] == "cpu-smoke" and record["ok"] and not record["failed"]

    for name in ("whole-run-vs-reference", "llama7b-pipeline", "tiny-ebft-cpu-fp32", "block-benchmark",
                 "pipeline-tiny"):  # the CPU parts ran and passed
        assert checks[name]["status"] == "pass", checks[name]
        assert name in record["ran"] and name in record["passed"]
    for name in ("tiny-ebft-cuda-bf16", "tiny-ebft-cuda-fp16", "placement-device-vs-pinned",
                 "smollm2-wanda50-ebft", "semi-structured-2of4"):  # what needs CUDA, skipped with its reason
        assert checks[name]["status"] == "skip", checks[name]
        assert "CUDA" in checks[name]["reason"] and record["skipped"][name] == checks[name]["reason"]
    torchrun = checks["torchrun-2-ranks"]  # no GPUs, or no distributed ebft: skipped, saying which
    assert torchrun["status"] == "skip" and torchrun["reason"] and torchrun["details"]["support"]

    tiny = checks["tiny-ebft-cpu-fp32"]["details"]
    assert tiny["pruned_weights"] > 0 and tiny["pruned_nonzero"] == 0
    assert tiny["training_dtypes"] == ["float32"] and tiny["grad_scalers"] == 0 and tiny["losses"]["finite"]
    assert checks["block-benchmark"]["details"]["shape"] == "tiny"
    whole = checks["whole-run-vs-reference"]["details"]  # ebft and the plain loop on the same windows
    assert whole["ebft"]["perplexity"] and whole["reference"]["perplexity"]["dense"] > 0
    assert whole["ebft"]["phases"]["to_first_block"] > 0 and whole["ratio_whole_run"] > 0
    big = checks["llama7b-pipeline"]["details"]  # the 7B run's code path at a tiny size: phases, disk, plan
    assert big["shape"] == "tiny" and big["bytes_written"] > 0 and big["checkpoint_bytes"] > 0
    plan_ckpt = sum(v for k, v in big["plan_disk_bytes"].items() if k.startswith("checkpoint"))
    assert 0.8 < big["checkpoint_bytes"] / plan_ckpt < 1.5  # the plan's checkpoint arithmetic (+ json, state files)
    assert set(checks["pipeline-tiny"]["details"]["perplexity"]) == {"dense", "pruned", "recovered"}
    assert "| tiny-ebft-cpu-fp32 | pass |" in done.stdout  # the table


def test_fp16_path_uses_a_grad_scaler_and_bf16_none(gc):
    """The instrumentation the GPU run relies on, exercised on CPU autocast (same code path in ebft)."""
    fp16 = gc.Check("fp16", "a", "")
    r = gc.check_tiny_ebft(fp16, "cpu", "fp16", torch.float32, epochs=1)
    assert not fp16.failures, fp16.failures
    assert r["training_dtypes"] == ["float16"] and r["grad_scalers"] == 2 and r["unscale_calls"] > 0
    bf16 = gc.Check("bf16", "a", "")
    r = gc.check_tiny_ebft(bf16, "cpu", "bf16", torch.bfloat16, epochs=1)
    assert not bf16.failures, bf16.failures
    assert r["training_dtypes"] == ["bfloat16"] and r["grad_scalers"] == 0


def test_the_walk_still_lets_the_placement_be_forced(gc):
    """If this fails, the walk no longer asks ebft.walk.store_device: update the GPU check's placement hook."""
    ok, why = gc.placement_hook()
    assert ok, why
    r = gc.tiny_walk("cpu", "fp32", torch.float32, epochs=1, store="pinned")
    assert r["store_decisions"] and all(d["forced"] == "pinned" and d["placed"] == "cpu" for d in r["store_decisions"])
    assert [o["inputs"] for o in r["placement"]] == ["cpu", "cpu"]  # pinning needs CUDA


def _runner(gc, tmp_path, budget=30.0):
    args = Namespace(budget=budget, only=None, cpu_smoke=True)
    return gc.Runner(args, tmp_path / "r.json", {"cuda": False})


def test_runner_stops_overrunning_checks_and_records_errors_and_skips(gc, tmp_path):
    runner = _runner(gc, tmp_path)

    def slow(check, deadline):
        while True:
            time.sleep(0.05)

    def broken(check, deadline):
        raise ValueError("boom")

    def cannot(check, deadline):
        raise gc.SkipCheck("no model here")

    assert runner.run("slow", "x", "", slow, budget=0.3, estimate=0.1).status == "timeout"
    assert runner.run("broken", "x", "", broken, budget=5, estimate=0.1).status == "error"
    assert runner.run("cannot", "x", "", cannot, budget=5, estimate=0.1).status == "skip"
    assert runner.run("gpu", "x", "", broken, needs_cuda=True).status == "skip"
    record = json.loads((tmp_path / "r.json").read_text())
    assert "slow" in record["stopped"] and record["failed"] == ["broken"] and not record["ok"]
    assert record["skipped"] == {"cannot": "no model here",
                                 "gpu": "needs CUDA (torch.cuda.is_available() is False here)"}
    late = _runner(gc, tmp_path, budget=1.0)
    assert late.run("big", "x", "", slow, budget=100, estimate=50).reason.startswith("not enough time left")


def test_projector_stops_a_walk_that_would_overrun(gc):
    projector = gc.Projector(deadline=time.monotonic() + 5, tail_s=0, label="t", report_every=100)
    projector("block_start", index=0, total=30)
    projector("block_end", index=0, seconds=3.0)  # the first block (warm-up) is never judged alone
    with pytest.raises(gc.Overrun, match="after block 2/30"):
        projector("block_end", index=1, seconds=1.0)


def test_smollm2_falls_back_to_the_quick_budget_when_the_paper_one_would_overrun(gc, monkeypatch):
    calls = []

    def fake_run(model, device, calib, nsamples, seqlen, epochs, *rest):
        calls.append((nsamples, seqlen, epochs))
        if nsamples == gc.BUDGETS["paper"]["nsamples"]:
            raise gc.Overrun("after block 2/30 the walk would end 99 s past its deadline")
        return {"perplexity": {"dense": 20.0, "pruned": 40.0, "recovered": 30.0}, "pruned_weights": 10,
                "pruned_nonzero": 0, "sparsity": 0.5, "losses": {"finite": True}, "seconds": {"total": 1.0},
                "ebft_seconds": 0.5, "eval": {"source": "wiki.test.raw", "windows": 1, "seqlen": 8}}

    monkeypatch.setattr(gc, "pipeline_run", fake_run)
    kit = {"smollm2": "builtin:smollm2", "offline_corpus": True, "eval_source": "offline"}
    args = Namespace(quick=False, no_fallback=False, smollm2_calib="offline")
    check = gc.Check("smollm2", "e", "")
    gc.check_smollm2(check, time.monotonic() + 600, "cpu", args, kit)
    assert [c[0] for c in calls] == [256, 128] and not check.failures
    assert check.details["budget"] == "quick" and "stopped" in check.details["attempts"]["paper"]
    assert check.reason.startswith("paper budget stopped") and "quick budget ran" in check.reason
    with pytest.raises(gc.SkipCheck, match="call 1"):  # no GGUF: skipped with the kit's reason
        gc.check_smollm2(gc.Check("s", "e", ""), time.monotonic() + 600, "cpu", args,
                         {"smollm2": None, "smollm2_reason": "half missing: call 1 must run first"})


def test_the_gguf_halves_are_checked_and_joined(gc, tmp_path):
    import hashlib

    kit, blob = tmp_path / "kit", os.urandom(3000)
    (kit / "a").mkdir(parents=True)
    (kit / "b").mkdir()
    (kit / "a" / "smollm2.gguf.part1").write_bytes(blob[:1000])
    (kit / "b" / "smollm2.gguf.part2").write_bytes(blob[1000:])
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    (kit / "b" / "kit.json").write_text(json.dumps({
        "sha256": sha(blob), "parts": {"a/smollm2.gguf.part1": sha(blob[:1000]),
                                       "b/smollm2.gguf.part2": sha(blob[1000:])}}))
    target = tmp_path / "cache" / "model.gguf"
    assert "sha256 ok" in gc.assemble_gguf(kit, target)
    assert target.read_bytes() == blob
    (kit / "a" / "smollm2.gguf.part1").unlink()  # call 2 landed on a fresh machine
    assert "call 1" in gc.assemble_gguf(kit, tmp_path / "other.gguf")


def test_distributed_support_is_detected_with_a_reason(gc):
    supported, why = gc.distributed_support()
    assert isinstance(supported, bool) and why


def test_the_2of4_check_compares_outputs_and_records_speed(gc):
    """Stage f on the CPU with a stand-in conversion: the weights are exactly 2:4, the outputs compared, the
    ratio recorded; a conversion that changes the result fails the check."""
    shapes = {"small": (8, 16)}
    two = gc.two_of_four((8, 16), "cpu", torch.float32)
    assert torch.equal((two.reshape(8, 4, 4) != 0).sum(-1), torch.full((8, 4), 2))
    check = gc.Check("semi-structured-2of4", "f", "test")
    gc.check_semi_structured(check, "cpu", shapes, tokens=32, to_sparse=lambda w: w.clone())
    row = check.details["linears"]["small"]
    assert not check.failures and row["max_rel_error"] == 0 and row["speedup"] > 0 and "small" in check.summary
    wrong = gc.Check("semi-structured-2of4", "f", "test")
    gc.check_semi_structured(wrong, "cpu", shapes, tokens=32, to_sparse=lambda w: w * 1.5)
    assert wrong.failures and "differs" in wrong.failures[0]


def test_the_2of4_check_skips_saying_why_when_the_conversion_is_refused(gc):
    def refuse(w):
        raise RuntimeError("no semi-structured kernels for this device")

    with pytest.raises(gc.SkipCheck, match="refused"):
        gc.check_semi_structured(gc.Check("x", "f", "t"), "cpu", {"s": (8, 16)}, tokens=8, to_sparse=refuse)
