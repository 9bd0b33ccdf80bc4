"""GGUF export (ebft.export): every supported family written and read back (gguf-py's reader, transformers'
GGUF loader), FLAP's padded models compacted exactly into llama.cpp's `deci` with per-layer sizes, refusals
in one line; and, where llama-cpp-python is installed, the files run through llama.cpp with the same logits
as the transformers model (f32 KV cache: max |Δlogit| ≤ 1e-3, identical top-1)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

from torch import nn

from conftest import TEXT, build_tokenizer, make_tiny_model, smollm2_gguf, tiny_run_folder
from ebft.cli import main
from ebft.export import Origin, export, write_gguf
from ebft.export.compact import compact_, layer_sizes
from ebft.export import vocab
from ebft.export.gguf import llama_cpp_available, model_chain, source_gguf_of
from ebft.gguf_layout import rope_interleave
from ebft.models import find_blocks
from ebft.structured import ATTENTION, MLP, block_layout, make_saveable_, resize_units_

TOKENS = 40


def _qwen3(vocab: int):
    torch.manual_seed(0)
    cfg = tf.Qwen3Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=256)
    model = tf.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model


def _model(arch: str, tok):
    return _qwen3(len(tok)) if arch == "qwen3" else make_tiny_model(arch, vocab_size=len(tok))


# what FLAP leaves of each of 2 blocks (KV groups of 2, MLP channels of 128): dense, uniform, adaptive with one
# block keeping every head, adaptive with no block keeping every head
PRUNED = {"dense": ((2, 2), (128, 128)), "uniform": ((1, 1), (64, 64)), "adaptive": ((2, 1), (96, 40)),
          "no-full-layer": ((1, 1), (96, 40))}
# the architecture each family's pruned model is written as
WRITTEN_AS = {"llama": {"dense": "llama", "uniform": "llama", "adaptive": "deci", "no-full-layer": "deci"},
              "mistral": {"dense": "llama", "uniform": "llama", "adaptive": "deci", "no-full-layer": "deci"},
              "qwen2": {"dense": "qwen2", "uniform": "llama", "adaptive": "deci", "no-full-layer": "deci"},
              "qwen3": dict.fromkeys(PRUNED, "qwen3")}


def _pruned_folder(arch: str, structure: str, tok, folder: Path) -> Path:
    """A tiny model of ``arch`` with FLAP's cuts (:data:`PRUNED`), saved as ebft saves it (padded to one block
    shape): Llama with compensation biases on o_proj and down_proj, Qwen2 with its Q/K/V biases, all nonzero."""
    model = _model(arch, tok)
    kv, ffn = PRUNED[structure]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, block in enumerate(find_blocks(model)[1]):
            resize_units_(block, block_layout(block, model.config), ATTENTION, list(range(2 - kv[i], 2)))
            resize_units_(block, block_layout(block, model.config), MLP, list(range(128 - ffn[i], 128)))
            for name, linear in block.named_modules():
                compensated = arch == "llama" and name.endswith(("o_proj", "down_proj")) and structure != "dense"
                if isinstance(linear, nn.Linear) and (linear.bias is not None or compensated):
                    linear.bias = nn.Parameter(torch.randn(linear.weight.shape[0], generator=g))
    make_saveable_(model)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(ids).logits[0].float().numpy()


def _fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.merges")}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def flap_runs(tmp_path_factory):
    """Saved ebft runs of a 4-block tiny Llama: FLAP adaptive (padded, with compensation biases, layers that
    keep one KV group) and uniform."""
    root = tiny_run_folder(tmp_path_factory.mktemp("flap"), 4)
    runs = {}
    for structure in ("adaptive", "uniform"):
        out = root / structure
        assert main(["run", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--nsamples", "8",
                     "--seqlen", "32", "--eval", str(root / "text.txt"), "--eval-seqlen", "32", "--eval-windows", "2",
                     "--method", "flap", "--sparsity", "0.5", "--flap-structure", structure, "--recover", "none",
                     "--no-speed", "--out", str(out)]) == 0
        runs[structure] = out
    return runs


# ----------------------------------------------------------------------------- written and read back

@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2"),
                                            ("qwen3", "qwen3")])
def test_each_family_reads_back_through_transformers_unchanged(tmp_path, tok, arch, gguf_arch):
    model = _model(arch, tok)
    ids = _ids(len(tok))
    expected = _logits(model, ids)
    report = write_gguf(copy.deepcopy(model), tok, tmp_path / "m.gguf", "f32")
    reader, fields = _fields(tmp_path / "m.gguf")
    assert report.architecture == gguf_arch == fields["general.architecture"] and not report.compacted
    assert fields[f"{gguf_arch}.attention.head_count"] == 4 and fields[f"{gguf_arch}.attention.head_count_kv"] == 2
    assert fields[f"{gguf_arch}.attention.key_length"] == 16 == fields[f"{gguf_arch}.rope.dimension_count"]
    assert len(fields["tokenizer.ggml.tokens"]) == len(tok) and fields["tokenizer.ggml.model"] == "gpt2"
    if arch == "qwen3":  # transformers' qwen3 GGUF loader takes head_dim from its default (128), not the file
        return
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert np.abs(_logits(back, ids) - expected).max() < 1e-4  # transformers undoes the rope permutation


def test_rope_interleave_pairs_each_half_with_its_partner():
    w = torch.arange(8.0)[:, None]  # one head of 8 rows: pairs (0,4) (1,5) (2,6) (3,7) become (0,1) (2,3) ...
    assert rope_interleave(w, 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = torch.arange(16.0)[:, None]
    assert rope_interleave(two, 2).flatten().tolist()[8:] == [8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(rope_interleave(rope_interleave(two, 2), 2, inverse=True), two)


def test_a_padded_flap_model_is_compacted_exactly(flap_runs):
    model = tf.AutoModelForCausalLM.from_pretrained(flap_runs["adaptive"]).eval()
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    padded = sum(p.numel() for p in model.parameters())
    sizes = compact_(model)
    record = json.loads((flap_runs["adaptive"] / "run.json").read_text())
    kept = [(b["kv_groups_kept"], b["channels_kept"]) for b in record["plan"]["blocks"]]
    assert [(s.kv_heads, s.ffn) for s in sizes] == kept  # found from the zeros alone: the run's own choice
    assert len(set(sizes)) > 1 and min(s.kv_heads for s in sizes) == 1
    assert sum(p.numel() for p in model.parameters()) < padded
    assert np.abs(_logits(model, ids) - before).max() < 1e-5  # the compacted model computes the same


@pytest.mark.parametrize("kind,multiple", [("f16", 1), ("q8_0", 32)])
def test_adaptive_flap_is_written_as_deci_with_per_layer_sizes(flap_runs, tmp_path, kind, multiple):
    path = tmp_path / f"m-{kind}.gguf"
    report = export(str(flap_runs["adaptive"]), path, kind=kind)
    reader, fields = _fields(path)
    assert report.architecture == "deci" == fields["general.architecture"] and report.compacted
    record = json.loads((flap_runs["adaptive"] / "run.json").read_text())
    kept = [(b["kv_groups_kept"], -(-b["channels_kept"] // multiple) * multiple) for b in record["plan"]["blocks"]]
    assert list(zip(fields["deci.attention.head_count_kv"], fields["deci.feed_forward_length"])) == kept
    assert list(fields["deci.attention.head_count"]) == [2 * kv for kv, _ in kept]  # 2 query heads per KV group
    tensors = {t.name: t for t in reader.tensors}
    for i, (kv, ffn) in enumerate(kept):
        assert tuple(tensors[f"blk.{i}.attn_k.weight"].shape) == (64, 16 * kv)
        assert tuple(tensors[f"blk.{i}.ffn_down.weight"].shape) == (ffn, 64)
        if kv < 2:  # the block lost a KV group: its mean contribution went to the output projection's bias
            assert f"blk.{i}.attn_output.bias" in tensors
        assert f"blk.{i}.ffn_down.bias" in tensors  # every block lost MLP channels
        assert f"blk.{i}.attn_q.bias" not in tensors  # zero biases are left out
    (tmp_path / "again").mkdir()
    again = export(str(flap_runs["adaptive"]), tmp_path / "again" / path.name, kind=kind)
    assert again.bytes == report.bytes


def test_uniform_flap_stays_its_familys_architecture(flap_runs, tmp_path):
    report = export(str(flap_runs["uniform"]), tmp_path / "u.gguf", kind="f32")
    _, fields = _fields(tmp_path / "u.gguf")
    assert report.architecture == "llama" and not report.compacted
    saved = json.loads((flap_runs["uniform"] / "config.json").read_text())
    assert fields["llama.feed_forward_length"] == saved["intermediate_size"]


def test_the_builtin_models_tokenizer_is_carried_over(tmp_path):
    source = smollm2_gguf()
    if source is None:
        pytest.skip("SmolLM2 GGUF not available offline")
    from gguf import GGUFReader

    model = make_tiny_model("llama", vocab_size=49152)
    write_gguf(model, None, tmp_path / "m.gguf", "f16", Origin(gguf=source))
    new, old = GGUFReader(tmp_path / "m.gguf").fields, GGUFReader(source).fields
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.chat_template"):
        assert new[key].contents() == old[key].contents()
    assert len(new["tokenizer.ggml.merges"].contents()) == len(old["tokenizer.ggml.merges"].contents())


def test_ebft_run_exports_into_its_output(tmp_path):
    root = tiny_run_folder(tmp_path, 2)
    out = tmp_path / "out"
    assert main(["run", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--nsamples", "4",
                 "--seqlen", "32", "--eval", str(root / "text.txt"), "--eval-seqlen", "32", "--eval-windows", "2",
                 "--recover", "none", "--export", "gguf", "--export-type", "q8_0", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["export"]["file"] == "model-q8_0.gguf" and (out / "model-q8_0.gguf").stat().st_size > 0
    assert "model-q8_0.gguf" in json.loads((out / ".ebft-output").read_text())["files"]
    _, fields = _fields(out / "model-q8_0.gguf")
    assert fields["general.name"] == "out" and fields["general.basename"] == "model"  # not the temporary folder's
    assert fields["general.quantization_version"] == 2
    # the file is made from the folder as saved: run.json says in which dtype (its figures are the run's own)
    assert record["resolved"]["save_dtype"] == "float32" and record["export"]["from_dtype"] == "float32"


def test_a_run_of_a_gguf_records_the_dtype_it_saved_and_exported(tmp_path, tok):
    """A GGUF source is saved in bfloat16 by default: run.json says so, since its float32 perplexities then
    differ from the saved folder's (and the exported file's) by that rounding."""
    write_gguf(make_tiny_model("llama", vocab_size=len(tok)), tok, tmp_path / "m.gguf", "f32")
    root = tiny_run_folder(tmp_path / "t", 2)
    out = tmp_path / "out"
    assert main(["run", "--model", str(tmp_path / "m.gguf"), "--calib", str(root / "text.txt"), "--nsamples", "4",
                 "--seqlen", "32", "--eval", str(root / "text.txt"), "--eval-seqlen", "32", "--eval-windows", "2",
                 "--recover", "none", "--export", "gguf", "--export-type", "f32", "--out", str(out)]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["resolved"]["save_dtype"] == "bfloat16" and record["export"]["from_dtype"] == "bfloat16"


def test_general_metadata_is_what_llama_cpps_converter_writes(tmp_path, tok):
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlanguage: en\nlicense: apache-2.0\n---\n# a tiny model\n")
    report = export(str(folder), tmp_path / "small.gguf", kind="f16")
    _, fields = _fields(tmp_path / "small.gguf")
    assert fields["general.type"] == "model" and fields["general.name"] == "small"
    assert fields["general.basename"] == "tiny-llama" and fields["general.license"] == "apache-2.0"
    assert fields["general.size_label"] == f"{report.params / 1e3:.0f}K" and 1e4 < report.params < 1e6
    assert "general.quantization_version" not in fields  # not quantized
    export(str(folder), tmp_path / "q.gguf", kind="q8_0")
    assert _fields(tmp_path / "q.gguf")[1]["general.quantization_version"] == 2


def test_a_run_of_a_relative_gguf_path_carries_its_tokenizer_from_any_folder(tmp_path, tok, monkeypatch):
    """run.json records --model as given (models/m.gguf) and the folder the run was made in: an export from
    elsewhere still finds the source GGUF, copies its tokenizer and licence (nothing rebuilt)."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "models").mkdir(parents=True)
    elsewhere.mkdir()
    source = work / "models" / "m.gguf"
    write_gguf(make_tiny_model("llama", vocab_size=len(tok)), tok, source, "f32",
               Origin(basename="tiny", license="mit"))
    (work / "text.txt").write_text(TEXT)
    monkeypatch.chdir(work)
    assert main(["run", "--model", "models/m.gguf", "--calib", "text.txt", "--nsamples", "4", "--seqlen", "32",
                 "--eval", "text.txt", "--eval-seqlen", "32", "--eval-windows", "2", "--recover", "none",
                 "--out", "runs/r"]) == 0
    monkeypatch.chdir(elsewhere)
    assert source_gguf_of(str(work / "runs" / "r")) == source.resolve()
    copied, real = [], vocab._copy_tokenizer
    monkeypatch.setattr(vocab, "_copy_tokenizer", lambda writer, reader: copied.append(1) or real(writer, reader))
    export(str(work / "runs" / "r"), elsewhere / "r.gguf", kind="f32")
    _, fields = _fields(elsewhere / "r.gguf")
    assert copied and fields["general.license"] == "mit" and fields["general.basename"] == "tiny"
    assert fields["general.name"] == "r"


