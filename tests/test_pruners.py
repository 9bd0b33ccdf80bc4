"""Pruners: hand-computed masks, exact patterns, and SparseGPT's OBS update checked against the maths."""
import pytest
import torch

import ebft.prune as prune
from ebft.errors import ConfigError
from ebft.masks import Pattern, check_mask, check_weight
from ebft.prune import PRUNERS, PruneResult, get_pruner, register_pruner, unregister_pruner
from ebft.prune.sparsegpt import sparsegpt
from ebft.stats import LayerStats


def correlated_layer(rows=32, cols=64, tokens=512, seed=0):
    """A random layer whose inputs X = Z @ A share a few strong directions, like LLM activations,
    so the Hessian XᵀX is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.eye(cols) + torch.randn(cols, 8, generator=g) @ torch.randn(8, cols, generator=g) / 8**0.5
    X = torch.randn(tokens, cols, generator=g) @ A
    return torch.randn(rows, cols, generator=g), X


def pruned_weight(result: PruneResult, weight):
    return result.weight if result.weight is not None else weight * result.mask


def layer_error(weight, pruned, X):
    """‖WXᵀ − ŴXᵀ‖_F: what every pruner tries to keep small."""
    return ((weight - pruned) @ X.T).norm().item()


# --- Hand computations -------------------------------------------------------------------------

HAND_W = torch.tensor([[1.0, -2.0, 0.5, 7.0],
                       [0.25, 1.5, -2.0, -5.0],
                       [-0.75, 0.5, 1.25, 4.0]])
# Four tokens, token t lights up feature t only: ‖X_j‖₂ = (4, 1, 2, 0.5) exactly.
HAND_X = torch.diag(torch.tensor([4.0, 1.0, 2.0, 0.5]))


def test_wanda_mask_by_hand():
    # |W|·‖X_j‖: [[4, 2, 1, 3.5], [1, 1.5, 4, 2.5], [3, 0.5, 2.5, 2]]
    stats = LayerStats.from_inputs(HAND_X)
    row = get_pruner("wanda")(HAND_W, stats, Pattern(0.5, scope="row"))
    assert row.weight is None
    assert row.mask.tolist() == [[1, 0, 0, 1], [0, 0, 1, 1], [1, 0, 1, 0]]
    one_two = get_pruner("wanda")(HAND_W, stats, Pattern(0.5, 1, 2))
    assert one_two.mask.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 1, 0]]


def test_magnitude_mask_by_hand():
    row = get_pruner("magnitude")(HAND_W, None, Pattern(0.5, scope="row"))
    assert row.weight is None
    assert row.mask.tolist() == [[0, 1, 0, 1], [0, 0, 1, 1], [0, 0, 1, 1]]
    # One threshold for the layer: the 6 smallest |W| go (0.25, 0.5, 0.5, 0.75, 1, 1.25).
    layer = get_pruner("magnitude")(HAND_W, None, Pattern(0.5, scope="layer"))
    assert layer.mask.tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]


# --- Every pruner, every pattern ----------------------------------------------------------------

PATTERNS = [Pattern(0.0, scope="row"), Pattern(0.0, scope="layer"), Pattern(0.5, scope="row"),
            Pattern(0.7, scope="layer"), Pattern(0.5, 2, 4), Pattern(0.5, 4, 8), Pattern(0.75, 1, 4)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
@pytest.mark.parametrize("name", sorted(n for n, p in PRUNERS.items() if not p.structured))
def test_every_pruner_and_pattern_is_exact(name, pattern):
    weight, X = correlated_layer(rows=8, cols=32, tokens=64)
    original = weight.clone()
    result = get_pruner(name)(weight, LayerStats.from_inputs(X), pattern)
    assert torch.equal(weight, original), "pruners must not modify the weight in place"
    check_mask(result.mask, pattern, name)
    pruned = pruned_weight(result, weight)
    assert pruned.shape == weight.shape and pruned.dtype == weight.dtype
    check_weight(pruned, result.mask, name)
    assert torch.isfinite(pruned).all()


@pytest.mark.parametrize("name", ["wanda", "sparsegpt"])
def test_missing_stats_is_a_clear_error(name):
    with pytest.raises(ValueError, match=name):
        get_pruner(name)(torch.randn(4, 8), None, Pattern(0.5))


# --- SparseGPT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="row"), Pattern(0.5, scope="layer"),
                                     Pattern(0.5, 2, 4)], ids=str)
@pytest.mark.parametrize("blocksize", [128, 16])
def test_sparsegpt_beats_wanda_and_magnitude(pattern, blocksize):
    weight, X = correlated_layer()
    stats = LayerStats.from_inputs(X)
    errors = {name: layer_error(weight, pruned_weight(get_pruner(name)(weight, stats, pattern), weight), X)
              for name in ("magnitude", "wanda")}
    ours = layer_error(weight, sparsegpt(weight, stats, pattern, blocksize=blocksize).weight, X)
    assert ours < 0.9 * min(errors.values()), (ours, errors)


def test_sparsegpt_at_sparsity_zero_is_identity():
    weight, X = correlated_layer(rows=8, cols=32)
    result = sparsegpt(weight, LayerStats.from_inputs(X), Pattern(0.0, scope="layer"))
    assert result.mask.all()
    assert torch.equal(result.weight, weight)


def damped_hessian(X, percdamp=0.01):
    H = LayerStats.from_inputs(X).hessian.double()
    return H + percdamp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


def test_sparsegpt_update_is_the_obs_least_squares_solution():
    """One weight per row pruned: the update must solve min ‖(w − ŵ)‖²_H exactly, with ŵ_j = 0,
    the columns left of j frozen (SparseGPT's order) and those right of it free:
    ŵ_F = w_F + w_j · H_FF⁻¹ H_Fj (H damped as in the pruner)."""
    weight, X = correlated_layer(rows=6, cols=8, tokens=256, seed=3)
    result = sparsegpt(weight, LayerStats.from_inputs(X), Pattern(1 / 8, scope="row"))
    H, expected = damped_hessian(X), weight.double().clone()
    for r, j in enumerate((~result.mask).int().argmax(1).tolist()):
        free = slice(j + 1, None)
        expected[r, free] += weight[r, j].double() * torch.linalg.solve(H[free, free], H[free, j])
        expected[r, j] = 0
    assert torch.allclose(result.weight.double(), expected, rtol=1e-4, atol=1e-4)


def test_sparsegpt_nm_is_independent_of_block_size():
    """Lazy batched updates must equal applying every column update at once: for N:M (whose mask
    choice does not depend on the block) any block size gives the same result."""
    weight, X = correlated_layer(rows=16, cols=32, seed=1)
    stats = LayerStats.from_inputs(X)
    reference = sparsegpt(weight, stats, Pattern(0.5, 2, 4), blocksize=128)
    for blocksize in (4, 8, 6):  # 6 rounds down to 4 so no group straddles two blocks
        result = sparsegpt(weight, stats, Pattern(0.5, 2, 4), blocksize=blocksize)
        assert torch.equal(result.mask, reference.mask)
        assert torch.allclose(result.weight, reference.weight, atol=1e-4)


@pytest.mark.parametrize("pattern", [Pattern(0.5, scope="layer"), Pattern(0.5, scope="row"),
                                     Pattern(0.5, 2, 4)], ids=str)
def test_sparsegpt_with_diagonal_hessian_is_wanda_without_update(pattern):
    """Uncorrelated inputs: no other weight can compensate a pruned one, so kept weights stay as
    they were; and with U_jj² = 1/H_jj the saliency w²/U_jj² = w²·2‖X_j‖²/n ranks exactly like
    Wanda's |w|·‖X_j‖ (no damping here, else H_jj + λ)."""
    g = torch.Generator().manual_seed(0)
    weight, X = torch.randn(6, 16, generator=g), torch.diag(torch.rand(16, generator=g) + 0.5)
    stats = LayerStats.from_inputs(X)
    result = sparsegpt(weight, stats, pattern, percdamp=0.0)
    assert torch.allclose(result.weight, weight * result.mask, atol=1e-6)
    assert torch.equal(result.mask, get_pruner("wanda")(weight, stats, pattern).mask)


@pytest.mark.parametrize("pattern", [Pattern(0.3, scope="row"), Pattern(0.3, scope="layer")], ids=str)
@pytest.mark.parametrize("blocksize", [8, 5])
def test_sparsegpt_block_counts_add_up_to_the_exact_total(pattern, blocksize):
    """Blocks prune n_pruned(i2) − n_pruned(i1) each: per-block rounding must not drift
    (20 columns at 30% in blocks of 8: 2 + 2 + 2 = 6, not 2 + 2 + 1)."""
    weight, X = correlated_layer(rows=7, cols=20, tokens=64)
    result = sparsegpt(weight, LayerStats.from_inputs(X), pattern, blocksize=blocksize)
    check_mask(result.mask, pattern)
    check_weight(result.weight, result.mask)


def test_sparsegpt_dead_inputs():
    weight, X = correlated_layer(rows=8, cols=16, tokens=64)
    X[:, [3, 7]] = 0
    result = sparsegpt(weight, LayerStats.from_inputs(X), Pattern(0.5, scope="row"))
    assert torch.isfinite(result.weight).all()
    assert (result.weight[:, [3, 7]] == 0).all()  # a weight on an always-zero input is useless
    check_mask(result.mask, Pattern(0.5, scope="row"))


def hessian_stats(H):
    stats = LayerStats(H.shape[0], frozenset({"hessian"}))
    stats.xxt, stats.count = H.clone(), 2  # hessian = 2·xxt/count = H
    return stats


def test_sparsegpt_retries_damping_then_fails_clearly():
    # Eigenvalues 2.01 and −0.01: 1% damping is not enough, 10% is.
    nearly_pd = hessian_stats(torch.tensor([[1.0, 1.01], [1.01, 1.0]]))
    result = sparsegpt(torch.tensor([[1.0, 2.0]]), nearly_pd, Pattern(0.5, scope="row"))
    check_mask(result.mask, Pattern(0.5, scope="row"))
    negative = hessian_stats(-torch.eye(2))
    with pytest.raises(RuntimeError, match="1x2 layer is not positive definite"):
        sparsegpt(torch.tensor([[1.0, 2.0]]), negative, Pattern(0.5, scope="row"))


# --- Registry ------------------------------------------------------------------------------------

def test_registry_contents():
    assert {"magnitude", "wanda", "sparsegpt"} <= set(PRUNERS)
    assert get_pruner("magnitude").needs == frozenset()
    assert get_pruner("wanda").needs == frozenset({"sq"})
    assert get_pruner("sparsegpt").needs == frozenset({"hessian"})
    assert [get_pruner(n).default_scope for n in ("magnitude", "wanda", "sparsegpt")] == ["layer", "row", "layer"]


def test_unknown_pruner_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        get_pruner("obs")
    assert info.value.field == "method"
    assert str(info.value).startswith("method: got 'obs'; allowed: ")
    assert "magnitude" in str(info.value) and "sparsegpt" in str(info.value) and "wanda" in str(info.value)


def test_register_pruner_validates():
    register_pruner("toy", needs=("mean",))(lambda w, s, p: PruneResult(w != 0))
    try:
        assert prune.get_pruner("toy").needs == frozenset({"mean"})
        with pytest.raises(ValueError, match="twice"):
            register_pruner("toy")(lambda w, s, p: None)
    finally:
        unregister_pruner("toy")  # keep the real registry clean
    assert "toy" not in PRUNERS
    with pytest.raises(ValueError, match="unknown statistics"):
        register_pruner("bad", needs=("fisher",))
    with pytest.raises(ValueError, match="default_scope"):
        register_pruner("bad", default_scope="column")
