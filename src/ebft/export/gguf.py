"""GGUF for llama.cpp (and ollama, LM Studio ...): a pruned model written so that it is smaller and runs.

**Which architecture.** A model whose blocks all have one shape is written as its family's own
architecture (``llama`` for Llama, SmolLM2 and Mistral; ``qwen2``, ``qwen3``). A structurally pruned model
whose blocks differ (FLAP adaptive) is first compacted (:mod:`.compact`: the all-zero KV groups and MLP
channels of ebft's padded save removed, exactly) and written as llama.cpp's ``deci`` architecture — the
one Nemotron-NAS models use — which reads per-layer arrays ``deci.attention.head_count``,
``deci.attention.head_count_kv`` and ``deci.feed_forward_length`` and takes the optional
``attn_output.bias`` / ``ffn_down.bias`` where FLAP's bias compensation goes, and the optional Q/K/V biases.
``deci`` is Llama's block, so Llama, Mistral and Qwen2 (Llama's block with Q/K/V biases) are written that
way; Qwen3 (norms on Q and K) has no such architecture in llama.cpp and is written padded (exact, not
smaller), with a warning. llama.cpp builds ``qwen2`` attention hidden x hidden wide, so a Qwen2 model
whose heads no longer fill the hidden size (uniform FLAP) is written as ``llama``, the same block.

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

**Tokenizer** (:mod:`.vocab`). Carried over from the source GGUF when the model came from one (the
built-in SmolLM2, a ``.gguf`` file, or a run of either, wherever it was made: :func:`model_chain`), else
built from the Hugging Face tokenizer so that llama.cpp tokenizes as transformers does.

**Metadata.** ``general.name`` is the output's name (the run's folder, the file's), ``general.basename`` and
``general.license`` the source model's (its GGUF's, or its folder's name and model card), ``general.size_label``
from the parameters written, ``general.quantization_version`` in quantized files, as llama.cpp's converter.
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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import clean_dead, write_atomic
from ..errors import EbftError
from ..gguf_layout import rope_interleave
from ..models import BUILTIN_MODELS, builtin_model_path, find_blocks, gguf_magic_problem
from .compact import LayerSize, compact_, compacted_sizes, uniform
from .vocab import add_tokenizer

log = logging.getLogger(__name__)

# family -> (its own GGUF architecture, the architecture for blocks of different sizes or None)
FAMILIES = {"llama": ("llama", "deci"), "mistral": ("llama", "deci"), "qwen2": ("qwen2", "deci"),
            "qwen3": ("qwen3", None)}
# architectures llama.cpp runs with its normal rope: Q and K rows are permuted per head for it
NORMAL_ROPE = ("llama", "deci")
# architectures whose attention llama.cpp builds hidden x hidden wide: a model whose heads no longer fill the
# hidden size is written as the Llama block they are (Qwen2's is Llama's with Q/K/V biases)
FULL_WIDTH = {"qwen2": "llama"}
PLAIN_TYPES = ("f32", "f16", "bf16", "q8_0")
K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
TYPES = PLAIN_TYPES + K_QUANTS
QUANT_BLOCK = 32
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


def check_family(config) -> tuple[str, str | None]:
    """The family's GGUF architecture and the one for blocks of different sizes (None: none), or one line
    saying why this model cannot be written."""
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


def is_input(path: Path, inputs) -> bool:
    """Whether ``path`` is one of ``inputs`` (existing paths, links resolved; names that are not paths skip)."""
    return any(given and os.path.exists(os.path.expanduser(str(given))) and
               os.path.realpath(os.path.expanduser(str(given))) == os.path.realpath(path) for given in inputs)


def replace_problem(path: Path, inputs=()) -> str | None:
    """Why the existing ``path`` may not be replaced by an export (None: it may): only a GGUF file that
    is not one of the export's ``inputs`` (the model, the GGUF its tokenizer comes from) is replaced."""
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    if is_input(path, inputs):
        return "it is the model being exported (or the GGUF its tokenizer comes from); write elsewhere"
    problem = gguf_magic_problem(path)
    if problem is not None:
        return f"it {problem}; ebft replaces only GGUF files"
    return None


@dataclass(frozen=True)
class Origin:
    """What the file says about where the model came from (``general.*``), and the GGUF whose tokenizer is
    carried over. Names and licence left None come from that GGUF where there is one."""

    name: str | None = None  # general.name: the output's name
    basename: str | None = None  # general.basename: the source model's
    license: str | None = None
    gguf: Path | None = None


