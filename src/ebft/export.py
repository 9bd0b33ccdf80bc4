"""Save a pruned model with zeros in place, atomically; measure its sparsity."""
from __future__ import annotations

import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def sparsity_report(model: torch.nn.Module, layer_names) -> dict:
    """Fraction of exact zeros per pruned linear (read from the weights themselves) and overall."""
    modules = dict(model.named_modules())
    layers, zeros, total = {}, 0, 0
    for name in layer_names:
        w = modules[name].weight.data
        z = int((w == 0).sum())
        layers[name] = round(z / w.numel(), 6)
        zeros, total = zeros + z, total + w.numel()
    return {"overall": round(zeros / total, 6) if total else 0.0, "layers": layers}


@contextmanager
def atomic_folder(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    If the body raises (or the process is interrupted), ``out`` is left as it was and the
    temporary folder is removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise FileExistsError(f"{out} appeared while the run was going; not replacing it")
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(model, tokenizer, folder: Path) -> None:
    """safetensors weights (zeros in place, dtype as loaded) + config + tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
