"""Models larger than host memory: load and write them block by block.

A lazy model is a *skeleton*: every parameter on the ``meta`` device (shape and dtype, no storage),
every buffer real (rotary ``inv_freq``, Gemma's ``embed_scale``: computed from the config at
construction, so capture and the tail run as usual). The weights stay in the checkpoint's
safetensors shards until the walk asks for them:

    model, tokenizer, store = load_lazy("meta-llama/Llama-2-70b-hf", dtype="bfloat16")
    writer = ShardWriter(tmp_out)
    store.load_outside()                      # embeddings, final norm, head: resident all run
    ... capture ...
    for i in range(store.num_blocks):
        block = store.load(i, device)         # read block i's tensors from the shards
        ... prune, recover, propagate ...
        store.release(i, write_to=writer)     # write it to the output shards, back to meta
    ... tail ...
    store.release_outside(write_to=writer)
    writer.finish(model)                      # index + config: loads with plain from_pretrained

Peak host memory is then the outside modules plus about one block (plus activations), not the
model. :class:`EagerBlocks` has the same interface over a model already in memory (it moves the
block to the device and back), so the walk has one code path.

Where the weights come from: a local folder or a hub id holding ``model.safetensors`` or
``model.safetensors.index.json`` + shards. For a hub id only the config, tokenizer and index are
fetched up front; each shard is downloaded (``hf_hub_download``, into the usual HF cache) the first
time a block in it is needed. Not lazy: GGUF files (transformers dequantises the whole file at
once) and ``pytorch_model.bin`` checkpoints (pickles cannot be read tensor by tensor) - load those
eagerly with :func:`ebft.models.load_model`; and families whose checkpoints transformers converts
on load (fused MoE experts and the like), which raise a clear error here.

Tied weights (``lm_head`` sharing the input embeddings) are one parameter in several places: they
are read once from whichever name the checkpoint has, set at every place, and written once under
the name ``save_pretrained`` keeps, so the output matches an eager ``save_pretrained`` tensor for
tensor.
"""
from __future__ import annotations

import json
import logging
import os
import re
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import EbftError
from .models import check_model_source, find_blocks, resolve_dtype

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PART = "model-part-{:05d}.safetensors"  # shards as written; renamed model-0000k-of-0000n at finish


# --------------------------------------------------------------------------- the skeleton

def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal-LM of ``config`` with parameters on ``meta`` and buffers real, in eval mode.

    Buffers are built by the modules' own constructors (on the CPU, in the dtype the eager
    ``from_pretrained`` gives them), so non-persistent ones - absent from checkpoints - are right.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config skips tying when the weights are on meta
    model.config.use_cache = False
    return model.eval()


def load_lazy(source: str, dtype: str = "auto", device: str = "cpu", revision: str | None = None,
              trust_remote_code: bool = False):
    """``(skeleton model, tokenizer, LazyBlocks)`` from a local folder or hub id with safetensors.

    Reads only the config, tokenizer and shard index; nothing of the weights. ``dtype`` and
    ``trust_remote_code`` as in :func:`ebft.models.load_model` (``auto``: float32 on CPU, bf16/fp16
    on GPUs). Every failure is one :class:`EbftError` line.
    """
    from transformers import AutoConfig, AutoTokenizer

    check_model_source(source)
    if str(source).endswith(".gguf") or source.startswith("builtin:"):
        raise EbftError(f"lazy loading needs safetensors; {source!r} is a GGUF model, which loads eagerly "
                        "(transformers dequantises the whole file at once)")
    local = Path(os.path.expanduser(source))
    name = str(local) if local.is_dir() else source
    if not local.is_dir() and not hub.hub_offline():
        why = hub.hub_unreachable()
        if why is not None:
            raise EbftError(f"could not load model {source!r} from the Hugging Face hub ({why}); pass a local folder")
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # whatever the parsers raise: one line, details in the log
        log.debug("loading %s failed", source, exc_info=True)
        raise EbftError(f"could not load the config or tokenizer of {source!r} ({hub.reason(exc)})") from exc
    checkpoint = Checkpoint(source, revision)
    source_dtype = getattr(config, "dtype", None)  # what the checkpoint holds: the saved dtype by default
    model = build_skeleton(config, torch_dtype, trust_remote_code)
    model.config.name_or_path = name
    from .models import DTYPES

    model._ebft_source_dtype = source_dtype if isinstance(source_dtype, torch.dtype) else DTYPES.get(source_dtype)
    _load_generation_config(model, name, revision)
    return model, tokenizer, LazyBlocks(model, checkpoint)


