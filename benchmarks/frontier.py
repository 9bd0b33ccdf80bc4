"""The time–quality frontier of recovery on SmolLM2-135M: perplexity against recovery wall time and
against training tokens, one line per method (EBFT with the paper's recipe, EBFT variants, LoRA).

Every point is one cell run by ebft's resumable cell runner (:func:`ebft.sweeps.run_cells`): the model
is loaded once, each cell starts from the unpruned weights, finished cells are kept in
``<out>/cells/*.json`` and skipped on a rerun (a changed setting is a new cell). Each cell is scored
on WikiText-2 (tuning) and PTB (the held-out domain the recipes were *not* tuned on).

    python benchmarks/frontier.py                                  # EBFT vs LoRA, three settings (hours on 2 CPU cores)
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

# What each point sets on the recovery (everything else: the run's defaults). "paper" and "best" are the
# recipes as ebft defines them (ebft.recover.recipes); the variants start from the earlier paper-like base
# (lr 2e-4, batch 8, no weight decay, norms frozen) and change one or two settings each.
VARIANT_BASE = {"method": "ebft", "lr": 2e-4, "batch_size": 8, "weight_decay": 0.0, "target": "dense-block",
                "train_norms": False, "loss": "mse"}
LORA_STEPS = (25, 50, 100, 200, 400)
POINTS = {
    "none": ("pruned", {"method": "none"}),
    **{f"paper-e{e}": ("EBFT, paper recipe", {"method": "ebft", "recipe": "paper", "epochs": e}) for e in (1, 2, 4, 8)},
    "lr1e-3-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 1e-3, "epochs": 2}),
    "lr3e-3-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 3e-3, "epochs": 2}),
    "b2-lr1e-3-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 1e-3, "batch_size": 2, "epochs": 2}),
    "b2-lr3e-3-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 3e-3, "batch_size": 2, "epochs": 2}),
    "b1-lr1e-3-e1": ("EBFT variants", {**VARIANT_BASE, "lr": 1e-3, "batch_size": 1, "epochs": 1}),
    "norms-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 1e-3, "batch_size": 2, "train_norms": True, "epochs": 2}),
    "dense-model-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 1e-3, "batch_size": 2, "target": "dense-model",
                                         "epochs": 2}),
    "token-norm-e2": ("EBFT variants", {**VARIANT_BASE, "lr": 1e-3, "batch_size": 2, "loss": "token-norm",
                                        "epochs": 2}),
    **{f"best-e{e}": ("EBFT, best recipe", {"method": "ebft", "recipe": "best", "epochs": e}) for e in (1, 2, 4, 8)},
    **{f"gradual-e{e}": ("EBFT, moving mask (ebft-gradual)", {"method": "ebft-gradual", "recipe": "best", "epochs": e})
       for e in (1, 2, 4, 8)},
    **{f"best-e{e}-w{k}": ("EBFT, joint windows", {"method": "ebft", "recipe": "best", "epochs": e, "window": k})
       for e in (1, 2, 4) for k in (2, 3, 4, 5)},
    **{f"self-best-e{e}": ("EBFT, self-generated calibration", {"calib.source": "self", "method": "ebft",
                                                                "recipe": "best", "epochs": e}) for e in (1, 2, 4)},
    **{f"self-best-e{e}-w{k}": ("EBFT, self-generated calibration, joint windows",
                                {"calib.source": "self", "method": "ebft", "recipe": "best", "epochs": e, "window": k})
       for e in (1, 2, 4) for k in (2, 3)},
    "atp-none": ("pruned, ATP allocation", {"prune.allocation": "atp", "method": "none"}),
    **{f"atp-best-e{e}": ("EBFT, ATP allocation", {"prune.allocation": "atp", "method": "ebft", "recipe": "best",
                                                   "epochs": e}) for e in (1, 2, 4)},
    **{f"atp-best-e{e}-w{k}": ("EBFT, ATP allocation, joint windows",
                               {"prune.allocation": "atp", "method": "ebft", "recipe": "best", "epochs": e, "window": k})
       for e in (2, 4) for k in (2, 3)},
    **{f"best-e2-w3-lr{lr:g}": ("EBFT, joint windows, learning rate", {"method": "ebft", "recipe": "best", "epochs": 2,
                                                                       "window": 3, "lr": lr}) for lr in (5e-4, 2e-3)},
    **{f"atp{b:g}-best-e2{w}": ("EBFT, ATP allocation (beta)", {"prune.allocation": "atp", "prune.atp_beta": b,
                                                                "method": "ebft", "recipe": "best", "epochs": 2,
                                                                **({"window": 3} if w else {})})
       for b in (0.01,) for w in ("", "-w3")},
    # more calibration windows for the same optimiser steps and tokens trained (n64, 1 epoch, batch 2 = n32, 2
    # epochs, batch 2): block reconstruction overfits its calibration text (Shin et al., 2024)
    **{f"n{n}-best-e{e}-b{b}{w}": ("EBFT, more calibration windows", {"calib.nsamples": n, "method": "ebft",
                                                                       "recipe": "best", "epochs": e, "batch_size": b,
                                                                       **({"window": 3} if w else {})})
       for n, e, b in ((64, 1, 2), (128, 1, 4), (128, 2, 4)) for w in ("", "-w3")},
    "atp0.01-none": ("pruned, ATP allocation (beta)", {"prune.allocation": "atp", "prune.atp_beta": 0.01,
                                                       "method": "none"}),
    # the closed-form refit (ebft.recover.refit): alone, and EBFT's start (on in the best recipe since it was
    # measured; "norefit" points are the best recipe as it was before)
    "refit": ("refit alone (closed form)", {"method": "refit"}),
    **{f"refit-damp{d:g}": ("refit alone (closed form)", {"method": "refit", "refit_damp": d}) for d in (0.01, 0.1)},
    **{f"norefit-best-e{e}{w}": ("EBFT, best recipe without refit", {"method": "ebft", "recipe": "best", "epochs": e,
                                                                     "refit": False, **({"window": 3} if w else {})})
       for e in (1, 2, 4) for w in ("", "-w3")},
    **{f"best-e2-damp{d:g}": ("EBFT, refit dampening", {"method": "ebft", "recipe": "best", "epochs": 2,
                                                       "refit_damp": d}) for d in (0.01, 0.1, 0.3, 3.0)},
    **{f"best-e2-w3-damp{d:g}": ("EBFT, refit dampening, joint windows", {"method": "ebft", "recipe": "best",
                                                                         "epochs": 2, "window": 3, "refit_damp": d})
       for d in (0.01,)},
    **{f"best-e{e}-lr{lr:g}": ("EBFT, learning rate", {"method": "ebft", "recipe": "best", "epochs": e, "lr": lr})
       for e in (2, 4) for lr in (5e-4, 2e-3, 4e-3)},
    **{f"lora-{n}": ("LoRA (masked)", {"method": "lora", "lora_steps": n, "lora_batch_size": 4, "lora_lr": 1e-3})
       for n in LORA_STEPS},
}
SETTINGS_HELP = ("METHOD:SPARSITY[:owl] (wanda:0.5, sparsegpt:0.7:owl), METHOD:N:M[:owl] (wanda:2:4), or "
                 "flap-adaptive:SPARSITY / flap-uniform:SPARSITY")
DEFAULT_SETTINGS = ("wanda:0.5", "wanda:0.7", "flap-adaptive:0.2")
EBFT_VS_LORA = ["none", "best-e1", "best-e2", "best-e4", "best-e8", "lora-25", "lora-50", "lora-100", "lora-200"]
DEFAULT_POINTS = {"wanda:0.5": list(POINTS), "wanda:0.7": EBFT_VS_LORA, "flap-adaptive:0.2": EBFT_VS_LORA}


def parse_setting(setting: str) -> dict:
    """The prune section's fields of one setting name (see SETTINGS_HELP); ValueError for a bad one."""
    parts = setting.split(":")
    owl = parts[-1] == "owl"
    parts = parts[:-1] if owl else parts
    try:
        if parts[0] in ("flap-adaptive", "flap-uniform") and len(parts) == 2 and not owl:
            return {"method": "flap", "sparsity": float(parts[1]), "flap_structure": parts[0].split("-")[1]}
        if parts[0] in ("magnitude", "wanda", "sparsegpt") and len(parts) in (2, 3):
            fields = ({"pattern": f"{int(parts[1])}:{int(parts[2])}"} if len(parts) == 3
                      else {"sparsity": float(parts[1])})
            return {"method": parts[0], **fields, **({"allocation": "owl"} if owl else {})}
    except ValueError:
        pass
    raise ValueError(f"setting {setting!r}: expected {SETTINGS_HELP}")


