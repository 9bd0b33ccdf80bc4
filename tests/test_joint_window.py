"""Joint recovery windows (EBFT's ``window``): K consecutive blocks, each pruned with its own masks, trained
together towards the dense model's output after the last of them; K = 1 is the paper's EBFT."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model, one_line, recover_spec, small_run_args
from ebft import walk as walk_module
from ebft.cli import main
from ebft.config import RunConfig
from ebft.estimate import plan_resources
from ebft.estimate.memory import RunSizes
from ebft.masks import parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.sweeps import cell_key
from ebft.walk import PruneSpec, walk


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def _walk(window: int, layers: int = 4, recovery: str = "ebft", **settings):
    model = make_tiny_model("llama", layers=layers)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.5, None, "row"))
    settings = {"epochs": 2, "batch_size": 2, "lr": 1e-3, "target": "dense-model", "window": window,
                **settings} if recovery == "ebft" else {}
    result = walk(model, _ids(), spec, recover_spec(recovery, **settings), eval_ids={"x": _ids(2, seed=1)},
                  batch_size=2)
    return model, result


def test_a_window_of_one_block_through_the_joint_path_is_ebft_bit_for_bit(monkeypatch):
    """The joint machinery (blocks as one module, names by position, calls in turn) at K = 1 changes nothing."""
    plain, plain_result = _walk(1)
    monkeypatch.setattr(walk_module, "_one_block", lambda pruned, calls: walk_module._joint([pruned], calls))
    joint, joint_result = _walk(1)
    for (name, a), b in zip(plain.state_dict().items(), joint.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(plain_result.streams["x/final"], joint_result.streams["x/final"])
    losses = lambda r: [(b["loss_before"], b["loss_after"], b["epoch_losses"]) for b in r.blocks]  # noqa: E731
    assert losses(plain_result) == losses(joint_result)


def test_a_window_trains_its_blocks_jointly_towards_the_dense_output_after_its_last():
    dense = make_tiny_model("llama", layers=4)
    pruned_only, _ = _walk(1, recovery="none")  # the blocks as pruned, before any training
    model, result = _walk(2)
    assert [b.get("window") for b in result.blocks] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    first, second = result.blocks[0], result.blocks[1]
    _, alone = _walk(1)
    assert "loss_before" not in first and second["trainable_params"] == 2 * alone.blocks[1]["trainable_params"]
    # the window's loss before training: the pruned blocks 0-1 against the dense model's output after block 1
    with torch.no_grad():
        target = dense(_ids(), output_hidden_states=True).hidden_states[2]
        out = pruned_only(_ids(), output_hidden_states=True).hidden_states[2]
    assert second["loss_before"] == pytest.approx((out - target).square().mean().item(), rel=1e-4)
    assert second["loss_after"] < second["loss_before"]
    for block in find_blocks(model)[1]:  # every block keeps its own masks exactly
        for lin in find_linears(block).values():
            assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5)
    # the blocks 0-1 were trained together: both changed from their pruned weights
    for i in (0, 1):
        a, b = find_blocks(model)[1][i], find_blocks(pruned_only)[1][i]
        assert not torch.equal(a.mlp.down_proj.weight, b.mlp.down_proj.weight)


def test_the_last_window_is_shorter_and_a_window_beyond_the_model_is_the_whole_model():
    _, result = _walk(2, layers=3)
    assert [b.get("window") for b in result.blocks] == [[0, 1], [0, 1], None]
    assert "loss_after" in result.blocks[2]
    _, result = _walk(8, layers=3)
    assert [b.get("window") for b in result.blocks] == [[0, 2]] * 3


@pytest.mark.parametrize("extra,needle", [
    (["--recover-window", "2", "--recipe", "paper"], "add --target dense-model"),
    (["--recover-window", "2", "--recover", "ebft-gradual"], "applies only with --recover ebft"),
    (["--recover-window", "2", "--recover", "none"], "applies only with --recover ebft"),
    (["--recover-window", "0"], "must be an integer in [1, 1024]"),
])
def test_windows_that_cannot_train_are_refused_in_one_line(three_blocks, tmp_path, capsys, extra, needle):
    assert main(small_run_args(three_blocks, tmp_path / "out", *extra)) == 2
    assert needle in one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_run_with_windows_saves_and_records_them(three_blocks, tmp_path):
    import json

    out = tmp_path / "out"
    assert main(small_run_args(three_blocks, out, "--recover-window", "2", "--epochs", "1")) == 0
    blocks = json.loads((out / "run.json").read_text())["blocks"]
    assert [b.get("window") for b in blocks] == [[0, 1], [0, 1], None]


def test_adding_the_window_setting_left_every_sweep_cell_key_as_it_was():
    """Keys of main before the setting existed (4c25468): a setting added at its default reruns no cell."""
    before = {"ebft": ("b9419543b82b", {}), "owl": ("ee37b09f9eb3", {"prune.allocation": "owl"}),
              "none": ("65f8ce165c1e", {"recover.method": "none"}), "lora": ("8d2fe68dd692", {"recover.method": "lora"}),
              "c4": ("d675f1293937", {"calib.source": "c4", "calib.nsamples": 32})}
    for name, (key, changes) in before.items():
        config = RunConfig(model="m")
        config.recover.refit = False  # the best recipe has refit on since; off is the recipe these keys had
        for path, value in changes.items():
            section, field = path.split(".")
            setattr(getattr(config, section), field, value)
        assert cell_key(config) == key, name
    config = RunConfig(model="m")
    config.recover.refit = False
    config.recover.window = 2
    assert cell_key(config) != before["ebft"][0]


def test_plan_counts_a_window_blocks_at_once(tiny_model_dir):
    from ebft.models import load_config

    sizes = {}
    for window in (1, 3):
        config = RunConfig(model=str(tiny_model_dir))
        config.recover.window = window
        sizes[window] = plan_resources(load_config(str(tiny_model_dir)), RunSizes.of(config))
    one, three = (sizes[w] for w in (1, 3))
    assert "joint window inputs" in three.activations and "joint window inputs" not in one.activations
    assert three.activations["joint window inputs"] == three.activations["calibration chain"]
    rec1, rec3 = one.phases["recovery"], three.phases["recovery"]
    assert rec3["AdamW moments"] == 3 * rec1["AdamW moments"]
    assert rec3["saved activations"] == 3 * rec1["saved activations"]
