"""Recipes: settings not given come from --recipe (best by default, paper for comparisons); anything
given explicitly wins; run.json says which recipe and which settings ran."""
import dataclasses
import json

import pytest

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
    assert RECIPES["paper"] == {"epochs": 10, "batch_size": 8, "lr": 2e-4, "weight_decay": 0.1,
                                "target": "dense-block", "train_norms": False, "loss": "mse"}


def test_run_records_the_recipe_and_the_settings_that_ran(tiny_model_dir, text_file, tmp_path):
    from ebft.cli import main

    out = tmp_path / "r"
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--recipe", "paper",
                 "--epochs", "1", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["recover"]["recipe"] == "paper"
    ran = record["resolved"]["recovery_settings"]
    assert ran["epochs"] == 1 and ran["lr"] == 2e-4 and ran["target"] == "dense-block"
