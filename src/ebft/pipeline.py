"""The pipeline, one straight line of stages, each run once:
load → data → allocate → walk → whole-model stages → evaluate → save.

``run`` (the ``ebft run`` command), each ``ebft sweep`` cell and ``evaluate`` (``ebft eval``) are this
line with parts left out; the run record (``run.json``) is built in one place, :func:`build_record`.

>>> from ebft import RunConfig, run
>>> cfg = RunConfig(model="builtin:smollm2", out="runs/demo")
>>> cfg.prune.method, cfg.prune.sparsity = "wanda", 0.5
>>> record = run(cfg)                      # prunes, evaluates, saves runs/demo + run.json
>>> record["perplexity"]["wikitext2"]      # {"dense": ..., "pruned": ..., "recovered": ...}

- **load**: the model in host memory, or (lazy) a skeleton whose blocks the walk reads one by one;
- **data**: calibration and evaluation token windows;
- **allocate**: OWL's or FLAP's decision per block, from one dense pass over the calibration chain
  (captured once, shared with the walk); ATP's from the blocks' sizes alone; nothing for a uniform
  allocation;
- **walk**: prune and recover block by block (:mod:`ebft.walk`), carrying the evaluation streams;
- **whole-model stages**: a model-scope recovery (LoRA) and the end-to-end finish, each followed by
  an evaluation of the model it leaves;
- **evaluate**: perplexities (all from :mod:`ebft.evaluation.perplexity`), zero-shot, speed;
- **save**: atomically, with ``run.json`` and the block-loss plot.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch

from . import distributed
from .allocation import allocator, check_allocation, weight_summaries
from .atomic import write_json
from .blockstore import load_lazy, store_for, weights_bytes
from .capabilities import check_distributed, lazy_blockers
from .checkpoint import NO_CHECKPOINT, RunCheckpoint, discard_if_finished, kill_point, settings_of
from .config import RunConfig, resolve_device
from .data import SELF, adds_bos, calibration_windows, eval_tokens, resolve_source, source_name
from .errors import ConfigError, EbftError
from .estimate import REDUCE, RunSizes, plan_resources
from .export import check_export_model
from .export.gguf import origin_of, write_gguf
from .evaluation.perplexity import C4_WINDOWS, eval_windows, model_perplexities, stage_perplexities
from .evaluation.speed import measure_speed
from .evaluation.zeroshot import average, evaluate_suite, load_tasks, plan_tasks
from .metrics import METRICS
from .models import check_model_source, context_length, find_blocks, load_model, model_files_fingerprint
from .output import atomic_folder, save_dtype, save_pretrained, sparsity_report
from .prune import get_pruner
from .recover import ModelContext, TrainingText, get_recovery
from .recover.finish import finish, prepare_finish
from .recover.recipes import PAPER_DIFFERENCES
from .report import plot_block_losses
from .selfcalib import Sampling, SelfDraw, self_windows
from .streams import CHAIN, STAGES, Homes, capture_stream
from .system import PhaseClock, host_available, peak_memory, reset_host_peak, seed_everything, versions
from .walk import MASK_KEY, PruneSpec, RecoverSpec, measure_after, planning_pass, walk
from .weights import ShardWriter
from .validate import budget_seconds, check_device, check_source, validate

log = logging.getLogger(__name__)

__all__ = ["run", "evaluate", "prune_and_recover", "prepare_data", "check_model_fits", "activation_placement",
           "final_stage", "Data", "Outcome", "seed_everything", "versions"]


def final_stage(config: RunConfig) -> str:
    """What the final model is called in records: "finished" after an end-to-end finish, else "pruned"
    without a recovery, else "recovered"."""
    if config.finish.method != "none":
        return "finished"
    return "pruned" if config.recover.method == "none" else "recovered"


# ----------------------------------------------------------------------------- load, data

def load(config: RunConfig, lazy: bool, device: str):
    """``(model, tokenizer)``: in host memory, or (lazy) a skeleton whose blocks the walk reads one by one."""
    if not lazy:
        return load_model(config.model, config.dtype, device, trust_remote_code=config.trust_remote_code)
    model, tokenizer, store = load_lazy(config.model, config.dtype, device, trust_remote_code=config.trust_remote_code)
    store.load_outside()  # embeddings, final norm, head: resident for capture and the tail
    return model, tokenizer


@dataclass
class Data:
    """Token windows for a run, and how they were made (run.json's ``resolved`` and ``eval_protocol``)."""

    calib: torch.Tensor | None  # [nsamples, seqlen]
    evals: dict[str, torch.Tensor]  # name -> [windows, seqlen]
    calib_seqlen: int | None
    eval_seqlen: int
    protocol: dict = field(default_factory=dict)  # name -> {seqlen, windows, tokens, bos, ...}
    notes: list[str] = field(default_factory=list)  # clamped lengths and the like
    guards: dict[str, torch.Tensor] = field(default_factory=dict)  # the guard's texts: name -> [k, seqlen]
    self_draw: SelfDraw | None = None  # --calib self: every window the run takes, generated before the walk

    def training_text(self, config: RunConfig) -> TrainingText:
        """Where LoRA and the finish draw their windows: the calibration text, or the model's own draw."""
        return TrainingText(config.calib.source, self.calib_seqlen, config.seed,
                            self.self_draw.windows if self.self_draw is not None else None)


def _clamped(value: int | None, context: int, name: str, notes: list[str]) -> int:
    default = min(context, 2048)
    if value is None:
        return default
    if value > context:
        notes.append(f"{name} {value} is above the model's context {context}: clamped to {context}")
        log.warning(notes[-1])
        return context
    return value


def eval_sets(tokenizer, sources, seqlen: int, windows: int | None) -> tuple[dict, dict]:
    """``({name: [n, seqlen] windows}, {name: protocol})`` for each evaluation text."""
    sets, protocol = {}, {}
    bos = adds_bos(tokenizer)
    for src in map(resolve_source, sources):
        name = source_name(src)
        ids = eval_tokens(tokenizer, src, bos=bos)
        cap = windows or (C4_WINDOWS if src == "c4" else None)
        sets[name] = eval_windows(ids, seqlen, cap, name)
        protocol[name] = {"source": src, "seqlen": seqlen, "windows": sets[name].shape[0],
                          "tokens": sets[name].numel(), "text_tokens": ids.shape[-1], "bos": bos,
                          "window_cap": cap}
        log.info("eval %s: %d windows of %d tokens", name, *sets[name].shape)
    return sets, protocol


def prepare_data(model, tokenizer, config: RunConfig, calibrate: bool = True, device: str | None = None,
                 progress=None, need: int | None = None, clock: PhaseClock | None = None) -> Data:
    """Calibration windows and evaluation windows; lengths default to min(model context, 2048) and are
    clamped to the model's context (with a warning, recorded in run.json).

    ``--calib self``: the (dense) ``model`` generates, on ``device`` (default: the run's), every window the
    run takes (:meth:`RunConfig.windows_drawn`, or ``need`` when more: a sweep's cells share one draw), or
    reads them from the cache (:mod:`ebft.selfcalib`); the calibration and guard windows are its prefix.
    ``clock``: the time of the generation (``self-calibration``) and of the rest (``tokenize``) goes to it."""
    clock = clock or PhaseClock()
    context, notes = context_length(model), []
    calib_seqlen = _clamped(config.calib.seqlen, context, "calib.seqlen", notes) if calibrate else None
    eval_seqlen = _clamped(config.eval.seqlen, context, "eval.seqlen", notes)
    drawn = None
    if calibrate and config.calib.source == SELF:
        with clock.phase("self-calibration"):
            drawn = self_windows(model, tokenizer, max(need or 0, config.windows_drawn()), calib_seqlen, config.seed,
                                 Sampling.of(config.calib), device or resolve_device(config.device), progress)
    with clock.phase("tokenize"):
        calib = None
        if calibrate:
            calib = (drawn.windows[:config.calib.nsamples] if drawn is not None else
                     calibration_windows(tokenizer, config.calib.source, config.calib.nsamples, calib_seqlen,
                                         config.seed))
        evals, protocol = eval_sets(tokenizer, config.eval.sources, eval_seqlen, config.eval.windows)
        guards = (guard_sets(tokenizer, config, calib_seqlen, eval_seqlen, drawn) if calibrate and guarded(config)
                  else {})
        data = Data(calib, evals, calib_seqlen, eval_seqlen, protocol, notes, guards, drawn)
        check_token_ids(model, tokenizer, {"calibration": drawn.windows if drawn else calib, **evals, **data.guards})
    return data


def check_token_ids(model, tokenizer, texts: dict) -> None:
    """Every token id of every text has a row in the embedding (a tokenizer's added token may not), else one
    line naming the text and the token, never an index error mid-run."""
    rows = model.get_input_embeddings().weight.shape[0]
    for name, ids in texts.items():
        if ids is not None and ids.numel() and int(ids.max()) >= rows:
            token = int(ids.max())
            raise EbftError(f"the {name} text holds the token {tokenizer.convert_ids_to_tokens(token)!r} (id {token}), "
                            f"which the model's embedding ({rows} rows) has no row for")


def guard_sets(tokenizer, config: RunConfig, calib_seqlen: int, eval_seqlen: int,
               drawn: SelfDraw | None = None) -> dict[str, torch.Tensor]:
    """The guard's texts, ``--recover-guard`` windows each: the calibration text's windows after the calibration
    ones (in the same draw, of the calibration length; ``drawn``: the model's own, --calib self), then the first
    windows of each ``--recover-guard-on`` text's validation split, of the evaluation length (scored as the
    texts the run is judged on are)."""
    k, n = config.recover.guard, config.calib.nsamples
    held_out = (drawn.windows[n:n + k] if drawn is not None else
                calibration_windows(tokenizer, config.calib.source, n + k, calib_seqlen, config.seed)[n:])
    sets = {GUARD: held_out}
    for src in config.recover.guard_texts:
        name, ids = f"held-out {source_name(src)}", eval_tokens(tokenizer, src, adds_bos(tokenizer), split="validation")
        if ids.shape[-1] < eval_seqlen:
            raise ConfigError("recover.guard_texts", src, f"has {ids.shape[-1]} tokens, fewer than one window of the "
                              f"evaluation length {eval_seqlen}: give a longer text (or a smaller --eval-seqlen)")
        sets[name] = eval_windows(ids, eval_seqlen, k, name)
        if sets[name].shape[0] < k:
            log.warning("guard text %s holds %d windows of %d tokens, not %d: the guard checks those",
                        source_name(src), sets[name].shape[0], eval_seqlen, k)
    return sets


def guardable(config: RunConfig) -> bool:
    """Whether the run's recovery is one the end-to-end guard can check (block-wise, not none)."""
    return get_recovery(config.recover.method).guardable


def guarded(config: RunConfig) -> bool:
    """Whether the run checks end to end that block-wise recovery did not make the model worse."""
    return config.recover.guard > 0 and guardable(config)


def check_model_fits(model, pattern, config: RunConfig) -> None:
    """What can only be checked on the loaded model, before any work (the pruner's own checks: linears to
    prune, N:M widths; structured pruning: the family's blocks can be shrunk and saved; the allocation's
    against the number of blocks: ATP's beta); settings the pruner resolves from the model (FLAP's auto
    bias compensation) are given to ``config.resolve``."""
    resolved = get_pruner(config.prune.method).check_model(model, pattern, config.prune.layers,
                                                           config.pruner_settings())
    config.resolve(**resolved)
    check_allocation(config.allocation_settings(), pattern, model.config)


# ----------------------------------------------------------------------------- allocate, walk, whole-model stages

@dataclass
class Outcome:
    """What pruning and recovery did: the walk's result, perplexities per stage, the recovery's cost."""

    result: object  # ebft.walk.WalkResult
    perplexity: dict[str, dict[str, float]]
    cost: dict
    plan: dict | None = None  # the allocation's record (OWL's per-block sparsities, FLAP's structure)
    finish: dict | None = None  # the end-to-end finish's record (ebft.recover.finish)
    phases: dict | None = None  # run.json's time by phase (:func:`phases_record`)

    def sparsity_measured(self, model) -> float:
        """Structured pruning: the fraction of block parameters removed; else the masked linears' zeros."""
        if self.plan and "removed_fraction" in self.plan:
            return self.plan["removed_fraction"]
        return sparsity_report(model, self.result.masks)["overall"]


@dataclass
class ModelStage:
    """A stage that trains the whole pruned model after the walk, then is evaluated: LoRA (a model-scope
    recovery, the model called "recovered") or the finish ("finished")."""

    label: str
    run: Callable[[ModelContext], dict]
    measured: bool = False  # its blocks' per-block metrics are taken again after it (ebft.walk.measure_after)


def prune_and_recover(model, tokenizer, config: RunConfig, pattern, data: Data, device: str, progress=None,
                      stages=STAGES, checkpoint=None, placement: dict[str, str] | None = None,
                      clock: PhaseClock | None = None) -> Outcome:
    """Allocate, prune the loaded ``model`` in place, recover it (block by block, then the whole-model
    stages), evaluate ``data.evals`` at every stage.

    The walk's final stage is named "recovered", or "pruned" when the walk does not recover (``--recover
    none``, or a model-scope recovery, which runs after it). ``checkpoint``
    (:class:`ebft.checkpoint.RunCheckpoint`): the allocation and the walk continue from it and are saved to
    it. ``placement``: where the walk keeps each activation group (:func:`activation_placement`). ``clock``
    (:class:`ebft.system.PhaseClock`): the time of capture, plan, walk and evaluate goes to it.
    """
    checkpoint = checkpoint if checkpoint is not None else NO_CHECKPOINT
    clock = clock or PhaseClock()
    recovery, settings = get_recovery(config.recover.method), config.recovery_settings()
    text = data.training_text(config)
    whole = _model_stages(model, tokenizer, config, text, device, progress)  # the finish's teacher: dense model
    homes = Homes(torch.device(device), placement)
    with clock.phase("capture"):
        chain = capture_stream(model, data.calib, torch.device(device), config.batch_size, distributed.current(),
                               to=homes.home(CHAIN, None))
    with clock.phase("plan"):
        allocation = checkpoint.allocation(lambda: allocate(model, chain, pattern, config, device, progress))
    spec = PruneSpec(get_pruner(config.prune.method), allocation.patterns if allocation else pattern,
                     config.prune.layers, config.pruner_settings(), allocation.structures if allocation else None)
    block_wise = recovery.scope == "block"
    budget = budget_seconds(config.recover.budget) if block_wise and config.recover.budget is not None else None
    guards = data.guards if guarded(config) else {}  # (a sweep's data serves cells with and without one)
    recover = (RecoverSpec(recovery, settings, config.seed, budget, keep_pruned=bool(guards)) if block_wise
               else RecoverSpec(seed=config.seed, keep_dense=True))  # a model-scope one: its blocks measured after it
    with clock.phase("walk"):
        result = walk(model, chain, spec, recover, {**data.evals, **guards},
                      {**{name: stages for name in data.evals}, **{name: ("pruned", "final") for name in guards}},
                      device, config.batch_size, progress, checkpoint=checkpoint, placement=placement)
    walked = "recovered" if block_wise and recovery.name != "none" else "pruned"
    guard_streams = {k: result.streams.pop(k) for k in list(result.streams) if k.rsplit("/", 1)[0] in guards}
    with clock.phase("evaluate"):
        perplexity = stage_perplexities(model, result, data.evals, device, final=walked)
        guard_record = (check_guard(model, result, guard_streams, guards, perplexity, data.evals, device,
                                    config.batch_size) if guards else None)
    records = {"recovered": block_recovery_cost(recovery.name, result.blocks, device)} if block_wise else {}
    for stage in whole:  # LoRA ("recovered"), the finish ("finished"): each evaluated on the model it leaves
        ctx = ModelContext(model, tokenizer, result.masks, text, torch.device(device), config.seed, progress)
        records[stage.label] = stage.run(ctx)
        if stage.measured:  # the per-block metrics after a model-scope recovery, against the dense blocks kept
            with clock.phase("metrics"):
                measure_after(model, data.calib, result.dense_blocks, result.blocks, device, config.batch_size,
                              result.masks)
        for name, value in model_perplexities(model, data.evals, device, config.batch_size).items():
            perplexity[name][stage.label] = value
    if guard_record is not None and records.get("recovered") is not None:
        records["recovered"]["guard"] = guard_record
    return Outcome(result, perplexity, records.get("recovered"), allocation.record if allocation else None,
                   records.get("finished"))


GUARD = "held-out calibration"  # the guard's windows in the walk (a name no text source has: it has a space)


def check_guard(model, result, streams: dict, guards: dict, perplexity: dict, evals: dict, device: str,
                batch_size: int = 1) -> dict:
    """End to end on the guard's texts (the held-out calibration windows, and each ``--recover-guard-on`` text's):
    the recovered model against the model pruning alone gives (the walk's "pruned" stage: each block pruned on
    the chain of blocks so pruned, as a ``--recover none`` run prunes it). If recovery made it worse on any of
    them, every block becomes that block (kept by the walk), and the recovered perplexities are the pruned ones —
    exactly that model."""
    scored = stage_perplexities(model, SimpleNamespace(streams={k: v for k, v in streams.items()},
                                                       returns_tuple=result.returns_tuple),
                                guards, device, final="recovered")
    calib = scored[GUARD]
    record = {"windows": int(guards[GUARD].shape[0]), "pruned_ppl": calib["pruned"],
              "recovered_ppl": calib["recovered"]}
    if len(guards) > 1:
        record["texts"] = {name: {"windows": int(guards[name].shape[0]), "pruned_ppl": ppl["pruned"],
                                  "recovered_ppl": ppl["recovered"]} for name, ppl in scored.items()}
    worse = [name for name, ppl in scored.items() if ppl["recovered"] > ppl["pruned"]]
    if not worse:
        return {**record, "kept": "recovered"}
    said = "; ".join(f"{name}: perplexity {scored[name]['pruned']:.4g} -> {scored[name]['recovered']:.4g}"
                     for name in worse)
    record["worse_on"] = worse
    prefix, blocks = find_blocks(model)
    if len(result.pruned_states) != len(blocks) or not all(_readable(read) for read in result.pruned_states.values()):
        # never the model the guard has just rejected: the checkpoint's copies were damaged during the run
        raise EbftError(f"the guard: recovery made the model worse end to end ({said}) and the blocks as pruned "
                        "cannot be read back from the checkpoint (damaged): not saving the rejected model; rerun with "
                        "--no-resume")
    log.warning("recovery made the model worse end to end on the guard's windows (%s): keeping every block as "
                "pruned", said)
    for index, read in result.pruned_states.items():
        state = read()
        blocks[index].load_state_dict({k: v for k, v in state.items() if not k.startswith(MASK_KEY)})
        result.masks.update({f"{prefix}.{index}.{k[len(MASK_KEY):]}": m for k, m in state.items()
                             if k.startswith(MASK_KEY)})
    evals = {name: ids for name, ids in evals.items() if "pruned" not in perplexity.get(name, {})}
    rescored = model_perplexities(model, evals, device, batch_size) if evals else {}
    for name, by_stage in perplexity.items():  # the pruned stage's streams are exactly this model's
        by_stage["recovered"] = by_stage["pruned"] if name not in rescored else rescored[name]
    return {**record, "kept": "pruned"}


def _readable(read) -> bool:
    """Whether a block as pruned can be read back (a damaged file in the checkpoint: no, said once)."""
    try:
        return bool(read())
    except EbftError as exc:
        log.warning("%s", exc)
        return False


def _model_stages(model, tokenizer, config: RunConfig, text: TrainingText, device: str,
                  progress=None) -> list[ModelStage]:
    """The whole-model stages of this run, prepared on the dense model (the finish's teacher)."""
    stages = []
    recovery = get_recovery(config.recover.method)
    if recovery.scope == "model":
        stages.append(ModelStage("recovered", lambda ctx: model_recovery(recovery, config.recovery_settings(), ctx),
                                 measured=True))
    prepared = prepare_finish(model, tokenizer, text, config.calib.nsamples, config.finish, device, config.batch_size,
                              progress)
    if prepared is not None:
        stages.append(ModelStage("finished", lambda ctx: finish(ctx, config.finish, prepared)))
    return stages


def model_recovery(recovery, settings, ctx: ModelContext) -> dict:
    """A model-scope recovery (LoRA) on the whole pruned model; its cost and record."""
    start = time.perf_counter()
    details = recovery.fn(ctx, settings) or {}
    return {"method": recovery.name, "scope": "model", "seconds": round(time.perf_counter() - start, 2),
            **peak_memory(str(ctx.device)), "trainable_params": details.pop("trainable_params", 0), **details}


def allocate(model, chain, pattern, config: RunConfig, device: str, progress=None):
    """The allocation of this run: OWL's or FLAP's from one dense pass over the calibration ``chain`` (left
    as it was), ATP's from the blocks' sizes alone (no pass); None for a uniform allocation."""
    decider = allocator(pattern, config.allocation_settings(), config.prune.layers, config.pruner_settings(),
                        model.config)
    if decider is None:
        return None
    if not decider.needs_pass:
        return decider.decide(weight_summaries(model, decider))
    return planning_pass(model, chain, decider, device, progress=progress)


def block_recovery_cost(method: str, blocks: list[dict], device: str) -> dict:
    """The cost of a block-wise recovery: its seconds summed over blocks; peak memory of the run so far.

    ``trainable_params``: summed over blocks (each block is trained once, so this is how many model
    parameters the recovery may change: kept weights, biases, norms if trained; masked zeros are not
    counted); ``trainable_params_max_block``: the largest block's, what the optimizer holds at once.
    """
    per_block = [b.get("trainable_params", 0) for b in blocks]
    return {"method": method, "scope": "block",
            "seconds": round(sum(b.get("recover_seconds", 0.0) for b in blocks), 2), **peak_memory(device),
            "trainable_params": sum(per_block), "trainable_params_max_block": max(per_block, default=0)}


def activation_placement(config: RunConfig, model, data: Data, device: str, lazy: bool = False,
                         free_accelerator: int | None = None, free_host: int | None = None) -> dict[str, str] | None:
    """On a GPU, where the walk keeps each activation group (calibration chain, dense-model stream,
    evaluation streams): on the accelerator or in pinned host memory, by the same arithmetic as
    ``ebft plan`` (:func:`ebft.estimate.plan_resources`), with this run's real lengths and window counts
    and the memory free now (or ``free_accelerator``/``free_host``). None on a CPU run: everything is
    host memory."""
    if torch.device(device).type != "cuda" and free_accelerator is None:
        return None
    windows = max((ids.shape[0] for ids in data.evals.values()), default=0)
    sizes = RunSizes.of(config, load="lazy" if lazy else "eager",
                        device=device if torch.device(device).type == "cuda" else "cuda",
                        calib_seqlen=data.calib_seqlen, eval_seqlen=data.eval_seqlen or config.eval.seqlen,
                        eval_texts=len(data.evals), eval_windows=windows)
    plan = plan_resources(model.config, sizes, free_accelerator=free_accelerator, free_host=free_host)
    where = dict(plan.placement.where)
    log.info("activations: %s (%s)", ", ".join(f"{g} -> {w}" for g, w in where.items()), plan.placement.decision)
    if plan.placement.decision == REDUCE:
        log.warning("this run may not fit: %s (ebft plan suggests what to reduce)", plan.placement.reason)
    return where


# ----------------------------------------------------------------------------- run

def run(config: RunConfig, progress=None) -> dict:
    """Prune (and recover) ``config.model``, evaluate before and after, save to ``config.out``.

    Returns the run record (also written as ``run.json`` in the output folder). A killed run
    continues from its checkpoint when called again with the same settings (:mod:`ebft.checkpoint`);
    ``config.lazy`` loads the model block by block (:mod:`ebft.blockstore`); under ``torchrun`` the
    ranks share the windows and rank 0 alone writes (:mod:`ebft.distributed`).
    """
    start = time.perf_counter()
    reset_host_peak()
    distributed.check_environment()
    if config.out and distributed.is_main_process():
        discard_if_finished(config.out)  # a finished run killed before it removed its checkpoint
    pattern = validate(config)
    if config.export is not None:
        check_export_model(config.model, config.trust_remote_code)  # before any work, not after it
    world = distributed.env_world_size()
    check_distributed(config, pattern, world)
    lazy = decide_lazy(config, pattern, world)
    if lazy:
        guard_off_when_lazy(config)
    device = distributed.rank_device(resolve_device(config.device))
    with distributed.process_group(device, config.rank_timeout):
        return _run(config, pattern, device, lazy, start, progress)


def _run(config: RunConfig, pattern, device: str, lazy: bool, start: float, progress) -> dict:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(config.seed)
    shard = distributed.current()
    distributed.agree({"config": settings_of(config.to_dict()), "lazy": lazy, "versions": versions(),
                       "model_files": model_files_fingerprint(config.model)})
    scale = {**({"lazy": True} if lazy else {}), **({"world_size": shard.world} if shard else {})}
    resolved = {"device": resolve_device(config.device), "lazy": lazy, "world_size": shard.world if shard else 1}
    checkpoint = RunCheckpoint.open(config, resolved, lazy, shard)  # the device before each rank takes its GPU
    clock = PhaseClock(device)  # run.json's "phases": where the time went, up to the first block and after
    try:
        suite = _zeroshot_suite(config.eval.zeroshot, config.eval.task_data)  # reads/downloads task data first
        with clock.phase("load"):
            model, tokenizer = load(config, lazy, device)
            check_model_fits(model, pattern, config)
        data = prepare_data(model, tokenizer, config, device=device, progress=progress, clock=clock)
        checkpoint.check_data(data.calib, {**data.evals, **data.guards})  # the guard's texts too
        checkpoint.begin()
        # speed: structured runs by default, in one process only (ranks would time each other's contention)
        speed_on = config.eval.speed if config.eval.speed is not None else (pattern.structured and shard is None)
        measured = Measurements(suite, config, device, speed_on, progress)
        with clock.phase("dense zero-shot and speed"):
            measured.dense(model, tokenizer, checkpoint)  # before the walk, which prunes the model in place
        params_dense = sum(p.numel() for p in model.parameters())
        placement = activation_placement(config, model, data, device, lazy)
        outcome = prune_and_recover(model, tokenizer, config, pattern, data, device, progress,
                                    stages=STAGES if config.eval.pruned else ("dense", "final"),
                                    checkpoint=checkpoint, placement=placement, clock=clock)
        with clock.phase("final zero-shot and speed"):
            measured.final(model, tokenizer, final_stage(config))
        outcome.phases = phases_record(clock, outcome.result, start)
        structure = get_pruner(config.prune.method).make_saveable(model)
        if structure is not None:
            structure = {"params_dense": params_dense, **structure,
                         "removed_fraction_of_blocks": outcome.plan["removed_fraction"],
                         "removed_fraction_of_model": round(1 - structure["params_pruned"] / params_dense, 6)}

        def record() -> dict:
            return build_record(config, model, pattern, device, data, outcome, measured.zeroshot(), start,
                                structure, measured.speed, scale)

        if shard is None or shard.main:  # rank 0 alone writes
            record = save_run(model, tokenizer, config, pattern, record, outcome, checkpoint, lazy)
        else:
            record = record()
        distributed.barrier()
    except Exception:
        checkpoint.failed()  # an error (not an interruption): leave nothing that blocks a corrected rerun
        raise
    finally:
        checkpoint.close()
    log.info("saved %s", config.out)
    return record


class Measurements:
    """Zero-shot accuracy and speed of the dense model (before the walk; kept in the checkpoint, so a
    resumed run does not redo them) and of the final model."""

    def __init__(self, suite, config: RunConfig, device: str, speed: bool, progress):
        self.suite, self.config, self.device, self.measure_speed, self.progress = suite, config, device, speed, progress
        self.zs: dict[str, dict | None] = {}
        self.speed: dict = {}

    def _zeroshot(self, model, tokenizer):
        if self.suite is None:
            return None
        return evaluate_suite(model, tokenizer, self.suite, self.config.eval.zeroshot_limit, self.device,
                              self.config.batch_size, self.progress)

    def dense(self, model, tokenizer, checkpoint) -> None:
        self.zs["dense"] = checkpoint.once("zeroshot_dense", lambda: self._zeroshot(model, tokenizer))
        if self.measure_speed:
            self.speed["dense"] = checkpoint.once("speed_dense", lambda: measure_speed(model, self.device))

    def final(self, model, tokenizer, stage: str) -> None:
        self.zs[stage] = self._zeroshot(model, tokenizer)
        if self.measure_speed:
            self.speed[stage] = measure_speed(model, self.device)

    def zeroshot(self) -> dict:
        return _zeroshot_record(self.suite, self.zs)


def save_run(model, tokenizer, config: RunConfig, pattern, make_record: Callable[[], dict], outcome: Outcome,
             checkpoint, lazy: bool) -> dict:
    """The output folder, atomically: the model (in its save dtype), run.json (``make_record()``, once the
    model is written: its file sizes and the wall time include the save), the block-loss plot; then the
    checkpoint goes. Returns the record."""
    with atomic_folder(config.out, config.overwrite) as tmp:
        kill_point("output")
        dtype = save_dtype(model, config.save_dtype, config.dtype)
        if lazy:
            _save_lazy(model, tokenizer, checkpoint, tmp, dtype)
        else:
            save_pretrained(model, tokenizer, tmp, dtype)
        record = make_record()
        record["resolved"]["save_dtype"] = str(dtype).removeprefix("torch.")  # what the files (and --export) hold
        if record.get("structure") is not None:
            record["structure"]["file_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        if config.export is not None:  # from the folder as saved (a lazy run holds no model in memory)
            report = export_saved(tmp, config, origin_of(config.model, name=Path(config.out).name))
            record["export"] = {"format": config.export, "file": Path(report.path).name,
                                "from_dtype": record["resolved"]["save_dtype"], **{
                                    k: v for k, v in dataclasses.asdict(report).items() if k != "path"}}
        write_json(tmp / "run.json", record)
        plot_block_losses(outcome.result.blocks, tmp / "block_losses.png",
                          f"{config.model}: {config.prune.method} {pattern} + {config.recover.method}", tuple(METRICS))
    checkpoint.remove()
    return record


def export_saved(folder, config: RunConfig, origin):
    """The saved model in ``folder`` (a temporary name), exported (``--export``) into it as
    ``model-<type>.gguf``; ``origin``: the run's name and where its model came from."""
    model, tokenizer = load_model(str(folder), "float32", "cpu")
    return write_gguf(model, tokenizer, Path(folder) / f"model-{config.export_type}.gguf", config.export_type,
                      origin)


def _save_lazy(model, tokenizer, checkpoint, folder, dtype) -> None:
    """A lazy run's output: the finished blocks' shards (from the checkpoint folder; cast one at a time
    when ``dtype`` is not the run's), the outside tensors, the index, config and tokenizer; loads with
    plain ``from_pretrained``, the same tensors as the eager run's ``save_pretrained``."""
    checkpoint.blocks.link_into(folder, dtype)
    writer = ShardWriter(folder, resume=True)
    outside = store_for(model).outside_state()
    writer.add({k: v.to(dtype) if v.is_floating_point() else v for k, v in outside.items()})
    writer.finish(model, dtype)
    tokenizer.save_pretrained(folder)


def build_record(config: RunConfig, model, pattern, device: str, data: Data, outcome: Outcome, zeroshot: dict,
                 start: float, structure: dict | None = None, speed: dict | None = None,
                 scale: dict | None = None) -> dict:
    """run.json: everything to rerun the run and everything it measured. ``scale``: how it ran when
    that is not one process with the model in memory (``{"lazy": True}``, ``{"world_size": 2}``)."""
    return {
        "config": config.to_dict(),
        "resolved": {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "calib_seqlen": data.calib_seqlen, "eval_seqlen": data.eval_seqlen, "pattern": str(pattern),
                     "recovery_settings": dataclasses.asdict(config.recovery_settings()),
                     "pruner_settings": dataclasses.asdict(config.pruner_settings()), "notes": data.notes,
                     "cwd": os.getcwd(),  # where a relative --model path is found again (ebft export)
                     **({"recipe_differences": PAPER_DIFFERENCES} if config.recover.recipe == "paper" else {}),
                     **(scale or {})},
        "versions": versions(),
        "seed": config.seed,
        "plan": outcome.plan,
        "blocks": outcome.result.blocks,
        "sparsity": walk_sparsity(model, outcome.result),
        "perplexity": outcome.perplexity,
        "eval_protocol": data.protocol,
        **({"self_calibration": data.self_draw.record} if data.self_draw is not None else {}),
        "recovery": outcome.cost,
        "finish": outcome.finish,
        **({"structure": structure} if structure else {}),
        **({"speed": speed} if speed else {}),
        **zeroshot,
        **({"phases": outcome.phases} if outcome.phases else {}),
        "wall_seconds": round(time.perf_counter() - start, 2),
        **peak_memory(device),
    }


def phases_record(clock: PhaseClock, result, start: float) -> dict:
    """run.json's ``phases``: seconds per phase of the run (load, tokenize, capture, plan, walk, evaluate, ...;
    the save is in ``wall_seconds`` only), the time from the start to the walk's first block, and the walk's
    blocks' time summed by phase (statistics, prune, recover, streams, checkpoint)."""
    seconds = {k: v for k, v in clock.take().items() if v >= 0.0005}
    blocks: dict[str, float] = {}
    for record in result.blocks:
        for name, value in (record.get("seconds_by_phase") or {}).items():
            blocks[name] = blocks.get(name, 0.0) + value
    first = None if result.first_block_at is None else round(result.first_block_at - start, 3)
    return {"seconds": seconds, "to_first_block": first, "blocks": {k: round(v, 3) for k, v in blocks.items()}}


def walk_sparsity(model, result) -> dict:
    """run.json's sparsity: read from the model's weights where the walk kept the masks, else from the
    counts the walk took of each block before freeing it (a lazy run); the same numbers either way."""
    if result.masks or not result.sparsity_counts:
        return sparsity_report(model, result.masks)
    zeros = sum(z for z, _ in result.sparsity_counts.values())
    total = sum(n for _, n in result.sparsity_counts.values())
    return {"overall": round(zeros / total, 6) if total else 0.0,
            "layers": {name: round(z / n, 6) for name, (z, n) in result.sparsity_counts.items()}}


# ----------------------------------------------------------------------------- what a run can do, decided up front

def guard_off_when_lazy(config: RunConfig) -> None:
    """A lazy run writes each block as it finishes, so the end-to-end guard could not put the blocks as pruned
    back: a guard the user asked for is refused in one line; the default one is turned off (not paid for)."""
    if not guarded(config):
        return
    given = getattr(config, "_given", ())
    if "recover.guard" in given or config.recover.guard_texts:
        key = ("--recover-guard-on (recover.guard_texts)" if config.recover.guard_texts
               else "--recover-guard (recover.guard)")
        raise ConfigError(key, config.recover.guard_texts or config.recover.guard,
                          "the guard cannot put the pruned blocks back in a lazy run (each block is written as it "
                          "finishes): drop the guard (--recover-guard 0) or load the model whole (--no-lazy)")
    log.warning("lazy loading: the end-to-end guard is off (a lazy run cannot put the pruned blocks back)")
    config.recover.guard = 0


def decide_lazy(config: RunConfig, pattern, world: int = 1) -> bool:
    """``--lazy``: yes (refused with one line if the run needs the whole model); ``--no-lazy``: no;
    unset: yes when the safetensors weights, times the ranks on this host, exceed half the available
    host memory and nothing in the run needs the whole model."""
    blockers = lazy_blockers(config, pattern)
    if config.lazy:
        if blockers:
            raise ConfigError("lazy", True, f"{blockers[0]}; drop --lazy")
        return True
    if config.lazy is False or blockers:
        return False
    size, free = weights_bytes(config.model), host_available()
    if size is None or free is None:
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or 1)
    if size * local <= free / 2:
        return False
    log.warning("loading %s lazily, block by block: its weights (%.1f GiB%s) exceed half the available "
                "memory (%.1f GiB); --no-lazy loads it whole", config.model, size / 2**30,
                f" x {local} ranks" if local > 1 else "", free / 2**30)
    return True


# ----------------------------------------------------------------------------- evaluate

def evaluate(model: str, sources=("wikitext2",), seqlen: int | None = None, windows: int | None = None,
             device: str = "auto", dtype: str = "auto", batch_size: int = 1, tasks=None,
             task_data: str | None = None, limit: int | None = None, progress=None,
             trust_remote_code: bool = False) -> dict:
    """Perplexity of a model (hub id, folder, .gguf) on each source: ``{"<source>": ppl}``.

    With zero-shot ``tasks`` (lm-eval names, a comma list, or "paper"; offline from ``task_data``;
    first ``limit`` items) the result also holds ``"zeroshot": {"<task>": {"acc": ..}}`` and
    ``"zeroshot_average"`` (mean acc); ``sources=()`` skips perplexity. ``"eval_protocol"`` says how
    each text was scored (window length, windows, tokens, BOS). ``progress(event, **info)`` hears the
    walk's ``block_start``/``block_end`` (every window goes through one block at a time) and zero-shot's
    ``task_start``/``task_end``. ``trust_remote_code``: let transformers run Python code shipped with
    the model (off: such a model is refused in one line).
    """
    config = RunConfig(model=model, device=device, dtype=dtype, batch_size=batch_size)
    config.eval.sources, config.eval.seqlen, config.eval.windows = list(sources), seqlen, windows
    config.eval.zeroshot, config.eval.task_data, config.eval.zeroshot_limit = tasks or [], task_data, limit
    config.check_types()
    check_device(config.device)
    for src in config.eval.sources:
        check_source(src, "eval")
    plan_tasks(tasks, task_data)
    check_model_source(model)
    device = resolve_device(device)
    suite = _zeroshot_suite(tasks, task_data)
    net, tokenizer = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
    data = prepare_data(net, tokenizer, config, calibrate=False)
    out: dict = {}
    if data.evals:
        out = model_perplexities(net, data.evals, device, batch_size, progress)
        out["eval_protocol"] = data.protocol
    if suite is not None:
        zs = evaluate_suite(net, tokenizer, suite, limit, device, batch_size, progress)
        out.update(zeroshot=zs, zeroshot_average=average(zs))
    return out


def _zeroshot_suite(tasks, task_data):
    """The zero-shot tasks, built (data read or downloaded) before any model is loaded; None if none."""
    specs = plan_tasks(tasks, task_data)
    return load_tasks(specs) if specs else None


def _zeroshot_record(suite, by_stage: dict[str, dict | None]) -> dict:
    """run.json's ``zeroshot: {task: {stage: metrics}}``, ``zeroshot_average: {stage: mean acc}``."""
    if suite is None:
        return {}
    return {"zeroshot": {s.name: {stage: res[s.name] for stage, res in by_stage.items()} for s in suite.specs},
            "zeroshot_average": {stage: average(res) for stage, res in by_stage.items()},
            "zeroshot_tasks": {s.name: s.describe() for s in suite.specs}}
