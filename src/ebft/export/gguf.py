"""GGUF for llama.cpp (and ollama, LM Studio ...): a pruned model written so that it is smaller and runs.

**Which architecture.** A model whose blocks all have one shape is written as its family's own
architecture (``llama`` for Llama, SmolLM2 and Mistral; ``qwen2``, ``qwen3``). A structurally pruned model
whose blocks differ (FLAP adaptive) is first compacted (:mod:`.compact`: the all-zero KV groups and MLP
channels of ebft's padded save removed, exactly) and written as llama.cpp's ``deci`` architecture — the
one Nemotron-NAS models use — which reads per-layer arrays ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` and takes the optional
``attn_output.bias`` / ``ffn_down.bias`` where FLAP's bias compensation goes. ``deci`` is Llama's block,
so only Llama-like families (``llama``, ``mistral``) are written that way; a non-uniform Qwen model has
no such architecture in llama.cpp and is written padded (exact, not smaller), with a warning.

**Exact, and what llama.cpp needs to read it right.** Q and K rows are permuted per head from
transformers' rotate-half layout to the interleaved layout of llama.cpp's normal rope (``llama`` and
``deci``; Qwen runs NeoX rope, unpermuted), after the kept heads are chosen. ``key_length``,
``value_length`` and ``rope.dimension_count`` are written (a file whose layer 0 lost heads would otherwise
derive a wrong rope dimension). Biases that are all zero are left out (llama.cpp treats a missing bias as
zero). Norms and biases stay fp32, as llama.cpp's own converter writes them.

**Types.** ``f32``, ``f16``, ``bf16``, ``q8_0`` are written here (with the ``gguf`` package); k-quants
(``q4_k_m``, ``q5_k_m``, ``q6_k`` ...) are made from an f32 file by llama.cpp's own quantizer when
llama-cpp-python is installed (``pip install 'ebft[gguf]'``). Quantized types quantize rows in blocks of
32, so MLP widths are padded with zero channels to a multiple of 32 (exact).

**Tokenizer.** Carried over from the source GGUF when the model came from one (the built-in SmolLM2, a
``.gguf`` file, or a run of either), else built from the Hugging Face tokenizer (byte-level BPE
``gpt2`` tokenizers and Llama's byte-fallback BPE, with merges, special tokens and chat template).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import clean_dead, write_atomic
from ..errors import EbftError
from ..models import BUILTIN_MODELS, builtin_model_path, find_blocks
from .compact import LayerSize, compact_, compacted_sizes, uniform

log = logging.getLogger(__name__)

# family -> (gguf architecture name, rope layout permuted for llama.cpp's normal rope, per-layer arch or None)
FAMILIES = {"llama": ("llama", True, "deci"), "mistral": ("llama", True, "deci"),
            "qwen2": ("qwen2", False, None), "qwen3": ("qwen3", False, None)}
PLAIN_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
TYPES = PLAIN_TYPES + K_QUANTS
QUANT_BLOCK = 32
GGUF_MAGIC = b"GGUF"
# what an export killed mid-way leaves beside its file: ``.<name>.gguf.tmp-<pid>`` and the k-quant
# scratch folder ``.ebft-gguf-<pid>-<random>``
LEFTOVERS = r"\.(?:.+\.gguf\.tmp|ebft-gguf)-(\d+)(?:-.+)?"


@dataclass
class GgufReport:
    """What was written: for the run record and the table ``ebft export`` prints."""

    path: str
    architecture: str
    type: str
    bytes: int
    layers: list[dict] = field(default_factory=list)  # per layer: heads, kv_heads, ffn
    compacted: bool = False
    params: int = 0
    notes: list[str] = field(default_factory=list)


def check_type(kind: str) -> None:
    if kind not in TYPES:
        raise EbftError(f"--type: got {kind!r}; allowed: {', '.join(TYPES)}")
    if kind in K_QUANTS and not llama_cpp_available():
        raise EbftError(f"--type {kind}: k-quants are made by llama.cpp's quantizer; install llama-cpp-python "
                        "(pip install 'ebft[gguf]'), or write f16 / q8_0")


@functools.cache
def llama_cpp_available() -> bool:
    """Whether llama-cpp-python is installed and loads on this CPU. Tried in a child process first: a wheel
    built for another CPU dies of an illegal instruction on import, which would take this process with it."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    try:
        probe = subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if probe.returncode != 0:
        log.warning("llama-cpp-python is installed but does not load here (exit status %d): k-quants unavailable",
                    probe.returncode)
    return probe.returncode == 0


def check_family(config) -> tuple[str, bool, str | None]:
    """The family's GGUF architecture, or one line saying why this model cannot be written."""
    family = getattr(config, "model_type", type(config).__name__)
    if family not in FAMILIES:
        raise EbftError(f"gguf: the {family} family is not one ebft writes for llama.cpp (it writes "
                        f"{', '.join(sorted(FAMILIES))}); save it with ebft and convert it with llama.cpp's own "
                        "convert_hf_to_gguf.py if llama.cpp supports it")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise EbftError(f"gguf: rope scaling {rope.get('rope_type')!r} is not written by ebft's GGUF export yet; "
                        "use llama.cpp's convert_hf_to_gguf.py on the saved model")
    return FAMILIES[family]


