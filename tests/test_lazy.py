"""Lazy, block-by-block loading and writing (ebft.blockstore, ebft.weights): same tensors, same outputs, less memory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, lazy_memory_benchmark, make_tiny_model
from ebft.errors import EbftError
from ebft.blockstore import EagerBlocks, LazyBlocks, build_skeleton, load_lazy
from ebft.weights import INDEX_NAME, ShardWriter, WeightFiles, save_names

bench = lazy_memory_benchmark()


def _plain(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _saved_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _save_family(arch, folder, shard="20KB"):
    """A tiny model of ``arch`` saved in several shards (no tokenizer: the stores do not need one)."""
    model = make_tiny_model(arch)
    model.save_pretrained(folder, max_shard_size=shard)
    return model


def _lazy_store(folder, dtype=torch.float32):
    from transformers import AutoConfig

    skeleton = build_skeleton(AutoConfig.from_pretrained(folder), dtype)
    return skeleton, LazyBlocks(skeleton, WeightFiles(folder))


# ----------------------------------------------------------------------------- the skeleton, per family

@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skeleton_and_loaded_blocks_match_eager(arch, dtype, tmp_path):
    """Meta parameters, real buffers equal to an eager load (rotary inv_freq, embed_scale, ...);
    once every unit is read, the same state dict, tying and logits as from_pretrained."""
    _save_family(arch, tmp_path)
    eager = _plain(tmp_path, dtype)
    model, store = _lazy_store(tmp_path, dtype)
    assert all(p.device.type == "meta" for p in model.parameters())
    eager_buffers, lazy_buffers = dict(eager.named_buffers()), dict(model.named_buffers())
    assert eager_buffers.keys() == lazy_buffers.keys()
    for name, b in eager_buffers.items():
        assert lazy_buffers[name].device.type == "cpu", name
        assert lazy_buffers[name].dtype == b.dtype and torch.equal(lazy_buffers[name], b), name

    store.load_outside()
    for i in range(store.num_blocks):
        store.load(i)
    _assert_same_state(eager, model)
    tied = eager.get_output_embeddings().weight is eager.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(eager(ids).logits, model(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "opt", "gpt2"])
def test_writer_saves_what_save_pretrained_saves(arch, tmp_path):
    """Same tensor names (tied heads left out the same way) and bytes; the folder loads plainly."""
    model = _save_family(arch, tmp_path / "in")
    model.save_pretrained(tmp_path / "eager", max_shard_size="20KB")
    skeleton, store = _lazy_store(tmp_path / "in")
    writer = ShardWriter(tmp_path / "lazy", max_shard_size="20KB")
    store.load_outside()
    for i in range(store.num_blocks):
        store.load(i)
        store.release(i, write_to=writer)
    store.release_outside(write_to=writer)
    writer.finish(skeleton)
    eager, lazy = _saved_tensors(tmp_path / "eager"), _saved_tensors(tmp_path / "lazy")
    assert eager.keys() == lazy.keys() == set(save_names(model))
    for k in eager:
        assert eager[k].dtype == lazy[k].dtype and torch.equal(eager[k], lazy[k]), k
    _assert_same_state(_plain(tmp_path / "eager"), _plain(tmp_path / "lazy"))
    index = json.loads((tmp_path / "lazy" / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(lazy)
    assert all((tmp_path / "lazy" / f).exists() for f in index["weight_map"].values())
    config = json.loads((tmp_path / "lazy" / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and config["dtype"] == "float32"


# ----------------------------------------------------------------------------- the wide model: the walk's order

@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A wide random Llama in several shards (blocks straddle shard boundaries) with a tokenizer."""
    folder = tmp_path_factory.mktemp("wide") / "model"
    sizes = bench.make_wide_model(folder, hidden=512, intermediate=2048, layers=8, max_shard_size="30MB")
    weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    files_of_block = [{f for k, f in weight_map.items() if k.startswith(f"model.layers.{i}.")} for i in range(8)]
    assert len(set(weight_map.values())) >= 3 and max(len(f) for f in files_of_block) > 1
    return folder, sizes


