"""`ebft sweep`: a 2 × 2 grid on a tiny model writes its results, resumes, survives an interruption."""
import dataclasses
import json

import pytest
import torch

import ebft.models
import ebft.sweeps
from ebft.cli import main
from ebft.config import RunConfig
from ebft.errors import ConfigError
from ebft.sweeps import SweepConfig, sweep

SEQLEN = 32


def _config(model_dir, text_file, out, **base_changes) -> SweepConfig:
    base = RunConfig(model=str(model_dir))
    base.calib.source, base.calib.nsamples, base.calib.seqlen = str(text_file), 4, SEQLEN
    base.eval.sources, base.eval.seqlen, base.eval.windows = [str(text_file)], SEQLEN, 2
    base.recover.epochs, base.recover.batch_size = 1, 2
    for key, value in base_changes.items():
        section, field = key.split("__")
        setattr(getattr(base, section), field, value)
    return SweepConfig(base, methods=["wanda"], sparsities=[0.5, 0.7], recoveries=["none", "ebft"], out=str(out))


class _Events:
    def __init__(self):
        self.events = []

    def __call__(self, event, **info):
        self.events.append(event)

    def count(self, event):
        return self.events.count(event)


def test_sweep_writes_results_and_rerun_skips_finished_cells(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    events = _Events()
    results = sweep(_config(tiny_model_dir, text_file, out), progress=events)

    assert events.count("cell_end") == 4 and events.count("cell_skip") == 0
    assert len(list((out / "cells").glob("wanda-*.json"))) == 4
    name = text_file.name
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith(f"| {name}"))
    assert "50%" in header and "70%" in header
    assert "| dense" in md and "| wanda + none" in md and "| wanda + ebft" in md and "—" not in md.split("Recovery")[0]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert len(saved["cells"]) == 4 and saved["dense"][name] > 0
    by_cell = {(c["recover"], c["column"]): c for c in saved["cells"]}
    assert by_cell[("ebft", "70%")]["perplexity"][name] != by_cell[("none", "70%")]["perplexity"][name]
    assert by_cell[("none", "50%")]["perplexity"][name] < by_cell[("none", "70%")]["perplexity"][name]
    assert by_cell[("ebft", "50%")]["recovery"]["trainable_params"] > 0
    assert by_cell[("none", "50%")]["recovery"]["trainable_params"] == 0

    # a rerun skips every finished cell without even loading the model
    monkeypatch.setattr(ebft.models, "load_model", lambda *a, **k: pytest.fail("model loaded for nothing"))
    events = _Events()
    again = sweep(_config(tiny_model_dir, text_file, out), progress=events)
    assert events.count("cell_end") == 0 and events.count("cell_skip") == 4
    assert again["cells"] == results["cells"]
    monkeypatch.undo()

    # another method's options concern no cell of this grid: refused before anything runs (they would do
    # nothing); a grid with that method keys only its own cells on them (tests/test_plugin.py)
    monkeypatch.setattr(ebft.models, "load_model", lambda *a, **k: pytest.fail("model loaded for nothing"))
    with pytest.raises(ConfigError, match="applies only with --recover (lora|dsnot), which no cell of this sweep has"):
        sweep(_config(tiny_model_dir, text_file, out, recover__lora_steps=7, recover__dsnot_cycles=3))
    monkeypatch.undo()

    # one changed EBFT setting is a different EBFT cell: rerun, not mistaken for the finished one;
    # the unrecovered cells do not depend on it and are kept
    events = _Events()
    sweep(_config(tiny_model_dir, text_file, out, recover__lr=3e-3), progress=events)
    assert events.count("cell_end") == 2 and events.count("cell_skip") == 2
    events = _Events()
    sweep(_config(tiny_model_dir, text_file, out, calib__nsamples=3), progress=events)
    assert events.count("cell_end") == 4


def _another_valid_value(value, name):
    if name == "recipe":
        return "paper" if value != "paper" else "best"
    if value is None:  # a recipe-controlled setting: give it explicitly, unlike the default recipe (best)
        return {"target": "dense-block", "loss": "token-norm", "train_norms": False, "epochs": 3,
                "batch_size": 3}.get(name, 0.0123)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.01
    if isinstance(value, str):
        return value + "x"
    return 0.5  # None: an optional number


@pytest.mark.parametrize("method", ["none", "ebft", "ebft-mask", "dsnot", "lora"])
def test_a_cell_is_keyed_on_exactly_its_recoverys_own_settings(method):
    """A recovery gets only its own settings dataclass, and its sweep cells are keyed on exactly those:
    changing another method's option never reruns the cell, changing one of its own always does."""
    from ebft.recover import get_recovery
    from ebft.recover.recipes import RECIPES
    from ebft.settings import fields_of
    from ebft.sweeps import cell_key

    cell = RunConfig(model="m")
    cell.recover.method = method
    own = {f.name for f in dataclasses.fields(get_recovery(method).settings)}
    assert type(cell.recovery_settings()) is get_recovery(method).settings
    assert set(dataclasses.asdict(cell.recovery_settings())) == own
    key = cell_key(cell)
    for f in fields_of(cell.recover):
        if f.name == "method":
            continue
        changed = RunConfig(model="m")
        changed.recover.method = method
        setattr(changed.recover, f.name, _another_valid_value(getattr(changed.recover, f.name), f.name))
        # the recipe concerns a method through the settings it resolves
        concerned = (f.name in own or (f.name == "recipe" and own & set(RECIPES["best"]))
                     or (f.name == "budget" and method in ("ebft", "ebft-mask"))  # it times block training
                     or (f.name in ("guard", "guard_texts") and method in ("ebft", "ebft-mask", "dsnot")))  # it checks block-wise ones
        assert (cell_key(changed) != key) == bool(concerned), f.name


