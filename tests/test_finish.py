"""The finish: end-to-end training after the walk, masks exact, against the dense teacher or the LM loss."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_tiny_model
from ebft.data import calibration_windows
from ebft.errors import ConfigError
from ebft.masks import check_weight, parse_pattern
from ebft.prune import get_pruner
from ebft.recover import ModelContext, TrainingText
from ebft.recover.finish import (FinishSettings, block_linears, choose_training, evaluate, finish, kd_loss,
                                 prepare_finish, teacher_targets)
from ebft.recover.lora import LoraLinear
from ebft.settings import check
from ebft.walk import PruneSpec, walk

SEQLEN, NSAMPLES = 32, 8


def _settings(**kw) -> FinishSettings:
    return FinishSettings(**{"method": "kd", "steps": 20, "batch_size": 4, "lr": 1e-3, "train": "weights", **kw})


def _prune(model, tokenizer, text_file, sparsity=0.8):
    calib = calibration_windows(tokenizer, str(text_file), NSAMPLES, SEQLEN, 0)
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", sparsity, None, "row"))
    return walk(model, calib, spec).masks


def _run(tokenizer, text_file, settings, model=None, prune=True):
    """Dense model -> teacher -> prune -> finish, as the pipeline does; returns (model, masks, record, data)."""
    model = model or make_tiny_model("llama", vocab_size=len(tokenizer))
    text = TrainingText(str(text_file), SEQLEN, 0)
    data = prepare_finish(model, tokenizer, text, NSAMPLES, settings)
    masks = _prune(model, tokenizer, text_file) if prune else {}
    ctx = ModelContext(model, tokenizer, masks, text, torch.device("cpu"))
    return model, masks, finish(ctx, settings, data), data


def test_teacher_targets_are_the_dense_models_distribution(tokenizer, text_file):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    windows = calibration_windows(tokenizer, str(text_file), 6, SEQLEN, 3)
    with torch.no_grad():
        dense = F.log_softmax(model(input_ids=windows).logits / 2.0, dim=-1)

    full = teacher_targets(model, windows, temperature=2.0, topk=0, batch_size=4)
    assert full.indices is None and full.logprobs.shape == dense.shape
    torch.testing.assert_close(full.logprobs, dense, rtol=0, atol=1e-5)

    top = teacher_targets(model, windows, temperature=2.0, topk=16, batch_size=4)
    values, indices = dense.topk(16, dim=-1)
    torch.testing.assert_close(top.logprobs, values, rtol=0, atol=1e-5)
    assert torch.equal(top.indices.long(), indices) and top.indices.dtype == torch.int32
    rest = torch.log1p(-values.exp().sum(-1))  # the mass of every other token
    torch.testing.assert_close(top.rest, rest, rtol=0, atol=1e-4)
    assert top.nbytes == 6 * SEQLEN * (16 * 8 + 4)


def test_the_teacher_is_taken_before_pruning_and_matches_the_calibration_windows(tokenizer, text_file):
    """prepare_finish on the dense model: its windows are the calibration draw (then the held-out ones),
    and its targets stay the dense model's after the walk pruned the model in place."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    twin = make_tiny_model("llama", vocab_size=len(tokenizer))  # same seed: the dense model, kept aside
    settings = _settings(topk=0, holdout=3)
    data = prepare_finish(model, tokenizer, TrainingText(str(text_file), SEQLEN, 0), NSAMPLES, settings)
    assert torch.equal(data.train, calibration_windows(tokenizer, str(text_file), NSAMPLES, SEQLEN, 0))
    assert data.heldout.shape == (3, SEQLEN)
    _prune(model, tokenizer, text_file)
    with torch.no_grad():
        for which, windows in (("train", data.train), ("heldout", data.heldout)):
            idx = torch.arange(len(windows))
            logprobs, _, _ = data.teacher_batch(which, idx, torch.device("cpu"))
            torch.testing.assert_close(logprobs, F.log_softmax(twin(input_ids=windows).logits, -1), rtol=0, atol=1e-5)
            assert kd_loss(twin(input_ids=windows).logits, *data.teacher_batch(which, idx, torch.device("cpu")),
                           1.0).abs() < 1e-5  # the dense model is its own teacher's perfect student
            assert kd_loss(model(input_ids=windows).logits, logprobs, None, None, 1.0) > 1e-3  # the pruned is not
    assert prepare_finish(model, tokenizer, TrainingText(str(text_file), SEQLEN, 0), NSAMPLES,
                          _settings(method="none")) is None
    assert prepare_finish(model, tokenizer, TrainingText(str(text_file), SEQLEN, 0), NSAMPLES,
                          _settings(method="lm")).teacher is None


