"""Block-wise, then end to end: EBFT alone vs EBFT + a short finish vs the finish alone (issue 13, item 4),
and LoRA with the masked update vs merged-then-remasked (item 3). SmolLM2-135M, WikiText-2 perplexity.

Each variant is ``RECOVERY[:key=value,...][+FINISH[:key=value,...]]``: the recovery's own settings (as
in YAML under ``recover:``) and, after ``+``, the finish (``kd`` or ``lm``) with its settings, e.g.

    ebft:epochs=10                      EBFT alone
    ebft:epochs=5+kd:steps=24           EBFT, then a kd finish of 24 steps
    none+kd:steps=48,train=lora         the finish alone, through masked LoRA
    lora:lora_merge=remask              LoRA, dense update re-masked on merge

What the pipeline will do once ``--finish`` is wired, done here by hand: load, draw the data, compute
the dense teacher (kd) *before* the walk, prune + recover (``prune_and_recover``), finish, then an
eval-only walk for the final perplexity. Finished variants are skipped on a rerun (their JSON is kept
under --out). Prints a markdown table; writes <out>/finish_stage.json.

    flock /tmp/ebft-heavy.lock python benchmarks/finish_stage.py --variants "ebft:epochs=10,ebft:epochs=5+kd:steps=24"
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from ebft import RunConfig
from ebft.config import resolve_device
from ebft.validate import validate
from ebft.models import load_model
from ebft.evaluation.perplexity import model_perplexities
from ebft.pipeline import prepare_data, prune_and_recover, seed_everything
from ebft.recover import ModelContext, TrainingText
from ebft.recover.finish import FinishSettings, finish, prepare_finish
from ebft.report import markdown_table
from ebft.settings import check

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_VARIANTS = ("lora:lora_merge=masked;lora:lora_merge=remask;"
                    "ebft:epochs=10;ebft:epochs=5+kd:steps=24;none+kd:steps=48")


def parse_part(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        settings[key.strip()] = yaml.safe_load(value)
    return method.strip(), settings


def parse_variant(text: str) -> tuple[tuple[str, dict], tuple[str, dict] | None]:
    recover, _, fin = text.partition("+")
    return parse_part(recover), (parse_part(fin) if fin else None)


def config_for(variant: str, args) -> tuple[RunConfig, FinishSettings]:
    (method, recover), fin = parse_variant(variant)
    cfg = RunConfig(model=args.model, out=str(args.out / "unused"), seed=args.seed)
    cfg.prune.method, cfg.prune.sparsity = args.method, args.sparsity
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = args.calib, args.nsamples, args.seqlen
    cfg.eval.sources = [str(WIKI) if WIKI.exists() else "offline"]
    cfg.eval.seqlen, cfg.eval.windows = args.eval_seqlen, args.eval_windows
    cfg.recover.method = method
    cfg.recover.batch_size = args.recover_batch_size  # EBFT windows per step (docs/results.md's tables: 2)
    cfg.recover.lr = args.lr
    cfg.recover.lora_steps, cfg.recover.lora_lr, cfg.recover.lora_batch_size = 100, 1e-3, 4  # docs/results.md's LoRA row
    for key, value in recover.items():
        setattr(cfg.recover, key, value)
    finish_settings = FinishSettings()
    if fin is not None:
        finish_settings.method = fin[0]
        for key, value in fin[1].items():
            setattr(finish_settings, key, value)
    check(finish_settings, "finish.")
    return cfg, finish_settings


def one(variant: str, args) -> dict:
    cfg, fin = config_for(variant, args)
    pattern = validate(cfg, need_out=False)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    seed_everything(cfg.seed)
    model, tokenizer = load_model(cfg.model, cfg.dtype, device)
    data = prepare_data(model, tokenizer, cfg)
    text = TrainingText(cfg.calib.source, data.calib_seqlen, cfg.seed)
    prep = prepare_finish(model, tokenizer, text, cfg.calib.nsamples, fin, device, cfg.batch_size)  # dense teacher
    outcome = prune_and_recover(model, tokenizer, cfg, pattern, data, device)
    ppl = {name: dict(v) for name, v in outcome.perplexity.items()}
    record = {"variant": variant, "config": cfg.to_dict(), "finish_settings": asdict(fin),
              "recovery": outcome.cost, "blocks": outcome.result.blocks}
    if prep is not None:
        ctx = ModelContext(model, tokenizer, outcome.result.masks, text, torch.device(device), cfg.seed)
        record["finish"] = finish(ctx, fin, prep)
        for name, value in model_perplexities(model, data.evals, device, cfg.batch_size).items():
            ppl[name]["finished"] = value
    record["perplexity"] = ppl
    record["wall_seconds"] = round(time.perf_counter() - start, 1)
    return record


def slug(variant: str) -> str:
    return re.sub(r"[^\w.=+-]+", "_", variant)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="';'-separated variants (see above)")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--calib", default="offline")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--recover-batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3, help="EBFT lr (docs/results.md: 1e-3 beat the reference's 2e-4)")
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "finish-stage")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)

    rows, results = [], {}
    for variant in filter(None, (v.strip() for v in args.variants.split(";"))):
        path = args.out / f"{args.method}-{args.sparsity:g}-{slug(variant)}.json"
        if path.exists():
            record = json.loads(path.read_text())
        else:
            logging.info("running %s", variant)
            record = one(variant, args)
            path.write_text(json.dumps(record, indent=1))
        results[variant] = record
        ppl = next(iter(record["perplexity"].values()))
        walked = ppl.get("recovered", ppl.get("pruned"))
        fin = record.get("finish") or {}
        rec = record["recovery"]
        recover_s = rec.get("seconds", 0.0)
        finish_s = fin.get("seconds", 0.0) + fin.get("teacher_seconds", 0.0)
        rows.append([variant, ppl["dense"], ppl["pruned"], walked, ppl.get("finished", walked),
                     rec.get("loss_before", fin.get("heldout_loss_before")),
                     rec.get("loss_adapter", fin.get("heldout_loss_trained")),
                     rec.get("loss_after", fin.get("heldout_loss_after")), fin.get("restored"),
                     round(recover_s), round(finish_s), round(recover_s + finish_s), round(record["wall_seconds"])])
    print(markdown_table(["variant", "dense", "pruned", "after walk", "final", "loss before", "loss trained",
                          "loss after", "restored", "recover s", "finish s", "total s", "wall s"], rows))
    (args.out / "finish_stage.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
