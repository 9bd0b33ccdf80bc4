"""Refit: the kept weights' masked least-squares optimum (``--recover refit``, EBFT's ``refit`` start)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, recover_spec
from ebft.config import RunConfig
from ebft.estimate.memory import RunSizes
from ebft.masks import parse_pattern
from ebft.prune import get_pruner
from ebft.recover import get_recovery
from ebft.recover.refit import layer_error, masked_lstsq
from ebft.sweeps import cell_key
from ebft.walk import PruneSpec, walk


def _problem(out=12, inp=40, tokens=400, keep=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inp, generator=g) @ torch.randn(inp, inp, generator=g)  # correlated inputs
    W = torch.randn(out, inp, generator=g)
    M = torch.rand(out, inp, generator=g) < keep
    return W, X.T @ X, M


def _exact(W, H, M, damp):
    Hd = H + damp * H.diagonal().mean() * torch.eye(len(H))
    rows = []
    for w, m in zip(W.double(), M):
        k, d = m, ~m
        row = torch.zeros_like(w)
        row[k] = w[k] + torch.linalg.solve(Hd.double()[k][:, k], Hd.double()[k][:, d] @ w[d])
        rows.append(row)
    return torch.stack(rows).float()


@pytest.mark.parametrize("damp", [1e-4, 0.01, 1.0])
def test_masked_lstsq_is_the_exact_row_by_row_solution(damp):
    W, H, M = _problem()
    solved, iterations = masked_lstsq(W, H, M, damp, tol=1e-7, max_iterations=500)
    assert torch.allclose(solved, _exact(W, H, M, damp), atol=1e-3, rtol=1e-3)
    assert 0 < iterations < 500
    assert torch.equal(solved[~M], torch.zeros(int((~M).sum())))  # masked weights exactly zero


def test_the_default_tolerance_is_close_to_the_optimum_and_better_than_pruning():
    W, H, M = _problem(out=64, inp=96, keep=0.3, seed=1)
    solved, _ = masked_lstsq(W, H, M)  # the default dampening, 1.0
    best = _exact(W, H, M, 1.0)
    pruned, refit, optimum = (layer_error(v, W, H) for v in (W * M, solved, best))
    assert refit < 0.8 * pruned
    assert refit <= optimum * 1.02


def test_dead_inputs_and_empty_rows_stay_finite():
    W, H, M = _problem()
    H[:, 3] = H[3, :] = 0  # an input that is always zero
    M[0] = False  # a row that keeps nothing
    solved, _ = masked_lstsq(W, H, M)
    assert torch.isfinite(solved).all() and torch.equal(solved[0], torch.zeros(W.shape[1]))


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def _walk(recovery, pattern="unstructured", sparsity=0.6, **settings):
    model = make_tiny_model("llama", layers=2)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern(pattern, sparsity, None, "row"))
    result = walk(model, _ids(), spec, recover_spec(recovery, **settings), eval_ids={"x": _ids(2, seed=1)},
                  batch_size=2)
    return model, result


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_the_refit_recovery_lowers_every_layer_error_and_keeps_the_masks(pattern, sparsity):
    pruned, _ = _walk("none", pattern, sparsity)
    model, result = _walk("refit", pattern, sparsity)
    for record in result.blocks:
        assert record["refit_error_after"] < record["refit_error_before"]
        assert record["refit_iterations"] > 0
    for (name, a), b in zip(pruned.state_dict().items(), model.state_dict().values()):
        if name.endswith("proj.weight") and "layers.0." in name:  # block 1's inputs (so its masks) differ
            assert torch.equal(a == 0, b == 0), name  # same zeros: the masks did not move
            assert not torch.equal(a, b), name  # and the kept weights did
    assert result.blocks[-1]["reconstruction_error_after"] < result.blocks[-1]["reconstruction_error_before"]


def test_ebft_with_refit_starts_from_the_refit_weights_and_records_it():
    _, plain = _walk("ebft", epochs=1, batch_size=2, refit=False)
    _, refit = _walk("ebft", epochs=1, batch_size=2, refit=True)
    for a, b in zip(plain.blocks, refit.blocks):
        assert "refit_error_before" not in a and b["refit_error_after"] < b["refit_error_before"]
        assert a["loss_before"] == pytest.approx(b["loss_before"], rel=1e-5) or a["index"] > 0  # block 0: same input
    assert refit.blocks[0]["epoch_losses"][0] < plain.blocks[0]["epoch_losses"][0]


def test_refit_off_is_the_ebft_it_was():
    """refit=False collects no Hessian and hands no dense weights: EBFT bit for bit as before the setting."""
    ebft = get_recovery("ebft")
    settings = RunConfig().recovery_settings()
    assert ebft.needs_of(settings) == {"hessian"} and ebft.wants_dense_weights(settings)  # the best recipe: on
    settings.refit = False
    assert ebft.needs_of(settings) == frozenset() and not ebft.wants_dense_weights(settings)


def test_the_recipes_and_the_cell_key():
    best, paper = RunConfig(), RunConfig()
    paper.recover.recipe = "paper"
    assert best.recovery_settings().refit and not paper.recovery_settings().refit
    explicit = RunConfig()
    explicit.recover.recipe = "paper"
    explicit.recover.refit = True
    assert cell_key(paper) != cell_key(explicit)  # refit on is a new cell; off (its default) keeps old keys


def test_the_plan_counts_the_hessians_and_dense_weights_refit_keeps():
    config = RunConfig()
    on = RunSizes.of(config)
    config.recover.refit = False
    off = RunSizes.of(config)
    assert "hessian" in on.needs and "hessian" not in off.needs
    assert on.dense_weights and not off.dense_weights
    assert on.refits() and not off.refits()
    config.recover.method = "refit"  # the standalone recovery: known from what it declares, not from its name
    assert RunSizes.of(config).refits()
    config.prune.method, config.recover.method = "sparsegpt", "dsnot"  # a Hessian (the pruner's) and dense weights
    dsnot = RunSizes.of(config)  # (a mask changer's) are not a refit
    assert "hessian" in dsnot.needs and dsnot.dense_weights and not dsnot.refits()



def test_a_structured_pruner_gets_no_refit_from_the_recipe_and_refuses_one_asked_for(tiny_model_dir, tmp_path, capsys):
    from conftest import small_run_args
    from ebft.cli import main
    flap = RunConfig()
    flap.prune.method = "flap"
    assert not flap.recovery_settings().refit  # the best recipe's refit applies to masks only
    assert get_recovery("ebft").needs_of(flap.recovery_settings()) == frozenset()
    out = tmp_path / "bad"
    assert main(small_run_args(tiny_model_dir, out, "--method", "flap", "--refit")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--refit" in err and "structured" in err
    assert not out.exists()
    # its dampening too: the best recipe's refit does not apply to FLAP, so --refit-damp would do nothing
    assert main(small_run_args(tiny_model_dir, out, "--method", "flap", "--refit-damp", "0.5")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--refit-damp" in err and "structured" in err
    assert not out.exists()


def test_the_plan_times_the_refit_solver_only_when_it_runs(tiny_model_dir):
    from ebft.estimate.timing import estimate_time
    from ebft.models import load_config
    config = RunConfig(model=str(tiny_model_dir))
    config.calib.nsamples, config.calib.seqlen = 4, 32
    timed = {}
    for refit in (True, False):
        config.recover.refit = refit
        estimate = estimate_time(load_config(str(tiny_model_dir)), RunSizes.of(config), device="cpu", iters=1, warmup=0)
        timed[refit] = [k for k, v in estimate.per_block.items() if k.startswith("refit") and v > 0]
    assert len(timed[True]) == 1 and timed[False] == []


def test_a_joint_window_refits_every_block_it_holds():
    model = make_tiny_model("llama", layers=4)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.6, None, "row"))
    settings = dict(epochs=1, batch_size=2, lr=1e-3, target="dense-model", window=2, refit=True)
    result = walk(model, _ids(), spec, recover_spec("ebft", **settings), eval_ids={"x": _ids(2, seed=1)}, batch_size=2)
    last = result.blocks[1]
    assert last["window"] == [0, 1] and last["refit_error_after"] < last["refit_error_before"]
    assert "refit_error_before" not in result.blocks[0]  # a window's record is on its last block
