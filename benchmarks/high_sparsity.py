"""High sparsity on SmolLM2-135M: no recovery, EBFT with the paper's recipe and with the best one, for Wanda
and SparseGPT at 60 / 70 / 80 % (uniform and OWL) and 2:4 — one table with times, and whether any recovery
left the model worse end to end than not recovering (the guard's verdict on its held-out windows, and the
evaluation texts themselves).

Every point is one sweep cell (``benchmarks/frontier.py``'s runner, resumable under ``--out``):

    python benchmarks/high_sparsity.py                       # 42 cells, about 90 min on 2 CPU cores
    python benchmarks/high_sparsity.py --cached              # the table of what has run
    python benchmarks/high_sparsity.py --guard-on --recover-guard 4 --out runs/hs-calib   # the guard on the calibration text alone

The guard (``--recover-guard``, here 16 windows per text) also checks the validation splits of WikiText-2 and
PTB at the evaluation length (``--recover-guard-on``; their test splits are what the table scores).

Writes ``<out>/high_sparsity.json`` and ``.md``; prints the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import frontier  # noqa: E402  (the points, the cell runner)

SETTINGS = [f"{m}:{s}{o}" for m in ("wanda", "sparsegpt") for s in ("0.6", "0.7", "0.8") for o in ("", ":owl")] + [
    "wanda:2:4", "sparsegpt:2:4"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {frontier.SETTINGS_HELP}")
    ap.add_argument("--epochs", type=int, default=2, choices=(1, 2, 4, 8), help="EBFT epochs of both recipes")
    frontier.add_data_arguments(ap, "high_sparsity", calib="offline", nsamples=16, eval_windows=8)
    valid = [frontier.SHARED / "wikitext-2-raw" / "wiki.valid.raw", frontier.SHARED / "ptb" / "ptb.valid.txt"]
    ap.add_argument("--guard-on", nargs="*", default=[str(p) for p in valid if p.exists()], metavar="TEXT",
                    help="the guard's further texts (--recover-guard-on; default: the validation splits of the "
                    "evaluation texts, WikiText-2 and PTB; none: the held-out calibration windows alone)")
    ap.set_defaults(recover_guard=16)  # each further text: 16 × 512 tokens of its validation split
    args = ap.parse_args()
    settings = args.settings.split(",")
    for setting in settings:
        try:
            frontier.parse_setting(setting)
        except ValueError as e:
            ap.error(str(e))
    logging.basicConfig(level=logging.WARNING)
    points = ["none", f"paper-e{args.epochs}", f"best-e{args.epochs}"]
    results = {}
    for setting in settings:
        done = frontier.run_setting(setting, points, args)
        if done is not None:
            results[setting] = done
            print(f"{setting}: " + ", ".join(f"{p['point']} {fmt(first(p['perplexity']))}" for p in done["points"]),
                  file=sys.stderr, flush=True)
    if not results:
        print(f"nothing to show under {args.out}", file=sys.stderr)
        return 1
    text = table(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "high_sparsity.json").write_text(json.dumps(results, indent=2))
    (args.out / "high_sparsity.md").write_text(text + "\n")
    worse = [row for row in rows(results) if row[-1]]
    print(f"{len(worse)} of {len(rows(results))} recovered points end worse than no recovery on an evaluation text")
    return 0


def first(perplexity: dict) -> float:
    return next(iter(perplexity.values()))


def fmt(x) -> str:
    return "-" if x is None else (f"{x:.3g}" if x >= 1e4 else f"{x:.1f}")


def rows(results: dict) -> list[list]:
    """One row per recovered point: setting, recipe, perplexity per text (pruned → recovered), seconds,
    the guard's verdict, and the texts on which the recovered model is worse than the pruned one."""
    out = []
    for setting, result in results.items():
        by_point = {p["point"]: p for p in result["points"]}
        pruned = by_point.get("none")
        for name, p in by_point.items():
            if name == "none":
                continue
            texts = list(p["perplexity"])
            worse = [Path(t).name for t in texts if pruned and p["perplexity"][t] > pruned["perplexity"][t]]
            guard = (p.get("guard") or {}).get("kept", "-")
            out.append([setting, name.split("-")[0], *(
                f"{fmt(pruned['perplexity'][t]) if pruned else '-'} → {fmt(p['perplexity'][t])}" for t in texts),
                p["recovery_seconds"], guard, ", ".join(worse)])
    return out


def table(results: dict) -> str:
    from ebft.report import markdown_table

    texts = [Path(t).name for t in next(iter(results.values()))["dense"]]
    dense = next(iter(results.values()))["dense"]
    head = ["setting", "recipe", *(f"{t} (dense {fmt(v)}): pruned → recovered" for t, v in zip(texts, dense.values())),
            "recovery s", "guard kept", "worse than pruned on"]
    return markdown_table(head, rows(results))


if __name__ == "__main__":
    sys.exit(main())
