"""Input statistics of one linear layer, accumulated over calibration tokens.

A pruner declares which of these it needs (``Pruner.needs``); the block walk attaches a forward
hook to each linear (:class:`StatsHooks`) and calls :meth:`LayerStats.update` with the layer's input.
Everything is kept as running fp32 sums over tokens so that batches can arrive in any size and order.
Linears that read the very same input tensor (a Llama block's q/k/v projections, its gate and up
projections) share one :class:`LayerStats`, accumulated once: for SparseGPT and the refit that is 4
Hessians per block instead of 7, the same numbers.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import all_reduce_, current

STAT_KINDS = ("sq", "mean", "hessian")


@dataclass
class LayerStats:
    """Running sums over the ``count`` tokens seen so far.

    - ``sq_sum[j]  = Σ_t x_tj²``      (Wanda's ‖X_j‖₂², DSnoT's variance)
    - ``x_sum[j]   = Σ_t x_tj``       (DSnoT's mean input)
    - ``xxt[i, j]  = Σ_t x_ti x_tj``  (SparseGPT's Hessian H = 2·xxt/count)
    """

    in_features: int
    needs: frozenset = frozenset()
    device: torch.device | str = "cpu"
    count: int = 0
    sq_sum: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    xxt: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        unknown = set(self.needs) - set(STAT_KINDS)
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; known: {STAT_KINDS}")
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.device)  # noqa: E731
        if "sq" in self.needs or "mean" in self.needs:
            self.sq_sum = zeros(self.in_features)
        if "mean" in self.needs:
            self.x_sum = zeros(self.in_features)
        if "hessian" in self.needs:
            self.xxt = zeros(self.in_features, self.in_features)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.device, dtype=torch.float32)
        self.count += x.shape[0]
        if self.sq_sum is not None:
            self.sq_sum += x.square().sum(0)
        if self.x_sum is not None:
            self.x_sum += x.sum(0)
        if self.xxt is not None:
            self.xxt.addmm_(x.T, x)

    def all_reduce_(self) -> None:
        """Sum the running sums and the token count over the ranks of torch.distributed (each rank saw
        its share of the calibration windows); nothing outside torch.distributed."""
        if current() is None:
            return
        for t in (self.sq_sum, self.x_sum, self.xxt):
            if t is not None:
                all_reduce_(t)
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        self.count = int(all_reduce_(count).item())

    def keep_only(self, needs) -> None:
        """Drop the sums no longer needed (the Hessian is in² floats: freed after pruning unless asked for)."""
        needs = set(needs)
        if "hessian" not in needs:
            self.xxt = None
        if "mean" not in needs:
            self.x_sum = None
            if "sq" not in needs:
                self.sq_sum = None

    # Derived quantities, named as the papers name them.
    @property
    def col_norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all tokens (Wanda)."""
        return self.sq_sum.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.x_sum / max(self.count, 1)

    @property
    def var(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1) - self.mean.square()).clamp_min(0)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / n (SparseGPT's layer-wise Hessian of ‖WX − ŴX‖²)."""
        return self.xxt * (2.0 / max(self.count, 1))

    @classmethod
    def from_inputs(cls, x: torch.Tensor, needs=STAT_KINDS) -> "LayerStats":
        """Statistics of a whole input matrix at once (tests, single-layer use)."""
        stats = cls(x.shape[-1], frozenset(needs), device=x.device)
        stats.update(x)
        return stats


class StatsHooks:
    """Forward hooks that add each linear's input to ``stats[name]`` — once per input tensor: a linear that reads
    the very tensor another one read in the same call (q/k/v, gate/up) is given that one's :class:`LayerStats`
    (``stats`` is updated in place; the first batch decides: a block calls its linears the same way on every
    batch) and adds nothing. Use as a context manager."""

    def __init__(self, linears: dict[str, nn.Module], stats: dict[str, LayerStats]):
        self.linears, self.stats = linears, stats
        self.seen: dict[str, weakref.ref] = {}  # name -> the last input it read (not kept alive)
        self.handles = []

    def __enter__(self) -> "StatsHooks":
        self.handles = [lin.register_forward_hook(self._hook(name)) for name, lin in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.seen = [], {}

    def unique(self) -> list[LayerStats]:
        """Each statistics object once (shared ones are one)."""
        return list({id(s): s for s in self.stats.values()}.values())

    def _hook(self, name: str):
        def add(module, args, output):
            x = args[0]
            twin = next((other for other, ref in self.seen.items() if other != name and ref() is x), None)
            self.seen[name] = weakref.ref(x)
            mine = self.stats[name]
            if twin is not None and mine is self.stats[twin]:
                return  # already counted by its twin
            if twin is not None and mine.count == 0:
                self.stats[name] = self.stats[twin]  # the first batch: share from now on
                return
            mine.update(x)  # (of a shared group, whichever linear reads the batch's tensor first)
        return add
