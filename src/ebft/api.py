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
from pathlib import Path

import torch

from . import __version__
from .config import RunConfig, check_device, check_source, resolve_device
from .data import calibration_windows, eval_tokens, source_name
from .evaluate.perplexity import eval_windows, stream_perplexity
from .export import atomic_folder, save_pretrained, sparsity_report, write_json
from .report import plot_block_losses
from .masks import validate_width
from .models import context_length, find_blocks, find_linears, load_model
from .prune import get_pruner
from .sequential import PruneSpec, RecoverSpec, walk

log = logging.getLogger(__name__)


def versions() -> dict:
    import transformers

    return {"ebft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory(device: str) -> dict:
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
    model, tokenizer = load_model(config.model, config.dtype, device)
    check_widths(model, pattern, config.prune.layers)
    ctx = min(context_length(model), 2048)
    calib_seqlen, eval_seqlen = config.calib.seqlen or ctx, config.eval.seqlen or ctx
    calib = calibration_windows(tokenizer, config.calib.source, config.calib.nsamples, calib_seqlen, config.seed)
    evals = _eval_sets(tokenizer, config.eval.sources, eval_seqlen, config.eval.windows)

    spec = PruneSpec(get_pruner(config.prune.method), pattern, config.prune.layers)
    recover = RecoverSpec(config.recover.method, config.recover, getattr(config.recover, "target", "dense-block"))
    stages = ("dense", "pruned", "final")
    result = walk(model, calib, spec, recover, evals, stages, device, config.batch_size, progress)

    final_name = "pruned" if config.recover.method == "none" else "recovered"
    ppl: dict[str, dict] = {}
    for key, hidden in result.streams.items():
        name, stage = key.rsplit("/", 1)
        label = final_name if stage == "final" else stage
        ppl.setdefault(name, {})[label] = round(stream_perplexity(model, hidden, evals[name], device), 4)

    record = {
        "config": config.to_dict(),
        "resolved": {"device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                     "calib_seqlen": calib_seqlen, "eval_seqlen": eval_seqlen, "pattern": str(pattern)},
        "versions": versions(),
        "seed": config.seed,
        "blocks": result.blocks,
        "sparsity": sparsity_report(model, result.masks),
        "perplexity": ppl,
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
             device: str = "auto", dtype: str = "auto", batch_size: int = 1) -> dict:
    """Perplexity of a model (hub id, folder, .gguf) on each source: ``{"<source>": ppl}``."""
    from .models import check_model_source

    check_device(device)
    for src in sources:
        check_source(src)
    check_model_source(model)
    device = resolve_device(device)
    net, tokenizer = load_model(model, dtype, device)
    seqlen = seqlen or min(context_length(net), 2048)
    evals = _eval_sets(tokenizer, sources, seqlen, windows)
    result = walk(net, None, None, eval_ids=evals, device=device, batch_size=batch_size)
    return {name: round(stream_perplexity(net, result.streams[f"{name}/dense"], evals[name], device), 4)
            for name in evals}
