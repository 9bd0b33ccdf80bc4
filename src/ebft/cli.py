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
EXAMPLES_EVAL = """examples:
  ebft eval --model runs/l2-wanda50 --eval wikitext2
  ebft eval --model builtin:smollm2 --eval ../shared/data/wikitext-2-raw/wiki.test.raw --eval-windows 8
"""

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
    "--recover": ("recover.method", dict(help="recovery after pruning each block: ebft (default) | none")),
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
    ev = sub.add_parser("eval", help="perplexity of a model", epilog=EXAMPLES_EVAL,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", required=True, help="hub id, local folder, .gguf file, or builtin:smollm2")
    ev.add_argument("--eval", nargs="+", default=["wikitext2"], help="texts, named or files (default wikitext2)")
    ev.add_argument("--eval-seqlen", type=int, help="tokens per window (default min(context, 2048))")
    ev.add_argument("--eval-windows", type=int, help="cap on windows per text")
    ev.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ev.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ev.add_argument("--batch-size", type=int, default=1)
    return parser


def config_from_args(args):
    from .config import RunConfig

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    for flag, (path, _) in RUN_FLAGS.items():
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
        elif event == "block_end":
            self.bar.update(1)
            if "loss_after" in info:
                self.bar.set_postfix(loss=f"{info['loss_before']:.3g}→{info['loss_after']:.3g}")
            if self.bar.n == self.bar.total:
                self.bar.close()
                self.bar = None


def run_table(record: dict) -> str:
    ppl = record["perplexity"]
    stages = [s for s in ("dense", "pruned", "recovered") if any(s in v for v in ppl.values())]
    rows = [[name, *(v.get(s) for s in stages)] for name, v in ppl.items()]
    text = format_table(["perplexity", *stages], rows) if rows else ""
    return (f"{text}\n\nsparsity {record['sparsity']['overall']:.2%} over "
            f"{len(record['sparsity']['layers'])} linears ({record['resolved']['pattern']}); "
            f"{record['wall_seconds']:.0f} s")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if not args.verbose:  # transformers' own bars (GGUF dequantisation, shard writing) are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "run":
            from .api import run

            config = config_from_args(args)
            config.validate()
            record = run(config, progress=_Progress())
            print(run_table(record))
            print(f"saved to {config.out}")
        elif args.command == "eval":
            from .api import evaluate

            result = evaluate(args.model, args.eval, args.eval_seqlen, args.eval_windows,
                              args.device, args.dtype, args.batch_size)
            print(format_table(["text", "perplexity"], list(result.items())))
    except EbftError as exc:
        print(f"ebft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ebft: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
