"""Where a run's activations go, whether it fits, and what to reduce when it does not.

:func:`place` is a pure function of byte counts: the activation groups, in priority order (the chain
and targets are read every training step; the evaluation streams once per block), go to the
accelerator while working memory + groups fit in ``reserve`` of its free memory; the rest to pinned
host memory while weights + host groups fit in ``host_reserve`` of free host memory; else the plan
says "reduce" and :func:`plan_resources` finds, setting by setting, the largest value that fits (and
names the flag that sets it). The run itself places its activations with the same arithmetic
(:func:`ebft.pipeline.activation_placement`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..system import accelerator_free, fmt_bytes, host_available
from .memory import (RunSizes, activation_bytes, disk_bytes, host_fixed_bytes, seqlens, weight_bytes,
                     working_bytes)
from .shape import ModelShape, load_config, model_shape

if TYPE_CHECKING:
    from .timing import TimeEstimate

ACCELERATOR, PINNED, HOST, REDUCE, UNKNOWN = "accelerator", "pinned host", "host", "reduce", "unknown"
# the flag that sets each size a reduction names
FLAGS = {"calib_nsamples": "--nsamples", "calib_seqlen": "--seqlen", "eval_windows": "--eval-windows",
         "eval_seqlen": "--eval-seqlen", "eval_stages": "evaluation stages (no flag: fewer --eval texts)",
         "recovery_batch": "--recover-batch-size", "load": "--lazy", "self_batch": "--self-batch-size"}
GENERATION = "self-calibration"  # the phase before the walk (--calib self): no activation is resident then


@dataclass(frozen=True)
class Placement:
    """Where each activation group lives, and whether the run fits at all."""

    decision: str  # accelerator | pinned host | host | reduce (| unknown: a GPU plan without its memory)
    where: dict[str, str]  # group -> accelerator | pinned host | host
    accelerator_bytes: int  # working memory + groups placed there
    accelerator_budget: int | None  # reserve × free accelerator memory
    host_bytes: int  # fixed host memory + groups placed there
    host_budget: int  # host_reserve × free host memory
    reason: str = ""  # why "reduce"


def place(groups: dict[str, int], working: int, free_accelerator: int | None, free_host: int,
          host_fixed: int = 0, reserve: float = 0.9, host_reserve: float = 0.8) -> Placement:
    """Place activation groups (priority order) on the accelerator or in pinned host memory.

    A group goes to the accelerator when ``working`` + the groups already there + it fit in
    ``reserve · free_accelerator``; otherwise to pinned host memory. The plan fits when
    ``host_fixed`` + the host groups fit in ``host_reserve · free_host``. With no accelerator
    (``free_accelerator=None``) working memory and every group live in (plain) host memory.
    Decision: "accelerator" (every group there), "pinned host" (some in pinned memory), "host" (CPU
    run), or "reduce" (``reason`` says which memory is short).
    """
    host_budget = int(host_reserve * free_host)
    if free_accelerator is None:
        need = host_fixed + working + sum(groups.values())
        where = {g: HOST for g in groups}
        if need > host_budget:
            return Placement(REDUCE, where, 0, None, need, host_budget,
                             f"host memory: need {fmt_bytes(need)}, have {fmt_bytes(host_budget)}")
        return Placement(HOST, where, 0, None, need, host_budget)
    acc_budget = int(reserve * free_accelerator)
    used, host, where = working, host_fixed, {}
    for name, nbytes in groups.items():
        if used + nbytes <= acc_budget:
            where[name], used = ACCELERATOR, used + nbytes
        else:
            where[name], host = PINNED, host + nbytes
    if working > acc_budget:
        return Placement(REDUCE, where, used, acc_budget, host, host_budget,
                         f"accelerator memory: the block's working memory alone needs {fmt_bytes(working)}, "
                         f"have {fmt_bytes(acc_budget)}")
    if host > host_budget:
        return Placement(REDUCE, where, used, acc_budget, host, host_budget,
                         f"host memory: need {fmt_bytes(host)}, have {fmt_bytes(host_budget)}")
    decision = ACCELERATOR if all(w == ACCELERATOR for w in where.values()) else PINNED
    return Placement(decision, where, used, acc_budget, host, host_budget)


@dataclass(frozen=True)
class Reduction:
    setting: str  # the RunSizes field
    current: int | str
    fits_at: int | str | None  # the largest value that fits, None: no value of this setting alone does

    @property
    def flag(self) -> str:
        return FLAGS.get(self.setting, self.setting)


@dataclass
class ResourcePlan:
    model: str
    sizes: RunSizes
    shape: ModelShape
    load: str  # eager | lazy, as decided
    weights: dict[str, int]
    host_fixed: dict[str, int]
    activations: dict[str, int]
    phases: dict[str, dict[str, int]]  # accelerator working memory per phase
    working: int  # the largest phase
    placement: Placement
    free_accelerator: int | None
    free_host: int
    reductions: list[Reduction] = field(default_factory=list)
    time: "TimeEstimate | None" = None
    notes: list[str] = field(default_factory=list)
    disk: dict[str, int] = field(default_factory=dict)  # what the run writes (:func:`.memory.disk_bytes`)


def _fit(shape: ModelShape, s: RunSizes, free_acc: int | None, free_host: int, reserve: float,
         host_reserve: float) -> tuple[str, dict, dict, dict, int, Placement]:
    """(load, host fixed, activation groups, phases, working, placement); load "auto": eager if it fits."""
    if s.load == "auto":
        eager = _fit(shape, dataclasses.replace(s, load="eager"), free_acc, free_host, reserve, host_reserve)
        if eager[-1].decision != REDUCE:
            return eager
        return _fit(shape, dataclasses.replace(s, load="lazy"), free_acc, free_host, reserve, host_reserve)
    load = s.load
    fixed = host_fixed_bytes(shape, s, load)
    groups = activation_bytes(shape, s)
    phases = working_bytes(shape, s)
    working = max(sum(p.values()) for name, p in phases.items() if name != GENERATION)
    gpu = s.device.startswith("cuda")
    placement = place(groups, working, free_acc if gpu else None, free_host, sum(fixed.values()), reserve,
                      host_reserve)
    if GENERATION in phases:
        placement = _with_generation(placement, sum(phases[GENERATION].values()), free_acc if gpu else None,
                                     sum(fixed.values()), reserve)
    return load, fixed, groups, phases, working, placement


def _with_generation(placement: Placement, need: int, free_acc: int | None, host_fixed: int,
                     reserve: float) -> Placement:
    """``--calib self`` generates before the walk, when no activation is resident: it must fit on its own
    (the accelerator, or the host beside the weights), else the plan says reduce."""
    if placement.decision == REDUCE:
        return placement
    have, short = (int(reserve * free_acc), "accelerator") if free_acc is not None else (
        placement.host_budget - host_fixed, "host")
    if need <= have:
        return placement
    return dataclasses.replace(placement, decision=REDUCE, reason=f"{short} memory: --calib self's generation "
                               f"(one batch's KV cache{', the whole model' if free_acc is not None else ''}) "
                               f"needs {fmt_bytes(need)}, have {fmt_bytes(have)}")


def _largest_fitting(shape, s, name, lo, hi, free_acc, free_host, reserve, host_reserve):
    def fits(v):
        return _fit(shape, dataclasses.replace(s, **{name: v}), free_acc, free_host, reserve,
                    host_reserve)[-1].decision != REDUCE
    if not fits(lo):
        return None
    while lo < hi:  # the largest v in [lo, hi] that fits; memory grows with every setting below
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggest_reductions(shape: ModelShape, s: RunSizes, free_acc: int | None, free_host: int,
                       reserve: float = 0.9, host_reserve: float = 0.8) -> list[Reduction]:
    """For each setting alone, the largest value at which the run fits (None: it cannot alone)."""
    seq, eval_seq = seqlens(shape, s)
    knobs = [("calib_nsamples", s.calib_nsamples), ("calib_seqlen", seq)]
    if s.eval_windows and s.eval_texts:
        knobs += [("eval_windows", s.eval_windows), ("eval_seqlen", eval_seq), ("eval_stages", s.stages())]
    if s.trains:
        knobs.append(("recovery_batch", s.recovery_batch))
    if s.self_windows:
        knobs.append(("self_batch", s.self_batch))
    out = []
    for name, current in knobs:
        low = 0 if name == "eval_windows" else 1  # no evaluation at all is a value; no calibration is not
        if current > low:
            out.append(Reduction(name, current, _largest_fitting(shape, s, name, low, current - 1, free_acc,
                                                                 free_host, reserve, host_reserve)))
    if s.load == "eager":
        lazy = _fit(shape, dataclasses.replace(s, load="lazy"), free_acc, free_host, reserve, host_reserve)[-1]
        out.append(Reduction("load", s.load, "lazy" if lazy.decision != REDUCE else None))
    return out


def plan_resources(config, sizes: RunSizes | None = None, free_accelerator: int | None = None,
         free_host: int | None = None, reserve: float = 0.9, host_reserve: float = 0.8,
         time_estimate: "TimeEstimate | None" = None, name: str | None = None) -> ResourcePlan:
    """Everything a run will need, from the config and the settings; no weight is loaded.

    ``free_accelerator`` / ``free_host``: bytes available (None: measured on this machine). A cuda
    plan made where no GPU is and given no ``free_accelerator`` gets the decision "unknown".
    """
    s = sizes or RunSizes()
    cfg = load_config(config, s.trust_remote_code)
    shape = model_shape(cfg, s.layers, s.attention, s.trust_remote_code)
    if free_accelerator is None or free_host is None:
        acc = accelerator_free(s.device) if s.device.startswith("cuda") else None
        free_accelerator = acc if free_accelerator is None else free_accelerator
        free_host = (host_available() or 0) if free_host is None else free_host
    unknown = s.device.startswith("cuda") and free_accelerator is None
    load, fixed, groups, phases, working, placement = _fit(shape, s, 0 if unknown else free_accelerator,
                                                           free_host, reserve, host_reserve)
    if unknown:
        placement = Placement(UNKNOWN, {g: "?" for g in groups}, working + sum(groups.values()), None,
                              placement.host_bytes, placement.host_budget,
                              "no GPU here: give the accelerator's free memory")
    p = ResourcePlan(model=name or str(getattr(cfg, "_name_or_path", "") or shape.model_type), sizes=s,
                     shape=shape, load=load, weights=weight_bytes(shape, s), host_fixed=fixed, activations=groups,
                     phases=phases, working=working, placement=placement,
                     free_accelerator=free_accelerator if s.device.startswith("cuda") else None, free_host=free_host,
                     time=time_estimate, disk=disk_bytes(shape, s, load))
    if placement.decision == REDUCE and not unknown:
        p.reductions = suggest_reductions(shape, s, free_accelerator, free_host, reserve, host_reserve)
        if s.device.startswith("cuda") and working > placement.accelerator_budget:
            least = max(sum(ph.values()) for ph in working_bytes(shape, s, batch=1).values())
            p.notes.append(f"the smallest accelerator for this model: {fmt_bytes(math.ceil(least / reserve))} free "
                           f"(recovery batch 1, activations in host memory)")
    if s.whole_model:
        p.notes.append(f"{s.whole_model} trains the whole model after the walk: its memory is not planned here")
    if shape.attention not in ("sdpa", "eager"):
        p.notes.append(f"attention {shape.attention}: saved activations estimated as for sdpa")
    return p
