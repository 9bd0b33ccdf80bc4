"""ebft: prune Hugging Face LLMs and recover them with block-wise fine-tuning."""
__version__ = "0.1.0"

__all__ = ["RunConfig", "CalibConfig", "PruneConfig", "RecoverConfig", "EvalConfig", "run", "evaluate",
           "sweep", "SweepConfig"]


def __getattr__(name):  # lazy: `import ebft.masks` must not pull in transformers
    if name in ("run", "evaluate"):
        from . import api
        return getattr(api, name)
    if name in ("sweep", "SweepConfig"):  # in ebft.sweeps: a submodule named sweep would shadow the function
        from . import sweeps
        return getattr(sweeps, name)
    if name in __all__:
        from . import config
        return getattr(config, name)
    raise AttributeError(name)
