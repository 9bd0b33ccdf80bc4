"""A pruner and a recovery written in this file alone run through `ebft run`, `ebft plan` and `ebft sweep`:
what they declare at registration (settings, statistics, state bytes, target) is everything the walk, the
estimator, the CLI and sweeps read about them. No other file knows these two methods."""
from __future__ import annotations

import json
import dataclasses
from dataclasses import dataclass

import pytest
import torch

from ebft.cli import main
from ebft.masks import mask_from_scores
from ebft.prune import PruneResult, register_pruner, require_stats, unregister_pruner
from ebft.recover import register_recovery, unregister_recovery
from ebft.settings import option

SEEN: dict[str, list] = {"pruner": [], "recovery": []}


@dataclass
class ShiftSettings:
    shift_power: float = option(1.0, "shift pruner: score |W| · ‖X_j‖₂^power", low=0)


def shift_prune(weight, stats, pattern, settings: ShiftSettings) -> PruneResult:
    """Wanda with an exponent on the input norms (a pruner nobody ships)."""
    norms = require_stats(stats, "sq_sum", "shift").col_norm.to(weight.device)
    SEEN["pruner"].append(settings.shift_power)
    return PruneResult(mask_from_scores(weight.abs() * norms.pow(settings.shift_power), pattern))


@dataclass
class NudgeSettings:
    nudge_steps: int = option(2, "nudge: gradient steps on the kept weights towards the target", low=1)
    nudge_lr: float = option(1e-3, "nudge: step size", low=0, low_open=True)


def nudge(ctx, settings: NudgeSettings) -> dict:
    """A few masked gradient steps on the block loss towards the targets (towards the dense model's own
    activations, as declared), with the statistics it declared."""
    assert ctx.targets is not None and ctx.targets.shape == ctx.inputs.shape
    assert all(s.x_sum is not None for s in ctx.stats.values())  # "mean", declared below
    SEEN["recovery"].append((ctx.index, settings.nudge_steps))
    weights = [lin.weight for lin in ctx.linears.values()]
    for w in weights:
        w.requires_grad_(True)
    losses = []
    for _ in range(settings.nudge_steps):
        loss = (ctx.forward(ctx.inputs[:2]) - ctx.targets[:2]).square().mean()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for (name, lin), w in zip(ctx.linears.items(), weights):
                w -= settings.nudge_lr * w.grad * ctx.masks[name].to(w.dtype)
                w.grad = None
    for w in weights:
        w.requires_grad_(False)
    return {"nudge_losses": losses}


@pytest.fixture
def plugins():
    register_pruner("shift", needs=("sq",), settings=ShiftSettings)(shift_prune)
    register_recovery("nudge", settings=NudgeSettings, target="dense-model", needs=("mean",), state_bytes=12,
                      summary="nudge: a toy recovery")(nudge)
    SEEN["pruner"].clear()
    SEEN["recovery"].clear()
    yield
    unregister_pruner("shift")
    unregister_recovery("nudge")


