"""Wanda 80 % with OWL on SmolLM2: why block-wise recovery made the whole model worse, and what the guard does.

The earlier measurement (docs/results.md, "OWL"): EBFT with the paper's recipe took the OWL model from 3.31e4 to
6.79e4 on WikiText-2 although every block's own loss fell. This script reruns that setting (16 × 256 offline
calibration windows, recovery batch 2, 5 epochs, WikiText-2 test 4 × 2048) and asks where it goes wrong:

- runs: no recovery; the paper recipe without the guard (the failure), with the dense *model* as the target
  instead of the dense block (is the target the cause?), the best recipe without the guard, and the paper
  recipe with the guard (``--recover-guard 4``, the default);
- for every saved model: how far each block's output drifts from the dense model's,
  ‖h_ℓ − h_ℓ^dense‖ / ‖h_ℓ^dense‖ on held-out WikiText-2 windows, block by block, and the final NLL;
- per block, the reconstruction loss before → after recovery (run.json) against that drift.

    python benchmarks/owl80.py --work runs/owl80       # ~15 min on 2 CPU cores; resumable (finished runs kept)

Writes benchmarks/results/owl80.json and prints the tables.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKI = HERE.parent.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
COMMON = ["--model", "builtin:smollm2", "--calib", "offline", "--nsamples", "16", "--seqlen", "256",
          "--method", "wanda", "--sparsity", "0.8", "--allocation", "owl", "--eval-windows", "4",
          "--eval-seqlen", "2048", "--no-speed"]
RUNS = {
    "none": ["--recover", "none"],
    "paper": ["--recipe", "paper", "--recover-batch-size", "2", "--epochs", "5", "--recover-guard", "0"],
    "paper-dense-model": ["--recipe", "paper", "--recover-batch-size", "2", "--epochs", "5", "--recover-guard", "0",
                          "--target", "dense-model"],
    "best": ["--recipe", "best", "--epochs", "5", "--recover-guard", "0"],
    "paper-guarded": ["--recipe", "paper", "--recover-batch-size", "2", "--epochs", "5"],
}


def ensure_run(work: Path, name: str, args: list[str], text: str) -> dict:
    out = work / name
    if not (out / "run.json").exists():
        subprocess.run([sys.executable, "-m", "ebft", "run", *COMMON, "--eval", text, *args, "--out", str(out)],
                       check=True)
    return json.loads((out / "run.json").read_text())


def drift(model_dirs: dict[str, Path], text: str, windows: int, seqlen: int) -> dict:
    """Per model: each block's output distance from the dense model's (relative, over held-out windows),
    and the NLL of those windows."""
    import torch

    from ebft.data import eval_tokens
    from ebft.models import load_model

    dense, tokenizer = load_model("builtin:smollm2", "float32")
    tokens = eval_tokens(tokenizer, text)[0]
    start = 4 * 2048  # past the perplexity's windows (COMMON: 4 x 2048)
    if tokens.numel() < start + windows * seqlen:
        raise SystemExit(f"drift: {text} has {tokens.numel()} tokens, fewer than {start + windows * seqlen}")
    ids = tokens[start:start + windows * seqlen].view(windows, seqlen)

    @torch.no_grad()
    def states(model):
        out = model(ids, output_hidden_states=True, labels=ids)
        return [h.float() for h in out.hidden_states[1:]], float(out.loss)

    reference, dense_nll = states(dense)
    del dense
    result = {"dense": {"nll": dense_nll, "drift": [0.0] * len(reference)}}
    for name, folder in model_dirs.items():
        model, _ = load_model(str(folder), "float32")
        hidden, nll = states(model)
        result[name] = {"nll": nll, "drift": [float((h - r).norm() / r.norm()) for h, r in zip(hidden, reference)]}
        del model
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "owl80")
    ap.add_argument("--text", default=str(WIKI) if WIKI.exists() else "offline")
    ap.add_argument("--drift-windows", type=int, default=2, help="held-out windows for the drift (512 tokens)")
    args = ap.parse_args()
    records = {name: ensure_run(args.work, name, run, args.text) for name, run in RUNS.items()}
    text = next(iter(records["none"]["perplexity"]))
    rows = []
    for name, rec in records.items():
        ppl = rec["perplexity"][text]
        guard = (rec.get("recovery") or {}).get("guard") or {}
        rows.append([name, ppl["dense"], ppl.get("pruned"), ppl.get("recovered", ppl.get("pruned")),
                     (rec.get("recovery") or {}).get("seconds"), guard.get("kept", "-"),
                     f"{guard.get('pruned_ppl', float('nan')):.4g} → {guard.get('recovered_ppl', float('nan')):.4g}"
                     if guard else "-"])
    from ebft.report import markdown_table

    print(markdown_table(["run", "dense", "pruned", "recovered (saved)", "recovery s", "guard kept",
                          "guard windows pruned → recovered"], rows))
    drifts = drift({n: args.work / n for n in RUNS if n != "paper-guarded"}, args.text, args.drift_windows, 512)
    layers = len(drifts["dense"]["drift"])
    shown = sorted({0, 1, 2, 3, 5, 10, 15, 20, 25, layers - 2, layers - 1})
    print()
    print(markdown_table(["model", "NLL", *(f"block {i}" for i in shown)],
                         [[n, d["nll"], *(d["drift"][i] for i in shown)] for n, d in drifts.items()]))
    sparsities = [b.get("sparsity") for b in records["none"]["plan"]["blocks"]] if isinstance(
        records["none"].get("plan"), dict) and "blocks" in records["none"]["plan"] else None
    losses = {n: [(b.get("loss_before"), b.get("loss_after")) for b in records[n]["blocks"]]
              for n in ("paper", "paper-dense-model", "best")}
    print()
    print(markdown_table(["block", "OWL sparsity", *(f"{n} loss before → after" for n in losses),
                          *(f"drift {n}" for n in ("none", "paper", "best"))],
                         [[i, sparsities[i] if sparsities else "-",
                           *(f"{losses[n][i][0]:.3g} → {losses[n][i][1]:.3g}" for n in losses),
                           *(drifts[n]["drift"][i] for n in ("none", "paper", "best"))] for i in range(layers)]))
    result = {"runs": {n: {"perplexity": r["perplexity"], "recovery": r.get("recovery"), "blocks": r["blocks"],
                           "plan": r.get("plan")} for n, r in records.items()}, "drift": drifts}
    path = HERE / "results" / "owl80.json"
    path.write_text(json.dumps(result, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x)
                               else str(x)))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
