"""Perplexity with the standard protocol of the SparseGPT / Wanda / EBFT papers, in one place.

The evaluation text is tokenised once (one BOS at the start of the whole text where the tokenizer
adds one, as the reference repos tokenise), cut into non-overlapping windows of ``seqlen`` tokens
(the tail that does not fill a window is dropped; C4 is capped at 256 windows, as the references
do), and ppl = exp(mean next-token NLL over all windows). The windows are pushed through the model
block by block (:mod:`ebft.walk`), so a model far larger than the accelerator is evaluated with
one block on it at a time.

Every perplexity ebft reports comes from :func:`stage_perplexities`: the streams a walk carried
(dense, pruned and recovered, in one walk over the blocks), or one evaluation walk of the model as it
is now (:func:`model_perplexities`: the dense model of ``ebft eval`` and sweeps, and the model after a
whole-model stage such as LoRA or the finish).
"""
from __future__ import annotations

import math

import torch

from .. import distributed
from ..capture import tail_nll, tail_nll_sum
from ..errors import EbftError
from ..walk import walk

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


def stage_perplexities(model, result, evals: dict[str, torch.Tensor], device, final: str) -> dict[str, dict[str, float]]:
    """``{text: {stage: ppl}}`` from a walk's result (its streams); the walk's stage "final" is named ``final``.

    Under torch.distributed each rank scores its windows and the NLL sums and token counts are added."""
    shard = distributed.current()
    ppl: dict[str, dict] = {}
    for key, hidden in result.streams.items():
        name, stage = key.rsplit("/", 1)
        label = final if stage == "final" else stage
        if shard is None:
            value = stream_perplexity(model, hidden, evals[name], device, result.returns_tuple)
        else:
            total, count = tail_nll_sum(model, hidden, shard.take(evals[name]), torch.device(device),
                                        result.returns_tuple)
            total, count = distributed.all_reduce_sums(total, count)
            value = math.exp(total / max(count, 1))
        ppl.setdefault(name, {})[label] = round(value, 4)
    return ppl


def model_perplexities(model, evals: dict[str, torch.Tensor], device, batch_size: int = 1,
                       progress=None) -> dict[str, float]:
    """``{text: ppl}`` of ``model`` as it is now: one evaluation walk over its blocks."""
    result = walk(model, None, None, eval_ids=evals, device=device, batch_size=batch_size, progress=progress)
    return {name: by_stage["dense"] for name, by_stage in stage_perplexities(model, result, evals, device,
                                                                            "dense").items()}


def perplexity(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
               device: str = "cpu", batch_size: int = 1) -> float:
    """Perplexity of ``model`` on token ids ``[1, T]`` (one block on ``device`` at a time)."""
    windows = eval_windows(ids, seqlen, max_windows)
    result = walk(model, None, None, eval_ids={"eval": windows}, device=device, batch_size=batch_size)
    return stream_perplexity(model, result.streams["eval/dense"], windows, device, result.returns_tuple)
