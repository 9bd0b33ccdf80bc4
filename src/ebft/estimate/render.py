"""The resource plan as a table for people and as JSON for programs."""
from __future__ import annotations

import dataclasses

from ..system import fmt_bytes
from .memory import seqlens
from .placement import ResourcePlan


def plan_to_dict(p: ResourcePlan) -> dict:
    """The plan as plain JSON-able data (bytes as integers)."""
    sh = p.shape
    return {
        "model": p.model,
        "sizes": {**dataclasses.asdict(p.sizes), "needs": sorted(p.sizes.needs),
                  "recovery_needs": sorted(p.sizes.recovery_needs)},
        "dtype": p.sizes.run_dtype(), "autocast": p.sizes.autocast_dtype(),
        "shape": {k: v for k, v in dataclasses.asdict(sh).items()
                  if k not in ("params_blocks", "linear_params", "mask_params", "norm_params", "linear_inputs",
                                "stats_inputs")},
        "parameters": {"total": sh.params_total, "per_block": sh.block_params, "blocks": sh.layers,
                       "in_blocks": sh.params_in_blocks, "outside_blocks": sh.params_outside},
        "weights_bytes": p.weights,
        "load": p.load,
        "host_fixed_bytes": p.host_fixed,
        "activations_bytes": p.activations,
        "accelerator_phases_bytes": p.phases,
        "accelerator_working_bytes": p.working,
        "free_accelerator_bytes": p.free_accelerator, "free_host_bytes": p.free_host,
        "placement": dataclasses.asdict(p.placement),
        "reductions": [dataclasses.asdict(r) for r in p.reductions],
        "time": dataclasses.asdict(p.time) if p.time else None,
        "disk_bytes": p.disk,
        "notes": list(p.notes),
    }


def render_plan(p: ResourcePlan) -> str:
    """The plan as a short human-readable table."""
    s, sh, pl = p.sizes, p.shape, p.placement
    seq, eval_seq = seqlens(sh, s)
    rows: list[tuple[str, str]] = []

    def row(k, v=""):
        rows.append((k, v))

    row("model", f"{p.model} ({sh.model_type}, {sh.layers} blocks, hidden {sh.hidden}, attention {sh.attention})")
    row("parameters", f"{sh.params_total / 1e9:.2f} B = {sh.layers} × {sh.block_params / 1e6:.1f} M per block"
                      f" + {sh.params_outside / 1e6:.1f} M outside")
    row("run", f"{s.device}, {s.run_dtype()}, autocast {s.autocast_dtype() or 'off'}; calibration {s.calib_nsamples}"
               f" × {seq}; {s.methods} (batch {s.recovery_batch}, {s.epochs} epochs, target {s.target or 'none'}"
               f"{f', windows of {s.window} blocks' if s.window > 1 else ''});"
               f" eval {s.eval_texts} × {s.eval_windows} × {eval_seq} at {s.stages()} stages")
    row("weights", f"{fmt_bytes(p.weights['total'])} ({fmt_bytes(p.weights['block'])} per block)")
    row("host: weights", f"{fmt_bytes(p.weights['eager'])} eager, {fmt_bytes(p.weights['lazy'])} lazy -> {p.load}")
    for k, v in p.host_fixed.items():
        if not k.startswith("weights"):
            row(f"host: {k}", fmt_bytes(v))
    for phase, parts in p.phases.items():
        row(f"{'accelerator' if s.device.startswith('cuda') else 'host working'}: {phase}", fmt_bytes(sum(parts.values())))
        for k, v in parts.items():
            row(f"  {k}", fmt_bytes(v))
    for k, v in p.activations.items():
        row(f"activations: {k}", f"{fmt_bytes(v)} -> {pl.where.get(k, '?')}")
    row("accelerator total", f"{fmt_bytes(pl.accelerator_bytes)} of {fmt_bytes(pl.accelerator_budget)} usable"
                             if pl.accelerator_budget is not None else "none (CPU run)")
    row("host total", f"{fmt_bytes(pl.host_bytes)} of {fmt_bytes(pl.host_budget)} usable")
    row("placement", pl.decision.upper() + (f": {pl.reason}" if pl.reason else ""))
    fitting = [r for r in p.reductions if r.fits_at is not None]
    for r in fitting:
        row(f"  or reduce {r.flag}", f"{r.current} -> {r.fits_at}")
    if p.reductions and not fitting:
        row("  reduce", "no single setting makes it fit")
    for k, v in p.disk.items():
        if k not in ("written in all", "peak"):
            row(f"disk: {k}", fmt_bytes(v))
    if p.disk:
        row("disk total", f"{fmt_bytes(p.disk['written in all'])} written, {fmt_bytes(p.disk['peak'])} at the peak "
                          "(no activations)")
    if p.time:
        t = p.time
        row("time", f"{_fmt_seconds(t.total_seconds)} ({t.label})")
        row("  per block", ", ".join(f"{k} {_fmt_seconds(v)}" for k, v in t.per_block.items()))
        if t.generation_seconds:
            row("  self-calibration", f"{_fmt_seconds(t.generation_seconds)} before the walk: {s.self_windows} windows × "
                                      f"{seq} tokens, {s.self_batch} at a time, one token per step (none when cached)")
    for note in p.notes:
        row("note", note)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in rows)


def _fmt_seconds(sec: float) -> str:
    if sec < 120:
        return f"{sec:.1f} s"
    if sec < 7200:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"
