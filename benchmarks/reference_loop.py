"""A plain reference loop of the whole method — Wanda 50 % then EBFT block by block — and ebft's `run` on the
same windows, back to back: the baseline ebft's speed is judged against.

The loop is what a researcher writes from the paper (Guo et al. 2024, EBFT; Sun et al. 2023, Wanda) in about a
hundred lines of plain PyTorch, nothing of ebft's walk in it: transformers loads the model in fp32 (TF32 matmuls
on a GPU); block 0's inputs come from the embeddings; for each decoder layer it takes the dense layer's outputs
on the current inputs (the target) with each linear's input norms, zeroes the 50 % of each row with the
smallest |W|·‖x‖, trains every parameter of the layer with AdamW (the paper recipe's learning rate, weight
decay, betas (0.9, 0.95), batch, epochs, linear decay, gradients clipped at 1.0, masked weights kept at zero),
then propagates the inputs through the trained layer. Perplexity is a plain forward of the whole model over
the evaluation windows, before and after. No checkpoint, no evaluation streams, no guard.

ebft runs `ebft run` with the paper recipe and the guard off, everything else its defaults (a checkpoint, the
dense / pruned / recovered perplexities from one walk). Both get the same calibration and evaluation windows
(ebft's own data functions make them for the loop).

    # the CPU proxy (minutes): SmolLM2, 32 x 256 offline C4 windows, 2 epochs, WikiText-2 test 20 x 512
    python benchmarks/reference_loop.py
    # the paper budget on a GPU (benchmarks/gpu_check.py's first stage runs this)
    python benchmarks/reference_loop.py --device cuda --nsamples 256 --seqlen 1024 --epochs 10 --eval-seqlen 2048 \\
        --eval-windows 0

Prints a table, writes ``benchmarks/results/reference_loop-<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
SHARED = HERE.parent.parent / "shared" / "data"
WIKI = SHARED / "wikitext-2-raw" / "wiki.test.raw"


# ----------------------------------------------------------------------------- the reference loop

def reference_run(model_path: str, calib, evals, device: str, epochs: int, batch: int, lr: float, wd: float,
                  clip: float = 1.0, sparsity: float = 0.5) -> dict:
    """Wanda + EBFT on ``model_path`` (a Hugging Face folder), the plain way; times and perplexities."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    start, dev = time.perf_counter(), torch.device(device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(dev).eval()
    times = {"load": time.perf_counter() - start}

    @torch.no_grad()
    def perplexity(ids):
        nll, count = 0.0, 0
        for i in range(ids.shape[0]):
            logits = model(ids[i:i + 1].to(dev)).logits[0, :-1].float()
            nll += F.cross_entropy(logits, ids[i, 1:].to(dev), reduction="sum").item()
            count += ids.shape[1] - 1
        return math.exp(nll / count)

    t = time.perf_counter()
    dense = perplexity(evals)
    times["dense perplexity"] = time.perf_counter() - t
    t = time.perf_counter()
    inner = model.model
    with torch.no_grad():
        x = inner.embed_tokens(calib.to(dev))
        positions = torch.arange(calib.shape[1], device=dev)[None]
        rope = inner.rotary_emb(x, positions)
    times["capture"] = time.perf_counter() - t

    def layer_out(layer, h):
        out = layer(h, position_embeddings=rope, position_ids=positions)
        return out[0] if isinstance(out, tuple) else out

    blocks = []
    for layer in inner.layers:
        t = time.perf_counter()
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sq = {n: torch.zeros(m.in_features, device=dev) for n, m in linears.items()}
        def note(n):
            def hook(module, args, output):  # (returns None: a hook's value would replace the output)
                sq[n].add_(args[0].float().pow(2).sum((0, 1)))
            return hook

        hooks = [m.register_forward_hook(note(n)) for n, m in linears.items()]
        with torch.no_grad():  # the dense layer on the current inputs: the target
            y = torch.cat([layer_out(layer, x[i:i + batch]) for i in range(0, len(x), batch)])
        for h in hooks:
            h.remove()
        masks = {}
        with torch.no_grad():  # Wanda: per row, zero the weights of the smallest |W| * ||x||
            for n, m in linears.items():
                score = m.weight.abs() * sq[n].sqrt()[None]
                drop = score.topk(int(score.shape[1] * sparsity), dim=1, largest=False).indices
                masks[n] = torch.ones_like(m.weight, dtype=torch.bool).scatter_(1, drop, False)
                m.weight.mul_(masks[n])
        params = list(layer.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=wd)
        steps = epochs * math.ceil(len(x) / batch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
        g = torch.Generator().manual_seed(len(blocks))
        losses = []
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch):
                idx = order[i:i + batch].to(dev)
                loss = F.mse_loss(layer_out(layer, x[idx]), y[idx])
                loss.backward()
                for n, m in linears.items():
                    m.weight.grad.mul_(masks[n])
                torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            for n, m in linears.items():  # AdamW's decay never moves a zero with a zero gradient; checked anyway
                assert not m.weight[~masks[n]].any()
            x = torch.cat([layer_out(layer, x[i:i + batch]) for i in range(0, len(x), batch)])
        del y
        blocks.append({"seconds": time.perf_counter() - t, "final_loss": sum(losses[-8:]) / len(losses[-8:])})
    times["blocks"] = sum(b["seconds"] for b in blocks)
    t = time.perf_counter()
    recovered = perplexity(evals)
    times["recovered perplexity"] = time.perf_counter() - t
    return {"perplexity": {"dense": dense, "recovered": recovered}, "seconds": times, "blocks": blocks,
            "wall_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------- ebft on the same windows

def ebft_run(model: str, calib_source: str, eval_source: str, device: str, nsamples: int, seqlen: int,
             epochs: int, eval_seqlen: int, eval_windows: int | None, out: Path, extra=()) -> dict:
    from ebft.cli import main

    args = ["run", "--model", model, "--calib", calib_source, "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--recipe", "paper", "--epochs", str(epochs), "--recover-guard", "0", "--eval", eval_source,
            "--eval-seqlen", str(eval_seqlen), "--device", device, "--out", str(out), "--overwrite", *extra]
    if eval_windows:
        args += ["--eval-windows", str(eval_windows)]
    start = time.perf_counter()
    code = main(args)
    wall = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"ebft run exited {code}")
    record = json.loads((out / "run.json").read_text())
    record["process_wall_seconds"] = wall
    return record