def sliding_window(config) -> int | None:
    """The sliding window the model really uses (Mistral's, Qwen's sliding layers), or None."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window >= int(getattr(config, "max_position_embeddings", 0) or 0):
        return None
    types = getattr(config, "layer_types", None)
    if getattr(config, "use_sliding_window", True) is False and not (types and "sliding_attention" in types):
        return None
    return window


def replace_problem(path: Path, inputs=()) -> str | None:
    """Why the existing ``path`` may not be replaced by an export (None: it may): only a GGUF file that
    is not one of the export's ``inputs`` (the model, the GGUF its tokenizer comes from) is replaced."""
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    for given in inputs:
        if given and os.path.exists(os.path.expanduser(str(given))) and \
                os.path.realpath(os.path.expanduser(str(given))) == os.path.realpath(path):
            return "it is the model being exported (or the GGUF its tokenizer comes from); write elsewhere"
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                return "it is not a GGUF file; ebft replaces only GGUF files"
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    return None


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, kind: str = "f16",
               source_gguf: str | os.PathLike | None = None, overwrite: bool = False) -> GgufReport:
    """Write ``model`` (changed in place: compacted, padded) and its tokenizer as a GGUF file at ``path``
    (atomically). ``source_gguf``: a GGUF file whose tokenizer metadata is carried over. A file at
    ``path`` (there before, or appearing while the file is written) is replaced only with ``overwrite``
    and only if it is a GGUF file other than ``source_gguf`` (:func:`replace_problem`), else
    :class:`EbftError`. What killed exports left in the folder is removed first."""
    check_type(kind)
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    if os.path.lexists(path):
        problem = replace_problem(path, [source_gguf]) if overwrite else "it exists (pass overwrite=True)"
        if problem is not None:
            raise EbftError(f"gguf: not replacing {path}: {problem}")
    clean_dead(path.parent, LEFTOVERS)
    arch, permute, per_layer_arch = check_family(model.config)
    multiple = 1 if kind in ("f32", "f16", "bf16") else QUANT_BLOCK
    sizes, notes = compacted_sizes(model, multiple), []
    window = sliding_window(model.config)
    if window is not None:
        notes.append(f"{arch}: llama.cpp has no sliding window for this architecture: the file computes exactly "
                     f"what the model does on up to {window} tokens, full attention beyond")
        log.warning(notes[-1])
    compacted = not uniform(sizes) and per_layer_arch is not None
    if not uniform(sizes) and per_layer_arch is None:
        notes.append(f"{arch}: llama.cpp reads no per-layer head counts or MLP widths for this family: written "
                     "padded to one block shape (exact, not smaller)")
        log.warning(notes[-1])
    sizes = compact_(model, multiple, drop=uniform(sizes) or compacted)
    if compacted:
        arch = per_layer_arch
    plain = kind if kind in PLAIN_TYPES else "f32"  # k-quants: llama.cpp quantizes an f32 file

    def write(tmp: Path) -> None:
        if plain == kind:
            _write(model, tokenizer, tmp, arch, sizes, kind, permute, source_gguf)
            return
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".ebft-gguf-{os.getpid()}-") as scratch:
            full = Path(scratch) / "f32.gguf"
            _write(model, tokenizer, full, arch, sizes, "f32", permute, source_gguf)
            _k_quantize(full, tmp, kind)

    write_atomic(path, write, durable=False,
                 replace=(lambda p: replace_problem(p, [source_gguf])) if overwrite else False)
    return GgufReport(str(path), arch, kind, path.stat().st_size,
                      [{"heads": s.heads, "kv_heads": s.kv_heads, "ffn": s.ffn} for s in sizes], compacted,
                      sum(p.numel() for p in model.parameters()), notes)


# ----------------------------------------------------------------------------- the file

