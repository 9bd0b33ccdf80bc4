"""Time one block of EBFT against a reference-style training loop, on the same data, in one run.

The reference-style loop does what the original EBFT code does per step: copies the batch from CPU
memory, multiplies the mask into the weight inside every forward (a parametrization), uses fp16
autocast with a GradScaler on GPU (clipping the *scaled* gradients), and calls ``.item()`` on the
loss every step. ebft's loop keeps inputs/targets on the device, masks the gradients instead of the
weights, unscales before clipping, and reads the loss once per epoch.

    python benchmarks/ebft_block.py                       # CPU: a real SmolLM2-135M block
    python benchmarks/ebft_block.py --shape llama7b       # GPU: a LLaMA-7B-shaped block, 256 x 1024

Prints a table and writes benchmarks/results/ebft_block-<device>-<shape>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ebft.masks import parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.recover import BlockContext
from ebft.recover.ebft import EbftSettings, ebft
from ebft.recover.training import reconstruction_loss
from ebft.capture import BlockIO, capture
from ebft.prune import BlockSite
from ebft.walk import PruneSpec, dense_pass


class _Masked(nn.Module):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w):
        return w * self.mask


def reference_loop(block, inputs_cpu, targets_cpu, masks, linears, io, cfg, device):
    """The reference's style of loop, for timing (its clip-on-scaled-gradients bug kept on purpose)."""
    for name, lin in linears.items():
        parametrize.register_parametrization(lin, "weight", _Masked(masks[name].to(device, lin.weight.dtype)))
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)  # torch's default kernel
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    n = inputs_cpu.shape[0]
    losses, epoch_times = [], []
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        for i in range(0, n, cfg.batch_size):
            x = inputs_cpu[i:i + cfg.batch_size].to(device)
            y = targets_cpu[i:i + cfg.batch_size].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                loss = reconstruction_loss(io.call(block, x), y)
            if scaler:
                scaler.scale(loss).backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # on scaled gradients, as the reference
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        _sync(device)
        epoch_times.append(time.perf_counter() - start)
    for lin in linears.values():
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    return {"seconds_per_epoch": sum(epoch_times) / len(epoch_times), "final_loss": sum(losses[-max(1, n // cfg.batch_size):]) / max(1, n // cfg.batch_size)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def smollm2_block(n, seqlen, device):
    from ebft.data import calibration_windows
    from ebft.models import load_model

    model, tokenizer = load_model("builtin:smollm2")
    ids = calibration_windows(tokenizer, "offline", n, seqlen, seed=0)
    x, calls = capture(model, ids, torch.device("cpu"), batch_size=8)
    _, blocks = find_blocks(model)
    block = blocks[3]
    for i, b in enumerate(list(blocks)[:3]):  # inputs of block 3 (a typical one)
        x = calls[i].forward(b, x)
    return block, x, calls[3]


def llama7b_block(n, seqlen, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    block = LlamaDecoderLayer(cfg, 0).to(device)  # fp32 master weights; activations in half precision
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, seqlen, 4096, generator=g) * 0.5).to(dtype)
    pos = torch.arange(seqlen, device=device)[None]
    rope = LlamaRotaryEmbedding(cfg).to(device)
    cos, sin = rope(x[:1].to(device), pos)
    io = BlockIO((), {"position_embeddings": (cos.to(dtype), sin.to(dtype)), "position_ids": pos,
                      "attention_mask": None}, torch.device(device), batch_size=8)
    return block, x, io


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["smollm2", "llama7b"], default=None,
                    help="default: llama7b on CUDA, smollm2 on CPU")
    ap.add_argument("--nsamples", type=int, default=None)
    ap.add_argument("--seqlen", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = args.shape or ("llama7b" if device.type == "cuda" else "smollm2")
    n = args.nsamples or (256 if shape == "llama7b" else 32)
    seqlen = args.seqlen or (1024 if shape == "llama7b" else 256)
    make = llama7b_block if shape == "llama7b" else smollm2_block
    block, x_cpu, io = make(n, seqlen, device)
    block.to(device)
    io.device = torch.device(device)
    linears = find_linears(block)

    # targets + Wanda statistics from the dense block, then prune once; both loops start from here
    stats, y_cpu = dense_pass(block, io, x_cpu, linears, {"sq"})
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", args.sparsity, None, "row"))
    masks, _ = spec.pruner.prune_block(block, linears, stats, BlockSite(0, "block", None, spec.pattern), None)
    pruned = {k: v.detach().clone() for k, v in block.state_dict().items()}
    cfg = EbftSettings(epochs=args.epochs)

    results = {}
    # reference-style: data stays in CPU memory and is copied every step
    _reset_peak(device)
    results["reference-style"] = reference_loop(block, x_cpu, y_cpu, masks, linears, io, cfg, device)
    results["reference-style"]["peak_memory_bytes"] = _peak(device)

    block.load_state_dict(pruned)
    x_dev, y_dev = x_cpu.to(device), y_cpu.to(device)  # ebft keeps them on the device when they fit
    _reset_peak(device)
    ctx = BlockContext(index=0, block=block, linears=linears, inputs=x_dev, targets=y_dev, masks=masks, stats=stats,
                       pattern=spec.pattern, io=io)
    record = ebft(ctx, cfg)  # train_seconds: the epochs alone
    results["ebft"] = {"seconds_per_epoch": record["train_seconds"] / args.epochs,
                       "final_loss": record["epoch_losses"][-1], "peak_memory_bytes": _peak(device)}

    tokens = n * seqlen
    lin_params = sum(l.weight.numel() for l in linears.values())
    hidden = x_cpu.shape[-1]
    flops_per_epoch = 3 * (2 * lin_params * tokens + 4 * n * seqlen * seqlen * hidden)  # fwd+bwd ≈ 3x fwd
    for r in results.values():
        r["tflops"] = flops_per_epoch / r["seconds_per_epoch"] / 1e12
    ratio = results["reference-style"]["seconds_per_epoch"] / results["ebft"]["seconds_per_epoch"]
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "shape": shape, "nsamples": n, "seqlen": seqlen, "epochs": args.epochs, "sparsity": args.sparsity,
        "torch": torch.__version__, "results": results, "speedup_vs_reference": ratio,
        "estimate_32_blocks_10_epochs_minutes": results["ebft"]["seconds_per_epoch"] * 10 * 32 / 60,
    }
    print(f"{shape} block on {summary['device']}: {n} windows x {seqlen} tokens, {args.epochs} epochs")
    print("| loop | s/epoch | TFLOP/s | peak memory | final loss |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds_per_epoch']:.2f} | {r['tflops']:.2f} | "
              f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {r['final_loss']:.4g} |")
    print(f"ebft is {ratio:.2f}x the reference-style loop; 32 blocks x 10 epochs ≈ "
          f"{summary['estimate_32_blocks_10_epochs_minutes']:.1f} min")
    out = Path(__file__).parent / "results" / f"ebft_block-{device.type}-{shape}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    main()
