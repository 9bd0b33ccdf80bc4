"""Where a whole `ebft run` spends its time and its disk: time to the first block by phase, each block's time
split into statistics / pruning / training / streams / checkpoint, and the bytes the process writes.

The GPU claims of issue 27 (checkpoints rewriting gigabytes of activations, a GGUF parsed four times) have
this CPU proxy: the same phases, timed from outside, for any source tree of ebft, so that two trees are
compared on one machine in one sitting:

    git worktree add /tmp/before 9f962fa
    python benchmarks/run_phases.py --tree /tmp/before --label before
    python benchmarks/run_phases.py --tree .           --label after
    python benchmarks/run_phases.py --compare before after       # the table of both, and the ratios

Each run is a fresh process (``python -m ebft run`` with ``PYTHONPATH=<tree>/src``) with timers wrapped
around functions both trees have (``ebft.pipeline.load``, ``prepare_data``, ``capture_stream``, ``allocate``,
``ebft.walk.dense_pass``, ``BlockWork.prune`` / ``recover``, ``Streams.advance``, the checkpoint's writers and
the block shard writer), so nothing in the library is changed to be measured. Bytes written are the process's
``wchar`` (/proc/self/io: every ``write`` call, page cache included), in all and inside the checkpoint's writers.

Budgets (SmolLM2-135M from the built-in GGUF, Wanda 50 %, EBFT with the default recipe, the shared C4 sample):
``small`` 32 × 256 windows, 2 epochs; ``mid`` 128 × 512 windows, 2 epochs. Evaluation: WikiText-2 test,
20 windows of 512 tokens. ``--blocks K`` stops the walk after K blocks (the per-block figures are means over
the blocks run; time to the first block does not depend on it). Writes
``benchmarks/results/run_phases-<label>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SHARED = HERE.parent.parent / "shared" / "data"
C4 = SHARED / "c4" / "c4_sample.jsonl"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
BUDGETS = {"small": dict(nsamples=32, seqlen=256, epochs=2), "mid": dict(nsamples=128, seqlen=512, epochs=2)}

# The worker: runs `ebft run` in this process with timers around named functions (those a tree lacks are skipped).
WORKER = r'''
import importlib, json, os, sys, time
import torch

def wchar():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("wchar:")).split()[1])

T0, W0 = time.perf_counter(), wchar()
state = {"first_block": None, "block": None, "blocks": [], "before": {}, "stop_after": int(os.environ["STOP_AFTER"])}

class Stop(BaseException):
    pass

def account(label, seconds, written):
    if state["first_block"] is None:
        d = state["before"]
    elif state["block"] is not None:
        d = state["block"]
    else:
        return
    d[label] = d.get(label, 0.0) + seconds
    if written:
        d[label + "_bytes"] = d.get(label + "_bytes", 0) + written

def wrap(module, path, label):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    owner, _, attr = path.rpartition(".")
    obj = mod
    for part in filter(None, owner.split(".")):
        obj = getattr(obj, part, None)
        if obj is None:
            return
    fn = getattr(obj, attr, None)
    if fn is None:
        return
    depth = {"n": 0}
    def timed(*a, **k):
        if depth["n"]:
            return fn(*a, **k)
        depth["n"] += 1
        t, w = time.perf_counter(), wchar()
        try:
            return fn(*a, **k)
        finally:
            depth["n"] -= 1
            account(label, time.perf_counter() - t, wchar() - w)
    setattr(obj, attr, timed)

import ebft.walk as walk
for module, path, label in [
        ("ebft.pipeline", "load", "load"), ("ebft.pipeline", "prepare_data", "tokenize"),
        ("ebft.pipeline", "capture_stream", "capture"), ("ebft.streams", "Streams.open", "capture"),
        ("ebft.pipeline", "allocate", "plan"), ("ebft.pipeline", "Measurements.dense", "dense extras"),
        ("ebft.checkpoint", "RunCheckpoint.open", "checkpoint"), ("ebft.checkpoint", "RunCheckpoint.begin", "checkpoint"),
        ("ebft.walk", "dense_pass", "statistics"), ("ebft.walk", "BlockWork.prune", "prune"),
        ("ebft.walk", "BlockWork.recover", "training"), ("ebft.streams", "Streams.advance", "streams"),
        ("ebft.checkpoint", "RunCheckpoint.save", "checkpoint"), ("ebft.checkpoint", "RunCheckpoint.save_masks", "checkpoint"),
        ("ebft.checkpoint", "RunCheckpoint.save_pruned", "checkpoint"),  # trees before RunCheckpoint's split
        ("ebft.checkpoint", "PrunedBlocks.save", "checkpoint"), ("ebft.weights", "ShardWriter.add", "checkpoint"),
        ("ebft.walk", "WalkState._resume", "resume")]:
    wrap(module, path, label)

load, done = walk.WalkState.load, walk.WalkState.done
def timed_load(self, index):
    now = time.perf_counter()
    if state["first_block"] is None:
        state["first_block"] = now - T0
        state["before_bytes"] = wchar() - W0
    if len(state["blocks"]) >= state["stop_after"]:
        raise Stop()
    state["block"] = {"index": index, "start": now}
    return load(self, index)
def timed_done(self, index, *a, **k):
    out = done(self, index, *a, **k)
    b = state["block"]
    b["seconds"] = time.perf_counter() - b.pop("start")
    state["blocks"].append(b)
    state["block"] = None
    return out
walk.WalkState.load, walk.WalkState.done = timed_load, timed_done

from ebft.cli import main
try:
    code = main(sys.argv[1:])
except Stop:
    code = "stopped"
out = {"code": code, "total_seconds": time.perf_counter() - T0, "total_bytes": wchar() - W0,
       "first_block_seconds": state["first_block"], "before_first_block": state["before"],
       "before_first_block_bytes": state.get("before_bytes"), "blocks": state["blocks"]}
print("PHASES " + json.dumps(out))
'''

BLOCK_PHASES = ("statistics", "prune", "training", "streams", "checkpoint")
FIRST_PHASES = ("load", "tokenize", "capture", "plan", "checkpoint", "dense extras")


def run_args(budget: dict, out: Path, extra: list[str]) -> list[str]:
    return ["run", "--model", "builtin:smollm2", "--calib", str(C4), "--nsamples", str(budget["nsamples"]),
            "--seqlen", str(budget["seqlen"]), "--epochs", str(budget["epochs"]), "--eval", str(WIKI),
            "--eval-seqlen", "512", "--eval-windows", "20", "--out", str(out), "--overwrite", *extra]


def measure(tree: Path, budget: str, blocks: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("RUN_PHASES_TMP")) as tmp:
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve() / "src"), "STOP_AFTER": str(blocks),
               "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-c", WORKER, *run_args(BUDGETS[budget], Path(tmp) / "run", extra)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("PHASES ")), None)
        if line is None:
            raise SystemExit(f"run_phases: the run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(line[len("PHASES "):])


def summarise(raw: dict) -> dict:
    blocks = raw["blocks"]
    n = max(len(blocks), 1)
    mean = {p: sum(b.get(p, 0.0) for b in blocks) / n for p in BLOCK_PHASES}
    mean["block"] = sum(b["seconds"] for b in blocks) / n
    mean["other"] = mean["block"] - sum(mean[p] for p in BLOCK_PHASES)
    ckpt_bytes = sum(b.get("checkpoint_bytes", 0) for b in blocks) / n
    return {"first_block_seconds": raw["first_block_seconds"],
            "before_first_block": {p: raw["before_first_block"].get(p, 0.0) for p in FIRST_PHASES},
            "blocks_run": len(blocks), "per_block_seconds": mean, "checkpoint_share": mean["checkpoint"] / mean["block"],
            "checkpoint_bytes_per_block": ckpt_bytes, "bytes_written": raw["total_bytes"],
            "total_seconds": raw["total_seconds"], "code": raw["code"]}


def table(results: dict[str, dict]) -> str:
    labels = list(results)
    budgets = sorted({b for r in results.values() for b in r["budgets"]})
    rows = []
    for budget in budgets:
        cells = {lab: results[lab]["budgets"].get(budget) for lab in labels}
        rows.append(f"\n{budget} ({results[labels[0]]['budgets'][budget]['blocks_run']} blocks measured)")
        rows.append("| phase | " + " | ".join(labels) + " |")
        rows.append("|---|" + "---:|" * len(labels))

        def row(name, get, fmt="{:.2f}"):
            vals = [get(cells[lab]) if cells[lab] else None for lab in labels]
            rows.append(f"| {name} | " + " | ".join("-" if v is None else fmt.format(v) for v in vals) + " |")

        row("time to first block (s)", lambda c: c["first_block_seconds"])
        for p in FIRST_PHASES:
            row(f"  {p}", lambda c, p=p: c["before_first_block"][p])
        row("per block (s)", lambda c: c["per_block_seconds"]["block"])
        for p in (*BLOCK_PHASES, "other"):
            row(f"  {p}", lambda c, p=p: c["per_block_seconds"][p])
        row("checkpoint share of block time", lambda c: 100 * c["checkpoint_share"], "{:.1f} %")
        row("checkpoint MB per block", lambda c: c["checkpoint_bytes_per_block"] / 1e6, "{:.1f}")
        row("MB written by the run", lambda c: c["bytes_written"] / 1e6, "{:.1f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=".", help="the source tree whose src/ is measured")
    ap.add_argument("--label", default="after", help="name of this measurement (results/run_phases-<label>.json)")
    ap.add_argument("--budgets", default="small,mid", help="comma list of: " + ", ".join(BUDGETS))
    ap.add_argument("--blocks", type=int, default=4, help="blocks to run at each budget (default 4; 30: all)")
    ap.add_argument("--compare", nargs="+", metavar="LABEL", help="print the table of measurements already made")
    ap.add_argument("extra", nargs="*", help="further `ebft run` arguments (after --)")
    args = ap.parse_args(argv)
    if args.compare:
        results = {lab: json.loads((RESULTS / f"run_phases-{lab}.json").read_text()) for lab in args.compare}
        print(table(results))
        return 0
    if not (C4.exists() and WIKI.exists()):
        raise SystemExit(f"run_phases: needs the shared data ({C4}, {WIKI})")
    out = {"tree": str(Path(args.tree).resolve()), "extra": args.extra, "budgets": {}}
    for budget in args.budgets.split(","):
        raw = measure(Path(args.tree), budget, args.blocks, args.extra)
        out["budgets"][budget] = {**summarise(raw), "raw": raw}
        print(f"{budget}: first block after {raw['first_block_seconds']:.1f} s, "
              f"{out['budgets'][budget]['per_block_seconds']['block']:.2f} s per block", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"run_phases-{args.label}.json").write_text(json.dumps(out, indent=2))
    print(table({args.label: out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
