"""Export a pruned model where people run models: ``ebft export`` and ``ebft run --export``.

Formats (:data:`FORMATS`):

- ``gguf`` (:mod:`.gguf`): llama.cpp, ollama, LM Studio. Structurally pruned models with per-layer
  sizes are compacted and written as llama.cpp's ``deci`` architecture: smaller on disk and faster.

The ``compressed-tensors`` sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``) are not written:
compressed-tensors removed its sparse compressors (0.15), transformers dropped loading them (the
minimum compressed-tensors it accepts is 0.15; huggingface/transformers#46342) and vLLM removed its
Sparse24 support and kernels (vllm-project/vllm#36799), so no current tool reads such a file (README,
"Deploy").
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError, EbftError
from ..models import check_model_source, load_model
from .gguf import K_QUANTS, TYPES, GgufReport, Origin, check_type, origin_of, write_gguf

log = logging.getLogger(__name__)

FORMATS = ("gguf",)
GGUF_MAGIC = b"GGUF"

__all__ = ["FORMATS", "TYPES", "K_QUANTS", "GgufReport", "Origin", "export", "check_export_target", "origin_of",
           "write_gguf"]


def check_export_target(out, overwrite: bool = False, inputs=()) -> Path:
    """Before any work: ``out`` is a ``.gguf`` file name in a folder that exists and can be written; an
    existing file there is replaced only with ``overwrite`` and only if it is a GGUF file (never a file of
    the user's), and never an input of the export."""
    if out is None or not str(out).strip():
        raise ConfigError("--out", out, "required: the .gguf file to write")
    path = Path(os.path.abspath(os.path.expanduser(str(out))))
    if path.suffix.lower() != ".gguf":
        raise ConfigError("--out", out, "must name a .gguf file")
    if not path.parent.is_dir():
        raise ConfigError("--out", out, f"its folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError("--out", out, f"its folder {path.parent} is not writable")
    for given in inputs:
        if given and os.path.exists(os.path.expanduser(str(given))) and \
                os.path.realpath(os.path.expanduser(str(given))) == os.path.realpath(path):
            raise ConfigError("--out", out, "is the model being exported; write the export elsewhere")
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise ConfigError("--out", out, "exists and is not a regular file")
        if not overwrite:
            raise ConfigError("--out", out, "already exists; pass --overwrite to replace a GGUF file")
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ConfigError("--out", out, "exists and is not a GGUF file; ebft replaces only GGUF files")
    return path


def export(model: str, out, fmt: str = "gguf", kind: str = "f16", overwrite: bool = False,
           trust_remote_code: bool = False) -> GgufReport:
    """Export ``model`` (a saved ebft run, a Hugging Face folder or hub id, a ``.gguf`` file, or
    ``builtin:smollm2``) to ``out`` in ``fmt``. Everything is checked before the model loads; the file
    appears complete or not at all."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"allowed: {', '.join(FORMATS)} (compressed-tensors: no current tool "
                          "reads its sparse formats, see the README's Deploy section)")
    check_type(kind)
    check_model_source(model)
    path = check_export_target(out, overwrite, inputs=[model])
    net, tokenizer = load_model(model, "float32", "cpu", trust_remote_code=trust_remote_code)
    try:
        report = write_gguf(net, tokenizer, path, kind, origin_of(model, name=path.stem))
    except (OSError, ValueError) as exc:
        if isinstance(exc, EbftError):
            raise
        raise EbftError(f"gguf: could not write {path} ({type(exc).__name__}: {exc})") from None
    log.info("wrote %s: %s, %s, %.1f MiB", path, report.architecture, kind, report.bytes / 2**20)
    return report
