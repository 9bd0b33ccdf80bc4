"""Per-block metrics (ebft.metrics) and the one training wrapper (ebft.recover.training.train_block).

Every recovery's run.json holds each block's reconstruction error before and after recovery (``none``: the
same number; EBFT: never worse; LoRA: measured again after it trained the whole model); the number is the
MSE of the pruned block against its target; taking it changes nothing the run computes; ``ebft plan`` counts
it; a metric of one's own is one registered function; the three block-training recoveries go through one
wrapper, whose guard undoes a worse training for each of them alike."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import make_tiny_model, recover_spec
from ebft import metrics
from ebft.capture import capture
from ebft.cli import main
from ebft.masks import parse_pattern
from ebft.metrics import METRICS, Probe, register_metric, unregister_metric
from ebft.models import find_blocks
from ebft.prune import get_pruner
from ebft.recover import training
from ebft.report import plot_block_losses
from ebft.walk import PruneSpec, walk

BEFORE, AFTER = "reconstruction_error_before", "reconstruction_error_after"


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def _wanda(sparsity=0.5):
    return PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", sparsity, None, "row"))


SETTINGS = {"none": [], "dsnot": [], "ebft": ["--epochs", "2", "--recover-batch-size", "4"],
            "lora": ["--lora-steps", "4", "--lora-lr", "1e-2"]}


@pytest.mark.parametrize("recovery", list(SETTINGS))
def test_run_json_records_every_blocks_error_before_and_after_for_every_recovery(recovery, tiny_model_dir, text_file,
                                                                                tmp_path):
    out = tmp_path / recovery
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "2", "--recover", recovery,
                 *SETTINGS[recovery], "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    blocks = record["blocks"]
    assert len(blocks) == 2 and all(b[BEFORE] > 0 and b[AFTER] >= 0 for b in blocks)
    if recovery == "none":  # nothing changes the block: the same measurement
        assert all(b[AFTER] == b[BEFORE] for b in blocks)
    if recovery == "ebft":  # the guard never keeps a worse block
        assert all(b[AFTER] <= b[BEFORE] for b in blocks)
        assert all(b[BEFORE] == pytest.approx(b["loss_before"], rel=1e-4) for b in blocks)  # mse, no held-out windows
    if recovery == "lora":  # measured again once LoRA trained the whole model
        assert any(b[AFTER] != b[BEFORE] for b in blocks)
    if recovery in ("dsnot", "ebft"):
        assert any(b[AFTER] < b[BEFORE] for b in blocks)
    assert (out / "block_losses.png").exists()


def test_the_error_is_the_pruned_blocks_mse_against_the_dense_block():
    model = make_tiny_model("llama")
    ids = _ids()
    x, calls = capture(model, ids, torch.device("cpu"), batch_size=4)
    dense_block = find_blocks(model)[1][0]
    y = calls[0].forward(dense_block, x)
    result = walk(model, ids, _wanda(), recover_spec("none"), batch_size=4)
    pruned = calls[0].forward(find_blocks(model)[1][0], x)
    assert result.blocks[0][BEFORE] == pytest.approx((pruned - y).square().mean().item(), rel=1e-5)


def test_taking_the_metrics_changes_nothing_the_walk_computes(monkeypatch):
    """The same weights, masks, records and random state with the metrics as without them."""
    def run(method, **settings):
        model = make_tiny_model("llama")
        result = walk(model, _ids(), _wanda(), recover_spec(method, **settings), batch_size=4)
        return model.state_dict(), result, torch.get_rng_state()

    measured = {m: run(m, **kw) for m, kw in (("ebft", {"epochs": 2, "batch_size": 4}), ("dsnot", {}))}
    monkeypatch.delitem(METRICS, "reconstruction_error")
    for method, kw in (("ebft", {"epochs": 2, "batch_size": 4}), ("dsnot", {})):
        state, result, rng = run(method, **kw)
        state_m, result_m, rng_m = measured[method]
        assert all(torch.equal(state[k], state_m[k]) for k in state), method
        assert all(torch.equal(result.masks[k], result_m.masks[k]) for k in result.masks)
        assert torch.equal(rng, rng_m)
        keys = {"loss_before", "loss_after", "epoch_losses", "restored", "dsnot_swaps"}
        assert [{k: b[k] for k in keys & set(b)} for b in result.blocks] == \
               [{k: b[k] for k in keys & set(b)} for b in result_m.blocks]
        assert BEFORE in result_m.blocks[0] and BEFORE not in result.blocks[0]


def test_a_joint_window_is_measured_as_one_on_its_last_block():
    result = walk(make_tiny_model("llama"), _ids(), _wanda(),
                  recover_spec("ebft", epochs=1, batch_size=4, target="dense-model", window=2), batch_size=4)
    first, last = result.blocks
    assert BEFORE not in first and last[AFTER] <= last[BEFORE]
    assert last[BEFORE] == pytest.approx(last["loss_before"], rel=1e-4)  # the window's objective: its dense output


def test_a_metric_of_ones_own_is_one_registered_function(tmp_path):
    @register_metric("output_norm", summary="the recovered block's mean output norm")
    def output_norm(probe: Probe) -> float:
        return probe.average(lambda out, y: out.float().norm(dim=-1).mean())

    try:
        result = walk(make_tiny_model("llama"), _ids(), _wanda(), recover_spec("dsnot"), batch_size=4)
        assert all({"output_norm_before", "output_norm_after", BEFORE, AFTER} <= set(b) for b in result.blocks)
        assert plot_block_losses(result.blocks, tmp_path / "plot.png", metrics=tuple(METRICS)) is not None
        with pytest.raises(ValueError, match="twice"):
            register_metric("output_norm")(output_norm)
    finally:
        unregister_metric("output_norm")
    assert "output_norm" not in METRICS and metrics.metric_passes() == 1


def test_the_plan_counts_the_measurements():
    from ebft.config import RunConfig
    from ebft.estimate import RunSizes, model_shape
    from ebft.estimate import memory as mem
    from ebft.estimate.timing import _per_block

    cfg = RunConfig(model="x", device="cpu")
    cfg.calib.nsamples = 16
    shape = model_shape(make_tiny_model("llama").config)
    sizes = {}
    for method in ("none", "dsnot", "ebft", "lora"):
        cfg.recover.method = method
        sizes[method] = s = RunSizes.of(cfg)
        per_block = _per_block(s, 1.0, 0.0, 0.0)  # one second per window's forward pass
        assert per_block["per-block metrics"] == (1 if method in ("none", "lora") else 2) * 16
        assert per_block["stats + targets pass"] == 16  # the dense block's outputs, a target or not
        assert "targets" in mem.activation_bytes(shape, s) or "dense-model stream" in mem.activation_bytes(shape, s)
    assert _per_block(sizes["lora"], 1.0, 0.0, 0.0)["per-block metrics after lora"] == 3 * 16
    assert mem.host_fixed_bytes(shape, sizes["lora"], "eager")["dense blocks (per-block metrics after lora)"] == \
        4 * shape.params_in_blocks
    assert not any("dense blocks" in k for k in mem.host_fixed_bytes(shape, sizes["ebft"], "eager"))
    register_metric("two_passes", passes=2)(lambda probe: 0.0)
    try:
        cfg.recover.method = "ebft"
        assert _per_block(RunSizes.of(cfg), 1.0, 0.0, 0.0)["per-block metrics"] == 2 * 3 * 16
    finally:
        unregister_metric("two_passes")
    assert _per_block(dataclasses.replace(sizes["ebft"], metric_passes=0), 1.0, 0.0, 0.0).get("per-block metrics") is None


@pytest.mark.parametrize("method", ["ebft", "ebft-gradual", "ebft-mask"])
def test_the_training_recoveries_share_one_wrapper_whose_guard_undoes_a_worse_block(method, monkeypatch):
    """training.train_block decides (its ``rejection``, patched here to call every training worse): each of the
    three then leaves the block exactly as pruning alone left it, masks included, and says so."""
    monkeypatch.setattr(training, "rejection", lambda failed, after, before: "loss increased")
    model, plain = make_tiny_model("llama"), make_tiny_model("llama")
    result = walk(model, _ids(), _wanda(), recover_spec(method, epochs=1, batch_size=4), batch_size=4)
    expected = walk(plain, _ids(), _wanda(), batch_size=4)
    for record in result.blocks:
        assert record["restored"] == "loss increased" and record["loss_after"] == record["loss_before"]
        assert record[AFTER] == record[BEFORE] and "train_seconds" in record and "epoch_losses" in record
    for (k, v), v2 in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(v, v2), k
    assert all(torch.equal(m, expected.masks[k]) for k, m in result.masks.items())
    assert all(p.requires_grad for p in model.parameters())  # given back as they came


def test_metric_names_name_run_json_keys():
    with pytest.raises(ValueError, match="identifier"):
        register_metric("relative error")