def _load_generation_config(model: nn.Module, name: str, revision: str | None) -> None:
    """The checkpoint's own ``generation_config.json`` (as ``from_pretrained`` reads it), so that the
    written folder keeps it; without one, the default derived from the config stays."""
    from transformers import GenerationConfig

    if getattr(model, "generation_config", None) is None:
        return
    try:
        model.generation_config = GenerationConfig.from_pretrained(name, revision=revision)
    except OSError:  # the model has none
        pass


def weights_bytes(source: str, revision: str | None = None) -> int | None:
    """Bytes of a model's safetensors weights, from the files' sizes (a local folder) or the shard
    index's ``total_size`` (a hub id; only the index is fetched); None when there are none to read
    lazily (GGUF, builtin, ``.bin``) or it cannot be told."""
    if str(source).endswith(".gguf") or str(source).startswith("builtin:"):
        return None
    local = Path(os.path.expanduser(str(source)))
    if local.is_dir():
        files = list(local.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files) if files else None
    if local.exists() or hub.hub_offline():
        return None
    try:
        from huggingface_hub import hf_hub_download

        index = json.loads(Path(hf_hub_download(str(source), INDEX_NAME, revision=revision)).read_text())
        return int(index["metadata"]["total_size"])
    except Exception:  # no index (one small file), no network: not worth loading lazily
        return None


def available_memory() -> int | None:
    """Host memory available to new allocations (Linux ``MemAvailable``), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------- reading

class Checkpoint:
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

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _size_to_int(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (as ``save_pretrained``'s ``max_shard_size``; ``"2GiB"`` also works)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
    if match is None:
        raise ValueError(f"max_shard_size: got {size!r}; use bytes or a size such as '5GB'")
    return int(float(match[1]) * _UNITS[match[2]])


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
    the tensors' bytes in header order, larger elements first so that each is aligned), flushed to disk
    before returning."""
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
        f.flush()
        os.fsync(f.fileno())


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
        self.max_shard_bytes = _size_to_int(max_shard_size)
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
        tmp = self.folder / f".{name}.tmp"
        write_safetensors(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, self.folder / name)
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
    for path in folder.glob(".model-part-*.safetensors.tmp"):
        path.unlink()


# --------------------------------------------------------------------------- the block store

_STORES: "weakref.WeakKeyDictionary[nn.Module, LazyBlocks]" = weakref.WeakKeyDictionary()


def store_for(model: nn.Module) -> "_Blocks":
    """The block store of ``model``: the :class:`LazyBlocks` built for it by :func:`load_lazy` (a
    skeleton knows where its weights are), else an :class:`EagerBlocks` over the model in memory."""
    return _STORES.get(model) or EagerBlocks(model)


def trim_host_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A freed block's tensors go back to the C allocator, which keeps most of that memory for reuse
    instead of returning it; block after block the process then grows as if nothing had been freed
    (measured: +13 MiB per 16 MiB block). Trimming after each release keeps the peak at one block.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _split(name: str) -> tuple[str, str]:
    path, _, attr = name.rpartition(".")
    return path, attr