def cell_for(setting: str, point: str, args):
    from ebft import RunConfig
    from ebft.recover import get_recovery

    cfg = RunConfig(model=args.model, seed=0)
    for key, value in parse_setting(setting).items():
        setattr(cfg.prune, key, value)
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = args.calib, args.nsamples, args.seqlen
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = args.eval, args.eval_seqlen, args.eval_windows
    for key, value in POINTS[point][1].items():  # "section.field", or a recover field
        section, _, name = key.rpartition(".")
        setattr(getattr(cfg, section or "recover"), name, value)
    if get_recovery(cfg.recover.method).guardable:
        cfg.recover.guard = args.recover_guard
        if cfg.recover.guard and getattr(args, "guard_on", None):
            cfg.recover.guard_texts = list(args.guard_on)
    return cfg


def time_to_reach(points: list[tuple[float, float]], target: float) -> tuple[float | None, bool]:
    """Seconds a method's curve needs to reach perplexity ``target``: its (seconds, perplexity) points sorted
    by time, interpolated log-log between the last point above the target and the first at or below it
    (None if it never gets there); and whether that is only an upper bound (its first point already
    reached the target: it may have needed less time)."""
    import math

    points = sorted(points)
    for (t0, p0), (t1, p1) in zip([(None, math.inf), *points], points):
        if p1 <= target:
            if t0 is None or p0 == math.inf or t0 <= 0:
                return t1, True
            f = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1))
            return math.exp(math.log(t0) + f * (math.log(t1) - math.log(t0))), False
    return None, False


