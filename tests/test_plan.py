"""The allocation pass and OWL: per-block sparsities from the dense model, same overall sparsity; ATP:
sparsity rising with depth, no pass."""
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_model, one_line, recover_spec, small_run_args
from ebft.errors import ConfigError
from ebft.masks import Pattern, check_mask, parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.allocation import (AllocationSettings, allocator, atp_sparsities, check_allocation, outlier_ratio,
                             owl_sparsities)
from ebft.prune import get_pruner
from ebft.walk import PruneSpec, planning_pass, walk


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def test_owl_band_and_mean():
    ratios = [0.01, 0.05, 0.03, 0.02]
    s = owl_sparsities(ratios, [10, 10, 10, 10], 0.7, 0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)  # the whole 2λ band is used
    assert s[1] == min(s) and s[0] == max(s)  # most outliers: least pruned
    weighted = owl_sparsities(ratios, [10, 30, 10, 10], 0.7, 0.08)
    assert sum(w * v for w, v in zip([10, 30, 10, 10], weighted)) / 60 == pytest.approx(0.7)
    assert owl_sparsities([0.02, 0.02], [1, 1], 0.5, 0.08) == pytest.approx([0.5, 0.5])  # no spread: uniform


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    lin = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 100.0]]))

    class Stats:
        col_norm = torch.ones(4)

    # mean score = 107 / 8 = 13.4: the one score of 100 is above 5 × the mean (67), not above 10 × (134)
    assert outlier_ratio({"l": lin}, {"l": Stats()}, 5.0) == pytest.approx(1 / 8)
    assert outlier_ratio({"l": lin}, {"l": Stats()}, 10.0) == 0.0


def test_owl_with_nm_or_out_of_range_lambda_is_refused():
    with pytest.raises(ConfigError, match="prune.allocation"):
        check_allocation(AllocationSettings(allocation="owl"), Pattern(0.5, 2, 4))
    with pytest.raises(ConfigError, match="prune.owl_lambda"):
        check_allocation(AllocationSettings(allocation="owl", owl_lambda=0.1), Pattern(0.95))
    check_allocation(AllocationSettings(allocation="uniform"), Pattern(0.5, 2, 4))


