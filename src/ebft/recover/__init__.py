"""Recoveries, registered by name (the contract and what a registration declares: :mod:`ebft.recover.base`).

Importing this package registers the built-in recoveries, in the order ``--help`` and YAML list
them; a recovery of your own is one module with a function decorated with :func:`register_recovery`,
imported before the run.
"""
from .base import (RECOVERIES, TARGETS, BlockContext, ModelContext, NoSettings, Recovery, TrainingText,
                   get_recovery, register_recovery, unregister_recovery)


@register_recovery("none", target=None, summary="none: prune only")
def no_recovery(ctx: BlockContext, settings) -> dict:
    """Keep the pruned weights as they are."""
    return {}


from . import ebft, refit, mask_tuning, gradual, dsnot  # noqa: E402,F401  (registers; this order in YAML and --help)
from . import lora  # noqa: E402,F401  (registers)

__all__ = ["RECOVERIES", "TARGETS", "BlockContext", "ModelContext", "NoSettings", "Recovery", "TrainingText",
           "get_recovery", "register_recovery", "unregister_recovery"]
