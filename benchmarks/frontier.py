"""The time–quality frontier of recovery on SmolLM2-135M: perplexity against recovery wall time and
against training tokens, one line per method (EBFT with the paper's recipe, EBFT variants, LoRA).

Every point is one cell run by ebft's resumable cell runner (:func:`ebft.sweeps.run_cells`): the model
is loaded once, each cell starts from the unpruned weights, finished cells are kept in
``<out>/cells/*.json`` and skipped on a rerun (a changed setting is a new cell). Each cell is scored
on WikiText-2 (tuning) and PTB (the held-out domain the recipes were *not* tuned on).

    python benchmarks/frontier.py                                  # all three settings (hours on 2 CPU cores)
    python benchmarks/frontier.py --settings wanda:0.5 --points paper-e2,best-e2
    python benchmarks/frontier.py --list                           # the points and what each changes

Writes ``<out>/frontier.json``, ``<out>/frontier.md`` and ``<out>/frontier.png``; prints the table.
The data: calibration ``--calib`` (default: the shared C4 sample, as issue 13's target) 32 × 256;
evaluation the first 20 × 512 tokens of WikiText-2 test and of PTB test.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"
PTB = SHARED / "ptb" / "ptb.test.txt"
C4 = SHARED / "c4" / "c4_sample.jsonl"

# What each point sets on the recovery (everything else: the run's defaults). "paper": the reference
# code's recipe at the budget (lr 2e-4, batch 8, no weight decay), 1–8 epochs.
PAPER = {"method": "ebft", "lr": 2e-4, "batch_size": 8, "weight_decay": 0.0, "target": "dense-block",
         "train_norms": False, "loss": "mse"}
BEST = {**PAPER, "lr": 1e-3, "batch_size": 2, "target": "dense-model", "train_norms": True}
POINTS = {
    "none": ("pruned", {"method": "none"}),
    **{f"paper-e{e}": ("EBFT, paper recipe", {**PAPER, "epochs": e}) for e in (1, 2, 4, 8)},
    "lr1e-3-e2": ("EBFT variants", {**PAPER, "lr": 1e-3, "epochs": 2}),
    "lr3e-3-e2": ("EBFT variants", {**PAPER, "lr": 3e-3, "epochs": 2}),
    "b2-lr1e-3-e2": ("EBFT variants", {**PAPER, "lr": 1e-3, "batch_size": 2, "epochs": 2}),
    "b2-lr3e-3-e2": ("EBFT variants", {**PAPER, "lr": 3e-3, "batch_size": 2, "epochs": 2}),
    "b1-lr1e-3-e1": ("EBFT variants", {**PAPER, "lr": 1e-3, "batch_size": 1, "epochs": 1}),
    "norms-e2": ("EBFT variants", {**PAPER, "lr": 1e-3, "batch_size": 2, "train_norms": True, "epochs": 2}),
    "dense-model-e2": ("EBFT variants", {**PAPER, "lr": 1e-3, "batch_size": 2, "target": "dense-model", "epochs": 2}),
    "token-norm-e2": ("EBFT variants", {**PAPER, "lr": 1e-3, "batch_size": 2, "loss": "token-norm", "epochs": 2}),
    **{f"best-e{e}": ("EBFT, best recipe", {**BEST, "epochs": e}) for e in (1, 2, 4, 8)},
    **{f"lora-{n}": ("LoRA (masked)", {"method": "lora", "lora_steps": n, "lora_batch_size": 4, "lora_lr": 1e-3})
       for n in (25, 50, 100, 200)},
}
SETTINGS = {"wanda:0.5": ("wanda", 0.5), "wanda:0.7": ("wanda", 0.7), "sparsegpt:0.7": ("sparsegpt", 0.7)}
DEFAULT_POINTS = {"wanda:0.5": list(POINTS),
                  "wanda:0.7": ["none", "paper-e2", "paper-e8", "best-e1", "best-e2", "best-e4", "lora-50", "lora-200"],
                  "sparsegpt:0.7": ["none", "paper-e2", "paper-e8", "best-e1", "best-e2", "best-e4", "lora-50",
                                    "lora-200"]}


def cell_for(setting: str, point: str, args):
    from ebft import RunConfig

    method, sparsity = SETTINGS[setting]
    cfg = RunConfig(model=args.model, seed=0)
    cfg.prune.method, cfg.prune.sparsity = method, sparsity
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = args.calib, args.nsamples, args.seqlen
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = args.eval, args.eval_seqlen, args.eval_windows
    for key, value in POINTS[point][1].items():
        setattr(cfg.recover, key, value)
    return cfg


def training_tokens(cell: dict) -> int:
    """Tokens the recovery trained on: EBFT epochs × calibration tokens (every block sees them all);
    LoRA steps × batch × window length."""
    rec, calib = cell["config"]["recover"], cell["config"]["calib"]
    if rec["method"] == "lora":
        return rec["lora_steps"] * rec["lora_batch_size"] * calib["seqlen"]
    if rec["method"] == "none":
        return 0
    return rec["epochs"] * calib["nsamples"] * calib["seqlen"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--points", help="comma list of points (default: per setting, see --list)")
    ap.add_argument("--calib", default=str(C4) if C4.exists() else "offline-c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval", nargs="+", default=[str(p) for p in (WIKI, PTB) if p.exists()] or ["offline"])
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "frontier")
    ap.add_argument("--list", action="store_true", help="print the points and exit")
    ap.add_argument("--cached", action="store_true",
                    help="table and plot from the points already run (under --out), running nothing")
    args = ap.parse_args()
    if args.list:
        for name, (line, changes) in POINTS.items():
            print(f"{name:16s} {line:20s} {changes}")
        return 0
    logging.basicConfig(level=logging.WARNING)
    from ebft.sweeps import run_cells

    results = {}
    for setting in args.settings.split(","):
        points = args.points.split(",") if args.points else DEFAULT_POINTS[setting]
        out = args.out / setting.replace(":", "-")
        if args.cached:
            from ebft.sweeps import cell_name

            points = [p for p in points if (out / "cells" / f"{cell_name(cell_for(setting, p, args))}.json").exists()]
            if not points:
                continue
        cells = [cell_for(setting, p, args) for p in points]
        pairs = [(c, c.validate(need_out=False)) for c in cells]
        base = cells[0]
        dense, finished = run_cells(base, pairs, out, progress=_progress(setting))
        results[setting] = {"dense": dense, "points": [
            {"point": p, "line": POINTS[p][0], "perplexity": rec["perplexity"], "tokens": training_tokens(rec),
             "recovery_seconds": rec["recovery"]["seconds"], "config": rec["config"]["recover"]}
            for p, rec in zip(points, finished)]}
        print(table(setting, results[setting]))
    if not results:
        print(f"nothing to show: no point of {args.settings} has run under {args.out}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(results, indent=2))
    (args.out / "frontier.md").write_text("\n\n".join(table(s, r) for s, r in results.items()) + "\n")
    plot(results, args.out / "frontier.png")
    print(f"wrote {args.out}/frontier.json, frontier.md, frontier.png")
    return 0


def table(setting: str, result: dict) -> str:
    from ebft.report import markdown_table

    texts = list(result["dense"])
    pruned = next((p["perplexity"] for p in result["points"] if p["point"] == "none"), None)

    def closed(p, t):  # the share of the pruning gap the point closed on text t
        if pruned is None or pruned[t] <= result["dense"][t]:
            return None
        return f"{(pruned[t] - p['perplexity'][t]) / (pruned[t] - result['dense'][t]):.1%}"

    rows = [["dense", "", "", "", *(x for t in texts for x in (result["dense"][t], ""))]]
    for p in result["points"]:
        rows.append([p["point"], p["line"], p["tokens"], p["recovery_seconds"],
                     *(x for t in texts for x in (p["perplexity"].get(t), closed(p, t)))])
    head = ["point", "line", "training tokens", "recovery s", *(x for t in texts for x in (t, "gap closed"))]
    return f"### {setting}\n\n" + markdown_table(head, rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for row, (setting, result) in zip(axes, results.items()):
        text = next(iter(result["dense"]))
        pruned = next((p["perplexity"][text] for p in result["points"] if p["point"] == "none"), None)
        for ax, x_key, x_label in ((row[0], "recovery_seconds", "recovery wall time (s, 2 CPU cores)"),
                                   (row[1], "tokens", "training tokens")):
            lines: dict[str, list] = {}
            for p in result["points"]:
                if p["point"] != "none":
                    lines.setdefault(p["line"], []).append((p[x_key], p["perplexity"][text]))
            for line, pts in lines.items():
                pts.sort()
                joined = len(pts) > 1 and "variants" not in line  # variants are separate settings, not a budget line
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-" if joined else "o", label=line)
            ax.axhline(result["dense"][text], color="black", linestyle="--", label="dense")
            if pruned is not None:
                ax.axhline(pruned, color="grey", linestyle=":", label="pruned, no recovery")
            ax.set_xscale("symlog" if x_key == "tokens" else "log")
            ax.set_yscale("log")
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"perplexity ({text})")
            ax.set_title(setting)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _progress(setting: str):
    def report(event, **info):
        if event in ("cell_start", "cell_skip"):
            print(f"[{setting}] {event.split('_')[1]} {info['index'] + 1}/{info['total']}: {info['name']}",
                  file=sys.stderr, flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())