def write_gguf(model: nn.Module, tokenizer, path: str | os.PathLike, kind: str = "f16",
               origin: Origin | None = None, overwrite: bool = False) -> GgufReport:
    """Write ``model`` (changed in place: compacted, padded) and its tokenizer as a GGUF file at ``path``
    (atomically). ``origin``: names, licence and a GGUF file whose tokenizer metadata is carried over. A file
    at ``path`` (there before, or appearing while the file is written) is replaced only with ``overwrite``
    and only if it is a GGUF file other than the origin's (:func:`replace_problem`), else :class:`EbftError`.
    What killed exports left in the folder is removed first."""
    check_type(kind)
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    source_gguf = origin.gguf if origin is not None else None
    if os.path.lexists(path):
        problem = replace_problem(path, [source_gguf]) if overwrite else "it exists (pass overwrite=True)"
        if problem is not None:
            raise EbftError(f"gguf: not replacing {path}: {problem}")
    clean_dead(path.parent, LEFTOVERS)
    family_arch, per_layer_arch = check_family(model.config)
    multiple = 1 if kind in ("f32", "f16", "bf16") else QUANT_BLOCK
    sizes, notes = compacted_sizes(model, multiple), []
    window = sliding_window(model.config)
    if window is not None:
        notes.append(f"{family_arch}: llama.cpp has no sliding window for this architecture: the file computes "
                     f"exactly what the model does on up to {window} tokens, full attention beyond")
        log.warning(notes[-1])
    compacted = not uniform(sizes) and per_layer_arch is not None
    if not uniform(sizes) and per_layer_arch is None:
        notes.append(f"{family_arch}: llama.cpp reads no per-layer head counts or MLP widths for this family: "
                     "written padded to one block shape (exact, not smaller)")
        log.warning(notes[-1])
    sizes = compact_(model, multiple, drop=uniform(sizes) or compacted)
    arch = per_layer_arch if compacted else _narrow_architecture(model.config, sizes, family_arch, notes)
    plain = kind if kind in PLAIN_TYPES else "f32"  # k-quants: llama.cpp quantizes an f32 file
    origin = replace(origin or Origin(), name=(origin and origin.name) or path.stem)

    def write(tmp: Path) -> None:
        if plain == kind:
            _write(model, tokenizer, tmp, arch, sizes, kind, origin)
            return
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".ebft-gguf-{os.getpid()}-") as scratch:
            full = Path(scratch) / "f32.gguf"
            _write(model, tokenizer, full, arch, sizes, "f32", origin)
            _k_quantize(full, tmp, kind)

    write_atomic(path, write, durable=False,
                 replace=(lambda p: replace_problem(p, [source_gguf])) if overwrite else False)
    return GgufReport(str(path), arch, kind, path.stat().st_size,
                      [{"heads": s.heads, "kv_heads": s.kv_heads, "ffn": s.ffn} for s in sizes], compacted,
                      sum(p.numel() for p in model.parameters()), notes)


def _narrow_architecture(config, sizes: list[LayerSize], arch: str, notes: list[str]) -> str:
    """``arch``, or the Llama block for a family llama.cpp builds hidden-wide when the heads lost no longer
    fill the hidden size (llama.cpp would refuse the file: "attn_q.weight has wrong shape")."""
    if arch not in FULL_WIDTH or sizes[0].heads * head_dim_of(config) == config.hidden_size:
        return arch
    notes.append(f"{arch}: llama.cpp's {arch} needs query heads filling the hidden size; {sizes[0].heads} heads of "
                 f"{head_dim_of(config)} are written as {FULL_WIDTH[arch]}, the same block")
    log.info(notes[-1])
    return FULL_WIDTH[arch]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# ----------------------------------------------------------------------------- the file

def _write(model, tokenizer, path: Path, arch: str, sizes: list[LayerSize], kind: str, origin: Origin) -> None:
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    head_dim = head_dim_of(config)
    per_layer = not uniform(sizes)
    source = gguf.GGUFReader(origin.gguf) if origin.gguf is not None else None
    _add_general(writer, origin, source, sum(p.numel() for p in model.parameters()), kind)
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
    add_tokenizer(writer, tokenizer, source, int(config.vocab_size))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], len(sizes))
    for name, tensor in _tensors(model, sizes, arch in NORMAL_ROPE):
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


