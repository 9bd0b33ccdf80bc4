"""How long ``--calib self`` takes to generate its windows, and what they read like (issue 28, item 1).

Loads SmolLM2-135M (``builtin:smollm2``), generates ``N × seqlen`` windows for each ``--sizes`` entry with
the default sampling settings (temperature 1, top-p 0.95, batches of 16; the cache is not read or written:
each size is generated from scratch), and prints seconds, tokens per second and the first windows as text.
Writes benchmarks/results/self_calib.json.

    python benchmarks/self_calib.py --sizes 32x256,128x256 --show 3
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="32x256,128x256", help="windows x tokens, comma-separated")
    ap.add_argument("--batch", type=int, default=16, help="windows generated at once (--self-batch-size)")
    ap.add_argument("--show", type=int, default=3, help="windows printed as text (of the first size)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    from ebft.models import load_model
    from ebft.selfcalib import Sampling, generate_windows

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model("builtin:smollm2", "float32")
    rows = []
    for size in args.sizes.split(","):
        n, seqlen = (int(x) for x in size.lower().split("x"))
        count = -(-n // args.batch) * args.batch
        start = time.perf_counter()
        windows = generate_windows(model, tokenizer, 0, count, seqlen, 0, Sampling(batch=args.batch), "cpu")
        seconds = time.perf_counter() - start
        rows.append({"windows": count, "seqlen": seqlen, "batch": args.batch, "seconds": round(seconds, 1),
                     "tokens_per_s": round(count * seqlen / seconds, 1), "threads": torch.get_num_threads()})
        print(json.dumps(rows[-1]), flush=True)
        if len(rows) == 1:
            for i, window in enumerate(windows[:args.show]):
                print(f"--- window {i}: {tokenizer.decode(window)!r}", flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "self_calib.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
