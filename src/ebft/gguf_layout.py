"""llama.cpp's tensor layout, both ways: the rope permutation of Q and K rows, and a ``deci`` GGUF file (ebft's
compact export of adaptive FLAP: per-layer head counts and MLP widths) read back as the model ebft saves.

**Rope.** llama.cpp's normal rope (``llama``, ``deci``) rotates interleaved pairs of a head's rows (2i, 2i + 1);
transformers rotates halves (i, i + d/2). :func:`rope_interleave` reorders a head's rows one way, and back with
``inverse``.

**deci, read back.** transformers has no ``deci`` model and builds every block from one config, so a ``deci``
file is read as ebft represents a structurally pruned model in a saved folder (:mod:`ebft.structured.saving`):
a Llama whose blocks are zero-padded to the widest block's KV groups and MLP channels, with the bias flags
(``attention_bias``, ``mlp_bias``) the file's biases need and zero biases elsewhere. A zero KV group (zero Q, K,
V rows and output-projection columns) and a zero MLP channel contribute exactly nothing, so the padded model
computes what the file does; ``ebft export`` compacts it again. Each layer's Q/K rows are un-permuted with that
layer's own head count. Files ebft cannot represent so (layers without attention, as some Nemotron-NAS ones,
or with different query heads per KV group) are refused in one line.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from .errors import EbftError

DECI = "deci"
BIAS_TENSORS = {"attention_bias": re.compile(r"^blk\.\d+\.attn_(q|k|v|output)\.bias$"),
           "mlp_bias": re.compile(r"^blk\.\d+\.ffn_(gate|up|down)\.bias$")}


def rope_interleave(w: torch.Tensor, heads: int, inverse: bool = False) -> torch.Tensor:
    """Rows of each head reordered from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1), or
    back (``inverse``). ``w``: Q or K weights (rows, in) or biases (rows,) of ``heads`` heads."""
    d = w.shape[0] // heads
    if inverse:
        return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_architecture(reader) -> str | None:
    field = reader.fields.get("general.architecture")
    return field.contents() if field is not None else None


def _value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _per_layer(reader, key: str, layers: int) -> list[int]:
    value = _value(reader, f"{DECI}.{key}")
    if value is None:
        raise EbftError(f"deci GGUF: {DECI}.{key} is missing")
    return [int(v) for v in value] if isinstance(value, list) else [int(value)] * layers


def deci_sizes(reader, path) -> tuple[list[int], list[int], list[int]]:
    """Per layer: query heads, KV heads, MLP width; refused where ebft's padded Llama cannot hold them."""
    layers = int(_value(reader, f"{DECI}.block_count", 0))
    heads, kv, ffn = (_per_layer(reader, k, layers) for k in
                      ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))
    if any(k == 0 for k in kv):
        raise EbftError(f"GGUF file {path}: a deci layer without attention (as Nemotron-NAS has) is not one ebft "
                        "can read; llama.cpp runs it")
    if len({h / k for h, k in zip(heads, kv)}) != 1 or any(h % k for h, k in zip(heads, kv)):
        raise EbftError(f"GGUF file {path}: its deci layers differ in query heads per KV head ({heads}, {kv}); "
                        "ebft reads deci files whose layers share one")
    return heads, kv, ffn


def deci_config(reader, path):
    """The config of the padded Llama that holds every layer of the ``deci`` file at ``path``."""
    from transformers import LlamaConfig

    heads, kv, ffn = deci_sizes(reader, path)
    group = heads[0] // kv[0]
    hidden = int(_value(reader, f"{DECI}.embedding_length"))
    head_dim = int(_value(reader, f"{DECI}.attention.key_length", hidden // heads[0]))
    names = [t.name for t in reader.tensors]
    vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    settings = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=max(ffn), num_hidden_layers=len(heads),
        head_dim=head_dim, max_position_embeddings=int(_value(reader, f"{DECI}.context_length", 2048)),
        rms_norm_eps=float(_value(reader, f"{DECI}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(_value(reader, f"{DECI}.rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
        **{flag: any(pattern.match(n) for n in names) for flag, pattern in BIAS_TENSORS.items()})
    refused = []
    for groups in range(max(kv), hidden + 1):  # the fewest KV groups (of the file's size) Llama accepts
        try:
            return LlamaConfig(num_attention_heads=groups * group, num_key_value_heads=groups, **settings)
        except Exception as exc:  # the config's own validation (heads must divide the hidden size)
            refused.append(str(exc).strip().splitlines()[-1])
    raise EbftError(f"GGUF file {path}: no Llama config holds its deci layers ({refused[-1] if refused else ''})")


def deci_tensors(reader, model: nn.Module, path) -> dict[str, torch.Tensor]:
    """The file's tensors under the names of ``model`` (a Llama of :func:`deci_config`, on any device),
    dequantised, Q/K rows un-permuted per layer, each zero-padded to the model's shape."""
    import gguf

    heads, kv, _ = deci_sizes(reader, path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DECI, len(heads))
    by_gguf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in expected}
    out = {}
    for tensor in reader.tensors:
        name = by_gguf.get(tensor.name)
        if name is None:
            raise EbftError(f"GGUF file {path}: tensor {tensor.name} has no place in a Llama")
        w = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).to(torch.float32)
        w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        layer = int(tensor.name.split(".")[1]) if tensor.name.startswith("blk.") else None
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            w = rope_interleave(w, heads[layer] if ".attn_q." in tensor.name else kv[layer], inverse=True)
        out[name] = _pad(w, expected[name], name, path)
    return out


def _pad(w: torch.Tensor, shape: tuple, name: str, path) -> torch.Tensor:
    """``w`` in the leading corner of zeros of ``shape``: the units a layer kept come first."""
    if w.dim() != len(shape) or any(a > b for a, b in zip(w.shape, shape)):
        raise EbftError(f"GGUF file {path}: tensor {name} has shape {tuple(w.shape)}, larger than the "
                        f"{shape} its own metadata allows")
    if tuple(w.shape) == shape:
        return w
    full = torch.zeros(shape, dtype=w.dtype)
    full[tuple(slice(0, n) for n in w.shape)] = w
    return full
