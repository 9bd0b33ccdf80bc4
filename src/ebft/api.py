"""The Python API; the CLI is a thin shell over these two functions.

>>> from ebft import RunConfig, run
>>> cfg = RunConfig(model="builtin:smollm2", out="runs/demo")
>>> cfg.prune.method, cfg.prune.sparsity = "wanda", 0.5
>>> record = run(cfg)                      # prunes, evaluates, saves runs/demo + run.json
>>> record["perplexity"]["wikitext2"]      # {"dense": ..., "pruned": ...}
"""
from __future__ import annotations

import logging
import platform
import random
import resource
import time

import torch

from . import __version__
from .config import RunConfig, check_device, check_source, resolve_device
from .data import calibration_windows, eval_tokens, source_name
from .evaluate.perplexity import eval_windows, stream_perplexity
from .evaluate.zeroshot import average, evaluate_suite, load_tasks, plan_tasks
from .export import atomic_folder, save_pretrained, sparsity_report, write_json
from .report import plot_block_losses
from .masks import validate_width
from .models import context_length, find_blocks, find_linears, load_model
from .prune import get_pruner
from .recover import TrainingText, get_recovery
from .sequential import STAGES, PruneSpec, RecoverSpec, walk

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


def _eval_sets(tokenizer, sources, seqlen, windows) -> dict[str, torch.Tensor]:
    sets = {}
    for src in sources:
        name = source_name(src)
        sets[name] = eval_windows(eval_tokens(tokenizer, src), seqlen, windows, name)
        log.info("eval %s: %d windows of %d tokens", name, *sets[name].shape)
    return sets


def check_widths(model, pattern, layers: str | None) -> None:
    """N:M needs M to divide every pruned layer's input width: fail before any work is done."""
    _, blocks = find_blocks(model)
    for block in blocks:
        for name, linear in find_linears(block, layers).items():
            validate_width(linear.in_features, pattern, name)


def final_stage(method: str) -> str:
    """What the model after the walk is called in records: "pruned" without a recovery, else "recovered"."""
    return "pruned" if method == "none" else "recovered"


def prepare_data(model, tokenizer, config: RunConfig):
    """``(calibration windows, {source: eval windows}, calib seqlen, eval seqlen)``; seqlens default
    to min(model context, 2048)."""
    ctx = min(context_length(model), 2048)
    calib_seqlen, eval_seqlen = config.calib.seqlen or ctx, config.eval.seqlen or ctx
    calib = calibration_windows(tokenizer, config.calib.source, config.calib.nsamples, calib_seqlen, config.seed)
    evals = _eval_sets(tokenizer, config.eval.sources, eval_seqlen, config.eval.windows)
    return calib, evals, calib_seqlen, eval_seqlen


def prune_and_recover(model, tokenizer, config: RunConfig, spec: PruneSpec, calib, evals, text: TrainingText,
                      device: str, progress=None, stages=STAGES):
    """Prune the loaded ``model`` in place, recover it, evaluate ``evals`` at ``stages``.

    Returns ``(walk result, {source: {stage: perplexity}}, recovery cost)``; the final stage is named
    "recovered", or "pruned" with ``--recover none``.
    """
    recovery = get_recovery(config.recover.method)
    if recovery.scope == "model":
        return _prune_then_recover_model(model, tokenizer, recovery, config, spec, calib, evals, text, device,
                                         progress, stages)
    recover = RecoverSpec(config.recover.method, config.recover, config.recover.target)
    result = walk(model, calib, spec, recover, evals, stages, device, config.batch_size, progress)
    ppl = stage_perplexities(model, result.streams, evals, device, final_stage(config.recover.method))
    return result, ppl, block_recovery_cost(config.recover.method, result.blocks, device)


