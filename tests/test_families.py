"""Exact for every family: the walk's dense perplexity equals a plain forward of the model.

Families that alternate attention types (Gemma 2/3, Qwen2/3 with ``layer_types``) give each block
its own mask and rotary embedding; a walk that reused block 0's arguments was 0.2–0.5 % off.
"""
import pytest
import torch

from conftest import FAMILIES, make_tiny_model
from ebft.evaluation.perplexity import stream_perplexity
from ebft.capture import capture
from ebft.walk import walk


def _ids(n=3, s=32, vocab=320, seed=0):
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))


def plain_nll(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).item()


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("batch_size", [1, 2])
def test_walk_dense_perplexity_equals_a_plain_forward(arch, batch_size):
    model = make_tiny_model(arch, layers=3)
    ids = _ids()
    expected = plain_nll(model, ids)
    result = walk(model, None, None, eval_ids={"x": ids}, batch_size=batch_size)
    got = stream_perplexity(model, result.streams["x/dense"], ids, "cpu", result.returns_tuple)
    assert got == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "qwen2-mixed"])
def test_blocks_of_different_types_get_their_own_arguments(arch):
    model = make_tiny_model(arch, layers=3)
    _, calls = capture(model, _ids(), torch.device("cpu"))
    types = model.config.layer_types
    assert types[0] != types[1] and types[0] == types[2]

    def same(a, b):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a is b or a == b

    kw = [io.kwargs for io in calls.ios]
    differs = [k for k in kw[0] if not same(kw[0][k], kw[1][k])]
    assert set(differs) & {"attention_mask", "position_embeddings"}  # sliding vs full mask or rotary
    assert all(same(kw[0][k], kw[2][k]) for k in kw[0])  # the same type: the same arguments


def test_reusing_block_zeros_arguments_would_be_wrong():
    """The failure the per-block capture fixes: with block 0's arguments everywhere, Gemma 2 is off."""
    model = make_tiny_model("gemma2", layers=3)
    ids = _ids()
    expected = torch.tensor(plain_nll(model, ids)).exp().item()
    import ebft.streams as streams_module

    real = streams_module.capture

    def block_zero_everywhere(*args, **kwargs):
        x, calls = real(*args, **kwargs)
        calls.ios = [calls.ios[0]] * len(calls.ios)
        return x, calls

    streams_module.capture = block_zero_everywhere
    try:
        result = walk(model, None, None, eval_ids={"x": ids})
    finally:
        streams_module.capture = real
    wrong = stream_perplexity(model, result.streams["x/dense"], ids)
    assert wrong != pytest.approx(expected, rel=1e-5)


def test_gpt2_eager_mask_arrives_positionally():
    model = make_tiny_model("gpt2-eager", layers=2)
    _, calls = capture(model, _ids(), torch.device("cpu"))
    assert any(isinstance(a, torch.Tensor) for a in calls[1].args)
