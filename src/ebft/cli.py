"""The ``ebft`` command: parse flags into a RunConfig, call the API, print tables and progress."""
from __future__ import annotations

import argparse
import logging
import sys

from .errors import EbftError
from .report import markdown_table as format_table

EXAMPLES_RUN = """examples:
  ebft run --model builtin:smollm2 --method wanda --sparsity 0.5 --calib offline --eval offline --out runs/demo
  ebft run --model meta-llama/Llama-2-7b-hf --method wanda --sparsity 0.5 --calib c4 --eval wikitext2 --out runs/l2-wanda50
  ebft run --model path/to/model.gguf --method sparsegpt --pattern 2:4 --calib notes.txt \\
           --eval ../shared/data/wikitext-2-raw/wiki.test.raw --out runs/x
  ebft run --config configs/demo.yaml --sparsity 0.6 --out runs/demo60   # flags override the file
"""
EXAMPLES_SWEEP = """examples:
  ebft sweep --model builtin:smollm2 --methods wanda,sparsegpt --sparsities 0.5,0.6,0.7 --recover none,dsnot,ebft \\
             --calib offline --nsamples 32 --seqlen 256 --eval offline --eval-windows 8 --out runs/sweep
  ebft sweep --model meta-llama/Llama-2-7b-hf --methods magnitude,wanda,sparsegpt --pattern 2:4 \\
             --recover none,ebft --calib c4 --eval wikitext2 --out runs/l2-24
A rerun with the same --out skips the finished cells (out/cells/*.json); a changed setting reruns only the
cells it concerns (e.g. --lora-steps reruns the lora cells, not the ebft ones).
"""
EXAMPLES_EVAL = """examples:
  ebft eval --model runs/l2-wanda50 --eval wikitext2
  ebft eval --model builtin:smollm2 --eval ../shared/data/wikitext-2-raw/wiki.test.raw --eval-windows 8
  ebft eval --model runs/l2-wanda50 --tasks                    # zero-shot, the paper's seven lm-eval tasks
  ebft eval --model builtin:smollm2 --tasks piqa,arc_easy,winogrande --task-data ../shared/data/zeroshot --limit 200
"""


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


TASKS_HELP = ("comma list of lm-eval task names; alone: the paper's seven (piqa, storycloze_2016, arc_easy, "
              "arc_challenge, hellaswag, winogrande, boolq)")
TASK_DATA_HELP = ("run zero-shot tasks offline from local files: a folder of <task>.jsonl (e.g. "
                  "../shared/data/zeroshot) or task=path pairs, comma-separated; offline tasks: piqa, arc_easy, "
                  "arc_challenge, boolq, openbookqa, winogrande, lambada_openai")

