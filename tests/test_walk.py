"""The block walk: discovery on real architectures, exactness at sparsity 0, perplexity."""
import math

import pytest
import torch

from conftest import ARCHS, make_tiny_model
from ebft.estimate.shape import model_shape
from ebft.evaluation.perplexity import eval_windows, perplexity
from ebft.masks import parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.capture import capture, tail_nll
from ebft.stats import STAT_KINDS, LayerStats
from ebft.walk import PruneSpec, dense_pass, walk


def _ids(n=3, s=32, vocab=320, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, s), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_discovers_blocks_and_linears(arch):
    model = make_tiny_model(arch)
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    names = set(find_linears(blocks[0]))
    assert len(names) >= 6 and not any("embed" in n or "lm_head" in n for n in names)
    assert set(find_linears(blocks[0], r"mlp|fc")) < names


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_at_sparsity_zero_reproduces_logits(arch):
    model = make_tiny_model(arch)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids).logits
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.0, None, "row"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = walk(model, _ids(seed=1), spec, eval_ids={"x": ids}, batch_size=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the walk's own streams reproduce the model's output through the tail
    nll = tail_nll(model, result.streams["x/final"], ids, torch.device("cpu"))
    direct = torch.nn.functional.cross_entropy(expected[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert nll == pytest.approx(direct.item(), rel=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_walk_prunes_every_block(arch):
    model = make_tiny_model(arch)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("2:4", None, None, "row"))
    result = walk(model, _ids(), spec)
    _, blocks = find_blocks(model)
    assert len(result.masks) == sum(len(find_linears(b)) for b in blocks)
    for block in blocks:
        for lin in find_linears(block).values():
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5)
    assert [b["index"] for b in result.blocks] == [0, 1]


def test_capture_sees_block_zero_inputs(tiny_llama):
    ids = _ids()
    x, io = capture(tiny_llama, ids, torch.device("cpu"))
    assert x.shape == (3, 32, 64)
    assert torch.allclose(x, tiny_llama.model.embed_tokens(ids))
    assert "position_embeddings" in io[0].kwargs and "position_embeddings" in io[1].kwargs  # discovered


def test_layers_regex_restricts_pruning(tiny_llama):
    spec = PruneSpec(get_pruner("magnitude"), parse_pattern("unstructured", 0.5, None, "layer"), r"mlp\.")
    result = walk(tiny_llama, _ids(), spec)
    assert result.masks and all(".mlp." in k for k in result.masks)
    assert (tiny_llama.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_perplexity_equals_direct_computation(tiny_llama):
    ids = _ids(n=1, s=100, seed=3)
    seqlen = 24  # 4 windows, tail of 4 tokens dropped
    with torch.no_grad():
        nlls = []
        for w in ids[0, : 4 * seqlen].view(4, seqlen):
            logits = tiny_llama(w[None]).logits[0]
            nlls.append(torch.nn.functional.cross_entropy(logits[:-1], w[1:], reduction="none"))
        direct = math.exp(torch.cat(nlls).mean().item())
    assert perplexity(tiny_llama, ids, seqlen) == pytest.approx(direct, rel=1e-5)
    assert eval_windows(ids, seqlen).shape == (4, seqlen)
    assert eval_windows(ids, seqlen, max_windows=2).shape == (2, seqlen)


@pytest.mark.parametrize("arch", ARCHS)
def test_linears_reading_one_input_share_one_statistics_object_with_the_same_sums(arch):
    """q/k/v (and gate/up) read the very same tensor: one LayerStats, counted once, equal to each one's own sums."""
    model = make_tiny_model(arch)
    block = find_blocks(model)[1][0]
    ids = torch.randint(0, 320, (6, 16), generator=torch.Generator().manual_seed(0))
    x, calls = capture(model, ids, torch.device("cpu"), batch_size=4)  # two batches: 4 + 2 windows
    linears = find_linears(block)
    own = {n: LayerStats(l.in_features, frozenset(STAT_KINDS)) for n, l in linears.items()}
    hooks = [l.register_forward_hook(lambda m, a, o, s=own[n]: s.update(a[0])) for n, l in linears.items()]
    calls[0].forward(block, x)
    for h in hooks:
        h.remove()
    stats, _ = dense_pass(block, calls[0], x, linears, STAT_KINDS, keep_output=False)
    if arch == "llama":  # q/k/v, o, gate/up, down: 4 statistics for 7 linears
        q, k, v, gate, up = (next(n for n in linears if n.endswith(s))
                             for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        assert stats[q] is stats[k] is stats[v] and stats[gate] is stats[up]
        assert len({id(s) for s in stats.values()}) == 4
    distinct = list({id(s): s for s in stats.values()}.values())  # what ebft plan counts: one per distinct input
    assert sorted(s.in_features for s in distinct) == sorted(model_shape(model.config).stats_inputs)
    for name, s in stats.items():
        assert s.count == own[name].count == 6 * 16
        for attr in ("sq_sum", "x_sum", "xxt"):
            torch.testing.assert_close(getattr(s, attr), getattr(own[name], attr), rtol=1e-5, atol=1e-5)