@pytest.mark.parametrize("pruner", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("recover", ["none", "ebft", "ebft-mask", "dsnot"])
def test_owl_composes_with_every_pruner_and_recovery(pruner, recover):
    model = make_tiny_model("llama", layers=3)
    pattern = parse_pattern("unstructured", 0.6, None, get_pruner(pruner).default_scope)
    settings = AllocationSettings(allocation="owl", owl_lambda=0.1, owl_threshold=2.0)
    plan = planning_pass(model, _ids(), allocator(pattern, settings, None), "cpu", 4)
    assert len(plan.patterns) == 3 and len({p.sparsity for p in plan.patterns}) == 3
    assert sum(p.sparsity for p in plan.patterns) / 3 == pytest.approx(0.6)
    kw = {"epochs": 1, "batch_size": 4} if recover in ("ebft", "ebft-mask") else {}
    result = walk(model, _ids(), PruneSpec(get_pruner(pruner), plan.patterns), recover_spec(recover, **kw),
                  batch_size=4)
    prefix, blocks = find_blocks(model)
    zeros = total = 0
    for i, block in enumerate(blocks):
        for name, lin in find_linears(block).items():
            mask = result.masks[f"{prefix}.{i}.{name}"]
            check_mask(mask, plan.patterns[i], name)  # each block's own sparsity, exactly
            zeros, total = zeros + int((lin.weight == 0).sum()), total + lin.weight.numel()
    assert zeros / total == pytest.approx(0.6, abs=0.01)  # the same overall sparsity as uniform


def test_run_records_the_plan(tiny_model_dir, text_file, tmp_path):
    import json

    from ebft.cli import main

    out = tmp_path / "owl"
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--recover", "none",
                 "--sparsity", "0.6", "--allocation", "owl", "--owl-threshold", "2", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    plan = record["plan"]
    assert plan["allocation"] == "owl" and len(plan["blocks"]) == 2
    assert sum(b["sparsity"] for b in plan["blocks"]) / 2 == pytest.approx(0.6)
    for b in plan["blocks"]:
        layer = f"model.layers.{b['index']}.mlp.up_proj"
        assert record["sparsity"]["layers"][layer] == pytest.approx(b["sparsity"], abs=0.02)


# ----------------------------------------------------------------------------- ATP

def test_atp_is_an_increasing_arithmetic_progression_around_the_target():
    s = atp_sparsities([10] * 30, 0.7, 0.01)
    assert [b - a for a, b in zip(s, s[1:])] == pytest.approx([0.01] * 29)  # common difference beta
    assert s[0] == pytest.approx(0.7 - 0.145) and s[-1] == pytest.approx(0.7 + 0.145)  # the paper's formula
    assert sum(s) / 30 == pytest.approx(0.7)
    sizes = [10, 30, 10, 10, 40]  # unequal blocks: still steps of beta, the size-weighted mean is the target
    w = atp_sparsities(sizes, 0.6, 0.05)
    assert [b - a for a, b in zip(w, w[1:])] == pytest.approx([0.05] * 4)
    assert sum(n * v for n, v in zip(sizes, w)) / sum(sizes) == pytest.approx(0.6)
    assert atp_sparsities([5, 5, 5], 0.5, 0.0) == pytest.approx([0.5] * 3)  # beta 0: uniform


def test_atp_beta_is_checked_against_the_block_count():
    thirty = SimpleNamespace(num_hidden_layers=30)
    atp = lambda beta: AllocationSettings(allocation="atp", atp_beta=beta)  # noqa: E731
    check_allocation(atp(0.02068), Pattern(0.7), thirty)  # 0.7 + 14.5 × beta < 1: beta < 0.020689...
    with pytest.raises(ConfigError, match=r"prune.atp_beta: got 0.02069; with 30 blocks .* use beta < 0.02068"):
        check_allocation(atp(0.02069), Pattern(0.7), thirty)
    check_allocation(atp(0.2), Pattern(0.3), SimpleNamespace(num_hidden_layers=4))  # the first block at 0: allowed
    with pytest.raises(ConfigError, match=r"from -0.0045 .* use beta ≤ 0.2 "):
        check_allocation(atp(0.203), Pattern(0.3), SimpleNamespace(num_hidden_layers=4))
    check_allocation(atp(1.0), Pattern(0.7))  # before the model is known: nothing to check it against
    check_allocation(atp(0.0), Pattern(0.95), thirty)  # OWL's lambda is not ATP's business
    with pytest.raises(ConfigError, match="prune.allocation"):
        check_allocation(atp(0.01), Pattern(0.5, 2, 4))
    with pytest.raises(ConfigError, match="prune.allocation"):
        check_allocation(atp(0.01), Pattern(0.2, structured=True))


def test_atp_run_no_pass_exact_overall_sparsity(four_blocks, tmp_path, monkeypatch):
    """A real run on a 4-block Llama: block sparsities 0.5 + 0.0625·(ℓ − 1.5) (whole rows of 64 and 128
    weights each), recorded in run.json and exact in the weights; the overall sparsity is the target; no
    planning pass, no statistics."""
    import ebft.pipeline
    import ebft.walk
    from ebft.cli import main

    def no_pass(*args, **kwargs):
        raise AssertionError("ATP ran a planning pass")

    monkeypatch.setattr(ebft.pipeline, "planning_pass", no_pass)
    monkeypatch.setattr(ebft.walk, "planning_pass", no_pass)
    out = tmp_path / "atp"
    assert main(small_run_args(four_blocks, out, "--recover", "none", "--method", "wanda", "--sparsity", "0.5",
                               "--allocation", "atp", "--atp-beta", "0.0625")) == 0
    record = json.loads((out / "run.json").read_text())
    expected = [0.40625, 0.46875, 0.53125, 0.59375]
    assert record["plan"] == {"allocation": "atp", "atp_beta": 0.0625,
                              "blocks": [{"index": i, "sparsity": s} for i, s in enumerate(expected)]}
    for name, value in record["sparsity"]["layers"].items():
        assert value == expected[int(name.split(".")[2])], name
    assert record["sparsity"]["overall"] == 0.5


def test_atp_beta_too_large_is_refused_before_the_data(four_blocks, tmp_path, capsys, monkeypatch):
    import ebft.pipeline
    from ebft.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("the run went on to tokenize")

    monkeypatch.setattr(ebft.pipeline, "prepare_data", no_data)
    out = tmp_path / "out"
    args = ["--allocation", "atp", "--atp-beta", "0.34", "--sparsity", "0.5"]
    assert main(small_run_args(four_blocks, out, "--recover", "none", *args)) == 2
    line = one_line(capsys)
    assert line.startswith("ebft: error: prune.atp_beta: got 0.34; with 4 blocks") and "beta < 0.3333" in line
    assert not list(tmp_path.iterdir())
    plan = ["plan", "--model", str(four_blocks / "model"), "--allocation", "atp", "--sparsity", "0.5"]
    assert main([*plan, "--atp-beta", "0.34"]) == 2 and "beta < 0.3333" in one_line(capsys)  # from the config alone
    assert main([*plan, "--atp-beta", "0.33"]) == 0
