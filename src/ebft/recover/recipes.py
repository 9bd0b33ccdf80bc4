"""Recipes: the recovery settings a user gets without choosing them.

``paper`` is the EBFT reference code's recipe (Guo et al. 2024): what to use to compare with the
paper. ``best`` is what ebft measured to recover the most for the same calibration data and a
comparable time (``benchmarks/frontier.py``; the README's "Recovery: the time–quality frontier"
shows the measurements and the check on a text domain the recipe was not tuned on).

A setting given explicitly (a flag, a YAML key, a Python assignment) always wins over the recipe;
``run.json`` records the recipe and the settings that ran (``resolved.recovery_settings``).
"""
from __future__ import annotations

RECIPES: dict[str, dict] = {
    "paper": {"epochs": 10, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.1, "target": "dense-block",
              "train_norms": False, "loss": "mse"},
    "best": {"epochs": 10, "batch_size": 2, "lr": 1e-3, "weight_decay": 0.0, "target": "dense-model",
             "train_norms": True, "loss": "mse"},
}
DEFAULT_RECIPE = "best"


def default_text(name: str) -> str:
    """How ``--help`` shows a recipe-controlled default: ``recipe (best: 1e-3, paper: 2e-4)``."""
    shown = ", ".join(f"{recipe}: {_fmt(values[name])}" for recipe, values in RECIPES.items() if name in values)
    return f"from --recipe ({shown})"


def recipe_fields() -> dict[str, str]:
    return {name: default_text(name) for values in RECIPES.values() for name in values}


def _fmt(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)
