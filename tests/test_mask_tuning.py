"""EBFT mask tuning: exact pattern at every step, lower block loss, dense weights, safe fallback."""
import pytest
import torch
from torch.nn.utils import parametrize

from conftest import make_tiny_model, recover_spec
from ebft.masks import check_mask, mask_from_scores, parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.recover import training
from ebft.recover.mask_tuning import initial_scores
from ebft.walk import PruneSpec, walk

PATTERNS = [("wanda", "unstructured", 0.5, "row"), ("wanda", "2:4", None, "row"),
            ("magnitude", "unstructured", 0.6, "layer")]


@pytest.mark.parametrize("pruner,pattern,sparsity,scope", PATTERNS)
def test_initial_scores_give_back_the_pruners_mask(pruner, pattern, sparsity, scope):
    g = torch.Generator().manual_seed(0)
    pat = parse_pattern(pattern, sparsity, scope, "row")
    keep = mask_from_scores(torch.rand(32, 64, generator=g), pat)  # a mask unrelated to the importance
    importance = torch.rand(32, 64, generator=g)
    importance[3] = 0  # a dead row: all ties
    assert torch.equal(mask_from_scores(initial_scores(importance, keep, pat), pat), keep)


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def _walk(arch, pruner, pattern, sparsity, scope, **settings):
    model = make_tiny_model(arch)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pat = parse_pattern(pattern, sparsity, scope, "row")
    forwards = []

    def check_forward_weight(module, args, out):  # runs on every forward of every training step
        if parametrize.is_parametrized(module, "weight"):
            check_mask(module.weight != 0, pat)
            forwards.append(1)

    _, blocks = find_blocks(model)
    for block in blocks:
        for lin in find_linears(block).values():
            lin.register_forward_hook(check_forward_weight)
    base = dict(epochs=3, batch_size=4, mask_lr=5e-3)
    spec = PruneSpec(get_pruner(pruner), pat)
    recover = recover_spec("ebft-mask", **{**base, **settings})
    result = walk(model, _ids(), spec, recover, batch_size=4)  # it re-checks every final mask and its zeros
    return model, dense, result, len(forwards)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pruner,pattern,sparsity,scope", PATTERNS)
def test_mask_tuning_keeps_the_pattern_every_step_and_lowers_the_loss(arch, pruner, pattern, sparsity, scope):
    model, dense, result, forwards = _walk(arch, pruner, pattern, sparsity, scope)
    linears_per_block = len(find_linears(find_blocks(model)[1][0]))
    assert forwards >= 2 * 3 * 2 * linears_per_block  # 2 blocks × 3 epochs × 2 steps, every linear
    for record in result.blocks:
        assert record["restored"] is None
        # a per-layer magnitude mask sits far from the |W|·‖X‖ order its scores start from: fewer flips
        assert record["loss_after"] < (0.9 if scope == "row" else 1.0) * record["loss_before"]
        assert record["mask_flips"] > 0
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            assert not parametrize.is_parametrized(lin)
            # Wanda and magnitude keep dense values, so the frozen weights are W ⊙ M
            assert torch.equal(lin.weight.data, dense[f"{full}.weight"] * result.masks[full]), full


def test_mask_tuning_keeps_the_pruners_masks_when_training_fails(monkeypatch):
    monkeypatch.setattr(training, "train_epochs", lambda *a, **k: ([float("nan")], True))  # (the one wrapper's)
    model = make_tiny_model("llama")
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.5, None, "row"))
    result = walk(model, _ids(), spec, recover_spec("ebft-mask", epochs=1))
    plain = make_tiny_model("llama")
    expected = walk(plain, _ids(), spec)
    for record in result.blocks:
        assert record["restored"] == "non-finite loss" and record["loss_after"] == record["loss_before"]
    for (k, v), (k2, v2) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(v, v2), k
    for full, mask in result.masks.items():
        assert torch.equal(mask, expected.masks[full]), full
    assert all(p.requires_grad for p in model.parameters())


def test_mask_tuning_starts_from_sparsegpts_updated_weights():
    """SparseGPT's kept weights carry its OBS update: mask tuning keeps them and grows dense values;
    with a zero learning rate nothing moves and the loss is exactly the pruned block's."""
    pat = parse_pattern("unstructured", 0.5, "layer", "layer")
    spec = PruneSpec(get_pruner("sparsegpt"), pat)
    plain = make_tiny_model("llama")
    dense = {k: v.clone() for k, v in plain.state_dict().items()}
    pruned = walk(plain, _ids(), spec)

    frozen = make_tiny_model("llama")
    still = walk(frozen, _ids(), spec, recover_spec("ebft-mask", epochs=2, batch_size=4, mask_lr=0.0))
    for record in still.blocks:
        assert record["restored"] is None and record["mask_flips"] == 0
        assert record["loss_after"] == record["loss_before"]  # the straight-through forward is exactly M
    for k, v in plain.state_dict().items():
        assert torch.equal(frozen.state_dict()[k], v), k

    model = make_tiny_model("llama")
    tuned = walk(model, _ids(), spec, recover_spec("ebft-mask", epochs=3, batch_size=4, mask_lr=5e-3))
    prefix, blocks = find_blocks(model)
    record = tuned.blocks[0]
    assert record["restored"] is None and record["mask_flips"] > 0 and record["loss_after"] < record["loss_before"]
    for name, lin in find_linears(blocks[0]).items():  # block 0 saw the same inputs in both walks
        full = f"{prefix}.0.{name}"
        old, new = pruned.masks[full], tuned.masks[full]
        weight = lin.weight.data
        assert torch.equal(weight[old & new], plain.state_dict()[f"{full}.weight"][old & new]), full
        assert torch.equal(weight[new & ~old], dense[f"{full}.weight"][new & ~old]), full
        assert not weight[~new].any(), full
