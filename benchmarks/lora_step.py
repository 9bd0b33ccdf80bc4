"""What masked LoRA's full out × in product costs per training step, on SmolLM2 (issue 20, part 2).

Masked LoRA (``--lora-merge masked``, ebft's default) trains the update already masked,
y = Wx + (s·(BA) ⊙ M)x: its forward and its input gradient each multiply by an out × in matrix, and
its adapter gradient needs the full product gᵀx, where plain LoRA (``remask``) multiplies by A and B
only (rank r). This script times training steps of both — the same pruned model (Wanda 50 %), the
same 4 windows × 256 tokens per step — with adapters on ``q_proj``/``v_proj`` (the default) and on
every block linear, alternating the variants step by step in one process so that the machine's load
hits both alike, and prints the median step time of each and their ratio. Writes
benchmarks/results/lora_step.json.

    python benchmarks/lora_step.py --steps 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def pruned_smollm2(nsamples: int = 8, seqlen: int = 256):
    """SmolLM2 pruned by Wanda to 50 % (through ebft's walk), its masks, and training windows."""
    from ebft import RunConfig
    from ebft.masks import parse_pattern
    from ebft.models import load_model
    from ebft.pipeline import prepare_data
    from ebft.prune import get_pruner
    from ebft.walk import PruneSpec, walk

    model, tokenizer = load_model("builtin:smollm2", "float32")
    cfg = RunConfig(model="builtin:smollm2")
    cfg.calib.nsamples, cfg.calib.seqlen, cfg.eval.sources = nsamples, seqlen, []
    ids = prepare_data(model, tokenizer, cfg).calib
    result = walk(model, ids, PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.5)))
    return model, result.masks, ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    from ebft.recover.lora import add_adapters, freeze, remove_adapters, resolve_targets

    torch.manual_seed(0)
    model, masks, ids = pruned_smollm2(max(args.batch, 8))
    batch = ids[:args.batch]
    unfreeze = freeze(model)
    model.train()
    rows = {}
    for targets in ("qv", "all"):
        names = resolve_targets(model, targets)
        variants = {"plain (remask)": {}, "masked": masks}
        times: dict[str, list[float]] = {v: [] for v in variants}
        for step in range(args.steps + 1):
            for variant, variant_masks in variants.items():
                adapters = add_adapters(model, names, variant_masks, 8, 16, 0.05)
                params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
                optimizer = torch.optim.AdamW(params, lr=1e-3)
                start = time.perf_counter()
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:  # the first is warm-up
                    times[variant].append(time.perf_counter() - start)
                remove_adapters(model, adapters)
        medians = {v: statistics.median(t) for v, t in times.items()}
        rows[targets] = {"target_names": names, "seconds": medians,
                         "masked_over_plain": round(medians["masked"] / medians["plain (remask)"], 3)}
        print(f"targets {targets} ({', '.join(names)} in every block): plain {medians['plain (remask)']:.2f} s/step, masked "
              f"{medians['masked']:.2f} s/step, ratio {rows[targets]['masked_over_plain']}", flush=True)
    unfreeze()
    path = HERE / "results" / "lora_step.json"
    path.write_text(json.dumps({"steps": args.steps, "batch": args.batch, "seqlen": int(ids.shape[1]),
                                "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