def test_lazy_walk_writes_the_eager_result(wide, tmp_path):
    """Each block read before it runs, changed, written and freed after: the same logits as the
    eager model doing the same, and a written folder that plain transformers loads to the same
    state dict (and logits) as the eager model's save_pretrained."""
    folder, _ = wide
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))

    eager = _plain(folder)
    handles = bench.walk_with_hooks(eager, EagerBlocks(eager))
    with torch.no_grad():
        eager_logits = eager(ids, use_cache=False).logits
    for h in handles:
        h.remove()
    eager.save_pretrained(tmp_path / "eager")

    model, tokenizer, store = load_lazy(str(folder), dtype="float32")
    assert store.lazy and all(p.device.type == "meta" for p in store.blocks.parameters())
    store.load_outside()
    writer = ShardWriter(tmp_path / "lazy", max_shard_size="20MB")
    bench.walk_with_hooks(model, store, writer)
    with torch.no_grad():
        lazy_logits = model(ids, use_cache=False).logits
    assert torch.equal(lazy_logits, eager_logits)
    assert all(p.device.type == "meta" for p in store.blocks.parameters())  # every block freed again
    store.release_outside(write_to=writer)
    writer.finish(model)
    tokenizer.save_pretrained(tmp_path / "lazy")

    assert len(list((tmp_path / "lazy").glob("model-*-of-*.safetensors"))) > 1
    reloaded = _plain(tmp_path / "lazy")
    _assert_same_state(reloaded, _plain(tmp_path / "eager"))
    _assert_same_state(reloaded, eager)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, use_cache=False).logits, eager(ids, use_cache=False).logits)


def test_peak_memory_lazy_is_one_block_eager_is_the_model(wide, tmp_path):
    """Each path in a fresh process (imports excluded): lazy stays within about one block plus the
    outside modules, the eager path holds the whole model; their outputs are identical."""
    folder, sizes = wide
    mib = 2 ** 20
    eager = bench.measure("eager", folder, tmp_path / "eager")
    lazy = bench.measure("lazy", folder, tmp_path / "lazy")
    # one block, its transient copy while read or pruned, the outside modules, and fixed costs
    # (tokenizer, skeleton, BLAS workspace) that do not grow with the model
    # (about 20 MiB here; measured growth: lazy 55-70 MiB, eager 130 MiB + 16 MiB per block)
    bound = (2 * sizes["block_bytes"] + sizes["outside_bytes"]) / mib + 64
    assert lazy["growth_mib"] < bound, (lazy, bound)
    assert eager["growth_mib"] > max(bound, sizes["model_bytes"] / mib), (eager, bound)
    assert torch.equal(torch.load(tmp_path / "lazy-logits.pt"), torch.load(tmp_path / "eager-logits.pt"))
    _assert_same_state(_plain(tmp_path / "lazy"), _plain(tmp_path / "eager"))


# ----------------------------------------------------------------------------- reading

def test_release_frees_and_a_reload_reads_the_checkpoint_again(wide):
    folder, _ = wide
    model, _, store = load_lazy(str(folder), dtype="float32")
    block = store.load(1)
    original = block.mlp.down_proj.weight.detach().clone()
    block.mlp.down_proj.weight.data.zero_()
    store.release(1)
    assert all(p.device.type == "meta" for p in block.parameters())
    assert torch.equal(store.load(1).mlp.down_proj.weight, original)
    with pytest.raises(RuntimeError, match="not loaded"):
        store.release(2)


def test_dtype_cast_matches_eager(wide):
    folder, _ = wide
    model, _, store = load_lazy(str(folder), dtype="bfloat16")
    store.load_outside()
    store.load(0)
    eager = _plain(folder, torch.bfloat16)
    for name, p in store.blocks[0].named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, eager.model.layers[0].get_parameter(name)), name
    assert torch.equal(model.lm_head.weight, eager.lm_head.weight)


