"""What clipping the fp16-*scaled* gradients does to the reference code's EBFT steps, measured on SmolLM2.

The EBFT reference code (sunggo/EBFT ``lib/finetune.py``) calls ``clip_grad_norm_(params, 1.0)`` after
``scaler.scale(loss).backward()`` and before ``scaler.step``: it clips the gradients *multiplied by the
GradScaler's scale* S (65536 when training starts; it doubles every 2000 clean steps, more than a
block's 320), and the step then divides them by S. Whenever the true gradient norm exceeds 1/S, the
gradients reaching AdamW have norm 1/S, and AdamW's update g/(√v + ε) is no longer ±lr but
lr·|g|/(|g| + ε) per weight, with ε = 1e-8 comparable to the tiny |g|. ebft unscales before clipping.

This script takes one block of SmolLM2 (``--block``) pruned by Wanda to 50 %, its dense outputs as the
target, 8 calibration windows of 256 tokens, and trains two copies for ``--steps`` steps at lr 2e-4 with
AdamW (0.9, 0.95), weight decay 0.1 — one clipping the true gradients (ebft), one the gradients scaled by
S (the reference, simulated in fp32) — and prints: the true gradient norm, the norm AdamW receives, the
median per-weight step in units of lr, and the block loss before and after. Writes
benchmarks/results/scaled_clipping.json.

    python benchmarks/scaled_clipping.py --block 10 --steps 20
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def block_problem(index: int, n: int, seqlen: int):
    """Block ``index`` of SmolLM2 Wanda-pruned to 50 %, its inputs, dense targets, how to call it, its masks."""
    from ebft import RunConfig
    from ebft.capture import capture
    from ebft.masks import parse_pattern
    from ebft.models import find_blocks, find_linears, load_model
    from ebft.pipeline import prepare_data
    from ebft.prune import BlockSite, get_pruner
    from ebft.walk import dense_pass

    model, tokenizer = load_model("builtin:smollm2", "float32")
    cfg = RunConfig(model="builtin:smollm2")
    cfg.calib.nsamples, cfg.calib.seqlen, cfg.eval.sources = n, seqlen, []
    ids = prepare_data(model, tokenizer, cfg).calib
    x, calls = capture(model, ids, torch.device("cpu"), batch_size=n)
    blocks = find_blocks(model)[1]
    for i in range(index):
        calls[i].forward(blocks[i], x, out=x)
    block = blocks[index]
    linears = find_linears(block)
    stats, targets = dense_pass(block, calls[index], x, linears, {"sq"})
    pattern = parse_pattern("unstructured", 0.5, None, "row")
    masks, _ = get_pruner("wanda").prune_block(block, linears, stats, BlockSite(index, "b", model.config, pattern), None)
    return block, x, targets, calls[index], masks


def train(block, x, y, io, masks, steps: int, scale: float | None, lr: float = 2e-4) -> dict:
    from ebft.models import find_linears
    from ebft.recover.ebft import trainable_parameters
    from ebft.recover.training import make_adamw

    block = copy.deepcopy(block)
    linears = find_linears(block)
    params = trainable_parameters(block, linears, True)
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    weight_masks = [(linears[n].weight, m.float()) for n, m in masks.items()]
    optimizer = make_adamw(params, lr, 0.1)

    def loss_now() -> float:
        with torch.no_grad():
            return float((io.call(block, x) - y).square().mean())

    before, true_norms, seen_norms, steps_in_lr = loss_now(), [], [], []
    for _ in range(steps):
        start = [p.detach().clone() for p in params]
        loss = (io.call(block, x) - y).square().mean()
        (loss * (scale or 1.0)).backward()
        for w, m in weight_masks:
            w.grad.mul_(m)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)  # the reference clips here, scaled
        true_norms.append(float(norm) / (scale or 1.0))
        if scale:
            for p in params:
                p.grad.div_(scale)  # what scaler.step does after the clip
        seen_norms.append(float(torch.cat([p.grad.flatten() for p in params]).norm()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        moved = torch.cat([(p.detach() - s).abs().flatten() for p, s in zip(params, start)])
        steps_in_lr.append(float(moved[moved > 0].median()) / lr)
    return {"loss_before": before, "loss_after": loss_now(), "true_grad_norm": true_norms[0],
            "grad_norm_adamw_sees": seen_norms[0], "median_step_in_lr_first": steps_in_lr[0],
            "median_step_in_lr_last": steps_in_lr[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scale", type=float, default=65536.0, help="the GradScaler's scale (its initial 2**16)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    block, x, y, io, masks = block_problem(args.block, 8, 256)
    rows = {"ebft (true gradients clipped)": train(block, x, y, io, masks, args.steps, None),
            f"reference (scaled by {args.scale:g}, then clipped)": train(block, x, y, io, masks, args.steps, args.scale)}
    print(f"| SmolLM2 block {args.block}, Wanda 50 %, {args.steps} steps at lr 2e-4 | true grad norm | norm AdamW sees "
          "| median step / lr (first, last) | block loss before → after |\n|---|---:|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['true_grad_norm']:.3g} | {r['grad_norm_adamw_sees']:.3g} | "
              f"{r['median_step_in_lr_first']:.3g}, {r['median_step_in_lr_last']:.3g} | "
              f"{r['loss_before']:.4g} → {r['loss_after']:.4g} |")
    out = HERE / "results" / "scaled_clipping.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"block": args.block, "steps": args.steps, "scale": args.scale, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
