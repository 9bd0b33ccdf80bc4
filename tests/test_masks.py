"""Sparsity patterns: exact counts (ties included), checks that catch broken masks, config parsing."""
import pytest
import torch

from ebft.errors import ConfigError, MaskError
from ebft.masks import (Pattern, check_mask, check_weight, mask_from_scores, n_pruned,
                        parse_pattern, validate_width)


def tied_scores(rows=16, cols=48, seed=0):
    """Integer-valued scores in {0, 1, 2}: almost every comparison is a tie."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (rows, cols), generator=g).float()


def random_scores(rows=16, cols=48, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tied_scores, random_scores])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_row_scope_prunes_exactly_per_row(make, sparsity):
    scores = make()
    mask = mask_from_scores(scores, Pattern(sparsity, scope="row"))
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    zeros = (~mask).sum(1)
    assert torch.all(zeros == n_pruned(48, sparsity))
    # Highest scores kept: within each row no pruned score exceeds a kept one.
    if 0 < n_pruned(48, sparsity) < 48:
        max_pruned = scores.masked_fill(mask, -torch.inf).amax(1)
        min_kept = scores.masked_fill(~mask, torch.inf).amin(1)
        assert torch.all(max_pruned <= min_kept)


@pytest.mark.parametrize("make", [tied_scores, random_scores])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.77])
def test_layer_scope_prunes_exactly_per_layer(make, sparsity):
    scores = make(rows=10, cols=30)
    mask = mask_from_scores(scores, Pattern(sparsity, scope="layer"))
    assert int((~mask).sum()) == n_pruned(300, sparsity)
    if sparsity:
        assert scores[~mask].max() <= scores[mask].min()


@pytest.mark.parametrize("make", [tied_scores, random_scores])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keeps_exactly_n_of_every_m(make, n, m):
    scores = make(rows=8, cols=64)
    mask = mask_from_scores(scores, Pattern(1 - n / m, n, m))
    groups, kept = scores.reshape(8, -1, m), mask.reshape(8, -1, m)
    assert torch.all(kept.sum(-1) == n)
    max_pruned = groups.masked_fill(kept, -torch.inf).amax(-1)
    min_kept = groups.masked_fill(~kept, torch.inf).amin(-1)
    assert torch.all(max_pruned <= min_kept)


def test_row_and_nm_masks_by_hand():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 5.0, 7.0, 6.0],
                           [8.0, 7.0, 1.0, 2.0, 6.0, 5.0, 3.0, 4.0]])
    row = mask_from_scores(scores, Pattern(0.5, scope="row"))
    assert row.tolist() == [[1, 0, 0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, 1, 0, 0]]
    layer = mask_from_scores(scores, Pattern(13 / 16, scope="layer"))  # keep the 3 largest overall
    assert layer.tolist() == [[0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0]]
    two_four = mask_from_scores(scores, Pattern(0.5, 2, 4))
    assert two_four.tolist() == [[1, 0, 1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0, 0]]


def test_n_pruned_floors_and_absorbs_rounding():
    assert n_pruned(10, 0.7) == 7
    assert n_pruned(100, 0.29) == 29  # 100 * 0.29 = 28.999999999999996
    assert n_pruned(7, 0.5) == 3
    assert n_pruned(64, 0.0) == 0


def test_nm_width_must_divide():
    with pytest.raises(ConfigError, match="in_features=6.*M=4"):
        mask_from_scores(torch.randn(3, 6), Pattern(0.5, 2, 4))
    with pytest.raises(ConfigError, match="mlp.down_proj"):
        validate_width(10, Pattern(0.5, 2, 4), "mlp.down_proj")
    validate_width(10, Pattern(0.5), "unstructured ignores width")


PATTERNS = [Pattern(0.5, scope="row"), Pattern(0.6, scope="layer"), Pattern(0.5, 2, 4),
            Pattern(0.5, 4, 8), Pattern(0.75, 1, 4)]


@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_check_mask_accepts_good_and_rejects_one_flip(pattern):
    mask = mask_from_scores(random_scores(rows=4, cols=16), pattern)
    check_mask(mask, pattern, "q_proj")
    broken = mask.clone()
    broken[2, 5] = ~broken[2, 5]
    with pytest.raises(MaskError, match="q_proj"):
        check_mask(broken, pattern, "q_proj")


def test_check_mask_rejects_non_bool_and_wrong_width():
    with pytest.raises(MaskError, match="bool"):
        check_mask(torch.ones(2, 4), Pattern(0.0), "fc1")
    with pytest.raises(MaskError, match="fc1"):
        check_mask(torch.ones(2, 6, dtype=torch.bool), Pattern(0.5, 2, 4), "fc1")


def test_check_weight():
    mask = torch.tensor([[True, False], [False, True]])
    check_weight(torch.tensor([[1.0, 0.0], [0.0, -2.0]]), mask, "o_proj")
    with pytest.raises(MaskError, match="o_proj: 1 pruned"):
        check_weight(torch.tensor([[1.0, 1e-8], [0.0, -2.0]]), mask, "o_proj")
    with pytest.raises(MaskError, match="shape"):
        check_weight(torch.zeros(2, 3), mask, "o_proj")


def test_parse_pattern_valid():
    assert parse_pattern("unstructured", 0.5, None, "row") == Pattern(0.5, scope="row")
    assert parse_pattern("Unstructured", 0.7, "layer", "row") == Pattern(0.7, scope="layer")
    assert parse_pattern("unstructured", 0.5, None, "layer").scope == "layer"
    p = parse_pattern("2:4", None, None, "layer")
    assert (p.n, p.m, p.sparsity, p.is_nm) == (2, 4, 0.5, True)
    assert parse_pattern("4:8", 0.5, None, "row") == Pattern(0.5, 4, 8)
    assert parse_pattern("1:3", 2 / 3 + 1e-8, None, "row").sparsity == 1 - 1 / 3
    assert str(p) == "2:4"
    assert str(Pattern(0.5, scope="row")) == "50% unstructured (per row)"
    assert str(Pattern(0.7, scope="layer")) == "70% unstructured (per layer)"
    assert parse_pattern("structured", 0.2) == Pattern(0.2, structured=True)
    assert str(Pattern(0.2, structured=True)) == "20% structured (of block parameters)"
    assert not Pattern(0.5).is_nm


@pytest.mark.parametrize("pattern,sparsity,scope,field,value", [
    ("unstructured", 1.0, None, "sparsity", "1.0"),
    ("unstructured", -0.1, None, "sparsity", "-0.1"),
    ("unstructured", 1.5, None, "sparsity", "1.5"),
    ("unstructured", float("nan"), None, "sparsity", "nan"),
    ("unstructured", "0.5", None, "sparsity", "'0.5'"),
    ("unstructured", None, None, "sparsity", "None"),
    ("2:4", 1.2, None, "sparsity", "1.2"),
    ("2:4", 0.6, None, "sparsity", "0.6"),  # contradicts 2:4
    ("1:4", 0.5, None, "sparsity", "0.5"),
    ("2-4", None, None, "pattern", "'2-4'"),  # malformed
    ("2:", None, None, "pattern", "'2:'"),
    ("a:b", None, None, "pattern", "'a:b'"),
    ("4:4", None, None, "pattern", "'4:4'"),  # N >= M
    ("5:4", None, None, "pattern", "'5:4'"),
    ("0:4", None, None, "pattern", "'0:4'"),  # N < 1
    ("blocks", 0.5, None, "pattern", "'blocks'"),  # unknown pattern
    ("unstructured", 0.5, "column", "scope", "'column'"),  # unknown scope
    ("2:4", None, "block", "scope", "'block'"),
])
def test_parse_pattern_errors_name_field_and_value(pattern, sparsity, scope, field, value):
    with pytest.raises(ConfigError) as info:
        parse_pattern(pattern, sparsity, scope, "row")
    message = str(info.value)
    assert info.value.field == field
    assert message.startswith(f"{field}: got {value};")
    assert "\n" not in message
    assert any(word in message for word in ("allowed", "implies", "required"))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 33), (0, 4)])
def test_packed_masks_round_trip(shape):
    from ebft.masks import pack_bits, unpack_bits

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, shape), mask)
    with pytest.raises(ValueError, match="packed bytes do not hold"):
        unpack_bits(torch.cat([packed, packed.new_zeros(1)]), shape)
