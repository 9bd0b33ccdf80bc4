"""Scale measurements of `ebft run`: lazy loading's host memory, and 1 vs N torch.distributed ranks.

    # peak host memory of `ebft run --lazy` vs `--no-lazy` on a wide random Llama (Wanda 50 %, no recovery)
    python benchmarks/scale.py memory --hidden 1024 --layers 8

    # 1 process (N threads) vs torchrun with N gloo ranks (1 thread each): wall time, perplexity, weights
    python benchmarks/scale.py distributed --nproc 2 --name smollm2 -- --model builtin:smollm2 --calib offline \\
        --nsamples 16 --seqlen 128 --eval offline --eval-seqlen 256 --eval-windows 8 --epochs 2 --recover-batch-size 4

Each run is a fresh process. Memory: the peak resident set after the imports (Linux VmHWM, reset by the
run at its start and recorded in run.json) minus the resident set then, with glibc's mmap threshold
fixed at 1 MiB (its adaptive threshold keeps freed blocks of up to 32 MiB resident, which makes the
peak depend on the allocation history). Writes benchmarks/results/scale-<what>-*.json and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SRC = HERE.parent / "src"

WORKER = """
import json, sys
import torch
import transformers.models.llama.modeling_llama  # imports are not what is measured
from ebft.cli import main
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
base = rss()
code = main(sys.argv[1:])
record = json.loads(open(sys.argv[sys.argv.index("--out") + 1] + "/run.json").read())
print(json.dumps({"code": code, "baseline_mib": base / 2**20, "peak_mib": record["peak_memory_bytes"] / 2**20,
                  "growth_mib": (record["peak_memory_bytes"] - base) / 2**20, "wall_seconds": record["wall_seconds"],
                  "perplexity": record["perplexity"]}))
"""


def _env(threads: int) -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads),
            "MALLOC_MMAP_THRESHOLD_": "1048576"}


def memory(args) -> dict:
    spec = importlib.util.spec_from_file_location("lazy_memory", HERE / "lazy_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = bench.make_wide_model(tmp / "model", hidden=args.hidden, intermediate=4 * args.hidden,
                                      layers=args.layers, max_shard_size="100MB")
        text = tmp / "text.txt"
        text.write_text(" ".join(f"word{i % 97}" for i in range(20000)))
        rows = []
        for mode in ("--no-lazy", "--lazy"):
            run = ["run", "--model", str(tmp / "model"), "--calib", str(text), "--nsamples", "8", "--seqlen", "64",
                   "--eval", str(text), "--eval-seqlen", "64", "--eval-windows", "4", "--recover", "none",
                   "--out", str(tmp / mode.strip("-")), *args.extra]
            done = subprocess.run([sys.executable, "-c", WORKER, *run], capture_output=True, text=True,
                                  env=_env(1), check=False)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            rows.append({"mode": mode.strip("-"), **json.loads(done.stdout.strip().splitlines()[-1])})
        same = _same_tensors(tmp / "no-lazy", tmp / "lazy")
    mib = {k: round(v / 2**20, 1) for k, v in sizes.items()}
    print(f"model: hidden {args.hidden}, {args.layers} blocks; weights {mib['model_bytes']} MiB, one block "
          f"{mib['block_bytes']} MiB, outside the blocks {mib['outside_bytes']} MiB (fp32)")
    print(f"{'run':8} {'peak RSS growth (MiB)':>22} {'wall s':>8}")
    for r in rows:
        print(f"{r['mode']:8} {r['growth_mib']:>22.1f} {r['wall_seconds']:>8.1f}")
    print(f"saved tensors identical: {same}; perplexity {rows[0]['perplexity']} / {rows[1]['perplexity']}")
    return {"sizes_mib": mib, "runs": rows, "identical_tensors": same}


def distributed(args) -> dict:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for ranks in (1, args.nproc):
            out = tmp / f"ranks{ranks}"
            run = ["run", *args.extra, "--out", str(out)]
            if ranks == 1:  # one process with the cores the ranks share
                cmd, env = [sys.executable, "-m", "ebft", *run], _env(args.nproc)
            else:
                cmd, env = [torchrun, "--nproc-per-node", str(ranks), "-m", "ebft", *run], _env(1)
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            seconds = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            record = json.loads((out / "run.json").read_text())
            rows.append({"ranks": ranks, "threads_per_rank": args.nproc if ranks == 1 else 1,
                         "seconds": round(seconds, 1), "walk_recover_seconds": record["recovery"]["seconds"],
                         "perplexity": record["perplexity"]})
        diff = _max_relative_difference(tmp / "ranks1", tmp / f"ranks{args.nproc}")
    print(f"{'ranks':6} {'threads':>8} {'seconds':>8} {'recovery s':>10}  perplexity")
    for r in rows:
        print(f"{r['ranks']:6} {r['threads_per_rank']:>8} {r['seconds']:>8} {r['walk_recover_seconds']:>10}  "
              f"{r['perplexity']}")
    print(f"largest difference of a saved tensor, relative to its largest magnitude: {diff:.2e}")
    return {"command": args.extra, "runs": rows, "max_relative_tensor_difference": diff}


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same_tensors(a: Path, b: Path) -> bool:
    import torch

    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _max_relative_difference(a: Path, b: Path) -> float:
    ta, tb = _tensors(a), _tensors(b)
    return max(((ta[k].float() - tb[k].float()).abs().max() / ta[k].float().abs().max().clamp_min(1e-12)).item()
               for k in ta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--hidden", type=int, default=1024)
    mem.add_argument("--layers", type=int, default=8)
    dist = sub.add_parser("distributed")
    dist.add_argument("--nproc", type=int, default=2)
    for p in (mem, dist):
        p.add_argument("--name", help="results file suffix (default: the sizes, or the number of ranks)")
        p.add_argument("extra", nargs="*", help="more `ebft run` arguments (after --)")
    args = parser.parse_args()
    result = memory(args) if args.what == "memory" else distributed(args)
    RESULTS.mkdir(exist_ok=True)
    name = (f"scale-memory-h{args.hidden}-l{args.layers}" if args.what == "memory"
            else f"scale-distributed-{args.nproc}ranks")
    if args.name:
        name += f"-{args.name}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS / name}.json")


if __name__ == "__main__":
    main()
