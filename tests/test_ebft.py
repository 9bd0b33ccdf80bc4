"""EBFT recovery: lowers block loss, keeps masks bit-for-bit, guards NaN, deterministic, fp16 step order."""
import pytest
import torch

from conftest import make_tiny_model
from ebft.masks import parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.recover import BlockContext
from ebft.recover.ebft import EbftSettings, ebft
from ebft.recover.training import make_adamw, optimizer_step, reconstruction_loss
from ebft.capture import capture
from ebft.prune import BlockSite
from ebft.walk import PruneSpec, RecoverSpec, dense_pass, walk


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def settings(**kw):
    base = dict(epochs=3, lr=1e-3, batch_size=4, weight_decay=0.1)
    return EbftSettings(**{**base, **kw})


def pruned_block(pattern="unstructured", sparsity=0.5, arch="llama", seed=0):
    """The context of block 0 of a tiny model, Wanda-pruned: inputs, dense targets, masks."""
    model = make_tiny_model(arch)
    _, blocks = find_blocks(model)
    block = blocks[0]
    x, calls = capture(model, _ids(), torch.device("cpu"), batch_size=4)
    linears = find_linears(block)
    stats, targets = dense_pass(block, calls[0], x, linears, {"sq"})
    spec = PruneSpec(get_pruner("wanda"), parse_pattern(pattern, sparsity, None, "row"))
    masks, _ = spec.pruner.prune_block(block, linears, stats, BlockSite(0, "b0", model.config, spec.pattern), None)
    return BlockContext(index=0, block=block, linears=linears, inputs=x, targets=targets, masks=masks, stats=stats,
                        pattern=spec.pattern, io=calls[0], seed=seed)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("2:4", None), ("unstructured", 0.7)])
def test_ebft_lowers_loss_and_keeps_masks_bit_for_bit(pattern, sparsity):
    ctx = pruned_block(pattern, sparsity)
    linears, masks = ctx.linears, ctx.masks
    before = {n: l.weight.detach().clone() for n, l in linears.items()}
    record = ebft(ctx, settings())
    assert record["loss_after"] < 0.9 * record["loss_before"]
    assert record["restored"] is None
    for name, lin in linears.items():
        # zeros stay exactly zero (AdamW with masked gradients and decoupled decay) ...
        assert torch.equal(lin.weight != 0, masks[name]), name
        # ... and the kept weights really trained
        assert not torch.equal(lin.weight, before[name]), name


def test_masked_adamw_keeps_zeros_exactly_without_rezeroing():
    w = torch.nn.Parameter(torch.randn(6, 8))
    mask = torch.rand(6, 8) > 0.5
    with torch.no_grad():
        w.mul_(mask)
    opt = make_adamw([w], lr=0.1, weight_decay=0.1)
    for _ in range(20):
        (w.sum() ** 2 + (w * torch.randn(6, 8)).sum()).backward()
        optimizer_step([w], opt, None, 1.0, [(w, mask.float())])
    assert torch.equal(w.detach() == 0, ~mask)  # not a single masked weight moved off 0.0


def test_every_block_loss_goes_down_in_the_walk():
    model = make_tiny_model("qwen2")  # attention bias is trained too
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.6, None, "row"))
    result = walk(model, _ids(), spec, RecoverSpec("ebft", settings()), batch_size=4)
    for rec in result.blocks:
        assert rec["loss_after"] < rec["loss_before"], rec
        assert len(rec["epoch_losses"]) == 3
    for name, mask in result.masks.items():
        w = dict(model.named_modules())[name].weight
        assert torch.equal(w != 0, mask), name
        assert (~mask).float().mean().item() == pytest.approx(0.6, abs=0.02)


def test_sparsity_zero_loss_stays_zero_weights_barely_move():
    ctx = pruned_block("unstructured", 0.0)
    linears = ctx.linears
    before = {n: l.weight.detach().clone() for n, l in linears.items()}
    record = ebft(ctx, settings(weight_decay=0.0))
    assert record["loss_before"] < 1e-10
    assert record["loss_after"] < 1e-8
    for name, lin in linears.items():
        assert (lin.weight - before[name]).abs().max() < 1e-3


def test_nan_guard_restores_post_pruning_weights():
    ctx = pruned_block()
    linears = ctx.linears
    before = {n: l.weight.detach().clone() for n, l in linears.items()}
    record = ebft(ctx, settings(lr=1e12, grad_clip=None, weight_decay=0.0))
    assert record["restored"] in ("non-finite loss", "loss increased")
    for name, lin in linears.items():
        assert torch.equal(lin.weight, before[name]), name
    assert record["loss_after"] == record["loss_before"]


