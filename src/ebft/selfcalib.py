"""``--calib self``: the dense model writes its own calibration windows.

Block reconstruction fits the calibration text so closely that it overfits it (Shin et al., EMNLP 2024,
"Rethinking pruning of LLMs via block reconstruction"); windows the model samples itself follow the
model's own distribution instead of one corpus's, which reduces that (Ji et al. 2025, "Beware of
calibration data for pruning LLMs", also generate synthetic calibration text from the model). With
``--calib self`` the dense model, before anything is pruned, samples every window the run takes
(:meth:`ebft.config.RunConfig.windows_drawn`: the calibration windows, the guard's held-out ones, LoRA's,
the finish's) once; each consumer takes a prefix of that one draw.

**How.** Each window follows one neutral start token, the tokenizer's BOS (else its EOS), which is not
part of the window; it is sampled one token at a time with a KV cache, ``batch`` windows at once:
temperature, then top-k, then top-p (nucleus), then the inverse of the kept distribution's CDF at a
uniform number. Special tokens and embedding rows past the tokenizer's vocabulary are never sampled, so a
window is plain text like any other source's. The randomness is per window: window ``i`` takes its
``seqlen`` uniform numbers from its own ``torch.Generator``, seeded with a hash of (run seed, ``i``).

**What the windows depend on**: the seed, the sampling settings, the model's weights and dtype, the
tokenizer (start token, special tokens), the generation batch (a batch's windows are computed together,
and kernels round differently at another batch size) and the device's kernels (a GPU's are not bit-for-bit
reproducible from one machine to another: the cache is what makes a draw repeatable there). Not on how
many windows are asked for: windows are generated in whole batches, so the first N windows of any draw
with the same key are the same N windows.

**The cache.** The windows go to ``<cache>/self-calibration/<key>.safetensors`` (``$EBFT_CACHE`` or
``~/.cache/ebft``, :func:`ebft.hub.cache_dir`), written atomically after every batch (a kill loses at most
the batch in progress). The key holds everything above: a digest of the loaded weights (a strided sample
of every tensor) and of the model's config, the tokenizer's vocabulary and special tokens, seqlen, seed,
sampling settings, batch, dtype and device type. A run that needs more windows than the file holds
generates only the batches missing; one that needs fewer reads a prefix; so a second run, a resumed run
and every cell of a sweep read the windows (one log line) instead of generating them. A file whose key,
shape, checksum or tokens are not what they should be is regenerated, with a warning.

Under torchrun rank 0 generates (or reads) the windows and broadcasts them: every rank holds the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import distributed, hub
from .atomic import write_atomic
from .errors import EbftError
from .system import work_counter

log = logging.getLogger(__name__)

FORMAT = 1  # how windows are drawn: a change to the sampler changes every key
SAMPLE_VALUES = 65536  # values of each weight tensor in the model's digest, spread over the whole tensor
CACHE_FOLDER = "self-calibration"


@dataclass(frozen=True)
class Sampling:
    """How the windows are sampled: the calib section's ``self_*`` settings."""

    temperature: float = 1.0
    top_p: float = 0.95
    top_k: int = 0  # 0: off
    batch: int = 16  # windows generated at once

    @classmethod
    def of(cls, calib) -> "Sampling":
        return cls(calib.self_temperature, calib.self_top_p, calib.self_top_k, calib.self_batch_size)


@dataclass
class SelfDraw:
    """The first windows of the model's own draw, and how they were come by (run.json's ``self_calibration``)."""

    windows: torch.Tensor  # [n, seqlen] token ids
    record: dict


# ----------------------------------------------------------------------------- sampling

def start_token(tokenizer) -> int:
    """The token every window follows: the tokenizer's BOS, else its EOS."""
    for name in ("bos_token_id", "eos_token_id"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, int):
            return token
    raise EbftError("calib self: the tokenizer has neither a BOS nor an EOS token to start the windows from; "
                    "give a text (--calib)")