def _common(model_dir, text_file):
    return ["--model", str(model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2"]


def test_a_pruner_and_recovery_of_ones_own_run_through_ebft_run(plugins, tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", *_common(tiny_model_dir, text_file), "--method", "shift", "--shift-power", "0.5",
                 "--recover", "nudge", "--nudge-steps", "3", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["resolved"]["pruner_settings"] == {"shift_power": 0.5}
    assert record["resolved"]["recovery_settings"] == {"nudge_steps": 3, "nudge_lr": 1e-3}
    assert [len(b["nudge_losses"]) for b in record["blocks"]] == [3, 3]
    assert set(SEEN["pruner"]) == {0.5} and SEEN["recovery"] == [(0, 3), (1, 3)]
    assert record["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert "recovered" in record["perplexity"][next(iter(record["perplexity"]))]
    # its flags are in --help, with the help it declared
    assert main(["run", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())  # (argparse wraps lines where it likes)
    assert "--shift-power" in help_text and "nudge: a toy recovery" in help_text
    assert "each pruner's own: shift/wanda row, magnitude/sparsegpt layer" in help_text  # --scope: its default_scope


def test_ebft_plan_reads_the_declarations(plugins, tiny_model_dir, tmp_path):
    path = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_model_dir), "--method", "shift", "--recover", "nudge",
                 "--device", "cpu", "--nsamples", "8", "--seqlen", "32", "--eval", "offline", "--eval-windows", "2",
                 "--free-host", "8GB", "--plan-json", str(path)]) == 0
    plan = json.loads(path.read_text())
    sizes = plan["sizes"]
    assert (sizes["state_bytes"], sizes["target"], sizes["trains"]) == (12, "dense-model", True)
    assert sizes["needs"] == ["mean", "sq"]  # the pruner's and the recovery's
    assert "dense-model stream" in plan["activations_bytes"] and "targets" not in plan["activations_bytes"]
    recovery = plan["accelerator_phases_bytes"]["recovery"]
    assert recovery["AdamW moments"] == recovery["fp32 gradients"] * 2  # 12 bytes: no other state
    assert "other state (restore snapshot, frozen weights)" not in recovery


def test_ebft_sweep_runs_and_keys_their_cells(plugins, tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "sweep"
    grid = ["sweep", *_common(tiny_model_dir, text_file), "--methods", "shift,wanda", "--sparsities", "0.5",
            "--recover", "none,nudge", "--out", str(out)]
    assert main(grid) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(c["method"], c["recover"]) for c in results["cells"]} == {
        ("shift", "none"), ("shift", "nudge"), ("wanda", "none"), ("wanda", "nudge")}
    cells = sorted(p.name for p in (out / "cells").glob("*-*-*.json"))
    # a setting of the recovery reruns its cells only; one of the pruner, its cells only
    assert main([*grid, "--nudge-steps", "1"]) == 0
    again = sorted(p.name for p in (out / "cells").glob("*-*-*.json"))
    new = set(again) - set(cells)
    assert {tuple(n.split("-")[:2]) for n in new} == {("shift", "nudge"), ("wanda", "nudge")}
    assert main([*grid, "--shift-power", "2"]) == 0
    newer = set(p.name for p in (out / "cells").glob("*-*-*.json")) - set(again)
    assert {tuple(n.split("-")[:2]) for n in newer} == {("shift", "none"), ("shift", "nudge")}


# ----------------------------------------------------------------------------- a bad registration, at once

@dataclass
class ClashesWithTheSection:
    sparsity: float = option(0.5, "a pruner's own sparsity: the prune section has one")


@dataclass
class NoDefault:
    rate: float


@dataclass
class AnObject:
    table: dict = dataclasses.field(default_factory=dict)


@dataclass
class EpochsAsText:
    epochs: str = option("two", "EBFT's epochs are an int: this one is text")


@dataclass
class PrunerEpochs:
    epochs: int = option(2, "a pruner's epochs: EBFT's --epochs is taken")


@dataclass
class RecoverySeed:
    seed: int = option(0, "a recovery's seed: the run's --seed is taken")


@pytest.mark.parametrize("kind,name,settings,needle", [
    ("pruner", "my/pruner", None, "use lowercase letters"),
    ("pruner", "a,b", None, "use lowercase letters"),
    ("pruner", "", None, "use lowercase letters"),
    ("recovery", "My Recovery", None, "use lowercase letters"),
    ("pruner", "clash", ClashesWithTheSection, "setting 'sparsity' is one of the section's own"),
    ("recovery", "textepochs", EpochsAsText, "'epochs' is declared twice with different types or defaults"),
    ("pruner", "untyped", dict, "settings must be a dataclass"),
    ("pruner", "nodefault", NoDefault, "setting 'rate' has no default"),
    ("recovery", "anobject", AnObject, "setting 'table' is not a bool, int, float, str or list"),
    ("pruner", "epochy", PrunerEpochs, "would be the flag --epochs, which recovery 'ebft'"),
    ("recovery", "seedy", RecoverySeed, "would be the flag --seed, which the run's own settings already declares"),
])
def test_a_bad_registration_is_refused_when_made(kind, name, settings, needle):
    """Refused at the decorator, in one line naming the method, so a plugin's mistake never breaks a later run
    (a name with a '/' became a path in ebft sweep; a setting clashing with the section broke every command)."""
    from ebft.prune import PRUNERS
    from ebft.recover import RECOVERIES

    register = register_pruner if kind == "pruner" else register_recovery
    kwargs = {} if settings is None else {"settings": settings}
    with pytest.raises(ValueError, match=needle) as error:
        register(name, **kwargs)(lambda *a: None)
    assert repr(name) in str(error.value) and "\n" not in str(error.value)
    assert name not in PRUNERS and name not in RECOVERIES
    assert main(["run", "--help"]) == 0  # every later command still works


def test_a_pruner_that_writes_nan_into_kept_weights_is_stopped(tiny_model_dir, text_file, tmp_path, capsys):
    def nanny(weight, stats, pattern, settings) -> PruneResult:
        mask = mask_from_scores(weight.abs(), pattern)
        out = weight.clone()
        out[mask.nonzero()[0][0], mask.nonzero()[0][1]] = float("nan")
        return PruneResult(mask, out)

    register_pruner("nanny")(nanny)
    try:
        out = tmp_path / "out"
        assert main(["run", *_common(tiny_model_dir, text_file), "--method", "nanny", "--recover", "none",
                     "--out", str(out)]) == 2
    finally:
        unregister_pruner("nanny")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ebft: error: pruner 'nanny'") and "NaN" in err
    assert not out.exists()
