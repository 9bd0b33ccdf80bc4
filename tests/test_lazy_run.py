"""`ebft run --lazy` on a model wider than the budget: peak host memory about one block plus the
activations while the eager run holds the model; the same tensors, perplexities and sparsity."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TEXT, lazy_memory_benchmark

ROOT = Path(__file__).resolve().parents[1]
bench = lazy_memory_benchmark()

# One `ebft run` in a fresh process, its peak resident set measured from after the imports (the
# run resets Linux's VmHWM at its start and records the peak in run.json).
WORKER = """
import json, sys
import torch
torch.set_num_threads(1)
import transformers.models.llama.modeling_llama  # imports are not what is measured
from ebft.cli import main
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
code = main(sys.argv[1:])
record = json.loads(open(sys.argv[sys.argv.index("--out") + 1] + "/run.json").read())
print(json.dumps({"code": code, "growth_mib": (record["peak_memory_bytes"] - base) / 2**20}))
"""


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A wide random Llama (6 blocks of 36 MiB in fp32) in several shards, and a text."""
    root = tmp_path_factory.mktemp("wide")
    sizes = bench.make_wide_model(root / "model", hidden=768, intermediate=3072, layers=6, max_shard_size="60MB")
    (root / "text.txt").write_text(TEXT)
    return root, sizes


def _run(root, out, *extra) -> dict:
    args = ["run", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--nsamples", "8",
            "--seqlen", "64", "--eval", str(root / "text.txt"), "--eval-seqlen", "64", "--eval-windows", "4",
            "--recover", "none", "--out", str(out), *extra]
    # a fixed mmap threshold: glibc's adaptive one keeps freed blocks of up to 32 MiB resident, which
    # makes the peak depend on the allocation history, not on what is alive
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    done = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures Linux's VmHWM")
def test_lazy_run_peak_is_about_one_block_and_its_output_is_the_eager_one(wide, tmp_path):
    root, sizes = wide
    mib = 2**20
    lazy = _run(root, tmp_path / "lazy", "--lazy")
    eager = _run(root, tmp_path / "eager", "--no-lazy")
    # one block being pruned, its transient copies (Wanda's sort of the widest linear, the new
    # masked weight), the outside modules, the activations (2 MiB) and fixed costs that do not grow
    # with the model (data, skeleton, tokenizer); measured here: lazy 120 MiB, eager 540 MiB (hidden 1024,
    # 8 blocks of 64 MiB: lazy 177 MiB, eager 1237 MiB)
    bound = (2 * sizes["block_bytes"] + sizes["outside_bytes"]) / mib + 96
    assert lazy["growth_mib"] < bound, (lazy, bound)
    assert eager["growth_mib"] > max(bound, sizes["model_bytes"] / mib), (eager, bound)

    a, b = _tensors(tmp_path / "eager"), _tensors(tmp_path / "lazy")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ra, rb = (json.loads((tmp_path / f / "run.json").read_text()) for f in ("eager", "lazy"))
    assert ra["perplexity"] == rb["perplexity"] and ra["sparsity"] == rb["sparsity"]
    assert rb["resolved"]["lazy"] is True and "lazy" not in ra["resolved"]
    assert len(list((tmp_path / "lazy").glob("model-*-of-*.safetensors"))) == 7  # a shard per block + the rest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the checkpoint is gone


def test_lazy_refuses_what_needs_the_whole_model(tmp_path, tiny_model_dir, text_file, capsys):
    from ebft.cli import main

    base = ["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--eval", str(text_file),
            "--out", str(tmp_path / "x"), "--lazy"]
    for extra, needle in ((["--recover", "lora"], "lora trains the whole model"),
                          (["--zeroshot", "piqa"], "zero-shot"),
                          (["--method", "flap"], "structured pruning"),
                          (["--speed"], "speed")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "--lazy" in err, err
    assert main([*base[:2], "builtin:smollm2", *base[3:]]) == 2
    assert "GGUF" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_auto_lazy_only_when_the_weights_do_not_fit(tiny_model_dir, monkeypatch):
    from ebft import blockstore, pipeline
    from ebft.config import RunConfig

    config = RunConfig(model=str(tiny_model_dir), out="x")
    pattern = config.pattern()
    size = blockstore.weights_bytes(str(tiny_model_dir))
    assert size == sum(f.stat().st_size for f in Path(tiny_model_dir).glob("*.safetensors"))
    monkeypatch.setattr(pipeline, "host_available", lambda: 4 * size)
    assert not pipeline.decide_lazy(config, pattern)
    monkeypatch.setattr(pipeline, "host_available", lambda: size)
    assert pipeline.decide_lazy(config, pattern)
    assert not pipeline.decide_lazy(config, pattern.__class__(0.5, structured=True))  # needs the whole model
    config.lazy = False
    assert not pipeline.decide_lazy(config, pattern)
    config.model = "builtin:smollm2"
    config.lazy = None
    assert not pipeline.decide_lazy(config, pattern)


@pytest.mark.parametrize("save_dtype", ["auto", "bfloat16"])
def test_lazy_output_is_the_eager_output(tiny_model_dir, text_file, tmp_path, save_dtype):
    """Same tensors (cast alike when saved in another dtype), the same config, perplexities and sparsity (both
    without the guard, which a lazy run cannot have: tests/test_flags_act.py)."""
    from ebft.cli import main

    def args(out, lazy):
        return ["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
                "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "4", "--epochs", "1",
                "--recover-guard", "0",
                "--save-dtype", save_dtype, "--out", str(out), "--lazy" if lazy else "--no-lazy"]

    assert main(args(tmp_path / "eager", False)) == 0 and main(args(tmp_path / "lazy", True)) == 0
    a, b = _tensors(tmp_path / "eager"), _tensors(tmp_path / "lazy")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((tmp_path / f / "config.json").read_text()) for f in ("eager", "lazy"))
    assert ca == cb
    ra, rb = (json.loads((tmp_path / f / "run.json").read_text()) for f in ("eager", "lazy"))
    assert ra["perplexity"] == rb["perplexity"] and ra["sparsity"] == rb["sparsity"]
    assert [b.keys() for b in ra["blocks"]] == [b.keys() for b in rb["blocks"]]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "lazy")
