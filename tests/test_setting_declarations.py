"""A setting declares what it changes (``changes``) and where it applies (``needs``); the commands that take
it, a checkpoint's resume identity, a sweep cell's key and the refusal of a setting that does nothing all
come from that one declaration (ebft.settings)."""
from __future__ import annotations

import dataclasses

import pytest

import ebft.cli
import ebft.config
from ebft import settings as st
from ebft.checkpoint import settings_of
from ebft.cli import build_parser
from ebft.config import EvalConfig, RunConfig, declared_settings, sections
from ebft.errors import ConfigError
from ebft.settings import Needs, option
from ebft.sweeps import cell_key
from ebft.validate import refuse_unused, unused_settings


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(f" {command}"))
    return {o for a in sub._actions for o in a.option_strings if o.startswith("--")}


def _declared():
    return [(key, f) for key, f in declared_settings() if f.metadata.get("cli", True)]


@pytest.mark.parametrize("command", ["run", "sweep", "plan", "eval"])
def test_each_command_shows_exactly_the_settings_that_do_something_there(command):
    flags = _flags(command)
    # the sweep's own flags (lists for these three, its folder of cells), ebft eval's own for zero-shot tasks
    own = {"sweep": {"--method", "--sparsity", "--recover", "--out"}, "eval": {"--task-data"}}.get(command, set())
    for key, f in _declared():
        flag = st.flag_of(f)
        if flag in own:
            continue
        assert (flag in flags) == (command in st.commands_of(f)), (command, key)


def test_what_each_command_leaves_out():
    assert not {"--lazy", "--seed", "--save-dtype", "--eval-pruned", "--out", "--resume", "--export",
                "--checkpoint", "--speed"} & _flags("eval")
    assert {"--model", "--dtype", "--device", "--batch-size", "--eval", "--eval-seqlen"} <= _flags("eval")
    assert not {"--resume", "--export", "--export-type", "--rank-timeout", "--out", "--overwrite",
                "--save-dtype"} & _flags("plan")
    assert {"--lazy", "--checkpoint", "--eval-pruned"} <= _flags("plan")  # the plan counts them
    assert not {"--lazy", "--resume", "--export", "--eval-pruned", "--save-dtype", "--speed"} & _flags("sweep")


def _with_new_eval_setting(monkeypatch, **declaration):
    """EvalConfig with one more setting, as a later release would add it."""
    new = dataclasses.make_dataclass("EvalConfig", [("bleu", bool, option(False, "a new evaluation-only score",
                                                                          **declaration))], bases=(EvalConfig,))
    monkeypatch.setattr(ebft.config, "EvalConfig", new)
    monkeypatch.setattr(ebft.cli, "EvalConfig", new)
    return new


def _cells():
    cells = []
    for method, recover, extra in [("wanda", "ebft", {}), ("sparsegpt", "none", {}), ("wanda", "lora", {}),
                                   ("flap", "ebft", {"sparsity": 0.2}), ("wanda", "ebft", {"allocation": "owl"})]:
        cell = RunConfig(model="m")
        cell.prune.method, cell.recover.method = method, recover
        for k, v in extra.items():
            setattr(cell.prune, k, v)
        cells.append(cell)
    return cells


def test_a_new_evaluation_setting_at_its_default_keeps_every_cell_key_and_shows_where_it_acts(monkeypatch):
    before = [cell_key(c) for c in _cells()]
    new = _with_new_eval_setting(monkeypatch, changes="eval", keyed="set")
    cells = _cells()
    for cell in cells:
        cell.eval = new(**dataclasses.asdict(cell.eval))
    assert [cell_key(c) for c in cells] == before
    cells[0].eval.bleu = True  # set, it changes the cell's numbers: a new key
    assert cell_key(cells[0]) != before[0]
    assert "--bleu" in _flags("eval") and "--bleu" in _flags("sweep") and "--bleu" in _flags("run")


def test_a_saved_files_setting_appears_only_in_run_and_is_never_compared(monkeypatch):
    new = _with_new_eval_setting(monkeypatch, changes="saved")
    assert "--bleu" in _flags("run") and not {"--bleu"} & (_flags("eval") | _flags("sweep") | _flags("plan"))
    config = RunConfig(model="m", out="runs/x")
    config.eval = new(**dataclasses.asdict(config.eval))
    plain, key = settings_of(config.to_dict()), cell_key(config)
    config.eval.bleu = True
    assert settings_of(config.to_dict()) == plain
    assert cell_key(config) == key  # the sweep does not take it: its default counts


def test_a_setting_with_needs_is_refused_where_it_does_nothing(monkeypatch):
    new = _with_new_eval_setting(monkeypatch, changes="eval", needs=Needs("eval.zeroshot", bool, "--zeroshot"))
    config = RunConfig(model="m")
    config.eval = new(**dataclasses.asdict(config.eval))
    config.eval.bleu = True
    assert unused_settings(config) == {"eval.bleu": (True, "--zeroshot")}
    with pytest.raises(ConfigError, match=r"--bleu \(eval.bleu\).*applies only with --zeroshot"):
        refuse_unused(config)
    config.eval.zeroshot = ["piqa"]
    assert "eval.bleu" not in unused_settings(config)


def test_the_checkpoint_compares_what_changes_a_result_where_it_applies():
    config = RunConfig(model="m", out="runs/x")
    plain = settings_of(config.to_dict())
    for key, value in [("save_dtype", "bfloat16"), ("export", "gguf"), ("rank_timeout", 5.0), ("resume", True),
                       ("checkpoint_every", 60.0), ("lazy", True), ("overwrite", True), ("calib.self_top_k", 7),
                       ("finish.steps", 3), ("eval.zeroshot_limit", 5)]:
        changed = RunConfig.from_dict(config.to_dict())
        section, _, name = key.rpartition(".")
        setattr(getattr(changed, section) if section else changed, name, value)
        assert settings_of(changed.to_dict()) == plain, key
    for key, value in [("seed", 1), ("calib.nsamples", 3), ("eval.windows", 2), ("prune.sparsity", 0.6),
                       ("recover.lr", 1e-3), ("out", "runs/y")]:
        changed = RunConfig.from_dict(config.to_dict())
        section, _, name = key.rpartition(".")
        setattr(getattr(changed, section) if section else changed, name, value)
        assert settings_of(changed.to_dict()) != plain, key
    changed = RunConfig.from_dict(config.to_dict())
    changed.calib.source, changed.calib.self_top_k = "self", 7  # where it applies, it is compared
    reference = RunConfig.from_dict(config.to_dict())
    reference.calib.source = "self"
    assert settings_of(changed.to_dict()) != settings_of(reference.to_dict())


def test_every_declaration_is_one_of_the_known_kinds():
    for key, f in _declared():
        assert st.changes_of(f) in st.CHANGES, key
        assert set(st.commands_of(f)) <= {"run", "sweep", "plan", "eval"}, key
        assert "run" in st.commands_of(f), key  # ebft run takes every setting
    with pytest.raises(ValueError, match="changes must be one of"):
        option(1, "x", changes="everything")
    assert set(sections()) == {"calib", "prune", "recover", "eval", "finish"}