def test_kd_loss_full_vocabulary_is_the_kl_and_top_k_lower_bounds_it():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(2, 5, 50) * 3, torch.randn(2, 5, 50) * 3
    t = F.log_softmax(teacher_logits / 2.0, -1)
    full = kd_loss(student_logits, t, None, None, 2.0)
    reference = F.kl_div(F.log_softmax(student_logits / 2.0, -1), t, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(full, reference.mean() * 4.0)
    values, idx = t.topk(8, -1)
    rest = t.scatter(-1, idx, float("-inf")).logsumexp(-1)
    bucketed = kd_loss(student_logits, values, idx.int(), rest, 2.0)
    assert 0 < bucketed < full  # k + 1 outcomes: a coarser partition, a smaller KL
    values, idx = t.topk(49, -1)  # 49 tokens + "the rest" (one token): the full KL again
    rest = t.scatter(-1, idx, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(kd_loss(student_logits, values, idx.int(), rest, 2.0), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("train", ["weights", "lora"])
def test_kd_finish_lowers_the_heldout_loss_and_keeps_every_mask_exact(tokenizer, text_file, train):
    lr = 1e-3 if train == "weights" else 1e-2
    model, masks, record, data = _run(tokenizer, text_file, _settings(train=train, lr=lr))
    assert record["train"] == train and record["restored"] is None
    assert record["heldout_loss_after"] < 0.85 * record["heldout_loss_before"]
    assert record["heldout_lm_loss_after"] < record["heldout_lm_loss_before"]
    assert record["checked_on"] == "heldout" and record["heldout_windows"] == 4 and record["train_windows"] == NSAMPLES
    assert len(record["step_losses"]) == 2 and record["step_losses"][-1] < record["step_losses"][0]
    assert record["teacher_bytes"] > 0 and record["seconds"] > 0 and record["trainable_params"] > 0
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight.data
        check_weight(weight, mask, name)
        assert (weight[~mask] == 0.0).all(), name  # exactly zero, never re-masked
    # the recorded loss is the model's as it now is (for lora: merged, exactly as the adapters were)
    now = evaluate(model, data, "heldout", torch.device("cpu"), 4, None)
    assert now["kd"] == pytest.approx(record["heldout_loss_after"], abs=1e-5)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())


def test_lm_finish_trains_the_kept_weights_on_the_lm_loss(tokenizer, text_file):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, masks, record, data = _run(tokenizer, text_file, _settings(method="lm"), model=model)
    assert data.teacher is None and "teacher_bytes" not in record
    assert record["heldout_loss_after"] < record["heldout_loss_before"] - 0.1
    assert record["heldout_loss_after"] == record["heldout_lm_loss_after"]
    for name, lin in block_linears(model).items():
        assert not torch.equal(lin.weight[masks[name]], before[f"{name}.weight"][masks[name]])
        check_weight(lin.weight.data, masks[name], name)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])  # blocks only
    assert record["trainable_params"] == sum(int(m.sum()) for m in masks.values())  # kept weights (no biases)


@pytest.mark.parametrize("train", ["weights", "lora"])
def test_a_finish_that_makes_the_heldout_loss_worse_is_undone(tokenizer, text_file, train):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    text = TrainingText(str(text_file), SEQLEN, 0)
    settings = _settings(train=train, lr=5.0, steps=10)  # far too large: the loss explodes
    data = prepare_finish(model, tokenizer, text, NSAMPLES, settings)
    masks = _prune(model, tokenizer, text_file)
    pruned = {n: p.detach().clone() for n, p in model.named_parameters()}
    record = finish(ModelContext(model, tokenizer, masks, text, torch.device("cpu")), settings, data)
    assert record["restored"] in ("loss increased", "non-finite loss")
    assert not record["heldout_loss_trained"] <= record["heldout_loss_before"]
    assert record["heldout_loss_after"] == record["heldout_loss_before"]
    for name, p in model.named_parameters():
        assert torch.equal(p, pruned[name]), name  # the pre-finish model, bit for bit
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_finish_on_a_structured_model_trains_its_shrunk_linears(tokenizer, text_file):
    """Structured pruning leaves smaller dense linears and no masks: the finish trains them all."""
    from test_structured import flap

    import copy

    dense = make_tiny_model("llama", vocab_size=len(tokenizer))
    text = TrainingText(str(text_file), SEQLEN, 0)
    data = prepare_finish(dense, tokenizer, text, NSAMPLES, _settings())
    flap(dense, 0.5, "uniform")
    for train, lr in (("weights", 1e-3), ("lora", 1e-2)):
        model = copy.deepcopy(dense)
        shapes = {n: lin.weight.shape for n, lin in block_linears(model).items()}
        record = finish(ModelContext(model, tokenizer, {}, text, torch.device("cpu")), _settings(train=train, lr=lr),
                        data)
        assert record["restored"] is None and record["heldout_loss_after"] < record["heldout_loss_before"]
        assert {n: lin.weight.shape for n, lin in block_linears(model).items()} == shapes
        assert record["trainable_params"] == (sum(p.numel() for lin in block_linears(model).values()
                                                  for p in lin.parameters()) if train == "weights" else
                                              sum(16 * (s[0] + s[1]) for s in shapes.values()))


