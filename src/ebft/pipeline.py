"""The pipeline, one straight line: config → load → data → plan → walk → evaluate → save.

``run`` (the ``ebft run`` command), each ``ebft sweep`` cell and ``evaluate`` (``ebft eval``) are this
line with parts left out; the run record (``run.json``) is built in one place, :func:`build_record`.

>>> from ebft import RunConfig, run
>>> cfg = RunConfig(model="builtin:smollm2", out="runs/demo")
>>> cfg.prune.method, cfg.prune.sparsity = "wanda", 0.5
>>> record = run(cfg)                      # prunes, evaluates, saves runs/demo + run.json
>>> record["perplexity"]["wikitext2"]      # {"dense": ..., "pruned": ..., "recovered": ...}
"""
from __future__ import annotations

import logging
import math
import platform
import random
import resource
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .config import RunConfig, budget_seconds, check_device, check_source, resolve_device
from .data import adds_bos, calibration_windows, eval_tokens, resolve_source, source_name
from .errors import ConfigError, EbftError
from .evaluation.perplexity import C4_WINDOWS, eval_windows, stream_perplexity
from .evaluation.speed import measure_speed
from .evaluation.zeroshot import average, evaluate_suite, load_tasks, plan_tasks
from .export import atomic_folder, save_dtype, save_pretrained, sparsity_report, write_json
from .masks import validate_width
from .models import context_length, find_blocks, find_linears, load_model
from .plan import make_plan
from .prune import get_pruner
from .recover import ModelContext, TrainingText, get_recovery
from .report import plot_block_losses
from .structured import make_saveable_
from .walk import STAGES, PruneSpec, RecoverSpec, walk

log = logging.getLogger(__name__)