def test_a_relative_model_path_without_a_recorded_folder_is_found_beside_the_run(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (tmp_path / "runs" / "m.gguf").write_bytes(b"GGUF")
    (run / "run.json").write_text(json.dumps({"config": {"model": "../m.gguf"}}))  # recorded before cwd was
    monkeypatch.chdir(tmp_path)
    assert model_chain("runs/r") == ["runs/r", str((tmp_path / "runs" / "m.gguf").resolve())]
    (run / "run.json").write_text(json.dumps({"config": {"model": "org/model"}}))  # a hub id stays as it is
    assert model_chain("runs/r") == ["runs/r", "org/model"]


# ----------------------------------------------------------------------------- refused in one line

def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_refusals_are_one_line_and_write_nothing(tmp_path, tok, capsys, monkeypatch):
    folder = tmp_path / "opt"
    make_tiny_model("opt", vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert "the opt family is not one ebft writes" in _refused(capsys, ["export", str(folder), "--out",
                                                                        str(tmp_path / "o.gguf")])
    llama = tmp_path / "llama"
    make_tiny_model("llama", vocab_size=len(tok)).save_pretrained(llama)
    tok.save_pretrained(llama)
    assert "must name a .gguf file" in _refused(capsys, ["export", str(llama), "--out", str(tmp_path / "o.bin")])
    assert "does not exist" in _refused(capsys, ["export", str(llama), "--out", str(tmp_path / "no" / "o.gguf")])
    assert "--type" in _refused(capsys, ["export", str(llama), "--type", "q9", "--out", str(tmp_path / "o.gguf")])
    assert "--format" in _refused(capsys, ["export", str(llama), "--format", "compressed-tensors",
                                           "--out", str(tmp_path / "o.gguf")])
    mine = tmp_path / "mine.gguf"
    mine.write_text("my notes")
    assert "not a GGUF file" in _refused(capsys, ["export", str(llama), "--out", str(mine), "--overwrite"])
    assert mine.read_text() == "my notes"
    import ebft.export.gguf as gguf_module

    monkeypatch.setattr(gguf_module, "llama_cpp_available", lambda: False)
    assert "llama-cpp-python" in _refused(capsys, ["export", str(llama), "--type", "q4_k_m",
                                                   "--out", str(tmp_path / "o.gguf")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "mine.gguf", "opt"]
    assert main(["export", str(llama), "--out", str(tmp_path / "o.gguf")]) == 0
    assert main(["export", str(llama), "--out", str(tmp_path / "o.gguf"), "--overwrite"]) == 0
    capsys.readouterr()
    assert "--export-type" in _refused(capsys, ["run", "--model", str(llama), "--export-type", "q8_0",
                                                "--out", str(tmp_path / "r")])


# ----------------------------------------------------------------------------- through llama.cpp

needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed "
                                     "(pip install 'ebft[gguf]'; a prebuilt wheel: ../shared/wheels)")


def llama_cpp_logits(path, ids) -> np.ndarray:
    import llama_cpp

    model = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64, type_k=0, type_v=0)  # f32 cache
    try:
        model.eval(ids[0].tolist())
        return np.array(model.scores[: ids.shape[1]])
    finally:
        model.close()


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_llama_cpp_computes_what_transformers_computes(tmp_path, tok, arch):
    model = _model(arch, tok)
    ids = _ids(len(tok))
    expected = _logits(model, ids)
    write_gguf(copy.deepcopy(model), tok, tmp_path / "m.gguf", "f32")
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - expected).max() <= 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@needs_llama_cpp
@pytest.mark.parametrize("structure", ["adaptive", "uniform"])
def test_llama_cpp_runs_flap_models_exactly(flap_runs, tmp_path, structure):
    """Adaptive: compacted `deci` with compensation biases and layers down to one KV group."""
    model = tf.AutoModelForCausalLM.from_pretrained(flap_runs[structure]).eval()
    ids = _ids(model.config.vocab_size)
    expected = _logits(model, ids)
    export(str(flap_runs[structure]), tmp_path / "m.gguf", kind="f32")
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - expected).max() <= 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@needs_llama_cpp
@pytest.mark.parametrize("structure", sorted(PRUNED))
@pytest.mark.parametrize("arch", sorted(WRITTEN_AS))
def test_each_family_pruned_is_written_as_an_architecture_llama_cpp_reads(tmp_path, tok, arch, structure):
    folder = _pruned_folder(arch, structure, tok, tmp_path / "model")
    report = export(str(folder), tmp_path / "m.gguf", kind="f32")
    reader, fields = _fields(tmp_path / "m.gguf")
    written = WRITTEN_AS[arch][structure]
    assert report.architecture == written == fields["general.architecture"]
    kv, ffn = PRUNED[structure]
    if written == "deci":
        assert list(fields["deci.attention.head_count_kv"]) == list(kv)
        assert list(fields["deci.feed_forward_length"]) == list(ffn)
    tensors = {t.name: t for t in reader.tensors}
    for i in range(2):
        heads = 2 * (kv[i] if written == "deci" else max(kv))  # 2 query heads per KV group, of 16
        assert tuple(tensors[f"blk.{i}.attn_q.weight"].shape) == (64, 16 * heads)
        assert (f"blk.{i}.attn_q.bias" in tensors) is (arch == "qwen2")


