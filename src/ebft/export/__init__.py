"""Export a pruned model where people run models: ``ebft export`` and ``ebft run --export``.

Formats (:data:`FORMATS`):

- ``gguf`` (:mod:`.gguf`): llama.cpp, ollama, LM Studio. Structurally pruned models with per-layer
  sizes are compacted and written as llama.cpp's ``deci`` architecture: smaller on disk and faster.

The ``compressed-tensors`` sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``) are not written:
compressed-tensors removed its sparse compressors (0.15), transformers dropped loading them (the
minimum compressed-tensors it accepts is 0.15; huggingface/transformers#46342) and vLLM removed its
Sparse24 support and kernels (vllm-project/vllm#36799), so no current tool reads such a file
(docs/deploy.md).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ConfigError, EbftError
from ..models import BUILTIN_MODELS, builtin_model_path, check_model_source, load_config, load_model
from ..output import note_added_file
from .gguf import (K_QUANTS, TYPES, GgufReport, Origin, check_family, check_type, is_input, origin_of,
                   replace_problem, write_gguf)

log = logging.getLogger(__name__)

FORMATS = ("gguf",)

__all__ = ["FORMATS", "TYPES", "K_QUANTS", "GgufReport", "Origin", "export", "check_export_model",
           "check_export_target", "origin_of", "write_gguf"]


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
    if is_input(path, inputs):
        raise ConfigError("--out", out, "is the model being exported; write the export elsewhere")
    if os.path.lexists(path):
        if not overwrite:
            raise ConfigError("--out", out, "already exists; pass --overwrite to replace a GGUF file")
        problem = replace_problem(path, inputs)
        if problem is not None:
            raise ConfigError("--out", out, f"exists and {problem.removeprefix('it ')}")
    return path


def check_export_model(model: str, trust_remote_code: bool = False) -> None:
    """Before any model loads: the model's family and rope are ones the GGUF export writes (read from its
    config alone). A config that cannot be read here is left to the load, which says why in one line."""
    source = builtin_model_path(model) if model in BUILTIN_MODELS else model
    try:
        config = load_config(str(source), trust_remote_code)
    except Exception:  # noqa: BLE001 - the load reports it
        log.debug("export: could not read the config of %s before loading", model, exc_info=True)
        return
    check_family(config)


def export(model: str, out, fmt: str = "gguf", kind: str = "f16", overwrite: bool = False,
           trust_remote_code: bool = False) -> GgufReport:
    """Export ``model`` (a saved ebft run, a Hugging Face folder or hub id, a ``.gguf`` file, or
    ``builtin:smollm2``) to ``out`` in ``fmt``. Everything is checked before the model loads; the file
    appears complete or not at all."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"allowed: {', '.join(FORMATS)} (compressed-tensors: no current tool "
                          "reads its sparse formats, see docs/deploy.md)")
    check_type(kind)
    check_model_source(model)
    check_export_model(model, trust_remote_code)
    origin = origin_of(model)  # the output's name: the file's own (write_gguf)
    path = check_export_target(out, overwrite, inputs=[model, origin.gguf])
    net, tokenizer = load_model(model, "float32", "cpu", trust_remote_code=trust_remote_code)
    if note_added_file(path):  # before the file appears: the folder never holds a file its marker does not list
        log.info("%s is an ebft output: its marker lists %s as added", path.parent, path.name)
    try:
        report = write_gguf(net, tokenizer, path, kind, origin, overwrite=overwrite)
    except (OSError, ValueError) as exc:
        if isinstance(exc, EbftError):
            raise
        raise EbftError(f"gguf: could not write {path} ({type(exc).__name__}: {exc})") from None
    log.info("wrote %s: %s, %s, %.1f MiB", path, report.architecture, kind, report.bytes / 2**20)
    return report
