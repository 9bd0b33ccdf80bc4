"""What a run may ask for that needs the whole model in memory or one process, in one table.

A lazy run (``--lazy``) holds one block at a time, and under torchrun every rank holds a share of the
windows; some things a run can ask for need more than that. Each row of :data:`NEEDS` is one of them:
the setting it comes from, its value in a run (read from the run's settings and what its methods
declare: a recovery's ``scope``, the pattern a structured pruner implies), and what needs the whole model
or one process, in the words of its refusal. :func:`lazy_blockers` (which keeps a run from loading
lazily) and :func:`check_distributed` (which refuses a run under torchrun) read this one table, and so
does ``--lazy``'s help (:data:`WHOLE_MODEL_HELP`).

``config`` is a :class:`ebft.config.RunConfig` (not imported: the config's help reads this module).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .data import SELF
from .errors import ConfigError
from .masks import Pattern
from .models import BUILTIN_MODELS
from .recover import RECOVERIES, get_recovery


@dataclass(frozen=True)
class Need:
    """Something a run may ask for that needs the whole model (it cannot load lazily) or one process (it
    cannot run under torchrun). ``value(config, pattern)``: what the run asks for (falsy: nothing); the
    texts say why, ``{value}`` standing for it."""

    setting: str  # the setting a torchrun refusal names
    what: str  # a few words for --lazy's help
    value: Callable[..., object]
    whole_model: str | None = None  # why it needs the whole model (None: a lazy run can do it)
    one_process: str | None = None  # why it needs one process (None: torchrun can run it)


def _gguf(config, pattern):
    return config.model if str(config.model).endswith(".gguf") or config.model in BUILTIN_MODELS else None


def _model_scope(config, pattern):
    return config.recover.method if get_recovery(config.recover.method).scope == "model" else None


def _finish(config, pattern):
    return config.finish.method if config.finish.method != "none" else None


NEEDS = (
    Need("model", "GGUF", _gguf,
         whole_model="GGUF models load whole (transformers dequantises the file at once)"),
    Need("calib", "--calib self", lambda config, pattern: config.calib.source == SELF,
         whole_model="--calib self samples every window from the whole model, one token at a time (a lazy run "
                     "would read every block per token)"),
    Need("recover", "a whole-model recovery", _model_scope,
         whole_model="recovery {value} trains the whole model at once",
         one_process="trains the whole model in one process; run it without torchrun (or use a block-wise "
                     "recovery: {block_wise})"),
    Need("eval.zeroshot", "zero-shot", lambda config, pattern: ",".join(config.eval.zeroshot),
         whole_model="zero-shot evaluation runs the whole model (evaluate the saved model with ebft eval --tasks)",
         one_process="runs in one process: evaluate the saved model with ebft eval --tasks, without torchrun"),
    Need("eval.speed", "speed", lambda config, pattern: config.eval.speed,
         whole_model="speed measurement runs the whole model",
         one_process="measures one process: run ebft without torchrun to measure speed"),
    Need("finish", "the finish", _finish,
         whole_model="the finish ({value}) trains the whole model at once",
         one_process="trains the whole model in one process; run it without torchrun, or leave the finish out"),
    Need("prune.pattern", "structured pruning", lambda config, pattern: pattern.structured,
         whole_model="structured pruning gives the saved model one block shape from all blocks at the end"),
    Need("export", "--export", lambda config, pattern: config.export,
         whole_model="--export {value} reads the whole saved model (export it afterwards with ebft export)"),
)

# --lazy's help: what cannot load lazily (and .bin checkpoints, which the block store cannot read tensor by tensor)
_WHOLE = [need.what for need in NEEDS if need.whole_model]
WHOLE_MODEL_HELP = f"{_WHOLE[0]}, .bin, {', '.join(_WHOLE[1:-1])} or {_WHOLE[-1]}"


def _asked(config, pattern: Pattern, kind: str):
    """``(need, value, why)`` for each row of :data:`NEEDS` this run asks for that needs ``kind``
    (``whole_model`` or ``one_process``), in the table's order."""
    block_wise = ", ".join(n for n, r in RECOVERIES.items() if r.scope == "block")
    for need in NEEDS:
        why = getattr(need, kind)
        value = need.value(config, pattern) if why is not None else None
        if value:
            yield need, value, why.format(value=value, block_wise=block_wise)


def lazy_blockers(config, pattern: Pattern) -> list[str]:
    """What in this run needs the whole model in memory, so that it cannot load lazily."""
    return [why for _, _, why in _asked(config, pattern, "whole_model")]


def check_distributed(config, pattern: Pattern, world: int) -> None:
    """What a run under torchrun cannot do, refused before anything is loaded; and a torchrun setting given
    to a run in one process (it would do nothing)."""
    if world < 2:
        if "rank_timeout" in getattr(config, "_given", ()):
            raise ConfigError("--rank-timeout (rank_timeout)", config.rank_timeout, "applies only under torchrun "
                              "(2 or more ranks), and this run is one process: drop it")
        return
    for need, value, why in _asked(config, pattern, "one_process"):
        raise ConfigError(need.setting, value, why)
    if config.calib.nsamples < world:
        raise ConfigError("calib.nsamples", config.calib.nsamples,
                          f"must be at least the number of ranks ({world}): each rank holds a share of the windows")
