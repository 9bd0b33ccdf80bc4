"""EBFT quality on SmolLM2-135M: WikiText-2 perplexity dense / pruned / recovered per setting.

Each setting is one `ebft run` (the pruned and recovered perplexities come from the same walk).
Finished settings are skipped on a rerun (their run.json is kept under --out). Prints a markdown
table and writes <out>/quality.json.

    python benchmarks/ebft_quality.py                      # docs/results.md's table
    python benchmarks/ebft_quality.py --settings wanda:0.7 --variants base,token-norm,dense-model
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ebft import RunConfig, run
from ebft.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# What each variant changes from the base EBFT settings (the investigation of issue 3).
VARIANTS = {
    "base": {},
    "none": {"method": "none"},
    "dense-model": {"target": "dense-model"},
    "token-norm": {"loss": "token-norm"},
    "train-norms": {"train_norms": True},
    "no-wd": {"weight_decay": 0.0},
    "lr1e-3": {"lr": 1e-3},
    "epochs10": {"epochs": 10},
}


def config_for(setting: str, variant: str, args) -> RunConfig:
    method, sparsity = setting.split(":", 1)
    cfg = RunConfig(model=args.model, out=str(args.out / f"{method}-{sparsity}-{variant}"), overwrite=True)
    cfg.prune.method = method
    if ":" in sparsity:
        cfg.prune.pattern = sparsity
    else:
        cfg.prune.sparsity = float(sparsity)
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = "offline", args.nsamples, args.seqlen
    cfg.eval.sources = [str(WIKI) if WIKI.exists() else "offline"]
    cfg.eval.seqlen, cfg.eval.windows = args.eval_seqlen, args.eval_windows
    cfg.recover.recipe = args.recipe  # docs/results.md's table: the reference recipe, from before --recipe best
    cfg.recover.epochs, cfg.recover.batch_size = args.epochs, args.batch_size
    for key, value in VARIANTS[variant].items():
        setattr(cfg.recover, key, value)
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--settings", default="wanda:0.7,sparsegpt:0.7,wanda:2:4,sparsegpt:2:4,wanda:0.5,sparsegpt:0.5")
    ap.add_argument("--variants", default="base")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=2, help="EBFT windows per step (2: 40 steps per block)")
    ap.add_argument("--recipe", default="paper", help="settings not given here come from this recipe (paper: "
                    "what docs/results.md's table ran; best: ebft's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "quality-lean")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    rows, results = [], {}
    for setting in args.settings.split(","):
        for variant in args.variants.split(","):
            cfg = config_for(setting, variant, args)
            path = Path(cfg.out) / "run.json"
            if path.exists():
                record = json.loads(path.read_text())
            else:
                logging.info("running %s %s", setting, variant)
                record = run(cfg)
            ppl = next(iter(record["perplexity"].values()))
            final = ppl.get("recovered", ppl.get("pruned"))
            closed = (ppl["pruned"] - final) / (ppl["pruned"] - ppl["dense"]) if ppl["pruned"] > ppl["dense"] else None
            seconds = sum(b.get("seconds", 0) for b in record["blocks"])
            restored = sum(1 for b in record["blocks"] if b.get("restored"))
            results[f"{setting}/{variant}"] = {"perplexity": ppl, "gap_closed": closed, "walk_seconds": seconds,
                                                "restored_blocks": restored}
            rows.append([setting, variant, ppl["dense"], ppl["pruned"], final,
                         f"{closed:.0%}" if closed is not None else None, round(seconds), restored])
    print(markdown_table(["setting", "variant", "dense", "pruned", "EBFT", "gap closed", "walk s", "restored"], rows))
    (args.out / "quality.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "results": results}, indent=2))


if __name__ == "__main__":
    main()
