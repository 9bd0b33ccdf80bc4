"""Run records as pictures and tables: the per-block metrics plot, markdown tables."""
from __future__ import annotations

from pathlib import Path

from .atomic import write_atomic


def plot_block_losses(blocks: list[dict], path: Path, title: str = "",
                      metrics: tuple[str, ...] = ("reconstruction_error",)) -> Path | None:
    """One panel per per-block metric (:mod:`ebft.metrics`; the record's ``<metric>_before`` and ``_after``, log
    scale), then the first one's ratio after/before (linear), readable where the two curves nearly overlap on
    the log scale. Records without metrics plot the training loss (``loss_before``/``loss_after``). Blocks whose
    training was undone are marked; a joint window's values are on its last block. None if nothing to plot."""
    names = [m for m in metrics if any(f"{m}_before" in b for b in blocks)] or (
        ["loss"] if any("loss_before" in b for b in blocks) else [])
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(names) + 1, 1, figsize=(8, 3 + 3 * len(names)), sharex=True,
                             gridspec_kw={"height_ratios": [3] * len(names) + [2]})
    for i, (name, ax) in enumerate(zip(names, axes)):
        _metric_panel(ax, [b for b in blocks if f"{name}_before" in b], name, held_out=i == 0)
    axes[0].set_title(title or "per-block reconstruction error")
    rows = [b for b in blocks if f"{names[0]}_before" in b]
    ratios = [b[f"{names[0]}_after"] / b[f"{names[0]}_before"] if b[f"{names[0]}_before"] else 1.0 for b in rows]
    rx = axes[-1]
    rx.bar([b["index"] for b in rows], ratios, color=["tab:red" if b.get("restored") else "tab:green" for b in rows])
    rx.axhline(1.0, color="black", linewidth=0.8)
    rx.set_ylim(0, max(1.05, max(ratios) * 1.05))
    rx.set_ylabel("after / before")
    rx.set_xlabel("block")
    rx.xaxis.set_major_locator(MaxNLocator(integer=True))
    rx.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _metric_panel(ax, rows: list[dict], name: str, held_out: bool) -> None:
    """A metric before and after recovery, per block (log scale when every value is positive); blocks whose
    training was undone marked; with ``held_out``, the training loss on held-out windows after recovery."""
    idx = [b["index"] for b in rows]
    ax.plot(idx, [b[f"{name}_before"] for b in rows], "o-", label="after pruning")
    ax.plot(idx, [b[f"{name}_after"] for b in rows], "o-", label="after recovery")
    if held_out and any("holdout_loss_after" in b for b in rows):
        ax.plot(idx, [b.get("holdout_loss_after") for b in rows], "x--", label="training loss after (held-out windows)")
    restored = [b for b in rows if b.get("restored")]
    if restored:
        ax.scatter([b["index"] for b in restored], [b[f"{name}_after"] for b in restored], marker="s", s=80,
                   facecolors="none", edgecolors="red", label="restored (recovery rejected)")
    positive = all(v > 0 for b in rows for v in (b[f"{name}_before"], b[f"{name}_after"]))
    ax.set_yscale("log" if positive else "linear")  # a sparsity-0 run has zero errors
    ax.set_ylabel(name.replace("_", " "))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def markdown_table(headers, rows) -> str:
    """A GitHub markdown table; floats with 3 decimals (4 significant digits when large), None as —."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *map(line, cells[1:])])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
    return "—" if value is None else str(value)


# ----------------------------------------------------------------------------- sweeps

def _sweep_rows(results: dict) -> list[tuple[str, str]]:
    """(pruner, recovery) pairs in grid order."""
    return [(m, r) for m in results["grid"]["methods"] for r in results["grid"]["recover"]]


def _sweep_cell(results: dict, method: str, recover: str, column: str) -> dict | None:
    return next((c for c in results["cells"] if (c["method"], c["recover"], c["column"]) == (method, recover, column)), None)


def sweep_markdown(results: dict) -> str:
    """The paper's main-table shape: one perplexity table per eval text (rows pruner + recovery,
    columns sparsity, a dense line on top), then the recovery cost of every cell."""
    columns, rows = results["grid"]["columns"], _sweep_rows(results)
    parts = [f"# Sweep: {results['model']}", ""]
    for source, dense in (results["dense"] or {"eval": None}).items():
        table = [["dense", *([dense] * len(columns))]]
        for m, r in rows:
            cells = [_sweep_cell(results, m, r, col) for col in columns]
            table.append([f"{m} + {r}", *(c["perplexity"].get(source) if c else None for c in cells)])
        missing = " (— : not run yet)" if any(v is None for row in table for v in row) else ""
        parts += [f"Perplexity on {source}{missing}.", "", markdown_table([source, *columns], table), ""]
    cost = []
    for m, r in rows:
        cells = [_sweep_cell(results, m, r, col) for col in columns]
        done = [c["recovery"] for c in cells if c]
        peak = max((c.get("peak_memory_bytes", 0) for c in done), default=None)
        cost.append([f"{m} + {r}", *(f"{c['recovery']['seconds']:.1f}" if c else None for c in cells),
                     max((c.get("trainable_params", 0) for c in done), default=None),
                     f"{peak / 2**20:.0f}" if peak else None])
    parts += ["Recovery cost: seconds per cell; trainable parameters, the row's largest (block-wise: summed over blocks, kept "
              "weights only); peak memory in MiB (on CPU the process's peak RSS, process-wide).", "",
              markdown_table(["recovery seconds", *columns, "trainable params", "peak MiB"], cost), ""]
    return "\n".join(parts)


def _column_sparsity(cell: dict) -> float:
    if cell["sparsity"] is not None:
        return cell["sparsity"]
    n, m = (int(v) for v in cell["column"].split(":"))
    return 1 - n / m


def plot_sweep(results: dict, path: Path) -> Path:
    """Perplexity against sparsity (log y), one line per pruner + recovery, dense as a horizontal line;
    one panel per eval text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(results["dense"]) or sorted({s for c in results["cells"] for s in c["perplexity"]}) or ["eval"]
    fig, axes = plt.subplots(1, len(sources), figsize=(7 * len(sources), 4.5), squeeze=False)
    for ax, source in zip(axes[0], sources):
        for m, r in _sweep_rows(results):
            cells = sorted((c for c in results["cells"] if (c["method"], c["recover"]) == (m, r)
                            and c["perplexity"].get(source) is not None), key=_column_sparsity)
            if cells:
                ax.plot([_column_sparsity(c) * 100 for c in cells], [c["perplexity"][source] for c in cells],
                        "o-", label=f"{m} + {r}")
        if results["dense"].get(source) is not None:
            ax.axhline(results["dense"][source], color="black", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(f"perplexity ({source})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(results["model"])
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), durable=False)
    plt.close(fig)
    return path