def test_checkpoint_without_the_base_model_prefix(tmp_path, tokenizer):
    """Hub OPT/GPT-2 checkpoints were saved from the base model: keys lack the ``model.`` prefix."""
    model = make_tiny_model("opt")
    base = {k.removeprefix("model."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(base, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lazy, _, store = load_lazy(str(tmp_path), dtype="float32")
    store.load_outside()
    for i in range(store.num_blocks):
        store.load(i)
    _assert_same_state(lazy, model)
    assert lazy.lm_head.weight is lazy.model.decoder.embed_tokens.weight


def test_missing_weight_fails_before_any_block_is_read(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(EbftError, match=r"lacks 1 weights .*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_lazy(str(tmp_path))


def test_not_safetensors_or_gguf_is_one_clear_line(tmp_path, tokenizer):
    model = make_tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(EbftError, match="needs safetensors weights.*eagerly"):
        load_lazy(str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(EbftError, match="GGUF.*eagerly"):
        load_lazy(str(gguf))


def test_hub_id_fetches_index_first_and_each_shard_when_needed(wide, monkeypatch):
    """No hub here: a stand-in ``hf_hub_download`` serves the wide model's files and records them."""
    import huggingface_hub

    folder, _ = wide
    fetched = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        assert repo_id == "org/wide" and revision == "main"
        fetched.append(filename)
        path = folder / filename
        if not path.exists():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    checkpoint = WeightFiles("org/wide", revision="main")
    assert fetched == [INDEX_NAME]
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    keys = [k for k in index if k.startswith("model.layers.0.")]
    tensors = checkpoint.read(keys)
    assert set(fetched[1:]) == {index[k] for k in keys}  # only block 0's shards
    assert len(set(fetched[1:])) < len(set(index.values()))
    checkpoint.read(keys)
    assert len(fetched) == 1 + len({index[k] for k in keys})  # each shard fetched once
    assert torch.equal(tensors[keys[0]], load_file(folder / index[keys[0]])[keys[0]])


# ----------------------------------------------------------------------------- writing

def test_writer_shards_are_bounded_and_a_killed_writer_resumes(tmp_path):
    tensors = {f"t{i}": torch.full((1024,), float(i)) for i in range(6)}  # 4 KiB each
    writer = ShardWriter(tmp_path, max_shard_size="9KB")
    writer.add({k: tensors[k] for k in ("t0", "t1", "t2")})
    assert len(list(tmp_path.glob("model-part-*.safetensors"))) == 2  # 8 KiB + 4 KiB
    with pytest.raises(ValueError, match="already written"):
        writer.add({"t0": tensors["t0"]})
    (tmp_path / ".model-part-00009.safetensors.tmp").write_bytes(b"half a shard")  # what a kill leaves

    resumed = ShardWriter(tmp_path, max_shard_size="9KB", resume=True)
    assert resumed.written == {"t0", "t1", "t2"} and resumed.total_bytes == 3 * 4096
    resumed.add({k: tensors[k] for k in ("t3", "t4", "t5")})
    assert {k: v for f in sorted(tmp_path.glob("model-part-*")) for k, v in load_file(f).items()}.keys() == tensors.keys()


def test_finish_refuses_an_incomplete_model(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path / "in")
    skeleton, store = _lazy_store(tmp_path / "in")
    writer = ShardWriter(tmp_path / "out")
    store.load(0)
    store.release(0, write_to=writer)
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish(skeleton)


def test_eager_store_has_the_same_interface_and_output(tmp_path):
    model = make_tiny_model("llama", layers=3)
    store = EagerBlocks(model)
    assert not store.lazy and store.num_blocks == 3
    writer = ShardWriter(tmp_path / "out")
    store.load_outside()
    for i in range(store.num_blocks):
        assert store.load(i, "cpu") is model.model.layers[i]
        store.release(i, write_to=writer)
    store.release_outside(write_to=writer)
    writer.finish(model)
    # a shard never spans two releases: 3 blocks + the outside tensors
    assert len(json.loads((tmp_path / "out" / INDEX_NAME).read_text())["weight_map"]) == len(save_names(model))
    assert len(list((tmp_path / "out").glob("model-0000?-of-00004.safetensors"))) == 4
    _assert_same_state(_plain(tmp_path / "out"), model)


def test_one_shard_is_named_like_save_pretrained(tmp_path):
    model = make_tiny_model("llama")
    writer = ShardWriter(tmp_path)
    writer.add(EagerBlocks(model).model.state_dict())
    writer.finish(model)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / INDEX_NAME).exists()
    _assert_same_state(_plain(tmp_path), model)


def test_generation_config_and_tokenizer_survive(wide, tmp_path):
    from transformers import GenerationConfig

    folder, _ = wide
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    GenerationConfig(eos_token_id=[1, 7], temperature=0.3, do_sample=True).save_pretrained(src)
    model, tokenizer, store = load_lazy(str(src), dtype="float32")
    assert model.generation_config.eos_token_id == [1, 7] and tokenizer.eos_token == "<eos>"
    writer = ShardWriter(tmp_path / "out")
    store.load_outside()
    for i in range(store.num_blocks):
        store.load(i)
        store.release(i, write_to=writer)
    store.release_outside(write_to=writer)
    writer.finish(model)
    assert GenerationConfig.from_pretrained(tmp_path / "out").temperature == 0.3


def test_unreachable_hub_id_is_one_clear_line(monkeypatch):
    from huggingface_hub import constants

    from ebft import hub

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    with pytest.raises(EbftError) as err:
        load_lazy("some-org/not-a-real-model-xyz")
    assert "some-org/not-a-real-model-xyz" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_blocks_load_onto_the_gpu_and_write_from_it(wide, tmp_path):
    folder, _ = wide
    model, _, store = load_lazy(str(folder), dtype="bfloat16", device="cuda")
    store.load_outside()
    writer = ShardWriter(tmp_path / "out")
    for i in range(store.num_blocks):
        block = store.load(i, "cuda")
        assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in block.parameters())
        store.release(i, write_to=writer)
        assert torch.cuda.memory_allocated() < 2 * sum(p.numel() * 2 for p in block.parameters()) + 2**24
    store.release_outside(write_to=writer)
    writer.finish(model)
    _assert_same_state(_plain(tmp_path / "out", torch.bfloat16), _plain(folder, torch.bfloat16))