def equal_quality(result: dict, text: str, fast: str = "EBFT, best recipe", slow: str = "LoRA (masked)") -> dict | None:
    """How much time ``slow``'s curve needs to reach the perplexities ``fast``'s points reach (and the reverse),
    on ``text``: per point of each line, the other line's interpolated time, and their ratio (``bound``:
    "<=" or ">=" when the other line's time is only an upper bound, so the ratio is a bound too)."""
    lines = {}
    for p in result["points"]:
        lines.setdefault(p["line"], []).append((p["recovery_seconds"], p["perplexity"][text]))
    if fast not in lines or slow not in lines:
        return None
    rows = []
    for ours, theirs in ((fast, slow), (slow, fast)):
        for seconds, ppl in sorted(lines[ours]):
            other, upper = time_to_reach(lines[theirs], ppl)
            t_fast, t_slow = (seconds, other) if ours == fast else (other, seconds)
            bound = "" if not upper else ("<=" if theirs == slow else ">=")
            rows.append({"perplexity": ppl, "from": ours, fast: t_fast, slow: t_slow, "bound": bound,
                         "ratio": None if t_fast is None or t_slow is None else round(t_slow / t_fast, 2)})
    return {"text": text, "fast": fast, "slow": slow, "rows": sorted(rows, key=lambda r: -r["perplexity"])}


