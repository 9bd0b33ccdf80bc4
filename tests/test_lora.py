"""LoRA recovery: trains a masked (or dense, re-masked) update, merges it exactly; a model-scope recovery."""
import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_model
from ebft.config import RunConfig
from ebft.data import calibration_windows
from ebft.errors import ConfigError
from ebft.masks import check_weight, parse_pattern
from ebft.prune import get_pruner
from ebft.recover import ModelContext, TrainingText, get_recovery
from ebft.recover.lora import LoraLinear, LoraSettings, add_adapters, check_targets, lm_loss, resolve_targets
from ebft.walk import PruneSpec, walk

SEQLEN = 32


def _pruned(tokenizer, text_file, sparsity=0.5):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    calib = calibration_windows(tokenizer, str(text_file), 4, SEQLEN, 0)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", sparsity, None, "row"))
    return model, walk(model, calib, spec).masks


def _lora(model, tokenizer, masks, text_file, **settings):
    settings = LoraSettings(**{"lora_steps": 20, "lora_lr": 1e-2, "lora_batch_size": 4, **settings})
    ctx = ModelContext(model, tokenizer, masks, TrainingText(str(text_file), SEQLEN, 0), torch.device("cpu"))
    return get_recovery("lora").fn(ctx, settings)


def test_lora_merge_keeps_masked_weights_zero_changes_kept_ones_and_lowers_the_loss(tokenizer, text_file):
    model, masks = _pruned(tokenizer, text_file)
    modules = dict(model.named_modules())
    before = {name: modules[name].weight.detach().clone() for name in masks}
    text = calibration_windows(tokenizer, str(text_file), 8, SEQLEN, seed=7)  # other windows of the text
    loss_before = lm_loss(model, text, torch.device("cpu"), 4, None)

    record = _lora(model, tokenizer, masks, text_file, lora_targets="all")

    for name, mask in masks.items():
        weight = modules[name].weight.data
        check_weight(weight, mask, name)  # every pruned weight exactly 0.0
        assert (weight[~mask] == 0).all()
        assert not torch.equal(weight[mask], before[name][mask]), f"{name}: kept weights unchanged"
    assert lm_loss(model, text, torch.device("cpu"), 4, None) < loss_before - 0.1
    assert record["loss_after"] < record["loss_before"]
    assert record["loss_adapter"] < record["loss_before"]
    assert len(record["step_losses"]) == 2 and record["train_windows"] == 80
    assert record["lora_merge"] == "masked"


def test_masked_lora_merges_exactly_the_model_the_adapters_were(tokenizer, text_file):
    """The update is trained masked, so merging changes nothing: the adapters' held-out loss is the
    merged model's, and every pruned weight is exactly 0.0 without re-applying any mask."""
    model, masks = _pruned(tokenizer, text_file)
    record = _lora(model, tokenizer, masks, text_file, lora_targets="all", lora_merge="masked")
    assert record["loss_adapter"] < record["loss_before"] - 0.1
    assert record["loss_after"] == pytest.approx(record["loss_adapter"], abs=1e-5)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert (modules[name].weight.data[~mask] == 0.0).all(), name


def test_remask_lora_loses_part_of_its_update_on_the_merge(tokenizer, text_file):
    """The old behaviour: a dense update, merged, then re-masked — exact sparsity, but the merged model
    is no longer the one the adapters trained (at 50 % sparsity half the update is dropped)."""
    model, masks = _pruned(tokenizer, text_file)
    record = _lora(model, tokenizer, masks, text_file, lora_targets="all", lora_merge="remask")
    assert record["lora_merge"] == "remask"
    assert abs(record["loss_after"] - record["loss_adapter"]) > 1e-3
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        check_weight(modules[name].weight.data, mask, name)


