"""ebft: prune Hugging Face LLMs and recover them with block-wise fine-tuning.

The public API, importable as written in docs/architecture.md::

    from ebft import RunConfig, run, evaluate, SweepConfig, sweep
"""
import importlib

__version__ = "0.2.0"

__all__ = ["RunConfig", "CalibConfig", "PruneConfig", "RecoverConfig", "EvalConfig", "run", "evaluate",
           "sweep", "SweepConfig"]

_HOMES = {"run": "pipeline", "evaluate": "pipeline", "sweep": "sweeps", "SweepConfig": "sweeps",
          "RunConfig": "config", "CalibConfig": "config", "PruneConfig": "config", "RecoverConfig": "config",
          "EvalConfig": "config"}


def __getattr__(name):  # lazy: `import ebft.masks` must not pull in transformers
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(name)