@pytest.mark.parametrize("structure", sorted(PRUNED))
@pytest.mark.parametrize("arch", sorted(WRITTEN_AS))
def test_ebft_reads_each_family_pruned_back_exactly(tmp_path, tok, arch, structure):
    """Qwen2 written as llama keeps its Q/K/V biases, Qwen3 its head size, deci its per-layer sizes."""
    from ebft.models import load_model

    folder = _pruned_folder(arch, structure, tok, tmp_path / "model")
    export(str(folder), tmp_path / "m.gguf", kind="f32")
    ids = _ids(len(tok))
    back, _ = load_model(str(tmp_path / "m.gguf"), "float32")
    assert np.abs(_logits(back, ids) - _logits(load_model(str(folder), "float32")[0], ids)).max() < 1e-5


@needs_llama_cpp
@pytest.mark.parametrize("structure", sorted(PRUNED))
@pytest.mark.parametrize("arch", sorted(WRITTEN_AS))
def test_llama_cpp_runs_each_family_pruned_exactly(tmp_path, tok, arch, structure):
    folder = _pruned_folder(arch, structure, tok, tmp_path / "model")
    model = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _ids(len(tok))
    expected = _logits(model, ids)
    export(str(folder), tmp_path / "m.gguf", kind="f32")
    got = llama_cpp_logits(tmp_path / "m.gguf", ids)
    assert np.abs(got - expected).max() <= 1e-3
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@needs_llama_cpp
def test_k_quants_are_made_by_llama_cpp_and_run(flap_runs, tmp_path):
    report = export(str(flap_runs["adaptive"]), tmp_path / "q4.gguf", kind="q4_k_m")
    f16 = export(str(flap_runs["adaptive"]), tmp_path / "f16.gguf", kind="f16")
    assert report.architecture == "deci" and report.bytes < f16.bytes
    assert all(layer["ffn"] % 32 == 0 for layer in report.layers)
    assert _fields(tmp_path / "q4.gguf")[1]["general.quantization_version"] == 2
    model = tf.AutoModelForCausalLM.from_pretrained(flap_runs["adaptive"]).eval()
    ids = _ids(model.config.vocab_size)
    got = llama_cpp_logits(tmp_path / "q4.gguf", ids)
    assert np.isfinite(got).all() and (got.argmax(-1) == _logits(model, ids).argmax(-1)).mean() > 0.5


@pytest.mark.integration
@needs_llama_cpp
def test_smollm2_through_llama_cpp(tmp_path, all_cores):
    source = smollm2_gguf()
    if source is None:
        pytest.skip("SmolLM2 GGUF not available offline")
    from ebft.models import load_model

    model, _ = load_model("builtin:smollm2", "float32")
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 1345, 30, 378, 12463, 6213, 441, 253, 2115, 282, 2060]])
    expected = _logits(model, ids)
    export("builtin:smollm2", tmp_path / "s.gguf", kind="f32")
    got = llama_cpp_logits(tmp_path / "s.gguf", ids)
    assert np.abs(got - expected).max() <= 1e-2 and (got.argmax(-1) == expected.argmax(-1)).all()