def test_masked_update_and_its_gradients_are_zero_where_the_mask_prunes():
    torch.manual_seed(0)
    base = nn.Linear(16, 8, bias=False)
    mask = torch.rand(8, 16) > 0.5
    base.weight.data *= mask
    adapter = LoraLinear(base, rank=4, alpha=8, mask=mask)
    nn.init.normal_(adapter.lora_B)  # B = 0 at init: give the update something to mask
    x = torch.randn(3, 5, 16)
    expected = x @ (base.weight + 2.0 * (adapter.lora_B @ adapter.lora_A) * mask).T
    out = adapter(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    # the hand-written backward (which recomputes the masked product) equals autograd's
    assert adapter.lora_A.grad.abs().sum() > 0
    ref_a, ref_b = adapter.lora_A.detach().clone().requires_grad_(), adapter.lora_B.detach().clone().requires_grad_()
    (x @ (base.weight + 2.0 * (ref_b @ ref_a) * mask).T).square().sum().backward()
    torch.testing.assert_close(adapter.lora_A.grad, ref_a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(adapter.lora_B.grad, ref_b.grad, rtol=1e-4, atol=1e-4)
    assert (adapter.update()[~mask] == 0).all()
    adapter.merge()
    assert (base.weight[~mask] == 0.0).all()


def test_lora_on_a_model_without_masks_trains_a_dense_update(tokenizer, text_file):
    """Structured pruning leaves no masks (the linears shrink): both merges are a plain LoRA merge."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    adapters = add_adapters(model, ["q_proj"], {}, rank=2, alpha=4)
    assert len(adapters) == 2 and all(a.mask is None for a in adapters.values())
    from ebft.recover.lora import remove_adapters
    remove_adapters(model, adapters)
    record = _lora(model, tokenizer, {}, text_file, lora_targets="all", lora_steps=10)
    assert record["loss_after"] == pytest.approx(record["loss_adapter"], abs=1e-5)
    assert record["loss_after"] < record["loss_before"]


def test_lora_qv_trains_q_and_v_only_and_leaves_a_plain_model(tokenizer, text_file):
    model, masks = _pruned(tokenizer, text_file)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    record = _lora(model, tokenizer, masks, text_file, lora_steps=3)

    rank = 8
    expected = sum(rank * (m.in_features + m.out_features) for n, m in model.named_modules()
                   if n.endswith(("q_proj", "v_proj")))
    assert record["trainable_params"] == expected
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == name.endswith(("q_proj.weight", "v_proj.weight")), name
        assert p.requires_grad  # restored as it was
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert not model.training


def test_lora_targets_are_checked():
    check_targets("qv")
    check_targets("q_proj, o_proj,mlp.down_proj")
    with pytest.raises(ConfigError, match="recover.lora_targets"):
        check_targets("q proj")
    model = make_tiny_model("llama")
    assert resolve_targets(model, "qv") == ["q_proj", "v_proj"]
    assert "mlp.down_proj" in resolve_targets(model, "all")
    with pytest.raises(ConfigError, match="no linear named qkv_proj.*q_proj"):
        resolve_targets(model, "qkv_proj,v_proj")
    cfg = RunConfig(model="x", out="y")
    cfg.recover.lora_dropout = 1.0
    with pytest.raises(ConfigError, match="recover.lora_dropout"):
        cfg.check_types()
    cfg.recover.lora_dropout, cfg.recover.lora_merge = 0.05, "merge"
    with pytest.raises(ConfigError, match="recover.lora_merge.*masked, remask"):
        cfg.check_types()


def test_run_with_lora_records_cost_and_saves_an_exactly_sparse_model(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from ebft.pipeline import run

    cfg = RunConfig(model=str(tiny_model_dir), out=str(tmp_path / "out"))
    cfg.prune.method, cfg.prune.sparsity = "wanda", 0.5
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = str(text_file), 4, SEQLEN
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = [str(text_file)], SEQLEN, 4
    cfg.recover.method, cfg.recover.lora_steps, cfg.recover.lora_lr = "lora", 10, 1e-2
    record = run(cfg)

    ppl = record["perplexity"][text_file.name]
    assert set(ppl) == {"dense", "pruned", "recovered"}
    assert ppl["recovered"] < ppl["pruned"]
    cost = record["recovery"]
    assert cost["method"] == "lora" and cost["scope"] == "model"
    assert cost["seconds"] > 0 and cost["peak_memory_bytes"] > 0 and cost["trainable_params"] > 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["recovery"]["trainable_params"] == cost["trainable_params"]

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for block in saved.model.layers:
        for lin in (block.self_attn.q_proj, block.self_attn.v_proj, block.mlp.down_proj):
            zeros_per_row = (lin.weight == 0).sum(1)
            assert (zeros_per_row == lin.in_features // 2).all()  # wanda's per-row 50 %, exactly
