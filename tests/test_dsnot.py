"""DSnoT: lowers a layer's reconstruction error, keeps every pattern exactly, grows dense values."""
import pytest
import torch

from conftest import make_tiny_model, recover_spec
from ebft.cli import build_parser, config_from_args
from ebft.config import RunConfig
from ebft.errors import ConfigError
from ebft.masks import check_mask, parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.recover.dsnot import dsnot_layer, is_mlp
from ebft.walk import PruneSpec, walk
from ebft.stats import LayerStats


def layer_problem(seed=0, out=24, cols=64, tokens=2048):
    """A weight and inputs whose features have nonzero means (as LLM activations do)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, cols, generator=g)
    mean = torch.randn(cols, generator=g)
    x = mean + 0.5 * torch.rand(cols, generator=g) * torch.randn(tokens, cols, generator=g)
    return weight, x, LayerStats.from_inputs(x, needs=("sq", "mean"))


def reconstruction(weight, sparse, x):
    return ((weight - sparse) @ x.T).norm().item()


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_dsnot_lowers_layer_error_and_keeps_sparsity(pattern, sparsity):
    weight, x, stats = layer_problem()
    pat = parse_pattern(pattern, sparsity, None, "row")
    wanda = get_pruner("wanda")(weight, stats, pat).mask
    keep, record = dsnot_layer(weight, weight * wanda, wanda, stats, pat, cycles=50, threshold=0.0)
    check_mask(keep, pat)  # every row keeps its count (every group of 4 keeps 2)
    assert torch.equal((~keep).sum(1), (~wanda).sum(1))
    assert record["swaps"] > 0 and not torch.equal(keep, wanda)
    # the expected error it targets, and the actual error ‖WX − ŴX‖ (N:M has less freedom)
    nm = pat.is_nm
    assert record["error_after"] < (0.9 if nm else 0.5) * record["error_before"]
    assert reconstruction(weight, weight * keep, x) < (0.95 if nm else 0.85) * reconstruction(weight, weight * wanda, x)


def test_dsnot_threshold_stops_rows():
    weight, _, stats = layer_problem()
    pat = parse_pattern("unstructured", 0.5, None, "row")
    wanda = get_pruner("wanda")(weight, stats, pat).mask
    keep, record = dsnot_layer(weight, weight * wanda, wanda, stats, pat, threshold=1e9)
    assert record["swaps"] == 0 and torch.equal(keep, wanda)
    _, one = dsnot_layer(weight, weight * wanda, wanda, stats, pat, cycles=1, threshold=0.0)
    assert 0 < one["swaps"] <= weight.shape[0] and one["cycles"] == 1  # at most one swap per row per cycle


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def _walk(arch, method, pattern="unstructured", sparsity=0.5, **settings):
    model = make_tiny_model(arch)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    spec = PruneSpec(get_pruner("wanda"), parse_pattern(pattern, sparsity, None, "row"))
    result = walk(model, _ids(), spec, recover_spec(method, **settings), batch_size=4)
    return model, dense, result


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_walk_with_dsnot_changes_masks_and_grows_dense_values(arch, pattern, sparsity):
    model, dense, result = _walk(arch, "dsnot", pattern, sparsity)  # the walk re-checks every mask
    _, plain, wanda = _walk(arch, "none", pattern, sparsity)
    prefix, blocks = find_blocks(model)
    changed = 0
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            mask = result.masks[full]
            # kept weights hold their dense value (Wanda never changes them), grown ones included
            assert torch.equal(lin.weight.data, dense[f"{full}.weight"] * mask), full
            changed += int(not torch.equal(mask, wanda.masks[full]))
    assert changed > 0
    for record in result.blocks:
        assert record["dsnot_swaps"] > 0
        assert record["dsnot_error_after"] < record["dsnot_error_before"]


def test_dsnot_skip_mlp_leaves_mlp_masks_alone():
    _, _, result = _walk("llama", "dsnot", dsnot_skip_mlp=True)
    _, _, wanda = _walk("llama", "none")
    for full, mask in result.masks.items():  # block 0: same inputs (later blocks see other chains)
        if full.startswith("model.layers.0."):
            assert torch.equal(mask, wanda.masks[full]) == is_mlp(full.split(".", 3)[-1]), full
    assert is_mlp("mlp.down_proj") and is_mlp("fc1") and not is_mlp("self_attn.o_proj")


def test_dsnot_settings_validate_and_map_from_flags():
    args = build_parser().parse_args(["run", "--model", "m", "--recover", "dsnot", "--dsnot-cycles", "5",
                                      "--dsnot-threshold", "0.01", "--dsnot-power", "2", "--dsnot-skip-mlp",
                                      "--mask-lr", "0.02"])
    r = config_from_args(args).recover
    assert (r.method, r.dsnot_cycles, r.dsnot_threshold, r.dsnot_power, r.dsnot_skip_mlp, r.mask_lr) == \
        ("dsnot", 5, 0.01, 2.0, True, 0.02)
    for field, value in [("dsnot_cycles", 0), ("dsnot_threshold", -1.0), ("dsnot_power", "x"),
                         ("dsnot_skip_mlp", "yes"), ("mask_lr", 0.0)]:
        config = RunConfig.from_dict({"recover": {field: value}})
        with pytest.raises(ConfigError, match=f"recover.{field}"):
            config.check_types()
