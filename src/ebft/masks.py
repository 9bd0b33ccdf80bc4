"""Sparsity patterns as pure tensor functions.

A mask is a bool tensor shaped like the weight ``[out, in]``; True means KEEP. Every function here
is exact: a pattern asks for a number of zeros and gets exactly that many, ties included.

- unstructured, ``scope="row"``:   each output row has ``n_pruned(in, s)`` zeros (Wanda's choice);
- unstructured, ``scope="layer"``: the whole matrix has ``n_pruned(out*in, s)`` zeros
  (the global magnitude baseline, SparseGPT's per-layer selection);
- ``N:M``: every group of M consecutive weights along the input dimension keeps exactly N
  (NVIDIA's semi-structured sparsity, Mishra et al. 2021, "Accelerating Sparse Deep Neural
  Networks"); its sparsity is ``1 - N/M``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ebft.errors import ConfigError, MaskError

SCOPES = ("row", "layer")
_PATTERN_HELP = "allowed: 'unstructured', 'structured' or 'N:M' with integers 1 <= N < M (e.g. '2:4')"


@dataclass(frozen=True)
class Pattern:
    """What to prune: a sparsity ratio and either an N:M group rule or an unstructured scope.

    N:M groups lie inside one row, so for N:M the scope is meaningless and stored as "row".
    ``structured``: whole attention heads (KV groups) and MLP channels are removed and ``sparsity``
    is the fraction of the blocks' parameters removed; there are no masks (see :mod:`ebft.structured`).
    Construction validates, so a Pattern in hand is always consistent.
    """

    sparsity: float
    n: int = 0
    m: int = 0
    scope: str = "row"
    structured: bool = False

    def __post_init__(self):
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise ConfigError("sparsity", s, "allowed: a number in [0, 1)")
        if self.scope not in SCOPES:
            raise ConfigError("scope", self.scope, f"allowed: {', '.join(SCOPES)}")
        if self.n or self.m:
            if not 1 <= self.n < self.m:
                raise ConfigError("pattern", f"{self.n}:{self.m}", _PATTERN_HELP)
            implied = 1 - self.n / self.m
            if abs(s - implied) > 1e-6:
                raise ConfigError("sparsity", s, f"pattern {self.n}:{self.m} implies sparsity "
                                  f"{implied:g}; give that or omit sparsity")

    @property
    def is_nm(self) -> bool:
        return self.n > 0 and self.m > 0

    def __str__(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        if self.structured:
            return f"{self.sparsity * 100:g}% structured (of block parameters)"
        return f"{self.sparsity * 100:g}% unstructured (per {self.scope})"


def parse_pattern(pattern: str, sparsity: float | None = None, scope: str | None = None,
                  default_scope: str = "row") -> Pattern:
    """Build a :class:`Pattern` from config text: ``"unstructured"``, ``"structured"`` or ``"N:M"``.

    ``scope`` None means the pruner's ``default_scope``. For N:M the sparsity may be omitted
    (it is ``1 - N/M``) and the scope is validated but irrelevant.
    """
    scope = default_scope if scope is None else scope
    if scope not in SCOPES:
        raise ConfigError("scope", scope, f"allowed: {', '.join(SCOPES)}")
    text = str(pattern).strip().lower()
    if text == "structured":
        if sparsity is None:
            raise ConfigError("sparsity", None, "required for a structured pattern: the fraction of block "
                              "parameters to remove, in [0, 1)")
        return Pattern(sparsity, structured=True)
    if text == "unstructured":
        if sparsity is None:
            raise ConfigError("sparsity", None, "required for an unstructured pattern: a number in [0, 1)")
        return Pattern(sparsity, scope=scope)
    match = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if match is None:
        raise ConfigError("pattern", pattern, _PATTERN_HELP)
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m:
        raise ConfigError("pattern", pattern, _PATTERN_HELP)
    if sparsity is not None:
        Pattern(sparsity)  # range check first, so an out-of-range value gets the range message
        Pattern(sparsity, n, m)  # then the contradiction check
    return Pattern(1 - n / m, n, m)  # store the exact ratio, not the user's rounding of it


def n_pruned(total: int, sparsity: float) -> int:
    """Number of zeros among ``total`` weights: floor(total·s).

    ``total`` is the row width for row scope and out·in for layer scope. The 1e-9 absorbs binary
    rounding (100 · 0.29 = 28.999999999999996 must give 29, not 28).
    """
    return math.floor(total * sparsity + 1e-9)


def validate_width(in_features: int, pattern: Pattern, name: str = "layer") -> None:
    """N:M needs whole groups: ``in_features`` divisible by M."""
    if pattern.is_nm and in_features % pattern.m:
        raise ConfigError("pattern", str(pattern), f"layer {name} has in_features={in_features}, "
                          f"not divisible by M={pattern.m}; N:M needs whole groups along each row")


def keep_dropping_lowest(scores: torch.Tensor, count: int, per_row: bool) -> torch.Tensor:
    """Keep mask with the ``count`` lowest scores dropped, per row or over the whole matrix.

    topk returns exactly ``count`` distinct indices even among ties, so the count is exact.
    """
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count == 0:
        return keep
    flat = scores if per_row else scores.reshape(1, -1)
    drop = flat.topk(count, dim=1, largest=False, sorted=False).indices
    keep.view(flat.shape).scatter_(1, drop, False)
    return keep


def mask_from_scores(scores: torch.Tensor, pattern: Pattern, name: str = "layer") -> torch.Tensor:
    """Keep mask for ``pattern`` that keeps the highest ``scores`` ([out, in])."""
    rows, cols = scores.shape
    if pattern.is_nm:
        validate_width(cols, pattern, name)
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        kept = groups.topk(pattern.n, dim=-1, sorted=False).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
        return keep.reshape(rows, cols)
    if pattern.scope == "row":
        return keep_dropping_lowest(scores, n_pruned(cols, pattern.sparsity), per_row=True)
    return keep_dropping_lowest(scores, n_pruned(rows * cols, pattern.sparsity), per_row=False)


def check_mask(mask: torch.Tensor, pattern: Pattern, name: str = "layer") -> None:
    """Raise :class:`MaskError` unless ``mask`` follows ``pattern`` exactly."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise MaskError(f"layer {name}: a mask must be a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    rows, cols = mask.shape
    if pattern.is_nm:
        if cols % pattern.m:
            raise MaskError(f"layer {name}: width {cols} is not divisible by M={pattern.m} ({pattern})")
        kept = mask.reshape(rows, -1, pattern.m).sum(-1)
        bad = int((kept != pattern.n).sum())
        if bad:
            raise MaskError(f"layer {name}: {bad} of {kept.numel()} groups of {pattern.m} "
                            f"do not keep exactly {pattern.n} ({pattern})")
    elif pattern.scope == "row":
        want = n_pruned(cols, pattern.sparsity)
        bad = int(((~mask).sum(1) != want).sum())
        if bad:
            raise MaskError(f"layer {name}: {bad} of {rows} rows do not have exactly {want} "
                            f"zeros of {cols} ({pattern})")
    else:
        want, got = n_pruned(rows * cols, pattern.sparsity), int((~mask).sum())
        if got != want:
            raise MaskError(f"layer {name}: {got} zeros of {rows * cols}, expected {want} ({pattern})")


def check_weight(weight: torch.Tensor, mask: torch.Tensor, name: str = "layer") -> None:
    """Raise :class:`MaskError` if any weight that the mask prunes is nonzero."""
    if weight.shape != mask.shape:
        raise MaskError(f"layer {name}: weight {tuple(weight.shape)} and mask {tuple(mask.shape)} differ in shape")
    bad = int((weight.ne(0) & ~mask).sum())
    if bad:
        raise MaskError(f"layer {name}: {bad} pruned weights are nonzero")


# ----------------------------------------------------------------------------- masks on disk: 1 bit each

_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 entries per byte (row-major, the last byte padded with False)."""
    flat = mask.detach().to("cpu", torch.bool).reshape(-1)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).view(-1, 8)
    return (flat.to(torch.uint8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise ValueError(f"{packed.numel()} packed bytes do not hold a mask of shape {tuple(shape)}")
    bits = (packed[:, None] & _BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[:numel].reshape(shape)
