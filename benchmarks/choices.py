"""Two defaults where ebft departs from a reference implementation, measured on SmolLM2 (issue 20):

- FLAP's bias compensation (``--flap-bias-stats``): the removed channels' mean input taken from the pruned
  chain's inputs to the block (``chain``, what the block really receives in the pruned model) or from the
  dense model's (``dense``, FLAP's reference code) — FLAP adaptive and uniform at 20 %, without recovery
  and with one epoch of EBFT (best recipe);
- DSnoT on the MLP linears too (``--dsnot-skip-mlp`` off) or on the attention linears only (on, the DSnoT
  reference code's default) — after Wanda at 50, 60 and 70 %, with the end-to-end guard off
  (``--recover-guard 0``: with it, the guard's fallback would be compared instead of DSnoT's own result).

Each pair runs as sweep cells (resumable under ``--out``) on the frontier's data: 32 × 256 calibration
windows of C4 (the shared sample; ``offline-c4`` without it), WikiText-2 and PTB test, 20 × 512 each.

    python benchmarks/choices.py                   # 12 cells, about 25 min on 2 CPU cores
    python benchmarks/choices.py --cached          # the table of what has run

Writes ``<out>/choices.json`` and prints the table: perplexity per text, and the relative change of the
second choice against the first.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402  (the data, the cell builder)

# (question, setting, recovery fields, the field compared, its two values)
QUESTIONS = [
    ("flap bias stats", "flap-adaptive:0.2", {"method": "none"}, ("prune", "flap_bias_stats"), ("chain", "dense")),
    ("flap bias stats", "flap-adaptive:0.2", {"method": "ebft", "epochs": 1}, ("prune", "flap_bias_stats"),
     ("chain", "dense")),
    ("flap bias stats", "flap-uniform:0.2", {"method": "none"}, ("prune", "flap_bias_stats"), ("chain", "dense")),
    ("dsnot skip mlp", "wanda:0.5", {"method": "dsnot", "guard": 0}, ("recover", "dsnot_skip_mlp"), (False, True)),
    ("dsnot skip mlp", "wanda:0.6", {"method": "dsnot", "guard": 0}, ("recover", "dsnot_skip_mlp"), (False, True)),
    ("dsnot skip mlp", "wanda:0.7", {"method": "dsnot", "guard": 0}, ("recover", "dsnot_skip_mlp"), (False, True)),
]


def cell(setting: str, recovery: dict, field: tuple[str, str], value, args):
    cfg = frontier.cell_for(setting, "none", args)
    for key, v in recovery.items():
        setattr(cfg.recover, key, v)
    setattr(getattr(cfg, field[0]), field[1], value)
    return cfg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    frontier.add_data_arguments(ap, "choices")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ebft.report import markdown_table
    from ebft.sweeps import cell_name, run_cells
    from ebft.validate import validate

    rows, results = [], []
    for question, setting, recovery, field, values in QUESTIONS:
        out = args.out / setting.replace(":", "-")
        cells = [cell(setting, recovery, field, v, args) for v in values]
        if args.cached and not all((out / "cells" / f"{cell_name(c)}.json").exists() for c in cells):
            continue
        dense, finished = run_cells(cells[0], [(c, validate(c, need_out=False)) for c in cells], out)
        texts = list(dense)
        first, second = (f["perplexity"] for f in finished)
        results.append({"question": question, "setting": setting, "recovery": recovery, "field": field[1],
                        "values": list(values), "dense": dense, "perplexity": [first, second],
                        "seconds": [f["seconds"] for f in finished],
                        "guard": [((f.get("recovery") or {}).get("guard") or {}).get("kept") for f in finished]})
        rows.append([question, setting, recovery["method"], f"{values[0]} → {values[1]}",
                     *(f"{first[t]:.2f} → {second[t]:.2f} ({second[t] / first[t] - 1:+.1%})" for t in texts),
                     " / ".join(str(kept or "off") for kept in results[-1]["guard"])])
        print(rows[-1], file=sys.stderr, flush=True)
    if not results:
        print(f"nothing has run under {args.out}", file=sys.stderr)
        return 1
    print(markdown_table(["question", "setting", "recovery", "choice", *(Path(t).name for t in texts),
                                         "guard kept"], rows))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "choices.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
