"""Recipes: settings not given come from --recipe (best by default, paper for comparisons); anything
given explicitly wins; run.json says which recipe and which settings ran."""
import dataclasses
import json

import pytest
import torch

from ebft.config import RunConfig
from ebft.recover.recipes import RECIPES, value


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_recipe_fills_what_is_not_given(recipe):
    config = RunConfig()
    config.recover.recipe = recipe
    settings = dataclasses.asdict(config.recovery_settings())
    for name in RECIPES[recipe]:
        assert settings[name] == value(recipe, name, config), name


@pytest.mark.parametrize("nsamples,batch", [(8, 1), (32, 2), (64, 4), (128, 8), (256, 8)])
def test_the_best_recipe_batches_by_the_calibration_size(nsamples, batch):
    config = RunConfig()
    config.calib.nsamples = nsamples
    assert config.recovery_settings().batch_size == batch


def test_explicit_settings_win_over_the_recipe():
    config = RunConfig.from_dict({"recover": {"recipe": "paper", "lr": 1e-3, "train_norms": True}})
    config.check_types()
    settings = config.recovery_settings()
    assert (settings.lr, settings.train_norms) == (1e-3, True)  # given
    assert (settings.batch_size, settings.target) == (RECIPES["paper"]["batch_size"], RECIPES["paper"]["target"])


def test_the_paper_recipe_is_the_reference_codes():
    """sunggo/EBFT trains every parameter that is not a mask (norms included), weight decay 0.1 on all."""
    assert RECIPES["paper"] == {"epochs": 10, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.1,
                                "target": "dense-block", "train_norms": True, "loss": "mse", "refit": False}


def test_run_records_the_recipe_and_the_settings_that_ran(tiny_model_dir, text_file, tmp_path):
    from ebft.cli import main

    out = tmp_path / "r"
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--recipe", "paper",
                 "--epochs", "1", "--recover-guard", "0", "--out", str(out)]) == 0  # (the guard may undo it)
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["recover"]["recipe"] == "paper"
    ran = record["resolved"]["recovery_settings"]
    assert ran["epochs"] == 1 and ran["lr"] == 2e-4 and ran["target"] == "dense-block" and ran["train_norms"] is True
    assert any("scaled" in note for note in record["resolved"]["recipe_differences"])  # what differs, and why
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)  # the norms trained, as the reference's do
    after = AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(before.model.layers[0].input_layernorm.weight, after.model.layers[0].input_layernorm.weight)


# ----------------------------------------------------------------------------- --recover-budget

@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0),
                                           ("2min", 120.0), ("0.5", 0.5)])
def test_a_budget_reads_as_seconds(text, seconds):
    from ebft.validate import budget_seconds

    assert budget_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0", "-5m", "10 days", "nan", "inf", "1e999"])
def test_a_bad_budget_is_refused_in_one_line(text, tiny_model_dir, text_file, tmp_path, capsys):
    from ebft.cli import main

    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(tmp_path / "o"),
                 f"--recover-budget={text}"]) == 2
    err = capsys.readouterr().err
    assert "recover.budget" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["lora", "dsnot", "none"])
def test_a_budget_needs_block_training(method, tiny_model_dir, text_file, tmp_path, capsys):
    from ebft.cli import main

    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(tmp_path / "o"),
                 "--recover", method, "--recover-budget", "10m"]) == 2
    assert "ebft or ebft-mask" in capsys.readouterr().err


def test_epochs_within_a_share():
    from ebft.recover.training import epochs_within

    assert epochs_within(10.0, 3.0, 10, "cpu") == 3
    assert epochs_within(100.0, 3.0, 10, "cpu") == 10  # the epochs are a cap
    assert epochs_within(1.0, 3.0, 10, "cpu") == 1  # at least one


@pytest.mark.parametrize("budget, epochs_run", [(1e-6, 1), (1e6, 3)])
def test_the_walk_shares_the_budget_over_the_blocks(budget, epochs_run, tokenizer, text_file):
    """A budget too small for a second epoch runs one per block; a generous one runs the cap; each
    block's record says what share it had (less for later blocks when earlier ones overran)."""
    from conftest import make_tiny_model
    from ebft.data import calibration_windows
    from ebft.masks import parse_pattern
    from ebft.prune import get_pruner
    from ebft.recover import get_recovery
    from ebft.recover.ebft import EbftSettings
    from ebft.walk import PruneSpec, RecoverSpec, walk

    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    calib = calibration_windows(tokenizer, str(text_file), 8, 32, 0)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.5, None, "row"))
    settings = EbftSettings(epochs=3, batch_size=2)
    result = walk(model, calib, spec, RecoverSpec(get_recovery("ebft"), settings, 0, budget=budget))
    assert all(len(b["epoch_losses"]) == epochs_run for b in result.blocks)
    shares = [b["time_share"] for b in result.blocks]
    assert shares[0] == pytest.approx(budget / len(result.blocks), rel=1e-3, abs=1e-3)
    if budget < 1:  # every block overran its share: the later ones get nothing left
        assert shares[-1] == 0.0


def test_a_budget_in_yaml_may_be_a_number_of_seconds():
    from ebft.validate import budget_seconds

    cfg = RunConfig.from_dict({"model": "m", "recover": {"budget": 600}})
    cfg.check_types()
    assert budget_seconds(cfg.recover.budget) == 600.0
