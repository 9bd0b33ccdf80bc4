"""Model loading: local folders, dtypes, unreachable hub ids, missing paths."""
import pytest
import torch

from ebft.errors import EbftError
from ebft.models import load_model, resolve_dtype


def test_local_folder_in_requested_dtype(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.use_cache is False and not model.training
    assert tokenizer("hello").input_ids


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float16", "cpu") == torch.float16


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    from huggingface_hub import constants

    from ebft import hub

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    with pytest.raises(EbftError) as err:
        load_model("some-org/not-a-real-model-xyz")
    msg = str(err.value)
    assert "some-org/not-a-real-model-xyz" in msg and "local folder" in msg and "\n" not in msg


def test_missing_local_path_fails_before_loading(tmp_path):
    with pytest.raises(EbftError, match="no such file"):
        load_model(str(tmp_path / "missing.gguf"))


def test_bfloat16_run_saves_bfloat16(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from ebft.cli import main

    out = tmp_path / "bf16"
    assert main(["run", "--model", str(tiny_model_dir), "--dtype", "bfloat16", "--recover", "none",
                 "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "2", "--out", str(out)]) == 0
    saved = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(saved.parameters()).dtype == torch.bfloat16
    assert (saved.model.layers[0].mlp.up_proj.weight == 0).float().mean().item() == pytest.approx(0.5)