def _write(model, tokenizer, path: Path, arch: str, sizes: list[LayerSize], kind: str, permute: bool,
           source_gguf) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_layer = not uniform(sizes)
    writer.add_name(Path(str(getattr(config, "name_or_path", "") or "model")).name or "model")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(len(sizes))
    writer.add_feed_forward_length([s.ffn for s in sizes] if per_layer else sizes[0].ffn)
    writer.add_head_count([s.heads for s in sizes] if per_layer else sizes[0].heads)
    writer.add_head_count_kv([s.kv_heads for s in sizes] if per_layer else sizes[0].kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(_file_type(kind))
    _add_tokenizer(writer, tokenizer, source_gguf)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(sizes))
    for name, tensor in _tensors(model, sizes, permute):
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise EbftError(f"gguf: no GGUF name for {name}")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        data, raw = _encode(data, kind, target)
        writer.add_tensor(target, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(model, sizes: list[LayerSize], permute: bool):
    """``(transformers name, tensor)`` in llama.cpp's layout: Q/K permuted per head for normal rope,
    all-zero biases left out, a tied head written once (as the embeddings)."""
    prefix, blocks = find_blocks(model)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in state.items():
        if (tied and name == "lm_head.weight") or "rotary" in name:
            continue
        if name.endswith(".bias") and not bool(tensor.ne(0).any()):
            continue
        if permute and name.startswith(prefix + ".") and (".q_proj." in name or ".k_proj." in name):
            index = int(name[len(prefix) + 1:].split(".", 1)[0])
            heads = sizes[index].heads if ".q_proj." in name else sizes[index].kv_heads
            tensor = _rope_interleave(tensor, heads)
        yield name, tensor


def _rope_interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _file_type(kind: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]


def _encode(data: np.ndarray, kind: str, name: str):
    """The tensor's bytes in ``kind`` (1-D tensors stay f32) and its GGML type."""
    import gguf

    if data.ndim == 1 or kind == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "f16":
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.BF16 if kind == "bf16" else gguf.GGMLQuantizationType.Q8_0
    if data.shape[-1] % QUANT_BLOCK and kind == "q8_0":
        log.warning("gguf: %s has rows of %d, not a multiple of %d: written f16", name, data.shape[-1], QUANT_BLOCK)
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, qtype), qtype


def _k_quantize(src: Path, dst: Path, kind: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), from an f32 GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = os.cpu_count() or 1
    with _quiet_stderr():  # llama.cpp prints every tensor it quantizes
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if code != 0:
        raise EbftError(f"gguf: llama.cpp's quantizer failed to make {kind} (code {code})")


@contextmanager
def _quiet_stderr():
    """C code's writes to stderr (file descriptor 2) go nowhere within the block, unless INFO logging is on."""
    if log.isEnabledFor(logging.INFO):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ----------------------------------------------------------------------------- the tokenizer

def _add_tokenizer(writer, tokenizer, source_gguf) -> None:
    if source_gguf is not None:
        _copy_tokenizer(writer, Path(source_gguf))
        return
    import gguf

    with tempfile.TemporaryDirectory(prefix="ebft-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8")) \
            if (Path(folder) / "tokenizer.json").is_file() else {}
        model = data.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            vocab = gguf.LlamaHfVocab(Path(folder))
        elif model.get("type") == "BPE":
            vocab = gguf.BpeVocab(Path(folder))
        else:
            raise EbftError(f"gguf: a {model.get('type') or type(tokenizer).__name__} tokenizer cannot be written "
                            "to GGUF by ebft (byte-level BPE and Llama's BPE can)")
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(kind)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        writer.add_tokenizer_pre(_pre_tokenizer(data))
        writer.add_token_list(tokens)
        if vocab.tokenizer_model == "llama":
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(folder), load_merges=vocab.tokenizer_model == "gpt2",
                          n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _pre_tokenizer(data: dict) -> str:
    """llama.cpp's name of the pre-tokenizer: GPT-2's regex when the tokenizer's is byte-level with it,
    else the default (token ids are unaffected; text may split differently in llama.cpp)."""
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("gguf: the tokenizer's pre-tokenizer is not one ebft names for llama.cpp: written as 'default'")
    return "default"


def _copy_tokenizer(writer, source: Path) -> None:
    """Every ``tokenizer.*`` key of the source GGUF, as it is."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)


def source_gguf_of(model_source: str) -> Path | None:
    """The GGUF file a model came from, if any: a ``.gguf`` path, the built-in model, or an ebft run of
    either (its run.json names the model)."""

    if model_source in BUILTIN_MODELS:
        return builtin_model_path(model_source)
    path = Path(os.path.expanduser(str(model_source)))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    record = path / "run.json"
    if record.is_file():
        try:
            given = json.loads(record.read_text(encoding="utf-8"))["config"]["model"]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s is damaged (no config.model): the tokenizer is rebuilt from the folder's files", record)
            return None
        if isinstance(given, str) and given != str(model_source):
            return _recorded_gguf(record, given)
    return None


def _recorded_gguf(record: Path, given: str) -> Path | None:
    """The GGUF a run's record names as its model: one line if it is not a GGUF, a warning if it is gone
    (the tokenizer is then rebuilt from the run folder's own files)."""
    found = source_gguf_of(given)
    if found is None:
        if given.lower().endswith(".gguf"):
            log.warning("%s names the model %s, which is not there: the tokenizer is rebuilt from the run "
                        "folder's files", record, given)
        return None
    try:
        with open(found, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise EbftError(f"{record} names the model {found}, which cannot be read ({error.strerror or error})") from None
    if magic != GGUF_MAGIC:
        raise EbftError(f"{record} names the model {found}, which is not a GGUF file (its tokenizer is carried "
                        "into the export); restore that file or correct config.model in the record")
    return found