def vocab_rows(model) -> int:
    """The width of the model's logits."""
    head = model.get_output_embeddings()
    return head.weight.shape[0] if head is not None else model.config.get_text_config().vocab_size


def banned_tokens(tokenizer, rows: int) -> torch.Tensor:
    """``[rows]`` bool: the tokens never sampled: every special token (BOS, EOS, padding, an added token
    marked special) and the embedding rows past the tokenizer's vocabulary (padding rows of a rounded-up
    embedding, which no text holds)."""
    banned = torch.zeros(rows, dtype=torch.bool)
    banned[min(len(tokenizer), rows):] = True
    special = set(tokenizer.all_special_ids)
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    banned[[i for i in special if 0 <= i < rows]] = True
    if bool(banned.all()):
        raise EbftError("calib self: every token of the model's vocabulary is a special token; give a text (--calib)")
    return banned


def window_noise(seed: int, index: int, seqlen: int) -> torch.Tensor:
    """The ``seqlen`` uniform numbers in [0, 1) window ``index`` is sampled with, from a generator of its own."""
    digest = hashlib.sha256(f"ebft self-calibration {seed} {index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.rand(seqlen, generator=generator)


def sample_next(logits: torch.Tensor, noise: torch.Tensor, banned: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The next token of each row of ``logits`` ``[B, V]``: banned tokens out, temperature, top-k, top-p
    (the fewest most likely tokens holding ``top_p`` of the probability), then the token where the kept
    distribution's CDF passes ``noise`` ``[B]`` (times the kept mass)."""
    scores = logits.float().masked_fill(banned, float("-inf"))
    scores = (scores - scores.amax(-1, keepdim=True)) / sampling.temperature  # ≤ 0: no overflow at any temperature
    order = None
    if 0 < sampling.top_k < scores.shape[-1]:
        scores, order = scores.topk(sampling.top_k, dim=-1)  # most likely first
    elif sampling.top_p < 1:
        scores, order = scores.sort(dim=-1, descending=True, stable=True)
    probs = scores.softmax(-1)
    if sampling.top_p < 1:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, 0.0)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (noise.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True)
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)  # rounding at the top end
    pick = torch.minimum(pick, last)
    return (pick if order is None else order.gather(-1, pick)).squeeze(-1)


def decode_step(model, ids: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
    """One forward of ``ids`` ``[B, T]`` after ``cache`` (None: none yet): ``(logits of the last position
    [B, V], the KV cache now)``. transformers calls the cache argument ``cache`` in recent 5.x releases,
    ``past_key_values`` before."""
    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{keyword: cache})
    return out.logits[:, -1], (out["cache"] if "cache" in out else out.past_key_values)


@torch.inference_mode()
def generate_batch(model, start: int, noise: torch.Tensor, banned: torch.Tensor, sampling: Sampling,
                   report=None) -> torch.Tensor:
    """``[B, S]`` tokens sampled by ``model`` (on its device) after the ``start`` token, one step per token
    with a KV cache; ``noise`` ``[B, S]``: each token's uniform number. The last token is sampled, never fed:
    the steps use positions 0 (the start token) to S - 1, so S may be the model's whole context."""
    device = next(model.parameters()).device
    rows, length = noise.shape
    noise, banned = noise.to(device), banned.to(device)
    tokens = torch.empty(rows, length, dtype=torch.long, device=device)
    step, cache = torch.full((rows, 1), start, dtype=torch.long, device=device), None
    for t in range(length):
        logits, cache = decode_step(model, step, cache)
        tokens[:, t] = sample_next(logits, noise[:, t], banned, sampling)
        step = tokens[:, t:t + 1]
        if report is not None:
            report(t + 1)
    return tokens.cpu()