def test_same_seed_same_result():
    weights = []
    for _ in range(2):
        ctx = pruned_block(seed=7)
        ebft(ctx, settings())
        weights.append(torch.cat([l.weight.flatten() for l in ctx.linears.values()]))
    assert torch.equal(weights[0], weights[1])
    ctx = pruned_block(seed=8)
    ebft(ctx, settings())
    assert not torch.equal(weights[0], torch.cat([l.weight.flatten() for l in ctx.linears.values()]))


@pytest.mark.parametrize("recover", ["ebft", "ebft-mask"])
def test_the_run_seed_reaches_the_recovery(recover):
    """--seed sets every random draw: with the same calibration windows, the walk's seed alone changes
    EBFT's (and mask tuning's) shuffling, and the same seed gives identical weights."""
    from ebft.recover import get_recovery

    def trained(seed):
        model = make_tiny_model("llama")
        spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.5, None, "row"))
        kw = dict(epochs=2, batch_size=2) | ({"lr": 1e-3} if recover == "ebft" else {"mask_lr": 5e-3})
        walk(model, _ids(), spec, RecoverSpec(recover, get_recovery(recover).settings(**kw), seed=seed), batch_size=4)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(trained(3), trained(3))
    assert not torch.equal(trained(3), trained(4))


def test_fp16_scaler_unscales_before_clipping():
    """A gradient of norm 0.5 must not be clipped by clip=1.0, whatever the loss scale."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    grad = torch.tensor([0.3, 0.4, 0.0, 0.0])  # norm 0.5
    scaler.scale((w * grad).sum()).backward()
    optimizer_step([w], opt, scaler, 1.0, [(w, torch.tensor([1.0, 1.0, 1.0, 0.0]))])
    assert torch.allclose(w.detach(), -grad)  # unclipped SGD step; clipping scaled grads would shrink it 1024x


def test_dense_model_target_and_token_norm_loss_run_and_differ():
    losses = {}
    for target, loss in [("dense-block", "mse"), ("dense-model", "mse"), ("dense-block", "token-norm")]:
        model = make_tiny_model("llama")
        spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.5, None, "row"))
        cfg = settings(target=target, loss=loss)
        result = walk(model, _ids(), spec, RecoverSpec("ebft", cfg), batch_size=4)
        losses[(target, loss)] = [b["loss_before"] for b in result.blocks]
        assert all(b["loss_after"] < b["loss_before"] for b in result.blocks)
    # block 0 sees the same inputs either way; block 1's targets differ with the target choice
    assert losses[("dense-block", "mse")][0] == pytest.approx(losses[("dense-model", "mse")][0])
    assert losses[("dense-block", "mse")][1] != pytest.approx(losses[("dense-model", "mse")][1])
    assert losses[("dense-block", "token-norm")][0] != pytest.approx(losses[("dense-block", "mse")][0])


def test_token_norm_loss_weighs_tokens_alike():
    target = torch.ones(1, 2, 4)
    target[0, 0] *= 100.0  # one massive token
    out = target.clone()
    out[0, 0] += 1.0  # error 1 on the massive token
    out[0, 1] += 1.0  # error 1 on the normal token
    assert reconstruction_loss(out, target, "mse").item() == pytest.approx(1.0)
    # relative error: 1/100² for the massive token, 1/1 for the normal one
    assert reconstruction_loss(out, target, "token-norm").item() == pytest.approx((1e-4 + 1.0) / 2)


def test_holdout_is_not_trained_on_and_reported():
    record = ebft(pruned_block(), settings(holdout=2))
    assert "holdout_loss_before" in record and "holdout_loss_after" in record
    assert record["holdout_loss_after"] < record["holdout_loss_before"]


def test_train_norms_changes_norm_weights():
    ctx = pruned_block()
    norm = ctx.block.input_layernorm.weight.detach().clone()
    ebft(ctx, settings(train_norms=True))
    assert not torch.equal(ctx.block.input_layernorm.weight, norm)
    ctx = pruned_block()
    norm = ctx.block.input_layernorm.weight.detach().clone()
    ebft(ctx, settings(train_norms=False))
    assert torch.equal(ctx.block.input_layernorm.weight, norm)


def test_weight_decay_lr_and_precision_each_change_the_result():
    from ebft.recover.training import autocast_dtype

    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "fp16") == torch.float16

    def trained(**kw):
        ctx = pruned_block()
        record = ebft(ctx, settings(**kw))
        return record, torch.cat([l.weight.flatten() for l in ctx.linears.values()])

    base_rec, base = trained()
    for kw in ({"weight_decay": 0.0}, {"lr": 3e-3}, {"precision": "bf16"}, {"grad_clip": 1e-3}):
        rec, w = trained(**kw)
        assert not torch.equal(w, base), kw
    assert trained(precision="bf16")[0]["loss_before"] != base_rec["loss_before"]  # bf16 autocast really ran