def test_sweep_cells_match_single_runs(tiny_model_dir, text_file, tmp_path):
    """Restoring the weights between cells: the last cell equals a fresh `ebft run` of its settings."""
    from ebft.pipeline import run

    config = _config(tiny_model_dir, text_file, tmp_path / "sweep")
    config.save_models = True
    results = sweep(config)
    assert len(list((tmp_path / "sweep" / "models").glob("wanda-*/model.safetensors"))) == 4
    last = config.cells()[-1]  # wanda, ebft, 0.7: after three cells pruned the same model object
    last.out = str(tmp_path / "single")
    single = run(last)
    name = text_file.name
    cell = next(c for c in results["cells"] if (c["recover"], c["column"]) == ("ebft", "70%"))
    assert cell["perplexity"][name] == pytest.approx(single["perplexity"][name]["recovered"], rel=1e-4)
    assert results["dense"][name] == pytest.approx(single["perplexity"][name]["dense"], rel=1e-6)


def test_interrupted_sweep_keeps_finished_cells(tiny_model_dir, text_file, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    real, calls = ebft.sweeps._run_cell, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ebft.sweeps, "_run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep(_config(tiny_model_dir, text_file, out))
    assert len(list((out / "cells").glob("wanda-*.json"))) == 2
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2
    monkeypatch.undo()

    events = _Events()
    results = sweep(_config(tiny_model_dir, text_file, out), progress=events)
    assert events.count("cell_skip") == 2 and events.count("cell_end") == 2
    assert len(results["cells"]) == 4


@pytest.mark.parametrize("args, message", [
    (["--methods", "wanda,nope"], "methods: got 'nope'; allowed: a comma-separated list of flap, magnitude"),
    (["--sparsities", "0.5,1.5"], "sparsities: got 1.5; allowed: numbers in [0, 1)"),
    (["--sparsities", "half"], "sparsities: got 'half'"),
    (["--recover", ""], "recover: got []; allowed"),
    (["--recover", "none,ebft", "--pattern", "2:4", "--sparsities", "0.6"], "sparsity"),
])
def test_bad_sweep_input_is_one_line_exit_2_and_writes_nothing(tiny_model_dir, text_file, tmp_path, capsys, args, message):
    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_sweep_config_validates_before_anything(tmp_path):
    with pytest.raises(ConfigError, match="out"):
        SweepConfig(RunConfig(model="x"), out=None).validate()
    cfg = SweepConfig(RunConfig(model="x"), sparsities=[], out=str(tmp_path / "o"))
    cfg.base.prune.pattern = "2:4"
    assert [c.prune.sparsity for c, _ in cfg.validate()] == [None, None]  # N:M: implied, one column
    assert not (tmp_path / "o").exists()


def test_the_finish_and_the_budget_change_a_cells_key_only_when_set():
    from ebft.config import RunConfig
    from ebft.sweeps import cell_key

    base = RunConfig(model="m")
    base.calib.source = "offline"
    key = cell_key(base)
    base.finish.steps = 99  # no finish: its settings change nothing
    assert cell_key(base) == key
    base.finish.method = "kd"
    assert cell_key(base) != key
    base.finish.method = "none"
    base.recover.budget = "10m"
    assert cell_key(base) != key  # ebft, the default recovery, trains blocks
    base.recover.method = "dsnot"
    no_budget = cell_key(base)
    base.recover.budget = None
    assert cell_key(base) == no_budget  # nothing to time


def test_the_guard_changes_a_cells_key_only_where_it_can_change_the_cell():
    from ebft.config import RunConfig
    from ebft.sweeps import cell_key

    base = RunConfig(model="m")
    base.calib.source = "offline"
    guarded = cell_key(base)  # ebft: a block-wise recovery, the guard at its default
    base.recover.guard = 0
    assert cell_key(base) != guarded  # a sweep rerun with --recover-guard 0 must not reuse guarded cells
    base.recover.guard = 16
    assert cell_key(base) not in (guarded, cell_key(dataclasses.replace(base, recover=dataclasses.replace(
        base.recover, guard=0))))
    for method in ("none", "lora"):  # no guard runs: the setting changes nothing
        base.recover.method = method
        keys = set()
        for guard in (0, 4, 16):
            base.recover.guard = guard
            keys.add(cell_key(base))
        assert len(keys) == 1, method


def test_atps_beta_keys_atp_cells_only():
    """ATP's beta reruns an ATP cell, never another (their keys stay as they were before ATP existed)."""
    from ebft.config import RunConfig
    from ebft.sweeps import cell_key

    cell = RunConfig(model="m")
    keys = {}
    for allocation in ("uniform", "owl", "atp"):
        cell.prune.allocation, cell.prune.atp_beta = allocation, 0.005
        keys[allocation] = cell_key(cell)
        cell.prune.atp_beta = 0.01
        assert (cell_key(cell) != keys[allocation]) == (allocation == "atp"), allocation
    assert len(set(keys.values())) == 3
