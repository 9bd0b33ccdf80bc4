"""Structured sparsity on SmolLM2-135M: FLAP (uniform and adaptive) at 20 % and 30 % of the blocks'
parameters, without recovery, + EBFT, + LoRA at EBFT's training tokens and at EBFT's wall time.

Each configuration is one ``ebft run`` through the Python API (skipped when its run.json exists), so
every row has the run's own record: parameters dense / pruned / saved, file size, prefill and
generation tokens/s of the dense and the final model (same process, same machine), WikiText-2
perplexity at 2048 tokens; the saved model is then evaluated again at 128 tokens per window (the
protocol FLAP and LLM-Pruner report).

    python benchmarks/structured.py                       # docs/results.md's table (about an hour on 2 CPU cores)
    python benchmarks/structured.py --ratios 0.2 --structures adaptive --recoveries none,ebft

Prints a markdown table and writes <out>/structured.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4_sample.jsonl"


def config(args, structure: str, ratio: float, recovery: str, lora_steps: int | None = None):
    from ebft import RunConfig

    name = f"flap-{structure}-{int(ratio * 100)}-{recovery}" + (f"{lora_steps}" if lora_steps else "")
    if recovery == "ebft" and args.window > 1:
        name += f"-w{args.window}"
    if args.calib == "self":
        name += "-self"
    cfg = RunConfig(model=args.model, out=str(args.out / name), seed=0)
    cfg.prune.method, cfg.prune.sparsity, cfg.prune.flap_structure = "flap", ratio, structure
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = args.calib, args.nsamples, args.seqlen
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = [args.eval], args.eval_seqlen, args.eval_windows
    cfg.eval.speed = True
    cfg.recover.method = "lora" if recovery.startswith("lora") else recovery
    if recovery != "none" and not recovery.startswith("lora"):
        cfg.recover.epochs = args.epochs
    if recovery == "ebft" and args.window > 1:
        cfg.recover.window = args.window
    if lora_steps:
        cfg.recover.lora_steps, cfg.recover.lora_batch_size, cfg.recover.lora_lr = lora_steps, 4, 1e-3
    return name, cfg


def run_one(name, cfg) -> dict:
    from ebft import run

    path = Path(cfg.out) / "run.json"
    if path.exists():
        return json.loads(path.read_text())
    print(f"running {name}", file=sys.stderr, flush=True)
    return run(cfg)


def ppl_at(out: str, source: str, seqlen: int, windows: int) -> float:
    from ebft import evaluate

    return evaluate(out, sources=[source], seqlen=seqlen, windows=windows)[Path(source).name]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--structures", default="uniform,adaptive")
    ap.add_argument("--recoveries", default="none,ebft,lora-tokens,lora-time")
    ap.add_argument("--calib", default=str(C4) if C4.exists() else "offline-c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--window", type=int, default=1, help="EBFT's joint window (--recover-window)")
    ap.add_argument("--eval", default=str(WIKI) if WIKI.exists() else "offline")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--short-windows", type=int, default=512, help="windows of 128 tokens for the FLAP protocol")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "structured")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows, records = [], {}
    rows.append(["dense", "", None, None, ppl_at(args.model, args.eval, 128, args.short_windows), "", "", "", None,
                 None, None])
    tokens = args.nsamples * args.seqlen * args.epochs  # what EBFT trains each block on
    for structure in args.structures.split(","):
        for ratio in map(float, args.ratios.split(",")):
            done: dict[str, dict] = {}
            for recovery in args.recoveries.split(","):
                steps = None
                if recovery == "lora-tokens":  # LoRA on as many training tokens as EBFT
                    steps = max(1, tokens // (4 * args.seqlen))
                elif recovery == "lora-time":  # LoRA for EBFT's recovery wall time, at its own measured pace
                    if "ebft" not in done or "lora-tokens" not in done:
                        continue
                    per_step = done["lora-tokens"]["recovery"]["seconds"] / done["lora-tokens"]["config"]["recover"]["lora_steps"]
                    steps = max(1, round(done["ebft"]["recovery"]["seconds"] / per_step))
                name, cfg = config(args, structure, ratio, recovery, steps)
                record = done[recovery] = records[name] = run_one(name, cfg)
                final = "pruned" if recovery == "none" else "recovered"
                text = next(iter(record["perplexity"]))
                short = record.setdefault("ppl_128", ppl_at(cfg.out, args.eval, 128, args.short_windows))
                s, sp = record["structure"], record.get("speed", {})
                rows.append([f"{structure} {ratio:.0%}", recovery + (f" ({steps} steps)" if steps else ""),
                             record["perplexity"][text]["dense"], record["perplexity"][text][final], short,
                             f"{s['params_pruned'] / 1e6:.1f}M", f"{s['params_saved'] / 1e6:.1f}M",
                             f"{s['file_bytes'] / 2**20:.0f}", sp.get(final, {}).get("prefill_tokens_per_s"),
                             sp.get(final, {}).get("generate_tokens_per_s"), record["recovery"]["seconds"]])
                dense_speed = sp.get("dense", {})
    from ebft.report import markdown_table

    head = ["FLAP", "recovery", "dense ppl", "ppl @2048", "ppl @128", "params", "saved params", "file MiB",
            "prefill tok/s", "generate tok/s", "recovery s"]
    print(markdown_table(head, rows))
    if records:
        print(f"dense speed (last run): {dense_speed}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "structured.json").write_text(json.dumps({"rows": rows, "head": head, "records": {
        k: {key: v.get(key) for key in ("perplexity", "structure", "speed", "recovery", "plan", "ppl_128")}
        for k, v in records.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