class _Blocks:
    """What eager and lazy stores share: the model, its blocks, and the tensors each unit saves."""

    lazy = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self._aliases = save_names(model)  # saved name -> its other names
        self._dropped = {a for names in self._aliases.values() for a in names}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors under their full saved names (tied aliases left out)."""
        state = self.blocks[index].state_dict(prefix=self._block_prefix(index))
        return {k: v for k, v in state.items() if k not in self._dropped}

    def outside_state(self) -> dict[str, torch.Tensor]:
        """The tensors outside the blocks (embeddings, norms, head) under their saved names."""
        inside = self.prefix + "."
        return {k: v for k, v in self.model.state_dict().items()
                if not k.startswith(inside) and k not in self._dropped}

    def release_outside(self, write_to: ShardWriter | None = None) -> None:
        """Write the outside tensors (if ``write_to``); they stay in memory for later use."""
        if write_to is not None:
            write_to.add(self.outside_state())


class EagerBlocks(_Blocks):
    """The block store of a model already in host memory: load moves a block to the device, release
    writes it (if asked) and moves it back to the CPU. Nothing is read or freed."""

    def load_outside(self, device: str | torch.device = "cpu") -> None:
        """Nothing to do: the outside modules are already in memory."""

    def load(self, index: int, device: str | torch.device = "cpu") -> nn.Module:
        return self.blocks[index].to(device)

    def release(self, index: int, write_to: ShardWriter | None = None) -> None:
        if write_to is not None:
            write_to.add(self.block_state(index))
        self.blocks[index].to("cpu")


class LazyBlocks(_Blocks):
    """The block store of a skeleton model: blocks are read from ``checkpoint`` on :meth:`load` and
    return to ``meta`` on :meth:`release`; the outside modules are read by :meth:`load_outside`.

    Every parameter's checkpoint name is resolved at construction, so a checkpoint missing a
    weight (or holding it under a name this family would convert on load) fails before any work.
    """

    lazy = True

    def __init__(self, model: nn.Module, checkpoint: Checkpoint):
        super().__init__(model)
        self.checkpoint = checkpoint
        self._check_no_conversion()
        prefix = getattr(model, "base_model_prefix", "") or ""
        state = model.state_dict(keep_vars=True)
        self._source: dict[str, str] = {}  # saved name -> checkpoint key
        missing = []
        for name, aliases in self._aliases.items():
            candidates = [name, *aliases]
            candidates += [n[len(prefix) + 1:] for n in candidates if prefix and n.startswith(prefix + ".")]
            key = next((c for c in candidates if c in checkpoint.weight_map), None)
            if key is not None:
                self._source[name] = key
            elif state[name].device.type == "meta":  # a real buffer keeps its constructed value
                missing.append(name)
        if missing:
            raise EbftError(f"{checkpoint.source}: the checkpoint lacks {len(missing)} weights of "
                            f"{type(model).__name__}, e.g. {missing[0]!r}")
        self._units: dict[int | None, list[str]] = defaultdict(list)  # block index (None: outside) -> saved names
        for name in self._aliases:
            self._units[self._unit(name)].append(name)
        for name, aliases in self._aliases.items():
            if any(self._unit(a) != self._unit(name) for a in aliases):
                raise EbftError(f"{type(model).__name__} shares {name} between blocks; it cannot load lazily")
        self._loaded: set[int | None] = set()
        _STORES[model] = self

    def _check_no_conversion(self) -> None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:  # a transformers without conversion mappings converts nothing
            return
        conversions = [c for c in get_model_conversion_mapping(self.model, add_legacy=False)
                       if not isinstance(c, PrefixChange)]
        if conversions:
            raise EbftError(f"transformers converts {self.model.config.model_type} checkpoints on load "
                            "(renamed or fused weights); lazy loading supports plain checkpoints, load it eagerly")

    def _unit(self, name: str) -> int | None:
        inside = self.prefix + "."
        if not name.startswith(inside):
            return None
        return int(name[len(inside):].split(".", 1)[0])

    def _materialise(self, unit: int | None, device) -> None:
        names = [n for n in self._units[unit] if n in self._source]
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        current = {n: params.get(n, buffers.get(n)) for n in names}
        tensors = self.checkpoint.read([self._source[n] for n in names], device,
                                       {self._source[n]: current[n].dtype for n in names})
        for name in names:
            t = tensors.pop(self._source[name])
            if t.shape != current[name].shape:
                raise EbftError(f"{self.checkpoint.source}: {self._source[name]} has shape {tuple(t.shape)}, "
                                f"the model expects {tuple(current[name].shape)}")
            if name in params:
                t = nn.Parameter(t, requires_grad=params[name].requires_grad)
            for site in (name, *self._aliases[name]):
                path, attr = _split(site)
                module = self.model.get_submodule(path)
                (module._parameters if attr in module._parameters else module._buffers)[attr] = t
        self._loaded.add(unit)

    def _to_meta(self, module: nn.Module) -> None:
        """Replace every parameter under ``module`` by a meta one of the same shape (tied ones stay tied)."""
        fresh: dict[int, nn.Parameter] = {}
        for sub in module.modules():
            for attr, p in list(sub._parameters.items()):
                if p is None or p.device.type == "meta":
                    continue
                if id(p) not in fresh:
                    fresh[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                requires_grad=p.requires_grad)
                sub._parameters[attr] = fresh[id(p)]

    def load_outside(self, device: str | torch.device = "cpu") -> None:
        """Read everything outside the blocks (embeddings, final norm, head) onto ``device``; keep it
        there for capture and the tail. Idempotent."""
        if None not in self._loaded:
            self._materialise(None, device)

    def load(self, index: int, device: str | torch.device = "cpu") -> nn.Module:
        """Read block ``index`` from the checkpoint onto ``device`` (if not already loaded); return it."""
        if index not in self._loaded:
            self._materialise(index, device)
        return self.blocks[index].to(device)

    def release(self, index: int, write_to: ShardWriter | None = None) -> None:
        """Write block ``index`` (if ``write_to``), then free it: its parameters go back to meta.
        A later :meth:`load` reads the checkpoint's (original) weights again."""
        if index not in self._loaded:
            raise RuntimeError(f"block {index} is not loaded")
        if write_to is not None:
            write_to.add(self.block_state(index))
        self._to_meta(self.blocks[index])
        self._loaded.discard(index)
        trim_host_memory()
