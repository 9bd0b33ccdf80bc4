"""Perplexity with the standard protocol of the SparseGPT / Wanda / EBFT papers.

The evaluation text is tokenised once (one BOS at the start of the whole text where the tokenizer
adds one, as the reference repos tokenise), cut into non-overlapping windows of ``seqlen`` tokens
(the tail that does not fill a window is dropped; C4 is capped at 256 windows, as the references
do), and ppl = exp(mean next-token NLL over all windows). The windows are pushed through the model
block by block (:mod:`ebft.walk`), so a model far larger than the accelerator is evaluated with
one block on it at a time.
"""
from __future__ import annotations

import math

import torch

from ..errors import EbftError
from ..walk import tail_nll, walk

C4_WINDOWS = 256  # the references score the first 256 windows of the joined C4 validation text


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None, name: str = "eval") -> torch.Tensor:
    """``[1, T]`` token ids → ``[n, seqlen]`` non-overlapping windows, tail dropped, at most ``max_windows``."""
    n = ids.shape[-1] // seqlen
    if n == 0:
        raise EbftError(f"eval text too short: {name} has {ids.shape[-1]} tokens; need at least "
                        f"--eval-seqlen = {seqlen} (use a longer text or a smaller --eval-seqlen)")
    if max_windows:
        n = min(n, max_windows)
    return ids.reshape(-1)[: n * seqlen].reshape(n, seqlen)


def stream_perplexity(model, hidden: torch.Tensor, windows: torch.Tensor, device="cpu", as_tuple: bool = False) -> float:
    """exp(mean NLL) given the last block's outputs for ``windows``."""
    return math.exp(tail_nll(model, hidden, windows, torch.device(device), as_tuple))


def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               device: str = "cpu", batch_size: int = 1) -> float:
    """Perplexity of ``model`` on token ids ``[1, T]`` (one block on ``device`` at a time)."""
    windows = eval_windows(ids, seqlen, max_windows)
    result = walk(model, None, None, eval_ids={"eval": windows}, device=device, batch_size=batch_size)
    return stream_perplexity(model, result.streams["eval/dense"], windows, device, result.returns_tuple)