def _add_general(writer, origin: Origin, source, params: int, kind: str) -> None:
    """``general.*`` as llama.cpp's converter writes them: type, name, basename, size label, licence, and the
    quantization version of a quantized file."""
    from gguf import GGML_QUANT_VERSION
    from gguf.utility import size_label

    writer.add_type("model")
    writer.add_name(origin.name)
    basename = origin.basename or _field(source, "general.basename")
    if basename:
        writer.add_basename(basename)
    writer.add_size_label(size_label(params, 0, 0, 0))
    license_ = origin.license or _field(source, "general.license")
    if license_:
        writer.add_license(license_)
    if kind not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(GGML_QUANT_VERSION)


def _field(reader, key: str):
    """A string field of a GGUF file (``reader``: its GGUFReader, or None), or None."""
    field = reader.fields.get(key) if reader is not None else None
    value = field.contents() if field is not None else None
    return value if isinstance(value, str) and value else None


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
            tensor = rope_interleave(tensor, heads)
        yield name, tensor


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


# ----------------------------------------------------------------------------- where the model came from

def origin_of(model_source: str, name: str | None = None) -> Origin:
    """The :class:`Origin` of ``model_source`` (a model, or an ebft run of one, or a run of that ...): the
    GGUF it came from if any (the built-in model, a ``.gguf`` file), else the original model's folder name
    and its model card's licence. ``name``: the output's (default: the file's own)."""
    chain = model_chain(model_source)
    for run, given in zip(chain, chain[1:]):
        _check_recorded(Path(os.path.expanduser(run)) / "run.json", given)
    gguf_file = next((g for g in map(_gguf_file, chain) if g is not None), None)
    if gguf_file is not None:
        return Origin(name, gguf=gguf_file)
    original = Path(os.path.expanduser(chain[-1]))
    return Origin(name, original.name or None, next((c for c in map(_card_license, chain) if c), None))


def source_gguf_of(model_source: str) -> Path | None:
    """The GGUF file a model came from, if any: a ``.gguf`` path, the built-in model, or an ebft run of
    either (its run.json names the model)."""
    return origin_of(model_source).gguf


def model_chain(model_source: str) -> list[str]:
    """``model_source``, then the model its run.json names, and so on: a run of a run of a model. A relative
    path recorded in a run.json is resolved against the folder the run was made in (its ``resolved.cwd``), the
    run's folder, then the current folder: the first that exists."""
    chain = [str(model_source)]
    while len(chain) < 32:
        given = _recorded_model(chain[-1])
        if given is None or given in chain:
            break
        chain.append(given)
    return chain


def _recorded_model(source: str) -> str | None:
    folder = Path(os.path.expanduser(source))
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        given, cwd = record["config"]["model"], (record.get("resolved") or {}).get("cwd")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if (folder / "run.json").is_file():
            log.warning("%s is damaged (no config.model): its model's tokenizer and names are not carried over",
                        folder / "run.json")
        return None
    if not isinstance(given, str) or given in BUILTIN_MODELS or os.path.isabs(os.path.expanduser(given)):
        return given if isinstance(given, str) else None
    bases = ([Path(cwd)] if isinstance(cwd, str) else []) + [folder, Path.cwd()]
    found = next((base / given for base in bases if (base / given).exists()), None)
    return str(found.resolve()) if found is not None else given  # a hub id, or a path no longer there


def _gguf_file(source: str) -> Path | None:
    if source in BUILTIN_MODELS:
        return builtin_model_path(source)
    path = Path(os.path.expanduser(source))
    return path if path.is_file() and path.suffix.lower() == ".gguf" else None


def _card_license(source: str) -> str | None:
    """The ``license:`` of a model folder's model card (README.md's YAML front matter), or None."""
    card = Path(os.path.expanduser(source)) / "README.md"
    try:
        text = card.read_text(encoding="utf-8") if card.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    for line in text[3:].split("\n---", 1)[0].splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip().strip("'\""):
            return value.strip().strip("'\"")
    return None


def _check_recorded(record: Path, given: str) -> None:
    """A model a run's record names: one line if it is a ``.gguf`` that is not a GGUF (its tokenizer would be
    carried into the export), a warning if it is gone (the tokenizer is then rebuilt from the run folder's
    own files)."""
    path = Path(os.path.expanduser(given))
    if path.suffix.lower() != ".gguf":
        return
    if not path.exists():
        log.warning("%s names the model %s, which is not there: the tokenizer is rebuilt from the run "
                    "folder's files", record, given)
        return
    problem = gguf_magic_problem(path)
    if problem is not None:
        raise EbftError(f"{record} names the model {path}, which {problem} (its tokenizer is carried into the "
                        "export); restore that file or correct config.model in the record")
