"""Pruners, registered by name (the contract is in :mod:`ebft.prune.base`).

Importing this package registers the built-in pruners; a pruner of your own is one module with a
function decorated with :func:`register_pruner`, imported before the run.
"""
from .base import (PRUNERS, BlockSite, NoSettings, Pruner, PruneResult, StructuredPruner, get_pruner,
                   register_pruner, require_stats, unregister_pruner)
from . import flap, magnitude, sparsegpt, wanda  # noqa: F401  (registers)

__all__ = ["PRUNERS", "BlockSite", "NoSettings", "Pruner", "PruneResult", "StructuredPruner", "get_pruner",
           "register_pruner", "require_stats", "unregister_pruner"]
