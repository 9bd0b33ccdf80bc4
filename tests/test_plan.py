"""The allocation pass and OWL: per-block sparsities from the dense model, same overall sparsity."""
import pytest
import torch

from conftest import make_tiny_model, recover_spec
from ebft.errors import ConfigError
from ebft.masks import Pattern, check_mask, parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.allocation import AllocationSettings, allocator, check_allocation, outlier_ratio, owl_sparsities
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
