"""A model whose files disagree with themselves is refused before any work, in one line that names the file
and what disagrees: config.json against the weights (shapes, tensors missing, tensors with no place), the
tokenizer against the embedding, weights holding NaN, a run's record naming a model file that is not a GGUF.
Eager and lazy loads alike; transformers' own load report never reaches the terminal. And what a GGUF export
cannot write is refused before the model loads."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import tiny_run_folder
from ebft.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("files"), 2)


def _variant(tiny, tmp_path, config=None, weights=None):
    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    if config:
        data = json.loads((folder / "config.json").read_text())
        config(data)
        (folder / "config.json").write_text(json.dumps(data))
    if weights:
        tensors = load_file(folder / "model.safetensors")
        weights(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _shrink_vocab(t):
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        t[k] = t[k][:-20].clone()


CASES = {
    "shape": (lambda c: c.update(intermediate_size=c["intermediate_size"] * 2), None,
              "its config.json and its weights disagree: model.layers.0.mlp.down_proj.weight is [64, 128] in the "
              "weights but [64, 256]"),
    "missing": (None, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"),
                "the weights have no model.layers.1.self_attn.q_proj.weight"),
    "fewer layers": (lambda c: c.update(num_hidden_layers=1), None, "which the config has no place for"),
    "more layers": (lambda c: c.update(num_hidden_layers=3), None, "the weights have no model.layers.2."),
    "vocabulary": (lambda c: c.update(vocab_size=c["vocab_size"] - 20), _shrink_vocab,
                   "its tokenizer has 320 tokens but its embedding only 300 rows"),
    "nan": (None, lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), float("nan")),
            "weight model.layers.0.mlp.up_proj.weight holds NaN"),
}
LAZY = {"fewer layers", "vocabulary", "nan", "missing"}


@pytest.mark.parametrize("case", list(CASES))
def test_files_that_disagree_are_one_line(tiny, tmp_path, capsys, case):
    config, weights, needle = CASES[case]
    folder = _variant(tiny, tmp_path, config, weights)
    assert main(["eval", "--model", str(folder), "--eval", str(tiny / "text.txt"), "--eval-seqlen", "32",
                 "--eval-windows", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and str(folder) in err, err
    assert "LOAD REPORT" not in err and "Traceback" not in err


@pytest.mark.parametrize("case", sorted(LAZY))
def test_lazy_loads_refuse_them_too_and_write_nothing(tiny, tmp_path, capsys, case):
    config, weights, needle = CASES[case]
    folder = _variant(tiny, tmp_path, config, weights)
    out = tmp_path / "out"
    assert main(["run", "--model", str(folder), "--calib", str(tiny / "text.txt"), "--eval", str(tiny / "text.txt"),
                 "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "16", "--recover", "none", "--lazy",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ebft: error:") and ("NaN" in err[-1] if case == "nan" else "lacks" in err[-1] or
                                                   "disagree" in err[-1] or "tokenizer has" in err[-1]), err
    assert not out.exists() and not (tmp_path / ".out.ckpt").exists()


def test_a_run_record_naming_a_file_that_is_not_a_gguf(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny / "model", run)
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    (run / "run.json").write_text(json.dumps({"config": {"model": str(fake)}}))
    assert main(["export", str(run), "--out", str(tmp_path / "o.gguf"), "--type", "f32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run / "run.json") in err and str(fake) in err and "not a GGUF" in err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("family,edit,needle", [
    ("opt", None, "the opt family is not one ebft writes"),
    ("llama", lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope scaling 'dynamic'"),
])
def test_what_an_export_cannot_write_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, family, edit,
                                                                      needle):
    root = tiny_run_folder(tmp_path / "m", 2, family)
    if edit:
        data = json.loads((root / "model" / "config.json").read_text())
        edit(data)
        (root / "model" / "config.json").write_text(json.dumps(data))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("ebft.pipeline.load_model", no_load)
    monkeypatch.setattr("ebft.export.load_model", no_load)
    base = ["--calib", str(root / "text.txt"), "--eval", str(root / "text.txt"), "--nsamples", "2", "--seqlen", "16",
            "--eval-seqlen", "16", "--recover", "none"]
    assert main(["run", "--model", str(root / "model"), *base, "--export", "gguf", "--out", str(tmp_path / "o")]) == 2
    assert needle in capsys.readouterr().err
    assert main(["export", str(root / "model"), "--out", str(tmp_path / "o.gguf")]) == 2
    assert needle in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_token_with_no_row_in_the_embedding_is_one_line(tiny, tmp_path, capsys):
    """transformers adds <|endoftext|> to the tokenizer of a GGUF whose vocabulary lacks it, one id past the
    embedding: the model loads (with a warning), and a text that holds the token is refused in one line
    instead of an index error in the middle of the work."""
    from conftest import build_tokenizer, make_tiny_model
    from ebft.export import write_gguf

    tok = build_tokenizer()
    write_gguf(make_tiny_model("llama", vocab_size=len(tok)), tok, tmp_path / "m.gguf", "f32")
    text = (tiny / "text.txt").read_text()
    (tmp_path / "eot.txt").write_text("<|endoftext|> " + text[:4000])
    assert main(["eval", "--model", str(tmp_path / "m.gguf"), "--eval", str(tmp_path / "eot.txt"),
                 "--eval-seqlen", "32", "--eval-windows", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("ebft: error: the eot.txt text holds the token '<|endoftext|>'"), err
    assert main(["eval", "--model", str(tmp_path / "m.gguf"), "--eval", str(tiny / "text.txt"),
                 "--eval-seqlen", "32", "--eval-windows", "1"]) == 0