def test_auto_trains_the_weights_when_their_optimizer_state_fits_else_lora(monkeypatch):
    import ebft.recover.finish as fin

    model = make_tiny_model("llama")
    n = sum(p.numel() for lin in block_linears(model).values() for p in lin.parameters())
    monkeypatch.setattr(fin, "free_memory", lambda device: 100 * n)
    assert choose_training(model, FinishSettings(), torch.device("cpu"))[0] == "weights"
    monkeypatch.setattr(fin, "free_memory", lambda device: 10 * n)
    mode, why = choose_training(model, FinishSettings(), torch.device("cpu"))
    assert mode == "lora" and "GiB" in why
    assert choose_training(model, FinishSettings(train="weights"), torch.device("cpu")) == ("weights", "asked")


def test_finish_none_does_nothing_and_kd_without_a_teacher_is_refused(tokenizer, text_file):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    ctx = ModelContext(model, tokenizer, {}, TrainingText(str(text_file), SEQLEN, 0), torch.device("cpu"))
    assert finish(ctx, FinishSettings(), None) == {}
    data = prepare_finish(model, tokenizer, ctx.text, NSAMPLES, _settings(method="lm"))
    with pytest.raises(ValueError, match="prepare_finish"):
        finish(ctx, _settings(method="kd"), data)


def test_finish_settings_are_validated():
    check(FinishSettings(), "finish.")
    for field, value, match in (("method", "kl", "finish.method.*none, kd, lm"), ("train", "all", "finish.train"),
                                ("temperature", 0.0, "finish.temperature"), ("steps", 0, "finish.steps"),
                                ("topk", -1, "finish.topk")):
        with pytest.raises(ConfigError, match=match):
            check(FinishSettings(**{field: value}), "finish.")
    assert FinishSettings(lr=None).lr is None  # the default: by what it trains


def test_ebft_run_with_a_finish_records_it_and_saves_the_finished_model(tiny_model_dir, text_file, tmp_path, capsys):
    """--finish kd on the command line: the dense teacher before the walk, the stage after it, the stage
    "finished" in the perplexities, the record in run.json, and the saved model keeps every mask."""
    import json

    from transformers import AutoModelForCausalLM

    from ebft.cli import main

    out = tmp_path / "finished"
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "4", "--out", str(out),
                 "--sparsity", "0.6", "--epochs", "1", "--finish", "kd", "--finish-steps", "4",
                 "--finish-holdout", "2", "--finish-lr", "1e-3"]) == 0
    printed = capsys.readouterr().out
    assert "finished" in printed
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["finish"]["method"] == "kd"
    assert record["finish"]["method"] == "kd" and record["finish"]["steps"] == 4
    ppl = next(iter(record["perplexity"].values()))
    assert {"dense", "pruned", "recovered", "finished"} <= set(ppl)
    if not record["finish"]["restored"]:
        assert ppl["finished"] != ppl["recovered"]
    saved = AutoModelForCausalLM.from_pretrained(out)
    for name, sparsity in record["sparsity"]["layers"].items():
        weight = saved.get_submodule(name).weight
        assert abs(float((weight == 0).float().mean()) - sparsity) < 1e-6, name


def test_the_finish_is_refused_where_it_cannot_run(tiny_model_dir, text_file, tmp_path, capsys):
    from ebft.cli import main

    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(tmp_path / "x"),
                 "--finish", "kd", "--lazy"]) == 2
    assert "finish" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--out", str(tmp_path / "x"),
                 "--finish", "distill"]) == 2
    assert "finish" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("train", ["weights", "lora"])
def test_the_finish_trains_a_bfloat16_model_on_cpu(tokenizer, text_file, train):
    """fp32 master weights under the model's own bf16 autocast (as EBFT): no dtype clash, masks exact."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer)).to(torch.bfloat16)
    model, masks, record, _ = _run(tokenizer, text_file, _settings(method="lm", train=train, steps=4), model=model)
    assert record["steps"] == 4 and next(model.parameters()).dtype == torch.bfloat16
    for name, mask in masks.items():
        check_weight(model.get_submodule(name).weight.data, mask, name)
