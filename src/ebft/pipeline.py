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
import platform
import random
import resource
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .config import RunConfig, check_device, check_source, resolve_device
from .data import adds_bos, calibration_windows, eval_tokens, resolve_source, source_name
from .errors import ConfigError, EbftError
from .evaluation.perplexity import C4_WINDOWS, eval_windows, stream_perplexity
from .evaluation.speed import measure_speed
from .evaluation.zeroshot import average, evaluate_suite, load_tasks, plan_tasks
from .export import atomic_folder, save_pretrained, sparsity_report, write_json
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
    the process's peak resident set size, process-wide and never reset (it includes loading the model,
    and in a sweep every earlier cell)."""
    if torch.device(device).type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"peak_memory_bytes": rss, "peak_memory_of": "process RSS"}


def final_stage(method: str) -> str:
    """What the model after the walk is called in records: "pruned" without a recovery, else "recovered"."""
    return "pruned" if method == "none" else "recovered"


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


def prune_and_recover(model, tokenizer, config: RunConfig, pattern, data: Data, device: str, progress=None,
                      stages=STAGES) -> Outcome:
    """Plan, prune the loaded ``model`` in place, recover it, evaluate ``data.evals`` at ``stages``.

    The final stage is named "recovered", or "pruned" with ``--recover none``.
    """
    recovery = get_recovery(config.recover.method)
    settings = config.recovery_settings()
    plan = make_plan(model, data.calib, pattern, config.allocation_settings(), config.prune.layers, device,
                     config.batch_size, progress, config.pruner_settings())
    spec = PruneSpec(get_pruner(config.prune.method), plan.patterns if plan else pattern, config.prune.layers,
                     config.pruner_settings(), plan.structures if plan else None)
    plan_record = plan.record if plan else None
    if recovery.scope == "model":  # LoRA: the walk only prunes; then the whole model trains; evaluate again
        result = walk(model, data.calib, spec, None, data.evals, stages, device, config.batch_size, progress)
        ppl = stage_perplexities(model, result, data.evals, device, final="pruned")
        start = time.perf_counter()
        text = TrainingText(config.calib.source, data.calib_seqlen, config.seed)
        ctx = ModelContext(model, tokenizer, result.masks, text, torch.device(device), config.seed, progress)
        details = recovery.fn(ctx, settings) or {}
        cost = {"method": recovery.name, "scope": "model", "seconds": round(time.perf_counter() - start, 2),
                **peak_memory(device), "trainable_params": details.pop("trainable_params", 0), **details}
        after = walk(model, None, None, eval_ids=data.evals, device=device, batch_size=config.batch_size)
        for name, by_stage in stage_perplexities(model, after, data.evals, device, final="recovered").items():
            ppl[name]["recovered"] = by_stage["dense"]  # an eval-only walk sees the current model as "dense"
        return Outcome(result, ppl, cost, plan_record)
    recover = RecoverSpec(recovery, settings, config.seed)
    result = walk(model, data.calib, spec, recover, data.evals, stages, device, config.batch_size, progress)
    ppl = stage_perplexities(model, result, data.evals, device, final_stage(config.recover.method))
    return Outcome(result, ppl, block_recovery_cost(recovery.name, result.blocks, device), plan_record)


def stage_perplexities(model, result, evals, device, final: str) -> dict[str, dict[str, float]]:
    """``{source: {stage: ppl}}`` from the walk's streams; the walk's stage "final" is named ``final``."""
    ppl: dict[str, dict] = {}
    for key, hidden in result.streams.items():
        name, stage = key.rsplit("/", 1)
        label = final if stage == "final" else stage
        value = stream_perplexity(model, hidden, evals[name], device, result.returns_tuple)
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
                 start: float, structure: dict | None = None, speed: dict | None = None) -> dict:
    """run.json: everything to rerun the run and everything it measured."""
    return {
        "config": config.to_dict(),
        "resolved": {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "calib_seqlen": data.calib_seqlen, "eval_seqlen": data.eval_seqlen, "pattern": str(pattern),
                     "recovery_settings": _as_dict(config.recovery_settings()),
                     "pruner_settings": _as_dict(config.pruner_settings()), "notes": data.notes},
        "versions": versions(),
        "seed": config.seed,
        "plan": outcome.plan,
        "blocks": outcome.result.blocks,
        "sparsity": sparsity_report(model, outcome.result.masks),
        "perplexity": outcome.perplexity,
        "eval_protocol": data.protocol,
        "recovery": outcome.cost,
        **({"structure": structure} if structure else {}),
        **({"speed": speed} if speed else {}),
        **zeroshot,
        "wall_seconds": round(time.perf_counter() - start, 2),
        **peak_memory(device),
    }


def _as_dict(settings) -> dict:
    import dataclasses

    return dataclasses.asdict(settings)


def run(config: RunConfig, progress=None) -> dict:
    """Prune (and recover) ``config.model``, evaluate before and after, save to ``config.out``.

    Returns the run record (also written as ``run.json`` in the output folder).
    """
    start = time.perf_counter()
    pattern = config.validate()
    device = resolve_device(config.device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed_everything(config.seed)
    suite = _zeroshot_suite(config.eval.zeroshot, config.eval.task_data)  # reads/downloads task data first
    model, tokenizer = load_model(config.model, config.dtype, device)
    check_model_fits(model, pattern, config.prune.layers, config.pruner_settings())
    data = prepare_data(model, tokenizer, config)

    zs_args = (suite, config.eval.zeroshot_limit, device, config.batch_size)
    zs_dense = _zeroshot(model, tokenizer, *zs_args)  # before the walk: it prunes the model in place
    measure = config.eval.speed if config.eval.speed is not None else pattern.structured
    speed = {"dense": measure_speed(model, device)} if measure else {}
    params_dense = sum(p.numel() for p in model.parameters())
    outcome = prune_and_recover(model, tokenizer, config, pattern, data, device, progress)
    final = final_stage(config.recover.method)
    zs = _zeroshot_record(suite, {"dense": zs_dense, final: _zeroshot(model, tokenizer, *zs_args)})
    if measure:
        speed[final] = measure_speed(model, device)
    structure = None
    if pattern.structured:  # one block shape the family's config can express (adaptive: padded)
        params_pruned = sum(p.numel() for p in model.parameters())
        shape = make_saveable_(model)
        structure = {"params_dense": params_dense, "params_pruned": params_pruned,
                     "params_saved": shape.params_saved, "padding_params": shape.padding_params,
                     "removed_fraction_of_blocks": outcome.plan["removed_fraction"],
                     "removed_fraction_of_model": round(1 - params_pruned / params_dense, 6),
                     "saved_config": {"num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
                                      "intermediate_size": shape.intermediate_size}}

    with atomic_folder(config.out, config.overwrite) as tmp:
        save_pretrained(model, tokenizer, tmp)
        if structure is not None:
            structure["file_bytes"] = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        record = build_record(config, model, pattern, device, data, outcome, zs, start, structure, speed)
        write_json(tmp / "run.json", record)
        plot_block_losses(outcome.result.blocks, tmp / "block_losses.png",
                          f"{config.model}: {config.prune.method} {pattern} + {config.recover.method}")
    log.info("saved %s", config.out)
    return record


def evaluate(model: str, sources=("wikitext2",), seqlen: int | None = None, windows: int | None = None,
             device: str = "auto", dtype: str = "auto", batch_size: int = 1, tasks=None,
             task_data: str | None = None, limit: int | None = None) -> dict:
    """Perplexity of a model (hub id, folder, .gguf) on each source: ``{"<source>": ppl}``.

    With zero-shot ``tasks`` (lm-eval names, a comma list, or "paper"; offline from ``task_data``;
    first ``limit`` items) the result also holds ``"zeroshot": {"<task>": {"acc": ..}}`` and
    ``"zeroshot_average"`` (mean acc); ``sources=()`` skips perplexity. ``"eval_protocol"`` says how
    each text was scored (window length, windows, tokens, BOS).
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
    net, tokenizer = load_model(model, dtype, device)
    data = prepare_data(net, tokenizer, config, calibrate=False)
    out: dict = {}
    if data.evals:
        result = walk(net, None, None, eval_ids=data.evals, device=device, batch_size=batch_size)
        ppl = stage_perplexities(net, result, data.evals, device, final="dense")
        out = {name: by_stage["dense"] for name, by_stage in ppl.items()}
        out["eval_protocol"] = data.protocol
    if suite is not None:
        zs = _zeroshot(net, tokenizer, suite, limit, device, batch_size)
        out.update(zeroshot=zs, zeroshot_average=average(zs))
    return out


def _zeroshot_suite(tasks, task_data):
    """The zero-shot tasks, built (data read or downloaded) before any model is loaded; None if none."""
    specs = plan_tasks(tasks, task_data)
    return load_tasks(specs) if specs else None


def _zeroshot(model, tokenizer, suite, limit, device, batch_size) -> dict | None:
    return None if suite is None else evaluate_suite(model, tokenizer, suite, limit, device, batch_size)


def _zeroshot_record(suite, by_stage: dict[str, dict | None]) -> dict:
    """run.json's ``zeroshot: {task: {stage: metrics}}``, ``zeroshot_average: {stage: mean acc}``."""
    if suite is None:
        return {}
    return {"zeroshot": {s.name: {stage: res[s.name] for stage, res in by_stage.items()} for s in suite.specs},
            "zeroshot_average": {stage: average(res) for stage, res in by_stage.items()},
            "zeroshot_tasks": {s.name: s.describe() for s in suite.specs}}
