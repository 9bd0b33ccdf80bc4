"""Careless and hostile input: every setting's type is checked for YAML exactly as for flags; bad sweep
cell files are rerun; one line, exit code 2, nothing written."""
import json

import pytest
import yaml

from ebft.cli import main
from ebft.config import RunConfig
from ebft.errors import ConfigError


@pytest.mark.parametrize("data,field", [
    ({"overwrite": "false"}, "overwrite"),  # a string is not a boolean (it was truthy)
    ({"model": 123}, "model"),
    ({"prune": {"method": ["wanda"]}}, "prune.method"),
    ({"seed": "abc"}, "seed"),
    ({"seed": 2**70}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"recover": {"lr": float("nan")}}, "recover.lr"),
    ({"recover": {"lr": ".inf"}}, "recover.lr"),
    ({"recover": {"grad_clip": -1}}, "recover.grad_clip"),
    ({"recover": {"epochs": True}}, "recover.epochs"),
    ({"recover": {"train_norms": "yes"}}, "recover.train_norms"),
    ({"calib": {"nsamples": -3}}, "calib.nsamples"),
    ({"eval": {"sources": [1, 2]}}, "eval.sources"),
    ({"eval": {"windows": 0}}, "eval.windows"),
    ({"prune": {"sparsity": "half"}}, "prune.sparsity"),
    ({"prune": {"allocation": "random"}}, "prune.allocation"),
    ({"prune": 5}, "prune"),
])
def test_yaml_values_are_checked_like_flags(data, field):
    with pytest.raises(ConfigError) as info:
        config = RunConfig.from_dict({"model": "m", "out": "o", **data})
        config.check_types()
    assert str(info.value).startswith(f"{field}: got ")


def test_yaml_float_text_is_read_as_a_number():
    config = RunConfig.from_dict({"recover": {"lr": "1e-3"}})  # PyYAML reads 1e-3 (no dot) as a string
    config.check_types()
    assert config.recover.lr == 0.001


def test_yaml_config_with_wrong_types_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "out": str(tmp_path / "o"), "overwrite": "false"}))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ebft: error: overwrite: got 'false'; must be true or false"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra", [["--eval-seqlen", "0"], ["--eval-windows", "0"], ["--batch-size", "0"],
                                   ["--eval-seqlen", "-5"]])
def test_eval_zero_or_negative_lengths_are_errors(tiny_model_dir, text_file, capsys, extra):
    assert main(["eval", "--model", str(tiny_model_dir), "--eval", str(text_file), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "must be an integer >= 1" in err


@pytest.mark.parametrize("content", ["", "{}", "[1, 2]", "\x00\xff garbage", '{"method": "wanda"}'])
def test_a_broken_sweep_cell_file_is_run_again(tiny_model_dir, text_file, tmp_path, content, caplog):
    from ebft.sweeps import SweepConfig, cell_name, sweep

    base = RunConfig(model=str(tiny_model_dir))
    base.calib.source, base.calib.nsamples, base.calib.seqlen = str(text_file), 4, 32
    base.eval.sources, base.eval.seqlen, base.eval.windows = [str(text_file)], 32, 2
    config = SweepConfig(base, methods=["wanda"], sparsities=[0.5], recoveries=["none"], out=str(tmp_path / "s"))
    cell = config.cells()[0]
    folder = tmp_path / "s" / "cells"
    folder.mkdir(parents=True)
    path = folder / f"{cell_name(cell)}.json"
    path.write_bytes(content.encode("latin-1"))
    results = sweep(config)
    assert len(results["cells"]) == 1 and results["cells"][0]["perplexity"]
    assert json.loads(path.read_text())["method"] == "wanda"  # rewritten as a real record
    assert sum("not a finished cell record" in r.message for r in caplog.records) == 1
