"""Structured pruning end to end: FLAP plans, the walk shrinks, EBFT/LoRA recover, plain transformers reloads."""
import json

import pytest
import torch

from conftest import block_training
from ebft.cli import main


def _args(model_dir, text_file, out, *extra):
    return ["run", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "3",
            *block_training(extra, "--epochs", "2", "--recover-batch-size", "4"), "--out", str(out), *extra]


@pytest.mark.parametrize("structure", ["adaptive", "uniform"])
@pytest.mark.parametrize("recover", ["ebft", "none"])
def test_flap_run_saves_a_smaller_model_plain_transformers_reloads(tiny_model_dir, text_file, tmp_path, structure,
                                                                  recover):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft.data import eval_tokens
    from ebft.evaluation.perplexity import perplexity

    out = tmp_path / "flap"
    assert main(_args(tiny_model_dir, text_file, out, "--method", "flap", "--sparsity", "0.3",
                      "--flap-structure", structure, "--recover", recover, "--no-speed")) == 0
    record = json.loads((out / "run.json").read_text())
    s = record["structure"]
    assert s["params_pruned"] < s["params_dense"]
    # adaptive: within half the largest unit; uniform rounds per module (2 KV groups: one of them is 50 %)
    assert record["plan"]["removed_fraction"] == pytest.approx(0.3, abs=0.05 if structure == "adaptive" else 0.1)
    if structure == "uniform":  # every block the same shape: nothing to pad beyond zero biases
        assert s["params_saved"] - s["params_pruned"] < 0.05 * s["params_pruned"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == s["params_saved"]
    final = "recovered" if recover == "ebft" else "pruned"
    ppl = record["perplexity"][text_file.name]
    ids = eval_tokens(AutoTokenizer.from_pretrained(out), str(text_file))
    assert perplexity(model, ids, 64, 3) == pytest.approx(ppl[final], rel=1e-4)
    if recover == "ebft":
        assert all(b["loss_after"] <= b["loss_before"] for b in record["blocks"])
        assert record["recovery"]["trainable_params"] > 0


def test_flap_with_lora_baseline_runs(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "lora"
    assert main(_args(tiny_model_dir, text_file, out, "--method", "flap", "--sparsity", "0.3", "--recover", "lora",
                      "--lora-steps", "4", "--lora-lr", "1e-2", "--lora-batch-size", "2", "--speed")) == 0
    record = json.loads((out / "run.json").read_text())
    assert set(record["perplexity"][text_file.name]) == {"dense", "pruned", "recovered"}
    assert set(record["speed"]) == {"dense", "recovered"}
    assert record["speed"]["recovered"]["prefill_tokens_per_s"] > 0


@pytest.mark.parametrize("extra,needle", [
    (["--method", "flap", "--recover", "dsnot"], "recover: got 'dsnot'"),
    (["--method", "flap", "--recover", "ebft-mask"], "structured pruning has none"),
    (["--method", "flap", "--recover", "refit"], "structured pruning has none"),
    (["--method", "flap", "--layers", "mlp"], "prune.layers"),
    (["--method", "flap", "--pattern", "2:4"], "pattern"),
    (["--method", "wanda", "--pattern", "structured"], "use method flap"),
    (["--method", "flap", "--allocation", "owl"], "prune.allocation"),
    (["--method", "flap", "--flap-metric", "L2"], "prune.flap_metric"),
])
def test_structured_misuse_is_one_line(tiny_model_dir, text_file, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    assert main(_args(tiny_model_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert not out.exists()


def test_walk_ebft_trains_the_shrunk_blocks():
    from conftest import make_tiny_model, recover_spec
    from ebft.masks import Pattern
    from ebft.allocation import flap_allocator
    from ebft.prune import get_pruner
    from ebft.prune.flap import FlapSettings
    from ebft.structured import block_layout
    from ebft.walk import PruneSpec, planning_pass, walk

    model = make_tiny_model("llama", layers=2)
    ids = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(0))
    pattern = Pattern(0.3, structured=True)
    plan = planning_pass(model, ids, flap_allocator(pattern, FlapSettings(flap_structure="uniform"), model.config),
                         "cpu", 4)
    spec = PruneSpec(get_pruner("flap"), plan.patterns, None, FlapSettings(flap_structure="uniform"), plan.structures)
    result = walk(model, ids, spec, recover_spec("ebft", epochs=3, batch_size=4, lr=1e-3), batch_size=4)
    assert result.masks == {}
    for i, block in enumerate(model.model.layers):
        layout = block_layout(block, model.config)
        assert layout.intermediate_size == len(plan.structures[i].mlp_keep) < 128
        assert result.blocks[i]["loss_after"] < result.blocks[i]["loss_before"]


def test_sweep_with_structured_rows(tiny_model_dir, text_file, tmp_path):
    from ebft.config import RunConfig
    from ebft.sweeps import SweepConfig, sweep

    base = RunConfig(model=str(tiny_model_dir))
    base.calib.source, base.calib.nsamples, base.calib.seqlen = str(text_file), 4, 32
    base.eval.sources, base.eval.seqlen, base.eval.windows = [str(text_file)], 32, 2
    base.recover.epochs, base.recover.batch_size = 1, 2
    config = SweepConfig(base, methods=["flap", "wanda"], sparsities=[0.3], recoveries=["none", "ebft"],
                         out=str(tmp_path / "sweep"))
    results = sweep(config)
    cells = {(c["method"], c["recover"]): c for c in results["cells"]}
    assert len(cells) == 4
    # the wanda cells after the flap cells started from the whole model, not a shrunk one
    assert cells[("wanda", "none")]["sparsity_measured"] == pytest.approx(0.3, abs=0.01)
    flap_cell = json.loads(next((tmp_path / "sweep" / "cells").glob("flap-ebft-*.json")).read_text())
    assert flap_cell["plan"]["allocation"] == "flap-adaptive" and flap_cell["sparsity_measured"] == pytest.approx(0.3, abs=0.05)
