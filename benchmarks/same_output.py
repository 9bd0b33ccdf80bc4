"""Bit for bit: do two source trees of ebft save the same tensors for the same runs?

A refactoring must not change what a run computes. This runs the same `ebft run` commands with the
package taken from a given source tree (``PYTHONPATH=<tree>/src``), each in a fresh process, and
records the SHA-256 of every saved tensor and the run's perplexities; ``compare`` then says, per
run, whether two trees saved identical tensors.

    git worktree add /tmp/before <old commit>
    python benchmarks/same_output.py run --tree /tmp/before --out /tmp/same-before
    python benchmarks/same_output.py run --tree .           --out /tmp/same-after
    python benchmarks/same_output.py compare /tmp/same-before /tmp/same-after

The runs (all offline, on the built-in SmolLM2-135M; the demo is `make demo`'s command, the others
are small): the demo; FLAP adaptive 20 %; OWL at 70 %; a `--lazy` run of a dense safetensors copy;
a run killed with SIGKILL at block 10 and then resumed; two gloo ranks under torchrun. Writes
``<out>/hashes.json`` (and the outputs under ``<out>/runs``); ``compare`` prints a table and writes
``benchmarks/results/same_output.json``. Same machine and thread count for both trees: across
machines the last bits of floating-point sums differ.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SMALL = ["--model", "builtin:smollm2", "--calib", "offline", "--nsamples", "8", "--seqlen", "128",
         "--eval", "offline", "--eval-seqlen", "256", "--eval-windows", "2", "--epochs", "1"]
# name -> (arguments after `ebft run`, how it runs)
RUNS = {
    "demo": (["--config", "configs/demo.yaml"], "plain"),
    "flap-adaptive": ([*SMALL, "--method", "flap", "--sparsity", "0.2"], "plain"),
    "owl": ([*SMALL, "--sparsity", "0.7", "--allocation", "owl"], "plain"),
    "lazy": (["--model", "{dense}", *SMALL[2:], "--lazy"], "plain"),
    "resumed": ([*SMALL, "--sparsity", "0.6"], "killed"),
    "gloo-2-ranks": ([*SMALL, "--recover-batch-size", "4"], "torchrun"),
}


def _env(tree: Path, threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    env.pop("EBFT_TEST_KILL", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _ebft(tree: Path, args: list[str], env: dict, torchrun: bool = False) -> subprocess.CompletedProcess:
    head = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ebft"] if torchrun
            else [sys.executable, "-m", "ebft"])
    return subprocess.run([*head, "run", *args], env=env, cwd=tree, capture_output=True, text=True)


def tensor_hashes(folder: Path) -> dict[str, str]:
    """``{tensor name: sha256 of its dtype, shape and bytes}`` over every safetensors file in ``folder``."""
    import torch
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key).contiguous()
                digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                out[key] = digest.hexdigest()
    return out


def _dense_copy(tree: Path, root: Path) -> Path:
    """A dense safetensors folder of SmolLM2 (what --lazy reads): magnitude at sparsity 0, no recovery."""
    out = root / "smollm2-dense"
    if not out.exists():
        result = _ebft(tree, ["--model", "builtin:smollm2", "--method", "magnitude", "--sparsity", "0",
                              "--recover", "none", "--nsamples", "1", "--seqlen", "16", "--eval", "offline",
                              "--eval-windows", "1", "--eval-seqlen", "16", "--out", str(out)], _env(tree))
        if result.returncode:
            raise SystemExit(f"could not write the dense copy: {result.stderr[-2000:]}")
    return out


def run_all(tree: Path, out: Path, only: list[str] | None) -> dict:
    runs_dir = out / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    record = json.loads((out / "hashes.json").read_text()) if (out / "hashes.json").exists() else {}
    for name, (args, how) in RUNS.items():
        if only and name not in only:
            continue
        target = runs_dir / name
        shutil.rmtree(target, ignore_errors=True)
        if "{dense}" in args:
            args = [str(_dense_copy(tree, out)) if a == "{dense}" else a for a in args]
        args = [*args, "--out", str(target)]
        if name == "demo":
            args += ["--overwrite"]
        start = time.perf_counter()
        if how == "killed":
            killed = _ebft(tree, args, {**_env(tree), "EBFT_TEST_KILL": "block:10"})
            if killed.returncode != -9:
                raise SystemExit(f"{name}: the run was not killed at block 10 (exit {killed.returncode}): "
                                 f"{killed.stderr[-2000:]}")
            result = _ebft(tree, args, _env(tree))
            if "resuming" not in result.stderr:
                raise SystemExit(f"{name}: the second run did not resume: {result.stderr[-2000:]}")
        else:
            result = _ebft(tree, args, _env(tree, 1 if how == "torchrun" else None), torchrun=how == "torchrun")
        if result.returncode:
            raise SystemExit(f"{name}: exit {result.returncode}: {result.stderr[-3000:]}")
        run_json = json.loads((target / "run.json").read_text())
        record[name] = {"seconds": round(time.perf_counter() - start, 1), "tensors": tensor_hashes(target),
                        "perplexity": run_json["perplexity"]}
        print(f"{name}: {len(record[name]['tensors'])} tensors, {record[name]['seconds']} s", flush=True)
        (out / "hashes.json").write_text(json.dumps(record, indent=1))
    return record


def compare(a: Path, b: Path) -> list[dict]:
    left = json.loads((a / "hashes.json").read_text())
    right = json.loads((b / "hashes.json").read_text())
    rows = []
    for name in RUNS:
        if name not in left or name not in right:
            rows.append({"run": name, "tensors": None, "identical": None, "perplexity_equal": None})
            continue
        ta, tb = left[name]["tensors"], right[name]["tensors"]
        same = sum(1 for k in ta if tb.get(k) == ta[k])
        rows.append({"run": name, "tensors": len(ta), "identical": same if set(ta) == set(tb) else f"{same} (names differ)",
                     "perplexity_equal": left[name]["perplexity"] == right[name]["perplexity"],
                     "perplexity": right[name]["perplexity"]})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="run every case with one source tree")
    run.add_argument("--tree", type=Path, default=HERE.parent, help="source tree (its src/ is imported)")
    run.add_argument("--out", type=Path, required=True, help="folder for the outputs and hashes.json")
    run.add_argument("--only", help="comma list of runs: " + ", ".join(RUNS))
    cmp = sub.add_parser("compare", help="compare two run folders")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    if args.what == "run":
        run_all(args.tree.resolve(), args.out.resolve(), args.only.split(",") if args.only else None)
        return 0
    rows = compare(args.before, args.after)
    print("| run | tensors | bit-identical | perplexities equal |\n|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['run']} | {r['tensors']} | {r['identical']} | {r['perplexity_equal']} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "same_output.json").write_text(json.dumps(rows, indent=1))
    ok = all(r["tensors"] is not None and r["identical"] == r["tensors"] and r["perplexity_equal"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
