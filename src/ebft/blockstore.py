"""The block store: where the walk gets block i and hands it back; lazily for models larger than memory.

The walk asks ``store.load(i, device)`` for a block and hands it back with ``store.release(i)``.
:class:`EagerBlocks` serves a model already in host memory (it moves the block to the device and
back); :class:`LazyBlocks` serves a model loaded lazily, block by block (below). So the walk has one
code path, and :func:`store_for` gives the store of any model.

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
model. Reading and writing safetensors is :mod:`ebft.weights`'.

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
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from . import hub
from .errors import EbftError
from .models import DTYPES, check_loaded, check_model_folder, check_model_source, find_blocks, params_on_meta, resolve_dtype
from .system import trim_host_memory
from .weights import INDEX_NAME, ShardWriter, WeightFiles, save_names

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- the skeleton

def build_skeleton(config, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The causal-LM of ``config`` with parameters on ``meta`` and buffers real, in eval mode.

    Buffers are built by the modules' own constructors (on the CPU, in the dtype the eager
    ``from_pretrained`` gives them), so non-persistent ones - absent from checkpoints - are right.
    """
    from transformers import AutoModelForCausalLM

    with params_on_meta():
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
    if local.is_dir():
        check_model_folder(local, trust_remote_code)  # config and every shard's header and size, as eagerly
    elif not hub.hub_offline():
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
    files = WeightFiles(source, revision)
    source_dtype = getattr(config, "dtype", None)  # what the checkpoint holds: the saved dtype by default
    model = build_skeleton(config, torch_dtype, trust_remote_code)
    model.config.name_or_path = name
    model._ebft_source_dtype = source_dtype if isinstance(source_dtype, torch.dtype) else DTYPES.get(source_dtype)
    _load_generation_config(model, name, revision)
    check_loaded(model, tokenizer, name)
    return model, tokenizer, LazyBlocks(model, files)


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


# --------------------------------------------------------------------------- the block store

_STORES: "weakref.WeakKeyDictionary[nn.Module, LazyBlocks]" = weakref.WeakKeyDictionary()


def store_for(model: nn.Module) -> "_Blocks":
    """The block store of ``model``: the :class:`LazyBlocks` built for it by :func:`load_lazy` (a
    skeleton knows where its weights are), else an :class:`EagerBlocks` over the model in memory."""
    return _STORES.get(model) or EagerBlocks(model)


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
    """The block store of a skeleton model: blocks are read from ``files`` on :meth:`load` and
    return to ``meta`` on :meth:`release`; the outside modules are read by :meth:`load_outside`.

    Every parameter's checkpoint name is resolved at construction, so a checkpoint missing a
    weight (or holding it under a name this family would convert on load) fails before any work.
    """

    lazy = True

    def __init__(self, model: nn.Module, files: WeightFiles):
        super().__init__(model)
        self.files = files
        self._check_no_conversion()
        prefix = getattr(model, "base_model_prefix", "") or ""
        state = model.state_dict(keep_vars=True)
        self._source: dict[str, str] = {}  # saved name -> checkpoint key
        missing, known = [], set()
        for name, aliases in self._aliases.items():
            candidates = [name, *aliases]
            candidates += [n[len(prefix) + 1:] for n in candidates if prefix and n.startswith(prefix + ".")]
            known.update(candidates)
            key = next((c for c in candidates if c in files.weight_map), None)
            if key is not None:
                self._source[name] = key
            elif state[name].device.type == "meta":  # a real buffer keeps its constructed value
                missing.append(name)
        if missing:
            raise EbftError(f"{files.source}: the checkpoint lacks {len(missing)} weights of "
                            f"{type(model).__name__}, e.g. {missing[0]!r}")
        extra = sorted(k for k in files.weight_map if k not in known and not k.endswith("inv_freq"))
        if extra:
            raise EbftError(f"model {files.source}: its config.json and its weights disagree: the weights hold "
                            f"{extra[0]}{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which the "
                            "config has no place for")
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
        tensors = self.files.read([self._source[n] for n in names], device,
                                       {self._source[n]: current[n].dtype for n in names})
        for name in names:
            t = tensors.pop(self._source[name])
            if t.shape != current[name].shape:
                raise EbftError(f"{self.files.source}: {self._source[name]} has shape {tuple(t.shape)}, "
                                f"the model expects {tuple(current[name].shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise EbftError(f"model {self.files.source}: weight {self._source[name]} holds NaN or infinite "
                                "values (a damaged file)")
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
