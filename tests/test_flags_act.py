"""Every flag acts, or is refused up front in one line, or is counted by `ebft plan`: never accepted and then
ignored. A setting counts as given when it is typed (or written in the YAML), even with its default value."""
from __future__ import annotations

import pytest

from conftest import tiny_run_folder
from ebft.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("flags"), 2)


def _base(tiny, out):
    return ["run", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), "--eval",
            str(tiny / "text.txt"), "--nsamples", "4", "--seqlen", "16", "--eval-seqlen", "16", "--out", str(out)]


@pytest.mark.parametrize("flags,needle", [
    (["--recover", "none", "--export-type", "f16"], "--export-type (export_type): got 'f16'; it applies only with "
                                                    "--export gguf"),
    (["--recover", "none", "--rank-timeout", "30"], "applies only under torchrun"),
    (["--recover", "none", "--method", "wanda", "--pattern", "2:4", "--scope", "row"], "2:4 groups lie inside one row"),
    (["--recover", "none", "--free-host", "1GB"], "--free-host: got '1GB'; applies only to the plan"),
    (["--recover", "none", "--plan-json", "p.json"], "applies only to the plan"),
    (["--recover", "none", "--recover-guard", "4"], "it applies only with --recover"),
    (["--recover", "none", "--recipe", "best"], "it applies only with --recover"),
    (["--recover", "ebft", "--epochs", "1", "--lazy", "--recover-guard", "4"], "the guard cannot put the pruned blocks "
                                                                               "back in a lazy run"),
    (["--recover", "ebft", "--epochs", "1", "--lazy", "--recover-guard-on", "GUARD"], "the guard cannot put"),
])
def test_a_flag_that_would_do_nothing_is_refused(tiny, tmp_path, capsys, flags, needle):
    (tmp_path / "guard.txt").write_text((tiny / "text.txt").read_text()[:3000])
    flags = [str(tmp_path / "guard.txt") if f == "GUARD" else f for f in flags]
    out = tmp_path / "out"
    assert main([*_base(tiny, out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and not (tmp_path / ".out.ckpt").exists()


def test_the_default_guard_is_off_under_lazy_and_not_paid_for(tiny, tmp_path, caplog):
    out = tmp_path / "out"
    assert main([*_base(tiny, out), "--recover", "ebft", "--epochs", "1", "--lazy"]) == 0
    import json

    record = json.loads((out / "run.json").read_text())
    assert record["config"]["recover"]["guard"] == 0 and "guard" not in record["recovery"]
    assert "the end-to-end guard is off" in caplog.text


def test_a_yaml_counts_where_it_differs_from_the_default(tiny, tmp_path, capsys):
    """A YAML holding every setting (run.json's ``config`` written out, to rerun a run) runs as it is; a value
    other than the default for a stage the run does not have is refused, as a typed flag is."""
    import json

    import yaml

    first = tmp_path / "first"
    assert main([*_base(tiny, first), "--recover", "none"]) == 0
    config = json.loads((first / "run.json").read_text())["config"]
    config["out"] = str(tmp_path / "again")
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(tmp_path / "all.yaml")]) == 0
    (tmp_path / "c.yaml").write_text("export_type: q8_0\nrecover: {method: none}\n")
    assert main([*_base(tiny, tmp_path / "out"), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "--export-type" in capsys.readouterr().err
