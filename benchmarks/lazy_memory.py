"""Peak host memory of the eager and the lazy (block-by-block) paths on a wide random Llama.

Each path runs in a fresh process: load the model, run every block in order on the same token
windows (zeroing each block's small weights just before it runs, so the output differs from the
input), then save. Eager: ``from_pretrained`` + ``save_pretrained``. Lazy:
:func:`ebft.blockstore.load_lazy`, each block read before it runs and written + freed after it
(:class:`ebft.weights.ShardWriter`). Measured: the peak resident set after the imports minus the
resident set then (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; see :func:`reset_peak`).

    python benchmarks/lazy_memory.py                        # hidden 512, 6 blocks: 100 MiB of fp32 weights
    python benchmarks/lazy_memory.py --hidden 1024 --layers 8

Prints a table and writes benchmarks/results/lazy_memory-h<hidden>-l<layers>.json. ``--worker`` runs one path and prints
its measurement as JSON (the tests call it that way).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def reset_peak() -> float:
    """Start measuring here: reset the peak to the current resident set; return that (MiB).

    ``ru_maxrss`` cannot be used alone: after a ``vfork`` + ``exec`` (how ``subprocess`` starts
    Python) it starts from the *parent's* peak. Linux's per-process high-water mark (``VmHWM``) can
    be reset by writing 5 to ``/proc/self/clear_refs``; elsewhere fall back to ``ru_maxrss``.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_mib("VmRSS")
    except OSError:
        return peak()


def peak() -> float:
    """Peak resident set (MiB) since :func:`reset_peak` (or since the start)."""
    hwm = _status_mib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_wide_model(folder: Path, hidden: int = 512, intermediate: int = 2048, layers: int = 6,
                    vocab: int = 1000, max_shard_size: str = "30MB", seed: int = 0) -> dict:
    """Save a random fp32 Llama (several shards) with a tiny tokenizer; return its sizes in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(folder)
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"block_bytes": block, "model_bytes": total, "outside_bytes": total - layers * block}


def prune_small_(block, threshold: float = 0.02) -> None:
    """Zero each linear's weights below ``threshold`` in magnitude (about 2/3 of them at the default
    init): a stand-in for the walk's work that needs little memory of its own, so the measurement
    shows the loading and writing."""
    import torch

    for module in block.modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            w.masked_fill_(w.abs() < threshold, 0)


def walk_with_hooks(model, store, writer=None):
    """Run the model's forward with each block loaded (and pruned) just before it runs and
    released (written to ``writer``) just after: the order the walk uses, via the store's API."""
    handles = []
    for i, block in enumerate(store.blocks):
        def before(module, args, i=i):
            prune_small_(store.load(i, "cpu"))

        def after(module, args, output, i=i):
            store.release(i, write_to=writer)

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    return handles


def run_one(mode: str, model_dir: Path, out: Path, windows: int = 4, seqlen: int = 64) -> dict:
    """One path in this process; the tokens are fixed so both paths see the same inputs."""
    import torch
    from transformers import AutoModelForCausalLM

    from ebft.blockstore import EagerBlocks, load_lazy
    from ebft.weights import ShardWriter

    torch.set_num_threads(1)
    import transformers.models.llama.modeling_llama  # noqa: F401  (imports are not what we measure)

    baseline = reset_peak()
    start = time.perf_counter()
    ids = torch.randint(0, 1000, (windows, seqlen), generator=torch.Generator().manual_seed(1))
    if mode == "lazy":
        model, tokenizer, store = load_lazy(str(model_dir), dtype="float32")
        store.load_outside()
        writer = ShardWriter(out, max_shard_size="30MB")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        store, writer = EagerBlocks(model), None
    walk_with_hooks(model, store, writer)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    torch.save(logits, out.parent / f"{mode}-logits.pt")
    if mode == "lazy":
        store.release_outside(write_to=writer)
        writer.finish(model)
    else:
        model.save_pretrained(out, max_shard_size="30MB")
    top = peak()
    return {"mode": mode, "baseline_mib": round(baseline, 1), "peak_mib": round(top, 1),
            "growth_mib": round(top - baseline, 1), "seconds": round(time.perf_counter() - start, 2)}


def measure(mode: str, model_dir: Path, out: Path) -> dict:
    """Run one path in a fresh Python process and return its measurement."""
    done = subprocess.run([sys.executable, __file__, "--worker", mode, "--model", str(model_dir), "--out", str(out)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=("eager", "lazy"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args.model, args.out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = make_wide_model(tmp / "model", hidden=args.hidden, intermediate=4 * args.hidden, layers=args.layers)
        rows = [measure(mode, tmp / "model", tmp / mode) for mode in ("eager", "lazy")]
    mib = {k: round(v / 2**20, 1) for k, v in sizes.items()}
    print(f"model: hidden {args.hidden}, {args.layers} blocks; weights {mib['model_bytes']} MiB, "
          f"one block {mib['block_bytes']} MiB, outside the blocks {mib['outside_bytes']} MiB (fp32)")
    print(f"{'path':6} {'peak RSS growth (MiB)':>22} {'seconds':>8}")
    for r in rows:
        print(f"{r['mode']:6} {r['growth_mib']:>22} {r['seconds']:>8}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lazy_memory-h{args.hidden}-l{args.layers}.json"
    out.write_text(json.dumps({"sizes_mib": mib, "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
