"""FLAP as a registered pruner: remove whole KV groups and MLP channels (An et al., AAAI 2024,
"Fluctuation-based Adaptive Structured Pruning for Large Language Models", arXiv:2312.11983).

The algorithm lives in :mod:`ebft.structured`: the planning pass scores every unit of the dense
model and chooses what each block keeps (``flap_structure``: ``adaptive``, one global ranking — the
paper's AL-AM — or ``uniform``, the same ratio everywhere — UL-UM); the walk then calls this pruner
on each block, which removes the units in place with FLAP's bias compensation, from the means of
the output projections' inputs that the walk collected on the chain's inputs to this block.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ebft.prune.base import register_pruner
from ebft.settings import option
from ebft.structured import METRICS, MODES, STATS_NEEDED, shrink_block_


@dataclass
class FlapSettings:
    flap_metric: str = option("WIFV", "FLAP unit score: {choices} (WIFV: input variance x squared weight column "
                              "norm, the paper's)", choices=METRICS)
    flap_structure: str = option("adaptive", "FLAP: {choices} (adaptive: one global ranking of heads and channels "
                                 "weighted by the parameters they remove, the paper's AL-AM; uniform: the same "
                                 "ratio in every block and module)", choices=MODES)
    flap_bias_stats: str = option("dense", "FLAP's bias compensation adds the removed channels' mean input from: "
                                  "{choices} (dense: the dense model's own, as FLAP's reference, which measured "
                                  "better on SmolLM2; chain: the pruned chain's inputs, which the block really "
                                  "receives)",
                                  choices=("chain", "dense"))
    bias_compensation: bool | None = option(None, "FLAP adds the removed channels' mean contribution to the "
                                            "output projections' bias (auto: where the family's config can hold "
                                            "those biases, so that the model saves; off otherwise, said in one line)",
                                            default_text="auto")


@register_pruner("flap", needs=STATS_NEEDED, settings=FlapSettings, structured=True)
def flap(block, config, structure, stats, settings: FlapSettings) -> None:
    """Shrink ``block`` to ``structure`` (chosen by the planning pass), compensating the biases with the
    means of ``flap_bias_stats``."""
    if settings.bias_compensation and settings.flap_bias_stats == "dense":
        stats = {name: SimpleNamespace(mean=torch.tensor(mean)) for name, mean in structure.dense_means.items()}
    shrink_block_(block, config, structure, stats if settings.bias_compensation else None)
