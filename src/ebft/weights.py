"""Safetensors on disk: read a model's weights tensor by tensor, write them shard by shard.

:class:`WeightFiles` reads the tensors of a local folder or a hub id (one ``model.safetensors`` or an
index and its shards) without loading the rest; :class:`ShardWriter` writes tensors as they come into
shards that, once :meth:`ShardWriter.finish`-ed, load with plain ``from_pretrained``;
:func:`write_safetensors` writes one file streaming each tensor's bytes (no second copy in memory).
:func:`save_names` says under which names ``save_pretrained`` saves a model's tensors (tied weights
once). The lazy block store (:mod:`ebft.blockstore`) and the checkpoint (:mod:`ebft.checkpoint`) are
built on these.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from . import hub
from .atomic import write_atomic
from .errors import EbftError
from .system import parse_bytes

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PART = "model-part-{:05d}.safetensors"  # shards as written; renamed model-0000k-of-0000n at finish


# --------------------------------------------------------------------------- reading

class WeightFiles:
    """The safetensors weights of a model: one file or an index + shards, in a folder or on the hub.

    ``keys`` (checkpoint tensor names) come from the index alone; :meth:`read` opens only the
    shards holding the requested tensors, downloading a hub shard the first time it is needed.
    """

    def __init__(self, source: str | os.PathLike, revision: str | None = None):
        self.source, self.revision = str(source), revision
        self._local = Path(os.path.expanduser(self.source))
        self._paths: dict[str, Path] = {}  # shard file name -> local path, once fetched
        index = self._fetch(INDEX_NAME, required=False)
        if index is not None:
            try:
                self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise EbftError(f"{index}: not a safetensors index ({hub.reason(exc)})") from exc
        else:
            single = self._fetch(WEIGHTS_NAME, required=False)
            if single is None:
                raise EbftError(f"lazy loading needs safetensors weights: {self.source!r} has neither "
                                f"{WEIGHTS_NAME} nor {INDEX_NAME} (load it eagerly instead)")
            from safetensors import safe_open

            try:
                with safe_open(single, "pt") as f:
                    self.weight_map = {key: WEIGHTS_NAME for key in f.keys()}
            except Exception as exc:  # SafetensorError: a truncated or foreign file
                raise EbftError(f"{single}: not a safetensors file ({hub.reason(exc)})") from exc

    @property
    def keys(self):
        return self.weight_map.keys()

    def _fetch(self, filename: str, required: bool = True) -> Path | None:
        """Local path of ``filename``: in the folder, or downloaded from the hub (cached) on first use."""
        if filename in self._paths:
            return self._paths[filename]
        if self._local.is_dir():
            path = self._local / filename
            if not path.exists():
                if required:
                    raise EbftError(f"{self.source}: the index names {filename}, which is missing")
                return None
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(self.source, filename, revision=self.revision))
            except EntryNotFoundError:
                if required:
                    raise EbftError(f"{self.source}: the index names {filename}, which the hub does not have")
                return None
            except Exception as exc:  # network, auth, offline without a cached copy
                raise EbftError(f"could not fetch {filename} of {self.source!r} from the Hugging Face hub "
                                f"({hub.reason(exc)})") from exc
        self._paths[filename] = path
        return path

    def read(self, keys, device: str | torch.device = "cpu",
             dtypes: dict[str, torch.dtype] | None = None) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` as fresh tensors on ``device``, each cast to ``dtypes[key]`` if given.

        A tensor is never a view of the memory-mapped shard (a shard replaced or truncated later
        cannot corrupt or kill the run), and a shard is mapped only while one tensor is copied out of
        it: the mapped pages count as resident, so holding the mapping over a whole block would
        double the block's footprint.
        """
        from safetensors import safe_open

        missing = [k for k in keys if k not in self.weight_map]
        if missing:
            raise EbftError(f"{self.source}: the checkpoint has no tensor {missing[0]!r}"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        by_file = defaultdict(list)
        for key in keys:
            by_file[self.weight_map[key]].append(key)
        out = {}
        for filename, names in by_file.items():
            path = self._fetch(filename)
            for key in names:
                with safe_open(path, "pt") as f:
                    mapped = f.get_tensor(key)
                dtype = (dtypes or {}).get(key, mapped.dtype)
                t = mapped.to(device=device, dtype=dtype)
                if t.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr():
                    t = t.clone()
                out[key] = t
                del mapped
        return out


# --------------------------------------------------------------------------- what is saved

def _tied_targets(model: nn.Module) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def save_names(model: nn.Module) -> dict[str, list[str]]:
    """``{name saved: [its other names]}`` for the model's state dict, the way ``save_pretrained`` saves it.

    Tensors shared between several names (tied weights) are saved once, under the name that is not
    a declared tie target (``lm_head.weight`` tied to ``model.embed_tokens.weight`` is saved as the
    latter); ``_keys_to_ignore_on_save`` are left out. Works on meta skeletons (by identity).
    """
    groups: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups[id(tensor)].append(name)
    targets = _tied_targets(model)
    ignore = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    plan = {}
    for names in groups.values():
        ordered = sorted(names)
        keep = next((n for n in ordered if n not in targets), ordered[-1])
        if keep not in ignore:
            plan[keep] = [n for n in ordered if n != keep]
    return plan


# --------------------------------------------------------------------------- writing

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _code
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write ``tensors`` as one safetensors file, streaming each tensor's bytes from its own memory.

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy, which for a
    block of a large model is one more block in host memory; here a tensor on an accelerator is
    copied to the host one at a time, and a host tensor is written as it is. The file is the
    safetensors format (an 8-byte little-endian header length, the JSON header padded to 8 bytes,
    the tensors' bytes in header order, larger elements first so that each is aligned). Not flushed to
    disk: the caller renames it into place (a kill cannot cut it) and a saved output is flushed whole."""
    # larger elements first: every tensor's offset is then a multiple of its element size
    tensors = dict(sorted(tensors.items(), key=lambda kv: -kv[1].element_size()))
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for t in tensors.values():
            t = t.detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """``{name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file (its metadata left out)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


class ShardWriter:
    """Write a model's tensors into safetensors shards as they come; :meth:`finish` makes it loadable.

    Each :meth:`add` writes its tensors at once (to one shard, or several when they exceed
    ``max_shard_size``), so nothing is held back: memory stays what the caller already holds.
    Shards never span two ``add`` calls; each is written to a temporary name and renamed, so a
    killed process leaves only complete shards (``ShardWriter(folder, resume=True)`` picks them up).
    """

    def __init__(self, folder: str | os.PathLike, max_shard_size: int | str = "5GB", resume: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = parse_bytes(max_shard_size)
        self.weight_map: dict[str, str] = {}  # tensor name -> shard file (as written)
        self.total_bytes = 0
        self._parts: list[str] = []
        if resume:
            self._pick_up()

    def _pick_up(self) -> None:
        k = 1
        while (path := self.folder / _PART.format(k)).exists():
            for key, entry in read_safetensors_header(path).items():  # the header alone: no data is read
                begin, end = entry["data_offsets"]
                self.weight_map[key] = path.name
                self.total_bytes += end - begin
            self._parts.append(path.name)
            k += 1

    @property
    def written(self) -> set[str]:
        return set(self.weight_map)

    @property
    def parts(self) -> int:
        """How many shard files have been written so far (a checkpoint records it, see :func:`trim_parts`)."""
        return len(self._parts)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` (any device; copied to the CPU one shard at a time) now."""
        again = [k for k in tensors if k in self.weight_map]
        if again:
            raise ValueError(f"tensor {again[0]!r} was already written")
        group, size = {}, 0
        for name, tensor in tensors.items():
            nbytes = tensor.numel() * tensor.element_size()
            if group and size + nbytes > self.max_shard_bytes:
                self._write(group)
                group, size = {}, 0
            group[name] = tensor
            size += nbytes
        if group:
            self._write(group)

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = _PART.format(len(self._parts) + 1)
        # not flushed to disk: the rename protects a shard from a kill; a saved output is flushed as a whole
        # (ebft.output), and a checkpoint's shard cut by a power loss is found by its size check on resume
        write_atomic(self.folder / name, lambda tmp: write_safetensors(tensors, tmp, metadata={"format": "pt"}),
                     durable=False)
        self._parts.append(name)
        for k in tensors:
            self.weight_map[k] = name
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self, model: nn.Module, dtype: torch.dtype | None = None) -> None:
        """Check that every tensor ``save_pretrained`` would save was written, name the shards
        ``model-0000k-of-0000n.safetensors`` (one shard: ``model.safetensors``), write the index,
        config and generation config. The tokenizer is the caller's (``tokenizer.save_pretrained``).
        ``dtype``: what the config says the weights are (default: the model's), when they were
        written cast; the config says ``use_cache: true``, as :func:`ebft.export.save_pretrained`'s."""
        expected = set(save_names(model))
        missing = sorted(expected - self.written)
        if missing:
            raise RuntimeError(f"{len(missing)} tensors were never written, e.g. {missing[0]!r}: "
                               "release every block and the outside modules into the writer first")
        extra = sorted(self.written - expected)
        if extra:
            log.warning("%d written tensors are not in the model's state dict, e.g. %r", len(extra), extra[0])
        n = len(self._parts)
        final = {part: WEIGHTS_NAME if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
                 for k, part in enumerate(self._parts, 1)}
        for part, name in final.items():
            os.replace(self.folder / part, self.folder / name)
        self._parts = list(final.values())
        self.weight_map = {k: final[v] for k, v in self.weight_map.items()}
        if n > 1:
            index = {"metadata": {"total_parameters": sum(p.numel() for p in model.parameters()),
                                  "total_size": self.total_bytes},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        # what save_pretrained records about the model in its config
        model.config.dtype = str(dtype or model.dtype).split(".")[1]
        model.config.architectures = [type(model).__name__]
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = True  # the walk turns the cache off; a user generating text wants it
        try:
            model.config.save_pretrained(self.folder)
        finally:
            model.config.use_cache = use_cache
        if getattr(model, "can_generate", lambda: False)() and getattr(model, "generation_config", None):
            model.generation_config.save_pretrained(self.folder)


def trim_parts(folder: str | os.PathLike, keep: int) -> None:
    """Delete the shards a :class:`ShardWriter` wrote into ``folder`` after its first ``keep`` (and any
    half-written one), so that ``ShardWriter(folder, resume=True)`` continues from a known point: a
    resumed walk rewrites the blocks it finished after its last checkpoint."""
    folder = Path(folder)
    for path in folder.glob("model-part-*.safetensors"):
        match = re.fullmatch(r"model-part-(\d+)\.safetensors", path.name)
        if match and int(match[1]) > keep:
            path.unlink()
    for path in folder.glob(".model-part-*.safetensors.tmp*"):
        path.unlink()