def windows_for(model: str, calib_source: str, eval_source: str, nsamples: int, seqlen: int, eval_seqlen: int,
                eval_windows: int | None, folder: Path, seed: int = 0):
    """The calibration and evaluation windows `ebft run` makes for these settings (its own functions), and the
    model saved into ``folder`` in fp32 (the loop loads that: a plain safetensors folder, the fastest load
    there is, so the loop's time is not inflated by a GGUF's dequantisation)."""
    import torch

    from ebft.data import adds_bos, calibration_windows, eval_tokens
    from ebft.evaluation.perplexity import eval_windows as cut
    from ebft.models import load_model
    from ebft.output import save_pretrained

    net, tokenizer = load_model(model, "float32", "cpu")
    save_pretrained(net, tokenizer, folder, torch.float32)
    calib = calibration_windows(tokenizer, calib_source, nsamples, seqlen, seed)
    evals = cut(eval_tokens(tokenizer, eval_source, bos=adds_bos(tokenizer)), eval_seqlen, eval_windows or None)
    return calib, evals


def compare(model: str, calib_source: str, eval_source: str, device: str, nsamples: int, seqlen: int, epochs: int,
            eval_seqlen: int, eval_windows: int | None, first: str = "ebft") -> dict:
    """ebft and the reference loop, back to back, on the same windows; the ratio of their wall times."""
    from ebft.config import RunConfig

    cfg = RunConfig(model=model, out="unused")
    cfg.recover.recipe, cfg.calib.nsamples = "paper", nsamples
    s = cfg.recovery_settings()
    out: dict = {"model": model, "device": device, "calib": f"{calib_source} {nsamples} x {seqlen}", "epochs": epochs,
                 "eval": f"{eval_source} at {eval_seqlen}", "recipe": {
                     "lr": s.lr, "weight_decay": s.weight_decay, "batch_size": s.batch_size, "grad_clip": s.grad_clip}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense"
        calib, evals = windows_for(model, calib_source, eval_source, nsamples, seqlen, eval_seqlen, eval_windows, path)
        for name in ([first] + [n for n in ("ebft", "reference") if n != first]):
            if name == "ebft":
                out["ebft"] = ebft_run(model, calib_source, eval_source, device, nsamples, seqlen, epochs,
                                       eval_seqlen, eval_windows, Path(tmp) / "ebft")
            else:
                out["reference"] = reference_run(str(path), calib, evals, device, epochs, s.batch_size, s.lr,
                                                 s.weight_decay, s.grad_clip or 1.0)
            _free(device)
    e, r = out["ebft"], out["reference"]
    out["ratio_whole_run"] = r["wall_seconds"] / e["process_wall_seconds"]
    load = e.get("phases", {}).get("seconds", {}).get("load", 0.0)
    out["ratio_without_load"] = ((r["wall_seconds"] - r["seconds"]["load"])
                                 / (e["process_wall_seconds"] - load))
    return out


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def table(out: dict) -> str:
    e, r = out["ebft"], out["reference"]
    name = next(iter(e["perplexity"]))
    ep = e["perplexity"][name]
    blocks_e = [b["seconds"] for b in e["blocks"]]
    blocks_r = [b["seconds"] for b in r["blocks"]]
    phases = e.get("phases", {})
    rows = ["| | ebft run | reference loop |", "|---|---:|---:|",
            f"| whole run (s) | {e['process_wall_seconds']:.1f} | {r['wall_seconds']:.1f} |",
            f"| load (s) | {phases.get('seconds', {}).get('load', float('nan')):.1f} | {r['seconds']['load']:.1f} |",
            f"| to the first block (s) | {phases.get('to_first_block') or float('nan'):.1f} | "
            f"{r['seconds']['load'] + r['seconds']['dense perplexity'] + r['seconds']['capture']:.1f} |",
            f"| per block, median (s) | {sorted(blocks_e)[len(blocks_e) // 2]:.2f} | "
            f"{sorted(blocks_r)[len(blocks_r) // 2]:.2f} |",
            f"| dense perplexity | {ep['dense']:.3f} | {r['perplexity']['dense']:.3f} |",
            f"| recovered perplexity | {ep['recovered']:.3f} | {r['perplexity']['recovered']:.3f} |",
            f"| reference / ebft, whole run | {out['ratio_whole_run']:.2f}x | |",
            f"| reference / ebft, without the load | {out['ratio_without_load']:.2f}x | |"]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--calib", default="offline-c4")
    ap.add_argument("--eval", default=str(WIKI))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=20, help="0: all")
    ap.add_argument("--first", choices=("ebft", "reference"), default="ebft", help="which runs first")
    args = ap.parse_args(argv)
    out = compare(args.model, args.calib, args.eval, args.device, args.nsamples, args.seqlen, args.epochs,
                  args.eval_seqlen, args.eval_windows or None, args.first)
    print(table(out))
    path = HERE / "results" / f"reference_loop-{args.device.split(':')[0]}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
