"""The fuzz test at length: N random command lines on a tiny model (see tests/fuzz_cases.py), of every kind:
`ebft run`, `ebft sweep`, `ebft plan`, `ebft eval --tasks` on damaged task files, resumed runs with damaged
checkpoints or changed commands, `ebft export` (users' files, its own source, a dead export's leftovers),
plugin registrations good and bad, and pairs of processes as two ranks (``--ranks`` of them).

    python benchmarks/fuzz.py --cases 500 --ranks 10    # prints how many exited 0 and 2, and any failure

Every case must exit 0 or 2 without a traceback, leave nothing under --out unless it succeeded, and
change no file outside --out; two ranks both succeed or both stop in one line. Writes
benchmarks/results/fuzz.json.
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
    ap.add_argument("--ranks", type=int, default=4, help="pairs of processes run as two ranks (slow: two imports)")
    args = ap.parse_args()
    import torch

    from conftest import TEXT, build_tokenizer, make_tiny_model
    from fuzz_cases import (KINDS, check_case, check_export_case, check_ranks, check_register_case,
                            check_resume_case, hostile_paths, make_case, make_plan_case, make_sweep_case,
                            make_task_case, reset)

    makers = {"run": make_case, "sweep": make_sweep_case, "plan": make_plan_case, "tasks": make_task_case}

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="ebft-fuzz-"))
    tokenizer = build_tokenizer()
    make_tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "corpus.txt").write_text(TEXT)
    paths = hostile_paths(root, root / "model", root / "corpus.txt")
    codes, kinds, failures, start = Counter(), Counter(), [], time.perf_counter()
    for seed in range(args.seed, args.seed + args.cases):
        rng = random.Random(seed)
        kind = rng.choice(KINDS)
        kinds[kind] += 1
        reset(root / "out")
        case = None
        try:
            if kind == "resume":
                code = check_resume_case(rng, paths, root)
            elif kind == "export":
                code = check_export_case(rng, paths, root)
            elif kind == "register":
                code = check_register_case(rng)
            else:
                case = makers[kind](rng, paths)
                code = check_case(case, root, root / "out")
            codes[code] += 1
        except Exception as exc:  # an assertion of the contract, or a crash: both are failures
            failures.append({"seed": seed, "kind": kind, "args": case, "why": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"FAIL seed {seed} ({kind}): {' '.join(case or [])}\n  {str(exc)[:300]}", file=sys.stderr)
    rank_codes = Counter()
    for i in range(args.ranks):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        reset(root / "out")
        try:
            rank_codes[str(check_ranks(random.Random(args.seed + i), paths, root, port))] += 1
        except Exception as exc:
            failures.append({"seed": args.seed + i, "kind": "ranks", "why": f"{type(exc).__name__}: {str(exc)[:500]}"})
            print(f"FAIL ranks {args.seed + i}: {str(exc)[:300]}", file=sys.stderr)
    result = {"cases": args.cases, "kinds": dict(kinds), "exit_0": codes[0], "exit_2": codes[2],
              "rank_pairs": args.ranks, "rank_exit_codes": dict(rank_codes), "failures": failures,
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps({k: v for k, v in result.items() if k != "failures"}), f"failures: {len(failures)}")
    out = ROOT / "benchmarks" / "results" / "fuzz.json"
    out.write_text(json.dumps(result, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
