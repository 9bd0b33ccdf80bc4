"""Recipes: the recovery settings a user gets without choosing them.

``paper`` is the EBFT reference code's recipe (Guo et al. 2024): what to use to compare with the
paper. ``best`` is what ebft measured to recover the most for the same calibration data in about the
same time (``benchmarks/frontier.py``; docs/results.md's "Recovery: the time–quality frontier" shows the
measurements and the check on a text domain the recipe was not tuned on): a 5× larger learning rate,
no weight decay, the dense model's own activations as the target, the norms trained too, the kept
weights refit in closed form before the first step (:mod:`.refit`), and small batches when the
calibration set is small — optimiser *steps* are what a small calibration set lacks
(about 16 windows per step at most: batch = nsamples / 16, between 1 and 8).

A setting given explicitly (a flag, a YAML key, a Python assignment) always wins over the recipe;
``run.json`` records the recipe (``config.recover.recipe``) and the settings that ran
(``resolved.recovery_settings``).

**The paper recipe against the reference code** (sunggo/EBFT ``lib/finetune.py``, ``lib/options.py``
and the README's command): AdamW with betas (0.9, 0.95), learning rate 2e-4 (the README's command; the
options' default is 1e-2), weight decay 0.1 on every trained parameter, batch 8, 10 epochs, no warm-up,
linear decay to zero, MSE, the dense block on the sparse chain's inputs as the target, and *every*
parameter of the block that is not a mask trained: the linears' weights and biases, and the norms.
What ebft does differently, on purpose, is :data:`PAPER_DIFFERENCES` (recorded in run.json).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Rule:
    """A recipe value that depends on the run (e.g. on the calibration set's size)."""

    fn: Callable  # (RunConfig) -> value
    text: str  # how --help shows it

    def __call__(self, config):
        return self.fn(config)


RECIPES: dict[str, dict] = {
    "paper": {"epochs": 10, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.1, "target": "dense-block",
              "train_norms": True, "loss": "mse", "refit": False},
    "best": {"epochs": 10, "batch_size": Rule(lambda c: max(1, min(8, c.calib.nsamples // 16)), "nsamples/16 in [1, 8]"),
             "lr": 1e-3, "weight_decay": 0.0, "target": "dense-model", "train_norms": True, "loss": "mse",
             "refit": True},
}
DEFAULT_RECIPE = "best"

# How ebft's paper recipe differs from the reference code, and why (run.json: resolved.recipe_differences)
PAPER_DIFFERENCES = [
    "gradient clipping at 1.0 applies to the true gradients: the reference clips the fp16-scaled gradients "
    "(the GradScaler's scale starts at 65536), so its clip shrinks every step's gradients by about the scale "
    "and Adam's epsilon then dominates (benchmarks/scaled_clipping.py measures how much smaller its steps are)",
    "a block whose training loss ends above where it started is restored to its pruned weights "
    "(the reference keeps it)",
    "the block trains in eval mode (the reference's train mode only matters for dropout, which Llama has none of)",
    "fp32 on CPU, bf16 autocast on GPUs that have it (the reference: fp16 autocast with a GradScaler)",
]


def value(recipe: str, name: str, config):
    """The recipe's value of ``name`` for this run."""
    v = RECIPES[recipe][name]
    return v(config) if isinstance(v, Rule) else v


def default_text(name: str) -> str:
    """How ``--help`` shows a recipe-controlled default: ``from --recipe (paper: 0.0002, best: 0.001)``."""
    shown = ", ".join(f"{recipe}: {_fmt(values[name])}" for recipe, values in RECIPES.items() if name in values)
    return f"from --recipe ({shown})"


def recipe_fields() -> dict[str, str]:
    return {name: default_text(name) for values in RECIPES.values() for name in values}


def _fmt(v) -> str:
    if isinstance(v, Rule):
        return v.text
    if isinstance(v, bool):
        return "on" if v else "off"
    return f"{v:g}" if isinstance(v, float) else str(v)