# flag -> (config path, argparse kwargs). The CLI mirrors RunConfig one to one.
RUN_FLAGS = {
    "--model": ("model", dict(help="hub id, local HF folder, .gguf file, or builtin:smollm2 (offline demo)")),
    "--out": ("out", dict(help="output folder for the pruned model and run.json")),
    "--method": ("prune.method", dict(help="pruner: magnitude | wanda | sparsegpt (default wanda)")),
    "--sparsity": ("prune.sparsity", dict(type=float, help="fraction of weights set to zero, in [0, 1) "
                                          "(default 0.5; implied by an N:M pattern)")),
    "--pattern": ("prune.pattern", dict(help="unstructured (default) or N:M, keeping N of every M weights, e.g. 2:4")),
    "--scope": ("prune.scope", dict(choices=["row", "layer"], help="unstructured ratio per output row or per "
                                    "layer (default: the method's paper: wanda row, magnitude/sparsegpt layer)")),
    "--layers": ("prune.layers", dict(help="regex on linear names inside a block (default: all linears)")),
    "--calib": ("calib.source", dict(help="calibration text: c4 | wikitext2 | ptb | offline | offline-c4 | a "
                                     ".txt/.raw/.jsonl/.json file (default offline)")),
    "--nsamples": ("calib.nsamples", dict(type=int, help="calibration windows (default 128)")),
    "--seqlen": ("calib.seqlen", dict(type=int, help="tokens per calibration window (default min(context, 2048))")),
    "--seed": ("seed", dict(type=int, help="seed for calibration sampling and training (default 0)")),
    "--eval": ("eval.sources", dict(nargs="+", help="perplexity texts, named or files (default wikitext2)")),
    "--eval-seqlen": ("eval.seqlen", dict(type=int, help="tokens per eval window (default min(context, 2048))")),
    "--eval-windows": ("eval.windows", dict(type=int, help="cap on eval windows per text, for quick runs")),
    "--zeroshot": ("eval.zeroshot", dict(nargs="?", const=["paper"], type=_task_list, metavar="TASKS",
                   help="zero-shot accuracy (lm-eval) of the dense and the final model: " + TASKS_HELP)),
    "--task-data": ("eval.task_data", dict(help=TASK_DATA_HELP)),
    "--zeroshot-limit": ("eval.zeroshot_limit", dict(type=int, help="first N items of each zero-shot task")),
    "--recover": ("recover.method", dict(help="recovery after pruning each block: ebft (default: train the "
                  "kept weights) | ebft-mask (learn the masks, weights frozen) | dsnot (training-free "
                  "prune-and-grow of the masks) | lora (after pruning, LoRA on the whole model, merged and re-masked) | none")),
    "--epochs": ("recover.epochs", dict(type=int, help="EBFT epochs over the calibration windows per block (default 10)")),
    "--lr": ("recover.lr", dict(type=float, help="EBFT AdamW learning rate, decayed linearly to 0 (default 2e-4)")),
    "--recover-batch-size": ("recover.batch_size", dict(type=int, help="EBFT windows per step (default 8)")),
    "--weight-decay": ("recover.weight_decay", dict(type=float, help="EBFT AdamW weight decay (default 0.1, as the reference)")),
    "--grad-clip": ("recover.grad_clip", dict(type=float, help="EBFT gradient-norm clip (default 1.0)")),
    "--target": ("recover.target", dict(choices=["dense-block", "dense-model"], help="EBFT target: the dense block "
                 "on the sparse chain's inputs (default, as the reference) or the dense model's own activations")),
    "--train-norms": ("recover.train_norms", dict(action="store_true", default=None,
                      help="EBFT also trains the block's norm weights (default: linear weights and biases only)")),
    "--loss": ("recover.loss", dict(choices=["mse", "token-norm"], help="EBFT loss: mse (default) or per-token "
               "normalised MSE (weighs tokens with massive activations like the others)")),
    "--holdout": ("recover.holdout", dict(type=int, help="calibration windows held out of EBFT training to "
                  "report held-out reconstruction loss (default 0)")),
    "--precision": ("recover.precision", dict(choices=["auto", "fp32", "bf16", "fp16"], help="EBFT training "
                    "precision (auto: fp32 on CPU, bf16 autocast on GPUs that have it, else fp16 + GradScaler)")),
    "--dsnot-cycles": ("recover.dsnot_cycles", dict(type=int, help="DSnoT swap cycles per layer at most (default 50)")),
    "--dsnot-threshold": ("recover.dsnot_threshold", dict(type=float, help="DSnoT stops a row when its expected "
                          "error, summed over a window's tokens as the reference does, is below this (default 0.1)")),
    "--dsnot-power": ("recover.dsnot_power", dict(type=float, help="DSnoT grows by |W·mean| / variance**power (default 1)")),
    "--dsnot-skip-mlp": ("recover.dsnot_skip_mlp", dict(action="store_true", default=None,
                         help="DSnoT refines the attention linears only (the reference code's default)")),
    "--mask-lr": ("recover.mask_lr", dict(type=float, help="ebft-mask AdamW learning rate on the mask scores, "
                  "decayed linearly to 0 (default 1e-3)")),
    "--lora-steps": ("recover.lora_steps", dict(type=int, help="LoRA optimizer steps, one pass over steps × "
                     "batch windows of the calibration text's train split (default 200)")),
    "--lora-lr": ("recover.lora_lr", dict(type=float, help="LoRA AdamW learning rate, decayed linearly to 0 (default 2e-4)")),
    "--lora-targets": ("recover.lora_targets", dict(help="LoRA adapters on: qv (q_proj, v_proj; default, as "
                       "Wanda) | all (every block linear) | a comma list of linear names")),
    "--lora-rank": ("recover.lora_rank", dict(type=int, help="LoRA rank (default 8)")),
    "--lora-alpha": ("recover.lora_alpha", dict(type=float, help="LoRA alpha; the update is scaled by alpha/rank (default 16)")),
    "--lora-dropout": ("recover.lora_dropout", dict(type=float, help="LoRA dropout (default 0.05)")),
    "--lora-batch-size": ("recover.lora_batch_size", dict(type=int, help="LoRA windows per step (default 4)")),
    "--dtype": ("dtype", dict(help="auto | float32 | bfloat16 | float16 (auto: fp32 on CPU, bf16/fp16 on GPU)")),
    "--device": ("device", dict(help="auto | cpu | cuda | cuda:N (default auto)")),
    "--batch-size": ("batch_size", dict(type=int, help="windows per forward pass (default 1)")),
    "--overwrite": ("overwrite", dict(action="store_true", default=None, help="replace an existing --out folder")),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"ebft: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ebft", description="Prune a Hugging Face LLM and recover it block by block.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="prune (and recover) a model, evaluate, save",
                         epilog=EXAMPLES_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", help="YAML file with the same settings; flags override it")
    for flag, (_, kwargs) in RUN_FLAGS.items():
        run.add_argument(flag, **{"default": None, **kwargs})
    sw = sub.add_parser("sweep", help="the grid pruner × recovery × sparsity on one model (resumable): "
                        "results.md, results.json, results.png", epilog=EXAMPLES_SWEEP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sw.add_argument("--config", help="YAML file with the shared settings (as for run); flags override it")
    sw.add_argument("--methods", default="wanda", help="comma list of pruners: magnitude, wanda, sparsegpt (default wanda)")
    sw.add_argument("--sparsities", help="comma list of sparsities in [0, 1) (default 0.5; with an N:M "
                    "--pattern: implied)")
    sw.add_argument("--recover", default="none,ebft", help="comma list of recoveries: none, ebft, ebft-mask, "
                    "dsnot, lora (default none,ebft)")
    sw.add_argument("--out", help="folder for cells/*.json and results.md/.json/.png; rerun it to resume")
    sw.add_argument("--save-models", action="store_true", help="also save each cell's model under out/models/")
    for flag, (_, kwargs) in RUN_FLAGS.items():
        if flag not in SWEEP_GRID_FLAGS:
            sw.add_argument(flag, **{"default": None, **kwargs})
    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model", epilog=EXAMPLES_EVAL,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or builtin:smollm2")
    ev.add_argument("--eval", nargs="+", help="texts, named or files (default wikitext2, none with --tasks)")
    ev.add_argument("--tasks", nargs="?", const=["paper"], type=_task_list, metavar="TASKS",
                    help="zero-shot accuracy (lm-eval, 0-shot, acc and acc_norm): " + TASKS_HELP)
    ev.add_argument("--task-data", help=TASK_DATA_HELP)
    ev.add_argument("--limit", type=int, help="first N items of each zero-shot task, for quick runs")
    ev.add_argument("--eval-seqlen", type=int, help="tokens per window (default min(context, 2048))")
    ev.add_argument("--eval-windows", type=int, help="cap on windows per text")
    ev.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ev.add_argument("--batch-size", type=int, default=1)
    return parser


def config_from_args(args, skip=frozenset()):
    from .config import RunConfig

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    for flag, (path, _) in RUN_FLAGS.items():
        if flag in skip:
            continue
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        target = config
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return config


class _Progress:
    """Renders the walk's events as a tqdm bar over blocks."""

    def __init__(self):
        self.bar = None

    def __call__(self, event, **info):
        from tqdm import tqdm

        if event == "block_start":
            if self.bar is None:
                self.bar = tqdm(total=info["total"], desc="blocks", unit="block", file=sys.stderr)
        elif event == "lora_start":
            self.bar = tqdm(total=info["steps"], desc="LoRA", unit="step", file=sys.stderr)
        elif event == "lora_step":
            self.bar.update(info["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{info['loss']:.3g}")
            if self.bar.n == self.bar.total:
                self.bar.close()
                self.bar = None
        elif event == "block_end":
            self.bar.update(1)
            if "loss_after" in info:
                self.bar.set_postfix(loss=f"{info['loss_before']:.3g}→{info['loss_after']:.3g}")
            if self.bar.n == self.bar.total:
                self.bar.close()
                self.bar = None


def zeroshot_table(results: dict[str, dict[str, dict]], averages: dict[str, float | None]) -> str:
    """``results``: ``{task: {stage: metrics}}``; one acc and one acc_norm column per stage."""
    stages = list(next(iter(results.values())))
    cols = [(s, m) for s in stages for m in ("acc", "acc_norm")]
    rows = [[task, next(iter(v.values())).get("n"), *(v[s].get(m) for s, m in cols)] for task, v in results.items()]
    rows.append(["average (acc)", None, *(averages.get(s) if m == "acc" else None for s, m in cols)])
    return format_table(["zero-shot", "n", *(f"{s} {m}".strip() for s, m in cols)], rows)


def run_table(record: dict) -> str:
    ppl = record["perplexity"]
    stages = [s for s in ("dense", "pruned", "recovered") if any(s in v for v in ppl.values())]
    rows = [[name, *(v.get(s) for s in stages)] for name, v in ppl.items()]
    text = format_table(["perplexity", *stages], rows) if rows else ""
    if record.get("zeroshot"):
        text = f"{text}\n\n{zeroshot_table(record['zeroshot'], record['zeroshot_average'])}".strip()
    return (f"{text}\n\nsparsity {record['sparsity']['overall']:.2%} over "
            f"{len(record['sparsity']['layers'])} linears ({record['resolved']['pattern']}); "
            f"{record['wall_seconds']:.0f} s{cost_line(record.get('recovery'))}")


def cost_line(cost: dict | None) -> str:
    if not cost or cost["method"] == "none":
        return ""
    return (f"\nrecovery {cost['method']}: {cost['seconds']:.1f} s, {cost['trainable_params']:,} trainable "
            f"parameters, peak memory {cost['peak_memory_bytes'] / 2**20:.0f} MiB ({cost['peak_memory_of']})")


class _SweepProgress:
    """A tqdm bar over the sweep's cells; the cell in progress (and its block or step) as the postfix."""

    def __init__(self):
        self.bar, self.cell = None, ""

    def __call__(self, event, **info):
        from tqdm import tqdm

        if event.startswith("cell_") and self.bar is None:
            self.bar = tqdm(total=info["total"], desc="cells", unit="cell", file=sys.stderr)
        if event == "cell_start":
            self.cell = info["name"].rsplit("-", 1)[0]  # without the settings key
            self.bar.set_postfix_str(self.cell)
        elif event == "block_start":
            self.bar.set_postfix_str(f"{self.cell}: block {info['index'] + 1}/{info['total']}")
        elif event == "lora_step":
            self.bar.set_postfix_str(f"{self.cell}: LoRA step {info['step']}/{info['steps']}")
        elif event in ("cell_end", "cell_skip"):
            self.bar.update(1)
            if self.bar.n == self.bar.total:
                self.bar.close()


SWEEP_GRID_FLAGS = frozenset({"--method", "--sparsity", "--recover", "--out", "--overwrite"})  # lists in sweep


def sweep_config_from_args(args):
    from .sweeps import SweepConfig, parse_list

    base = config_from_args(args, skip=SWEEP_GRID_FLAGS)
    nm = ":" in str(base.prune.pattern)
    return SweepConfig(base=base, methods=parse_list(args.methods, "methods"),
                       sparsities=parse_list(args.sparsities, "sparsities", number=True) if args.sparsities is not None
                       else ([] if nm else [0.5]),
                       recoveries=parse_list(args.recover, "recover"), out=args.out, save_models=args.save_models)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "huggingface_hub", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not args.verbose:  # transformers' own bars (GGUF dequantisation, shard writing) are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "run":
            from .api import run

            config = config_from_args(args)
            record = run(config, progress=_Progress())  # validates before anything is loaded
            print(run_table(record))
            print(f"saved to {config.out}")
        elif args.command == "sweep":
            from .report import sweep_markdown
            from .sweeps import sweep

            config = sweep_config_from_args(args)
            results = sweep(config, progress=_SweepProgress())  # validates every cell first
            print(sweep_markdown(results))
            print(f"wrote {config.out}/results.md, results.json, results.png")
        elif args.command == "eval":
            from .api import evaluate

            sources = args.eval or ([] if args.tasks else ["wikitext2"])
            result = evaluate(args.model, sources, args.eval_seqlen, args.eval_windows, args.device, args.dtype,
                              args.batch_size, args.tasks, args.task_data, args.limit)
            zeroshot, average = result.pop("zeroshot", None), result.pop("zeroshot_average", None)
            tables = [format_table(["text", "perplexity"], list(result.items()))] if result else []
            if zeroshot:
                tables.append(zeroshot_table({t: {"": m} for t, m in zeroshot.items()}, {"": average}))
            print("\n\n".join(tables))
    except EbftError as exc:
        print(f"ebft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "sweep":
            print(f"ebft: interrupted; the finished cells are kept in {args.out}/cells (rerun to resume)", file=sys.stderr)
            return 130
        print("ebft: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