def generate_windows(model, tokenizer, first: int, count: int, seqlen: int, seed: int, sampling: Sampling,
                     device, progress=None, on_batch=None) -> torch.Tensor:
    """Windows ``first`` to ``first + count`` of the draw (whole batches: both multiples of the batch), sampled
    by ``model`` on ``device`` (the whole model goes there for the generation, and back). ``on_batch(windows)``
    hears the windows generated so far after each batch; ``progress`` a bar over the tokens."""
    if first % sampling.batch or count % sampling.batch:
        raise ValueError(f"windows {first} to {first + count}: not whole batches of {sampling.batch}")
    banned, start = banned_tokens(tokenizer, vocab_rows(model)), start_token(tokenizer)
    report = work_counter(progress, "self-calibration: generating", count * seqlen, unit="token")
    home, done = next(model.parameters()).device, []
    model.to(device)
    try:
        for begin in range(first, first + count, sampling.batch):
            noise = torch.stack([window_noise(seed, i, seqlen) for i in range(begin, begin + sampling.batch)])
            offset = (begin - first) * seqlen
            done.append(generate_batch(model, start, noise, banned, sampling,
                                       lambda t: report(offset + t * sampling.batch)))
            if on_batch is not None:
                on_batch(torch.cat(done))
    finally:
        model.to(home)
    return torch.cat(done) if done else torch.empty(0, seqlen, dtype=torch.long)


# ----------------------------------------------------------------------------- the cache

def model_digest(model) -> str:
    """The loaded weights' identity: a digest of the model's config and of every tensor's dtype, shape and
    :data:`SAMPLE_VALUES` values strided over it. Equal for the same weights wherever they were loaded
    from (a copied folder, another path); different once weights change anywhere (pruning, fine-tuning)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("_name_or_path", "_commit_hash", "use_cache", "transformers_version")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // SAMPLE_VALUES)][:SAMPLE_VALUES]
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def tokenizer_digest(tokenizer) -> str:
    """The tokenizer's identity: its vocabulary, special tokens and start token."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    what = [vocab, sorted(tokenizer.all_special_ids), start_token(tokenizer), len(tokenizer)]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False, default=str).encode()).hexdigest()[:32]


