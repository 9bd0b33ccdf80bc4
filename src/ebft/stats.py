"""Input statistics of one linear layer, accumulated over calibration tokens.

A pruner declares which of these it needs (``Pruner.needs``); the block walk attaches a forward
hook to each linear and calls :meth:`LayerStats.update` with the layer's input. Everything is kept
as running fp32 sums over tokens so that batches can arrive in any size and order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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
