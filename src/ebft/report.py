"""Run records as pictures and tables: per-block reconstruction loss plot, markdown tables."""
from __future__ import annotations

from pathlib import Path


def plot_block_losses(blocks: list[dict], path: Path, title: str = "") -> Path | None:
    """Log-scale reconstruction loss before/after recovery per block; None if nothing to plot."""
    rows = [b for b in blocks if "loss_before" in b]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [b["index"] for b in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(idx, [b["loss_before"] for b in rows], "o-", label="after pruning")
    ax.plot(idx, [b["loss_after"] for b in rows], "o-", label="after recovery")
    if any("holdout_loss_after" in b for b in rows):
        ax.plot(idx, [b.get("holdout_loss_after") for b in rows], "x--", label="after recovery (held-out windows)")
    restored = [b["index"] for b in rows if b.get("restored")]
    if restored:
        ax.scatter(restored, [b["loss_after"] for b in rows if b.get("restored")], marker="s", s=80,
                   facecolors="none", edgecolors="red", label="restored (recovery rejected)")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("reconstruction loss")
    ax.set_title(title or "per-block reconstruction loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