def cache_key(model, tokenizer, seqlen: int, seed: int, sampling: Sampling, device) -> tuple[str, dict]:
    """``(key, what it is made of)``: everything the windows depend on (see the module docstring)."""
    what = {"format": FORMAT, "model": model_digest(model), "tokenizer": tokenizer_digest(tokenizer),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": torch.device(device).type, "seqlen": seqlen, "seed": seed, **dataclasses.asdict(sampling)}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24], what


def _checksum(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()


class WindowCache:
    """One key's file of windows: read (checked, never trusted) and written (atomically)."""

    def __init__(self, key: str, what: dict):
        self.key, self.what = key, what
        self.path = hub.cache_dir() / CACHE_FOLDER / f"{key}.safetensors"
        self._warned = False

    def read(self, seqlen: int, batch: int, banned: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        """``(windows, seconds their generation took)``; ``(None, 0)`` without a file or with one that is not
        this key's windows (said in a warning: it is regenerated)."""
        if not self.path.exists():
            return None, 0.0
        try:
            with safe_open(str(self.path), "pt") as f:
                meta, windows = f.metadata() or {}, f.get_tensor("windows")
            problem = self._problem(windows, meta, seqlen, batch, banned)
        except Exception as exc:  # truncated, not safetensors, no such tensor
            problem, meta = hub.reason(exc), {}
        if problem is not None:
            log.warning("self-calibration: the cached windows %s are damaged (%s): generating them again",
                        self.path, problem)
            return None, 0.0
        return windows, float(meta.get("seconds", 0.0))

    def _problem(self, windows: torch.Tensor, meta: dict, seqlen: int, batch: int, banned: torch.Tensor) -> str | None:
        if meta.get("written_by") != "ebft" or meta.get("key") != self.key:
            return "not the windows of this key"
        if windows.dtype != torch.long or windows.dim() != 2 or windows.shape[1] != seqlen:
            return f"{windows.dtype} {list(windows.shape)}, not int64 [N, {seqlen}]"
        if windows.shape[0] == 0 or windows.shape[0] % batch:
            return f"{windows.shape[0]} windows, not whole batches of {batch}"
        if meta.get("sha256") != _checksum(windows):
            return "checksum mismatch"
        if int(windows.min()) < 0 or int(windows.max()) >= len(banned) or bool(banned[windows].any()):
            return "tokens that are never sampled"
        return None

    def write(self, windows: torch.Tensor, seconds: float) -> None:
        """Replace the file with ``windows`` (a failure to write is a warning: a later run generates again)."""
        meta = {"written_by": "ebft", "key": self.key, "sha256": _checksum(windows), "seconds": f"{seconds:.3f}",
                "what": json.dumps(self.what, sort_keys=True)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, lambda tmp: save_file({"windows": windows.contiguous()}, str(tmp), metadata=meta))
        except OSError as exc:
            if not self._warned:
                log.warning("self-calibration: could not write the cache %s (%s): a later or resumed run generates "
                            "the windows again", self.path, hub.reason(exc))
            self._warned = True


# ----------------------------------------------------------------------------- the draw

def self_windows(model, tokenizer, n: int, seqlen: int, seed: int, sampling: Sampling, device,
                 progress=None) -> SelfDraw:
    """The first ``n`` windows of the dense ``model``'s own draw: read from the cache, the batches missing
    generated on ``device``. Under torchrun, rank 0's on every rank."""
    shard = distributed.current()
    if shard is not None and not shard.main:
        return SelfDraw(_from_rank0(None, n, seqlen), {"from": "rank 0"})
    draw = _draw(model, tokenizer, n, seqlen, seed, sampling, device, progress)
    if shard is not None:
        _from_rank0(draw.windows, n, seqlen)
    return draw


def _from_rank0(windows: torch.Tensor | None, n: int, seqlen: int) -> torch.Tensor:
    """Rank 0's ``[n, seqlen]`` windows, broadcast to every rank (``windows``: rank 0's, None elsewhere)."""
    device = distributed.collective_device()
    shared = (windows.to(device) if windows is not None
              else torch.empty((n, seqlen), dtype=torch.long, device=device))
    distributed.broadcast_([shared])
    return shared.cpu()


def _draw(model, tokenizer, n: int, seqlen: int, seed: int, sampling: Sampling, device, progress) -> SelfDraw:
    key, what = cache_key(model, tokenizer, seqlen, seed, sampling, device)
    cache = WindowCache(key, what)
    cached, seconds_before = cache.read(seqlen, sampling.batch, banned_tokens(tokenizer, vocab_rows(model)))
    have = cached if cached is not None else torch.empty(0, seqlen, dtype=torch.long)
    total = -(-n // sampling.batch) * sampling.batch
    generated, start = max(total - len(have), 0), time.perf_counter()
    if generated:
        log.info("self-calibration: generating %d windows of %d tokens on %s, %d at a time, into %s", generated,
                 seqlen, device, sampling.batch, cache.path)
        old = have
        have = torch.cat([old, generate_windows(
            model, tokenizer, len(old), generated, seqlen, seed, sampling, device, progress,
            on_batch=lambda new: cache.write(torch.cat([old, new]), seconds_before + time.perf_counter() - start))])
    else:
        log.info("self-calibration: %d windows of %d tokens read from the cache %s (no generation)", n, seqlen,
                 cache.path)
    seconds = time.perf_counter() - start if generated else 0.0
    record = {"generated": generated > 0, "windows": n, "seqlen": seqlen, "windows_generated": generated,
              "seconds": round(seconds, 2),
              "tokens_per_second": round(generated * seqlen / seconds, 1) if generated and seconds > 0 else None,
              "cache_file": str(cache.path), "cache_windows": len(have),
              "cache_generation_seconds": round(seconds_before + seconds, 2),
              "start_token": tokenizer.convert_ids_to_tokens(start_token(tokenizer)),
              "sampling": dataclasses.asdict(sampling), "key": key}
    return SelfDraw(have[:n].clone(), record)
