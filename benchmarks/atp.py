"""ATP's common difference β on SmolLM2-135M (30 blocks): which default, against uniform and OWL.

Wanda at 50 % and 70 % unstructured sparsity, no recovery (``--recover none``), per-block sparsity from
``--allocation uniform``, ``owl`` (its defaults: λ 0.08, M 5) and ``atp`` at each β of ``--betas``.
Every point is one cell of ebft's resumable cell runner (:func:`ebft.sweeps.run_cells`): the model is
loaded once, each cell starts from the unpruned weights, finished cells are kept under ``--out`` and
skipped on a rerun. The data are the frontier's (benchmarks/frontier.py): calibration 32 × 256 windows
of the shared C4 sample, evaluation the first 20 × 512 tokens of WikiText-2 test and of PTB test.

    python benchmarks/atp.py                                   # 14 cells, ~25 min on 2 CPU cores
    python benchmarks/atp.py --sparsities 0.7 --betas 0.01,0.02

One cell as a single run (the 70 %, β = 0.01 point):

    ebft run --model builtin:smollm2 --method wanda --sparsity 0.7 --allocation atp --atp-beta 0.01 \\
        --recover none --calib ../shared/data/c4/c4_sample.jsonl --nsamples 32 --seqlen 256 \\
        --eval ../shared/data/wikitext-2-raw/wiki.test.raw ../shared/data/ptb/ptb.test.txt \\
        --eval-seqlen 512 --eval-windows 20 --out runs/atp-70-0.01

Writes ``benchmarks/results/atp.json`` (or ``--json``) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from frontier import _progress, add_data_arguments  # noqa: E402  (the data, the progress lines)

BETAS = (0.0, 0.002, 0.005, 0.01, 0.015)
SPARSITIES = (0.5, 0.7)


def allocations(betas) -> list[tuple[str, dict]]:
    """``(label, prune fields)`` of every point of one sparsity."""
    return [("uniform", {"allocation": "uniform"}), ("owl", {"allocation": "owl"}),
            *((f"atp β={beta:g}", {"allocation": "atp", "atp_beta": beta}) for beta in betas)]


def cell_for(sparsity: float, fields: dict, args):
    from ebft import RunConfig

    cfg = RunConfig(model=args.model, seed=0)
    cfg.prune.method, cfg.prune.sparsity = "wanda", sparsity
    for key, value in fields.items():
        setattr(cfg.prune, key, value)
    cfg.recover.method = "none"
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = args.calib, args.nsamples, args.seqlen
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = args.eval, args.eval_seqlen, args.eval_windows
    return cfg


def point(label: str, record: dict) -> dict:
    """What the table and the JSON keep of one cell."""
    plan = record.get("plan") or {}
    blocks = [b["sparsity"] for b in plan.get("blocks", [])]
    return {"allocation": label, "perplexity": record["perplexity"], "sparsity_measured": record["sparsity_measured"],
            "first_block": blocks[0] if blocks else record["sparsity"],
            "last_block": blocks[-1] if blocks else record["sparsity"], "blocks": blocks,
            "seconds": record["seconds"]}


def run_sparsity(sparsity: float, args) -> dict:
    from ebft.sweeps import cell_name, run_cells
    from ebft.validate import validate

    out = args.out / f"wanda-{sparsity:g}"
    points = allocations(args.betas)
    cells = [cell_for(sparsity, fields, args) for _, fields in points]
    if args.cached:
        kept = [i for i, c in enumerate(cells) if (out / "cells" / f"{cell_name(c)}.json").exists()]
        points, cells = [points[i] for i in kept], [cells[i] for i in kept]
        if not cells:
            return {}
    pairs = [(c, validate(c, need_out=False)) for c in cells]
    dense, finished = run_cells(cells[0], pairs, out, progress=_progress(f"wanda {sparsity:g}"))
    return {"dense": dense, "points": [point(label, rec) for (label, _), rec in zip(points, finished)]}


def table(results: dict) -> str:
    from ebft.report import markdown_table

    texts = list(next(iter(results.values()))["dense"])
    labels = list(dict.fromkeys(p["allocation"] for r in results.values() for p in r["points"]))
    head = ["allocation", *(f"{t} {s}" for s in results for t in texts)]
    rows = [["dense", *(r["dense"][t] for r in results.values() for t in texts)]]
    for label in labels:
        cells = []
        for r in results.values():
            p = next((p for p in r["points"] if p["allocation"] == label), None)
            cells += [None if p is None else round(p["perplexity"][t], 2) for t in texts]
        rows.append([label, *cells])
    spans = [[s, p["allocation"], f"{p['first_block']:.3f}", f"{p['last_block']:.3f}", f"{p['sparsity_measured']:.4f}"]
             for s, r in results.items() for p in r["points"]]
    return (markdown_table(head, rows) + "\n\nper-block sparsity (first, last block) and the model's measured "
            "overall sparsity\n\n" + markdown_table(["sparsity", "allocation", "first", "last", "overall"], spans))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", type=lambda t: [float(b) for b in t.split(",")], default=list(BETAS),
                    help="comma list of ATP's β (default: %(default)s)")
    ap.add_argument("--sparsities", type=lambda t: [float(s) for s in t.split(",")], default=list(SPARSITIES))
    ap.add_argument("--json", type=Path, default=HERE / "results" / "atp.json")
    add_data_arguments(ap, "atp")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for sparsity in args.sparsities:
        finished = run_sparsity(sparsity, args)
        if finished:
            results[f"{sparsity:.0%}"] = finished
    if not results:
        print(f"nothing to show: no cell has run under {args.out}", file=sys.stderr)
        return 1
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": args.model, "calib": [args.calib, args.nsamples, args.seqlen],
                                     "eval": [args.eval, args.eval_windows, args.eval_seqlen],
                                     "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
