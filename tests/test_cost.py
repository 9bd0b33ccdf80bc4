"""Every run record carries the recovery's cost: seconds, peak memory, trainable parameters."""
import pytest

from ebft.pipeline import run
from ebft.config import RunConfig


def _run(model_dir, text_file, out, recover):
    cfg = RunConfig(model=str(model_dir), out=str(out))
    cfg.prune.method, cfg.prune.sparsity = "wanda", 0.5
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = str(text_file), 4, 32
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = [str(text_file)], 32, 2
    cfg.recover.method = recover
    if recover == "ebft":  # settings of a recovery that does not run are refused
        cfg.recover.epochs, cfg.recover.batch_size = 1, 2
        cfg.recover.recipe, cfg.recover.train_norms = "paper", False  # linear weights only: the count below
    return run(cfg)


def test_block_recovery_cost_sums_the_blocks(tiny_model_dir, text_file, tmp_path):
    record = _run(tiny_model_dir, text_file, tmp_path / "ebft", "ebft")
    cost, blocks = record["recovery"], record["blocks"]
    assert cost["method"] == "ebft" and cost["scope"] == "block"
    assert cost["seconds"] == pytest.approx(sum(b["recover_seconds"] for b in blocks), abs=0.01)
    assert 0 < cost["seconds"] <= record["wall_seconds"]
    assert cost["peak_memory_bytes"] > 0 and cost["peak_memory_of"] == "process RSS"
    # kept weights only: each linear is 50 % sparse, tiny Llama linears have no bias
    kept = sum(round(n * (1 - record["sparsity"]["layers"][name]))
               for name, n in _linear_sizes(tmp_path / "ebft").items())
    assert cost["trainable_params"] == sum(b["trainable_params"] for b in blocks) == kept
    assert cost["trainable_params_max_block"] == max(b["trainable_params"] for b in blocks)

    none = _run(tiny_model_dir, text_file, tmp_path / "none", "none")["recovery"]
    assert none["method"] == "none" and none["trainable_params"] == 0 and none["seconds"] < cost["seconds"]


def _linear_sizes(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: m.weight.numel() for n, m in model.named_modules() if n.endswith("_proj")}