def _prune_then_recover_model(model, tokenizer, recovery, config, spec, calib, evals, text, device, progress, stages):
    """A model-scope recovery (LoRA): the walk only prunes; then train the whole model; evaluate it again."""
    result = walk(model, calib, spec, None, evals, stages, device, config.batch_size, progress)
    ppl = stage_perplexities(model, result.streams, evals, device, final="pruned")
    start = time.perf_counter()
    details = recovery.fn(model, tokenizer, result.masks, config.recover, text, device, progress) or {}
    cost = {"method": recovery.name, "scope": "model", "seconds": round(time.perf_counter() - start, 2),
            **peak_memory(device), "trainable_params": details.pop("trainable_params", 0), **details}
    after = walk(model, None, None, eval_ids=evals, device=device, batch_size=config.batch_size)
    for name, stages_ppl in stage_perplexities(model, after.streams, evals, device, final="recovered").items():
        ppl[name]["recovered"] = stages_ppl["dense"]  # an eval-only walk sees the current model as "dense"
    return result, ppl, cost


def stage_perplexities(model, streams, evals, device, final: str) -> dict[str, dict[str, float]]:
    """``{source: {stage: ppl}}`` from the walk's streams; the walk's stage "final" is named ``final``."""
    ppl: dict[str, dict] = {}
    for key, hidden in streams.items():
        name, stage = key.rsplit("/", 1)
        label = final if stage == "final" else stage
        ppl.setdefault(name, {})[label] = round(stream_perplexity(model, hidden, evals[name], device), 4)
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
    check_widths(model, pattern, config.prune.layers)
    calib, evals, calib_seqlen, eval_seqlen = prepare_data(model, tokenizer, config)

    spec = PruneSpec(get_pruner(config.prune.method), pattern, config.prune.layers)
    text = TrainingText(config.calib.source, calib_seqlen, config.seed)
    zs_args = (suite, config.eval.zeroshot_limit, device, config.batch_size)
    zs_dense = _zeroshot(model, tokenizer, *zs_args)  # before the walk: it prunes the model in place
    result, ppl, cost = prune_and_recover(model, tokenizer, config, spec, calib, evals, text, device, progress)
    final = final_stage(config.recover.method)
    zs = _zeroshot_record(suite, {"dense": zs_dense, final: _zeroshot(model, tokenizer, *zs_args)})

    record = {
        "config": config.to_dict(),
        "resolved": {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "calib_seqlen": calib_seqlen, "eval_seqlen": eval_seqlen, "pattern": str(pattern)},
        "versions": versions(),
        "seed": config.seed,
        "blocks": result.blocks,
        "sparsity": sparsity_report(model, result.masks),
        "perplexity": ppl,
        "recovery": cost,
        **zs,
        "wall_seconds": None,
        **peak_memory(device),
    }
    with atomic_folder(config.out, config.overwrite) as tmp:
        save_pretrained(model, tokenizer, tmp)
        record["wall_seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / "run.json", record)
        plot_block_losses(result.blocks, tmp / "block_losses.png",
                          f"{config.model}: {config.prune.method} {pattern} + {config.recover.method}")
    log.info("saved %s", config.out)
    return record


def evaluate(model: str, sources=("wikitext2",), seqlen: int | None = None, windows: int | None = None,
             device: str = "auto", dtype: str = "auto", batch_size: int = 1, tasks=None,
             task_data: str | None = None, limit: int | None = None) -> dict:
    """Perplexity of a model (hub id, folder, .gguf) on each source: ``{"<source>": ppl}``.

    With zero-shot ``tasks`` (lm-eval names, a comma list, or "paper"; offline from ``task_data``;
    first ``limit`` items) the result also holds ``"zeroshot": {"<task>": {"acc": ..}}`` and
    ``"zeroshot_average"`` (mean acc); ``sources=()`` skips perplexity.
    """
    from .config import _positive
    from .models import check_model_source

    check_device(device)
    for src in sources:
        check_source(src)
    _positive("limit", limit, optional=True)
    plan_tasks(tasks, task_data)
    check_model_source(model)
    device = resolve_device(device)
    suite = _zeroshot_suite(tasks, task_data)
    net, tokenizer = load_model(model, dtype, device)
    seqlen = seqlen or min(context_length(net), 2048)
    evals = _eval_sets(tokenizer, sources, seqlen, windows)
    out = {}
    if evals:
        result = walk(net, None, None, eval_ids=evals, device=device, batch_size=batch_size)
        out = {name: round(stream_perplexity(net, result.streams[f"{name}/dense"], evals[name], device), 4)
               for name in evals}
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