def versions() -> dict:
    import transformers

    return {"ebft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: str) -> dict:
    """Peak memory so far: on CUDA the allocator's peak since the last reset (the run's start); on CPU
    the process's peak resident set size since :func:`reset_host_peak` (the start of :func:`run`; in a
    sweep, since the process started: every earlier cell included). Linux's ``VmHWM`` is read, which
    unlike ``ru_maxrss`` does not start from the parent's peak in a subprocess; elsewhere ``ru_maxrss``."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "cuda"}
    rss = _vm_hwm()
    if rss is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_bytes": rss, "peak_memory_of": "process RSS"}


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_host_peak() -> None:
    """Restart the host peak-memory measurement at the current resident set (Linux: writing 5 to
    ``/proc/self/clear_refs`` resets ``VmHWM``; elsewhere nothing)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def final_stage(config: RunConfig) -> str:
    """What the final model is called in records: "finished" after an end-to-end finish, else "pruned"
    without a recovery, else "recovered"."""
    if config.finish.method != "none":
        return "finished"
    return "pruned" if config.recover.method == "none" else "recovered"


# ----------------------------------------------------------------------------- data

@dataclass
class Data:
    """Token windows for a run, and how they were made (run.json's ``resolved`` and ``eval_protocol``)."""

    calib: torch.Tensor | None  # [nsamples, seqlen]
    evals: dict[str, torch.Tensor]  # name -> [windows, seqlen]
    calib_seqlen: int | None
    eval_seqlen: int
    protocol: dict = field(default_factory=dict)  # name -> {seqlen, windows, tokens, bos, ...}
    notes: list[str] = field(default_factory=list)  # clamped lengths and the like


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


def prepare_data(model, tokenizer, config: RunConfig, calibrate: bool = True) -> Data:
    """Calibration windows and evaluation windows; lengths default to min(model context, 2048) and are
    clamped to the model's context (with a warning, recorded in run.json)."""
    context, notes = context_length(model), []
    calib_seqlen = _clamped(config.calib.seqlen, context, "calib.seqlen", notes) if calibrate else None
    eval_seqlen = _clamped(config.eval.seqlen, context, "eval.seqlen", notes)
    calib = (calibration_windows(tokenizer, config.calib.source, config.calib.nsamples, calib_seqlen, config.seed)
             if calibrate else None)
    evals, protocol = eval_sets(tokenizer, config.eval.sources, eval_seqlen, config.eval.windows)
    return Data(calib, evals, calib_seqlen, eval_seqlen, protocol, notes)


def check_model_fits(model, pattern, layers: str | None, pruner_settings=None) -> None:
    """What can only be checked on the loaded model, before any work: every block has linears to prune
    (a ``--layers`` regex that matches none is an error, not a silent no-op), N:M widths divide, and for
    structured pruning the family's blocks can be shrunk and saved (with the biases compensation needs)."""
    _, blocks = find_blocks(model)
    if pattern.structured:
        from .structured import block_layout
        from .structured.saving import _bias_flags

        layouts = [block_layout(block, model.config) for block in blocks]  # clear errors for unknown layouts
        if getattr(pruner_settings, "bias_compensation", False):
            needed = {layouts[0].attention.out_proj, layouts[0].mlp.out_proj}
            _bias_flags(model, model.config, needed, getattr(model.config, "model_type", type(model).__name__))
        return
    for index, block in enumerate(blocks):
        linears = find_linears(block, layers)
        if not linears:
            if layers is not None:
                names = ", ".join(find_linears(block)) or "none"
                raise ConfigError("prune.layers", layers, f"matches no linear in block {index}; its linears: {names}")
            raise EbftError(f"{type(model).__name__}: block {index} has no nn.Linear layers to prune "
                            f"(this family's layers are {type(block).__name__} internals ebft cannot prune)")
        for name, linear in linears.items():
            validate_width(linear.in_features, pattern, name)


# ----------------------------------------------------------------------------- plan + walk

@dataclass
class Outcome:
    """What pruning and recovery did: the walk's result, perplexities per stage, the recovery's cost."""

    result: object  # ebft.walk.WalkResult
    perplexity: dict[str, dict[str, float]]
    cost: dict
    plan: dict | None = None  # the allocation's record (OWL's per-block sparsities)
    finish: dict | None = None  # the end-to-end finish's record (ebft.recover.finish)


def prune_and_recover(model, tokenizer, config: RunConfig, pattern, data: Data, device: str, progress=None,
                      stages=STAGES, checkpoint=None, placement: dict[str, str] | None = None) -> Outcome:
    """Plan, prune the loaded ``model`` in place, recover it, evaluate ``data.evals`` at ``stages``; then
    the optional end-to-end finish (``config.finish``), evaluated as the stage "finished".

    The walk's final stage is named "recovered", or "pruned" with ``--recover none``. ``checkpoint``
    (:class:`ebft.checkpoint.RunCheckpoint`): the plan and the walk continue from it and are saved to it.
    ``placement``: where the walk keeps each activation group (:func:`activation_placement`).
    """
    from .recover.finish import finish, prepare_finish

    text = TrainingText(config.calib.source, data.calib_seqlen, config.seed)
    # the finish's windows and (kd) the dense teacher: from the dense model, before the walk prunes it
    prepared = prepare_finish(model, tokenizer, text, config.calib.nsamples, config.finish, device,
                              config.batch_size)
    outcome = _prune_and_recover(model, tokenizer, config, pattern, data, device, progress, stages, checkpoint, text,
                                 placement)
    if prepared is None:
        return outcome
    ctx = ModelContext(model, tokenizer, outcome.result.masks, text, torch.device(device), config.seed, progress)
    outcome.finish = finish(ctx, config.finish, prepared)
    after = walk(model, None, None, eval_ids=data.evals, device=device, batch_size=config.batch_size)
    for name, by_stage in stage_perplexities(model, after, data.evals, device, final="finished").items():
        outcome.perplexity[name]["finished"] = by_stage["dense"]  # an eval-only walk calls the model "dense"
    return outcome


def _prune_and_recover(model, tokenizer, config: RunConfig, pattern, data: Data, device: str, progress, stages,
                       checkpoint, text, placement) -> Outcome:
    recovery = get_recovery(config.recover.method)
    settings = config.recovery_settings()
    if checkpoint is not None and checkpoint.has_plan:
        plan = checkpoint.plan()
    else:
        plan = make_plan(model, data.calib, pattern, config.allocation_settings(), config.prune.layers, device,
                         config.batch_size, progress, config.pruner_settings())
        if checkpoint is not None:
            checkpoint.save_plan(plan)
    spec = PruneSpec(get_pruner(config.prune.method), plan.patterns if plan else pattern, config.prune.layers,
                     config.pruner_settings(), plan.structures if plan else None)
    plan_record = plan.record if plan else None
    if recovery.scope == "model":  # LoRA: the walk only prunes; then the whole model trains; evaluate again
        result = walk(model, data.calib, spec, None, data.evals, stages, device, config.batch_size, progress,
                      checkpoint=checkpoint, placement=placement)
        ppl = stage_perplexities(model, result, data.evals, device, final="pruned")
        start = time.perf_counter()
        ctx = ModelContext(model, tokenizer, result.masks, text, torch.device(device), config.seed, progress)
        details = recovery.fn(ctx, settings) or {}
        cost = {"method": recovery.name, "scope": "model", "seconds": round(time.perf_counter() - start, 2),
                **peak_memory(device), "trainable_params": details.pop("trainable_params", 0), **details}
        after = walk(model, None, None, eval_ids=data.evals, device=device, batch_size=config.batch_size)
        for name, by_stage in stage_perplexities(model, after, data.evals, device, final="recovered").items():
            ppl[name]["recovered"] = by_stage["dense"]  # an eval-only walk sees the current model as "dense"
        return Outcome(result, ppl, cost, plan_record)
    budget = budget_seconds(config.recover.budget) if config.recover.budget is not None else None
    recover = RecoverSpec(recovery, settings, config.seed, budget)
    result = walk(model, data.calib, spec, recover, data.evals, stages, device, config.batch_size, progress,
                  checkpoint=checkpoint, placement=placement)
    ppl = stage_perplexities(model, result, data.evals, device, "pruned" if recovery.name == "none" else "recovered")
    return Outcome(result, ppl, block_recovery_cost(recovery.name, result.blocks, device), plan_record)


def stage_perplexities(model, result, evals, device, final: str) -> dict[str, dict[str, float]]:
    """``{source: {stage: ppl}}`` from the walk's streams; the walk's stage "final" is named ``final``.

    Under torch.distributed each rank scores its windows and the NLL sums and token counts are added."""
    from .distributed import all_reduce_sums, current
    from .walk import tail_nll_sum

    shard = current()
    ppl: dict[str, dict] = {}
    for key, hidden in result.streams.items():
        name, stage = key.rsplit("/", 1)
        label = final if stage == "final" else stage
        if shard is None:
            value = stream_perplexity(model, hidden, evals[name], device, result.returns_tuple)
        else:
            total, count = tail_nll_sum(model, hidden, shard.take(evals[name]), torch.device(device),
                                        result.returns_tuple)
            total, count = all_reduce_sums(total, count)
            value = math.exp(total / max(count, 1))
        ppl.setdefault(name, {})[label] = round(value, 4)
    return ppl


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


# ----------------------------------------------------------------------------- run

def build_record(config: RunConfig, model, pattern, device: str, data: Data, outcome: Outcome, zeroshot: dict,
                 start: float, structure: dict | None = None, speed: dict | None = None,
                 scale: dict | None = None) -> dict:
    """run.json: everything to rerun the run and everything it measured. ``scale``: how it ran when
    that is not one process with the model in memory (``{"lazy": True}``, ``{"world_size": 2}``)."""
    return {
        "config": config.to_dict(),
        "resolved": {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "calib_seqlen": data.calib_seqlen, "eval_seqlen": data.eval_seqlen, "pattern": str(pattern),
                     "recovery_settings": _as_dict(config.recovery_settings()),
                     "pruner_settings": _as_dict(config.pruner_settings()), "notes": data.notes, **(scale or {})},
        "versions": versions(),
        "seed": config.seed,
        "plan": outcome.plan,
        "blocks": outcome.result.blocks,
        "sparsity": walk_sparsity(model, outcome.result),
        "perplexity": outcome.perplexity,
        "eval_protocol": data.protocol,
        "recovery": outcome.cost,
        "finish": outcome.finish,
        **({"structure": structure} if structure else {}),
        **({"speed": speed} if speed else {}),
        **zeroshot,
        "wall_seconds": round(time.perf_counter() - start, 2),
        **peak_memory(device),
    }


def walk_sparsity(model, result) -> dict:
    """run.json's sparsity: read from the model's weights where the walk kept the masks, else from the
    counts the walk took of each block before freeing it (a lazy run); the same numbers either way."""
    if result.masks or not result.sparsity_counts:
        return sparsity_report(model, result.masks)
    zeros = sum(z for z, _ in result.sparsity_counts.values())
    total = sum(n for _, n in result.sparsity_counts.values())
    return {"overall": round(zeros / total, 6) if total else 0.0,
            "layers": {name: round(z / n, 6) for name, (z, n) in result.sparsity_counts.items()}}


def _as_dict(settings) -> dict:
    import dataclasses

    return dataclasses.asdict(settings)


def run(config: RunConfig, progress=None) -> dict:
    """Prune (and recover) ``config.model``, evaluate before and after, save to ``config.out``.

    Returns the run record (also written as ``run.json`` in the output folder). A killed run
    continues from its checkpoint when called again with the same settings (:mod:`ebft.checkpoint`);
    ``config.lazy`` loads the model block by block (:mod:`ebft.lazy`); under ``torchrun`` the ranks
    share the windows and rank 0 alone writes (:mod:`ebft.distributed`).
    """
    from . import distributed
    from .checkpoint import discard_if_finished

    start = time.perf_counter()
    reset_host_peak()
    if config.out and distributed.is_main_process():
        discard_if_finished(config.out)  # a finished run killed before it removed its checkpoint
    pattern = config.validate()
    world = distributed.env_world_size()
    check_distributed(config, world)
    lazy = decide_lazy(config, pattern, world)
    device = distributed.rank_device(resolve_device(config.device))
    started = distributed.setup(device)
    try:
        return _run(config, pattern, device, lazy, start, progress)
    finally:
        if started:
            distributed.teardown()


def _run(config: RunConfig, pattern, device: str, lazy: bool, start: float, progress) -> dict:
    from . import distributed
    from .checkpoint import RunCheckpoint, kill_point

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(config.seed)
    shard = distributed.current()
    main = shard is None or shard.main
    scale = {**({"lazy": True} if lazy else {}), **({"world_size": shard.world} if shard else {})}
    resolved = {"device": resolve_device(config.device), "lazy": lazy, "world_size": shard.world if shard else 1}
    checkpoint = RunCheckpoint.open(config, resolved, lazy, shard)  # the device before each rank takes its GPU
    try:
        suite = _zeroshot_suite(config.eval.zeroshot, config.eval.task_data)  # reads/downloads task data first
        model, tokenizer = _load(config, lazy, device)
        check_model_fits(model, pattern, config.prune.layers, config.pruner_settings())
        data = prepare_data(model, tokenizer, config)
        if checkpoint is not None:
            checkpoint.check_data(data.calib, data.evals)
            checkpoint.begin()

        zs_args = (suite, config.eval.zeroshot_limit, device, config.batch_size, progress)
        # before the walk, which prunes the model in place; kept in the checkpoint, not redone on resuming
        zs_dense = _once(checkpoint, "zeroshot_dense", lambda: _zeroshot(model, tokenizer, *zs_args))
        # speed: structured runs by default, in one process only (ranks would time each other's contention)
        measure = config.eval.speed if config.eval.speed is not None else (pattern.structured and shard is None)
        speed = {"dense": _once(checkpoint, "speed_dense", lambda: measure_speed(model, device))} if measure else {}
        params_dense = sum(p.numel() for p in model.parameters())
        placement = activation_placement(config, model, data, device, lazy)
        outcome = prune_and_recover(model, tokenizer, config, pattern, data, device, progress, checkpoint=checkpoint,
                                    placement=placement)
        final = final_stage(config)
        zs = _zeroshot_record(suite, {"dense": zs_dense, final: _zeroshot(model, tokenizer, *zs_args)})
        if measure:
            speed[final] = measure_speed(model, device)
        structure = _make_saveable(model, params_dense, outcome) if pattern.structured else None

        if not main:  # rank 0 alone writes
            record = build_record(config, model, pattern, device, data, outcome, zs, start, structure, speed, scale)
            distributed.barrier()
            if checkpoint is not None:
                checkpoint.close()
            return record
        with atomic_folder(config.out, config.overwrite) as tmp:
            kill_point("output")
            dtype = save_dtype(model, config.save_dtype, config.dtype)
            if lazy:
                _save_lazy(model, tokenizer, checkpoint, tmp, dtype)
            else:
                save_pretrained(model, tokenizer, tmp, dtype)
            if structure is not None:
                structure["file_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
            record = build_record(config, model, pattern, device, data, outcome, zs, start, structure, speed, scale)
            write_json(tmp / "run.json", record)
            plot_block_losses(outcome.result.blocks, tmp / "block_losses.png",
                              f"{config.model}: {config.prune.method} {pattern} + {config.recover.method}")
        if checkpoint is not None:
            checkpoint.remove()
        distributed.barrier()
    finally:
        if checkpoint is not None:
            checkpoint.close()
    log.info("saved %s", config.out)
    return record


def activation_placement(config: RunConfig, model, data: Data, device: str, lazy: bool = False,
                         free_accelerator: int | None = None, free_host: int | None = None) -> dict[str, str] | None:
    """On a GPU, where the walk keeps each activation group (calibration chain, dense-model stream,
    evaluation streams): on the accelerator or in pinned host memory, by the same arithmetic as
    ``ebft plan`` (:func:`ebft.budget.plan`), with this run's real lengths and window counts and the
    memory free now (or ``free_accelerator``/``free_host``). None on a CPU run: everything is host memory."""
    if torch.device(device).type != "cuda" and free_accelerator is None:
        return None
    import dataclasses

    from . import budget

    s = budget.settings_from_run_config(config, load="lazy" if lazy else "eager")
    windows = max((ids.shape[0] for ids in data.evals.values()), default=0)
    s = dataclasses.replace(s, device=device if torch.device(device).type == "cuda" else "cuda",
                            calib_seqlen=data.calib_seqlen, eval_seqlen=data.eval_seqlen or s.eval_seqlen,
                            eval_texts=len(data.evals), eval_windows=windows)
    plan = budget.plan(model.config, s, free_accelerator=free_accelerator, free_host=free_host)
    where = dict(plan.placement.where)
    log.info("activations: %s (%s)", ", ".join(f"{g} -> {w}" for g, w in where.items()), plan.placement.decision)
    if plan.placement.decision == budget.REDUCE:
        log.warning("this run may not fit: %s (ebft plan suggests what to reduce)", plan.placement.reason)
    return where


def _load(config: RunConfig, lazy: bool, device: str):
    """``(model, tokenizer)``: in host memory, or (lazy) a skeleton whose blocks the walk reads one by one."""
    if not lazy:
        return load_model(config.model, config.dtype, device, trust_remote_code=config.trust_remote_code)
    from .lazy import load_lazy

    model, tokenizer, store = load_lazy(config.model, config.dtype, device, trust_remote_code=config.trust_remote_code)
    store.load_outside()  # embeddings, final norm, head: resident for capture and the tail
    return model, tokenizer


def _make_saveable(model, params_dense: int, outcome: Outcome) -> dict:
    """Structured runs: one block shape the family's config can express (adaptive: padded); the record."""
    params_pruned = sum(p.numel() for p in model.parameters())
    shape = make_saveable_(model)
    return {"params_dense": params_dense, "params_pruned": params_pruned,
            "params_saved": shape.params_saved, "padding_params": shape.padding_params,
            "removed_fraction_of_blocks": outcome.plan["removed_fraction"],
            "removed_fraction_of_model": round(1 - params_pruned / params_dense, 6),
            "saved_config": {"num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
                             "intermediate_size": shape.intermediate_size}}


def _once(checkpoint, key: str, compute):
    """``compute()``, kept in the checkpoint so that a resumed run does not redo it."""
    if checkpoint is None:
        return compute()
    missing = object()
    value = checkpoint.extra(key, missing)
    if value is missing:
        value = compute()
        checkpoint.save_extra(key, value)
    return value


def _save_lazy(model, tokenizer, checkpoint, folder, dtype) -> None:
    """A lazy run's output: the finished blocks' shards (from the checkpoint folder; cast one at a time
    when ``dtype`` is not the run's), the outside tensors, the index, config and tokenizer; loads with
    plain ``from_pretrained``, the same tensors as the eager run's ``save_pretrained``."""
    from .lazy import ShardWriter, store_for

    checkpoint.link_blocks_into(folder, dtype)
    writer = ShardWriter(folder, resume=True)
    outside = store_for(model).outside_state()
    writer.add({k: v.to(dtype) if v.is_floating_point() else v for k, v in outside.items()})
    writer.finish(model, dtype)
    tokenizer.save_pretrained(folder)


def lazy_blockers(config: RunConfig, pattern) -> list[str]:
    """What in this run needs the whole model in memory, so that it cannot load lazily."""
    from .models import BUILTIN_MODELS

    why = []
    if str(config.model).endswith(".gguf") or config.model in BUILTIN_MODELS:
        why.append("GGUF models load whole (transformers dequantises the file at once)")
    if get_recovery(config.recover.method).scope == "model":
        why.append(f"recovery {config.recover.method} trains the whole model at once")
    if config.eval.zeroshot:
        why.append("zero-shot evaluation runs the whole model (evaluate the saved model with ebft eval --tasks)")
    if config.eval.speed:
        why.append("speed measurement runs the whole model")
    if config.finish.method != "none":
        why.append(f"the finish ({config.finish.method}) trains the whole model at once")
    if pattern.structured:
        why.append("structured pruning gives the saved model one block shape from all blocks at the end")
    return why


def decide_lazy(config: RunConfig, pattern, world: int = 1) -> bool:
    """``--lazy``: yes (refused with one line if the run needs the whole model); ``--no-lazy``: no;
    unset: yes when the safetensors weights, times the ranks on this host, exceed half the available
    host memory and nothing in the run needs the whole model."""
    import os

    from .lazy import available_memory, weights_bytes

    blockers = lazy_blockers(config, pattern)
    if config.lazy:
        if blockers:
            raise ConfigError("lazy", True, f"{blockers[0]}; drop --lazy")
        return True
    if config.lazy is False or blockers:
        return False
    size, free = weights_bytes(config.model), available_memory()
    if size is None or free is None:
        return False
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or 1)
    if size * local <= free / 2:
        return False
    log.warning("loading %s lazily, block by block: its weights (%.1f GiB%s) exceed half the available "
                "memory (%.1f GiB); --no-lazy loads it whole", config.model, size / 2**30,
                f" x {local} ranks" if local > 1 else "", free / 2**30)
    return True


def check_distributed(config: RunConfig, world: int) -> None:
    """What a run under torchrun cannot do, refused before anything is loaded."""
    if world < 2:
        return
    if get_recovery(config.recover.method).scope == "model":
        raise ConfigError("recover", config.recover.method, "trains the whole model in one process; run it without "
                          "torchrun (or use a block-wise recovery: ebft, ebft-mask, dsnot, none)")
    if config.finish.method != "none":
        raise ConfigError("finish", config.finish.method, "trains the whole model in one process; run it without "
                          "torchrun, or leave the finish out")
    if config.eval.zeroshot:
        raise ConfigError("eval.zeroshot", ",".join(config.eval.zeroshot), "runs in one process: evaluate the saved "
                          "model with ebft eval --tasks, without torchrun")
    if config.eval.speed:
        raise ConfigError("eval.speed", True, "measures one process: run ebft without torchrun to measure speed")
    if config.calib.nsamples < world:
        raise ConfigError("calib.nsamples", config.calib.nsamples,
                          f"must be at least the number of ranks ({world}): each rank holds a share of the windows")


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
    from .models import check_model_source

    check_model_source(model)
    device = resolve_device(device)
    suite = _zeroshot_suite(tasks, task_data)
    net, tokenizer = load_model(model, dtype, device, trust_remote_code=trust_remote_code)
    data = prepare_data(net, tokenizer, config, calibrate=False)
    out: dict = {}
    if data.evals:
        result = walk(net, None, None, eval_ids=data.evals, device=device, batch_size=batch_size, progress=progress)
        ppl = stage_perplexities(net, result, data.evals, device, final="dense")
        out = {name: by_stage["dense"] for name, by_stage in ppl.items()}
        out["eval_protocol"] = data.protocol
    if suite is not None:
        zs = _zeroshot(net, tokenizer, suite, limit, device, batch_size, progress)
        out.update(zeroshot=zs, zeroshot_average=average(zs))
    return out


def _zeroshot_suite(tasks, task_data):
    """The zero-shot tasks, built (data read or downloaded) before any model is loaded; None if none."""
    specs = plan_tasks(tasks, task_data)
    return load_tasks(specs) if specs else None


def _zeroshot(model, tokenizer, suite, limit, device, batch_size, progress=None) -> dict | None:
    return None if suite is None else evaluate_suite(model, tokenizer, suite, limit, device, batch_size, progress)


def _zeroshot_record(suite, by_stage: dict[str, dict | None]) -> dict:
    """run.json's ``zeroshot: {task: {stage: metrics}}``, ``zeroshot_average: {stage: mean acc}``."""
    if suite is None:
        return {}
    return {"zeroshot": {s.name: {stage: res[s.name] for stage, res in by_stage.items()} for s in suite.specs},
            "zeroshot_average": {stage: average(res) for stage, res in by_stage.items()},
            "zeroshot_tasks": {s.name: s.describe() for s in suite.specs}}
