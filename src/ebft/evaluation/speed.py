"""Measured speed of a model: prefill and generation tokens per second (what structured pruning buys).

Prefill: one forward over a ``[1, prompt]`` window, no cache. Generation: greedy decoding of ``new``
tokens with the KV cache after a short prompt; tokens/s counts the new tokens only. Each is timed
``repeats`` times after one warm-up and the median is reported. Token ids are random (speed does not
depend on the text). The numbers are only comparable within one run on one machine.
"""
from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def measure_speed(model, device="cpu", prompt: int = 256, new: int = 32, repeats: int = 3, vocab: int | None = None) -> dict:
    """``{"prefill_tokens_per_s", "generate_tokens_per_s", "prompt", "new", "repeats"}``."""
    device = torch.device(device)
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    home = next(model.parameters()).device
    model.to(device)
    try:
        def timed(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        prefill = timed(lambda: model(ids, use_cache=False))
        short = ids[:, :16]
        eos = getattr(model.generation_config, "eos_token_id", None)
        generate = timed(lambda: model.generate(short, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                                use_cache=True, pad_token_id=eos if isinstance(eos, int) else 0))
    finally:
        model.to(home)
    return {"prefill_tokens_per_s": round(prompt / prefill, 1), "generate_tokens_per_s": round(new / generate, 2),
            "prompt": prompt, "new": new, "repeats": repeats, "device": str(device)}
