"""The fuzz test at length: N random `ebft run` command lines on a tiny model (see tests/fuzz_cases.py).

    python benchmarks/fuzz.py --cases 500          # prints how many exited 0 and 2, and any failure

Every case must exit 0 or 2 without a traceback, leave nothing under --out unless it succeeded, and
change no file outside --out. Writes benchmarks/results/fuzz.json.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1000, help="first case's seed (the unit test uses 0..39)")
    args = ap.parse_args()
    import torch

    from conftest import TEXT, build_tokenizer, make_tiny_model
    from fuzz_cases import check_case, hostile_paths, make_case, reset

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ebft-fuzz-"))
    tokenizer = build_tokenizer()
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text(TEXT)
    paths = hostile_paths(root, root / "model", root / "corpus.txt")
    codes, failures, start = Counter(), [], time.perf_counter()
    for seed in range(args.seed, args.seed + args.cases):
        case = make_case(random.Random(seed), paths)
        reset(root / "out")
        try:
            codes[check_case(case, root, root / "out")] += 1
        except Exception as exc:  # an assertion of the contract, or a crash: both are failures
            failures.append({"seed": seed, "args": case, "why": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"FAIL seed {seed}: {' '.join(case)}\n  {str(exc)[:300]}", file=sys.stderr)
    result = {"cases": args.cases, "exit_0": codes[0], "exit_2": codes[2], "failures": failures,
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}), f"failures: {len(failures)}")
    out = ROOT / "benchmarks" / "results" / "fuzz.json"
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