def training_tokens(cell: dict) -> int:
    """Tokens the recovery trained on: EBFT epochs × calibration tokens (every block sees them all);
    LoRA steps × batch × window length."""
    rec, calib = cell["config"]["recover"], cell["config"]["calib"]
    if rec["method"] == "lora":
        return rec["lora_steps"] * rec["lora_batch_size"] * calib["seqlen"]
    if rec["method"] in ("none", "refit"):  # no training
        return 0
    return rec["epochs"] * calib["nsamples"] * calib["seqlen"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma list of {SETTINGS_HELP}")
    ap.add_argument("--points", help="comma list of points (default: per setting, see --list)")
    add_data_arguments(ap, "frontier")
    ap.add_argument("--list", action="store_true", help="print the points and exit")
    args = ap.parse_args()
    if args.list:
        for name, (line, changes) in POINTS.items():
            print(f"{name:16s} {line:34s} {changes}")
        return 0
    settings = args.settings.split(",")
    for setting in settings:
        try:
            parse_setting(setting)
        except ValueError as e:
            ap.error(str(e))
    unknown = [p for p in (args.points or "").split(",") if p and p not in POINTS]
    if unknown:
        ap.error(f"--points: unknown {', '.join(unknown)} (see --list)")
    logging.basicConfig(level=logging.WARNING)
    results = {}
    for setting in settings:
        points = args.points.split(",") if args.points else DEFAULT_POINTS.get(setting, EBFT_VS_LORA)
        finished = run_setting(setting, points, args)
        if finished is None:
            continue
        results[setting] = finished
        print(table(setting, results[setting]))
        speeds = [speed for text in results[setting]["dense"] if (speed := equal_quality(results[setting], text))]
        if speeds:
            results[setting]["equal_quality"] = speeds
            for speed in speeds:
                print(equal_quality_table(speed))
    if not results:
        print(f"nothing to show: no point of {args.settings} has run under {args.out}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "frontier.json").write_text(json.dumps(results, indent=2))
    (args.out / "frontier.md").write_text("\n\n".join(
        "\n\n".join([table(s, r), *(equal_quality_table(speed) for speed in r.get("equal_quality", []))])
        for s, r in results.items()) + "\n")
    plot(results, args.out / "frontier.png")
    print(f"wrote {args.out}/frontier.json, frontier.md, frontier.png")
    return 0


def add_data_arguments(ap, name: str, calib: str | None = None, nsamples: int = 32, eval_windows: int = 20) -> None:
    """The model, the data and the output folder of a benchmark built on these cells (the frontier's by default)."""
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--calib", default=calib or (str(C4) if C4.exists() else "offline-c4"))
    ap.add_argument("--nsamples", type=int, default=nsamples)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval", nargs="+", default=[str(p) for p in (WIKI, PTB) if p.exists()] or ["offline"])
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=eval_windows)
    ap.add_argument("--recover-guard", type=int, default=4, metavar="WINDOWS",
                    help="the end-to-end guard's held-out windows (0: off; its time is outside the recovery's, "
                    "but it shares the machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / name)
    ap.add_argument("--cached", action="store_true", help="the tables of the points already run (under --out), "
                    "running nothing")


def run_setting(setting: str, points: list[str], args) -> dict | None:
    """Run (or, with ``--cached``, read) the points of one setting as sweep cells; their records."""
    from ebft.sweeps import cell_name, run_cells
    from ebft.validate import validate

    out = args.out / setting.replace(":", "-")
    if args.cached:
        points = [p for p in points if (out / "cells" / f"{cell_name(cell_for(setting, p, args))}.json").exists()]
        if not points:
            return None
    cells = [cell_for(setting, p, args) for p in points]
    pairs = [(c, validate(c, need_out=False)) for c in cells]
    dense, finished = run_cells(cells[0], pairs, out, progress=_progress(setting))
    return {"dense": dense, "points": [
        {"point": p, "line": POINTS[p][0], "perplexity": rec["perplexity"], "tokens": training_tokens(rec),
         "recovery_seconds": rec["recovery"]["seconds"], "config": rec["config"]["recover"],
         "guard": rec["recovery"].get("guard")}
        for p, rec in zip(points, finished)]}


def equal_quality_table(speed: dict) -> str:
    from ebft.report import markdown_table

    fast, slow = speed["fast"], speed["slow"]
    def mark(r, name):
        upper = r["bound"] and ((r["bound"] == "<=") == (name == slow))  # the other line's time, a bound
        return "—" if r[name] is None else f"{'≤ ' if upper else ''}{r[name]:.1f}"

    rows = [[f"{r['perplexity']:.4g}", r["from"], mark(r, fast), mark(r, slow),
             "—" if r["ratio"] is None else f"{'≤ ' if r['bound'] == '<=' else '≥ ' if r['bound'] else ''}{r['ratio']:.2f}"]
            for r in speed["rows"]]
    return (f"time to reach the same {speed['text']} perplexity (interpolated log-log on each curve; "
            f"ratio = {slow} / {fast}; ≤ / ≥: the other line's first point already reached it, so its "
            f"time is an upper bound)\n\n"
            + markdown_table(["perplexity", "point of", f"{fast} s", f"{slow} s", "ratio"], rows))


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

    texts = list(next(iter(results.values()))["dense"])
    names = dict.fromkeys(p["line"] for r in results.values() for p in r["points"] if p["point"] != "none")
    colours = {line: f"C{i}" for i, line in enumerate(names)}  # one colour per line in every panel
    fig, axes = plt.subplots(len(results), len(texts), figsize=(6.5 * len(texts), 4.2 * len(results)), squeeze=False)
    for row, (setting, result) in zip(axes, results.items()):
        for ax, text in zip(row, texts):
            pruned = next((p["perplexity"][text] for p in result["points"] if p["point"] == "none"), None)
            lines: dict[str, list] = {}
            for p in result["points"]:
                if p["point"] != "none":
                    lines.setdefault(p["line"], []).append((p["recovery_seconds"], p["perplexity"][text]))
            for line, pts in lines.items():
                pts.sort()
                joined = len(pts) > 1 and "variants" not in line  # variants are separate settings, not a budget line
                ax.plot([x for x, _ in pts], [y for _, y in pts], "o-" if joined else "o", label=line,
                        color=colours[line])
            ax.axhline(result["dense"][text], color="black", linestyle="--", label="dense")
            if pruned is not None:
                ax.axhline(pruned, color="grey", linestyle=":", label="pruned, no recovery")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("recovery wall time (s, 2 CPU cores)")
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
