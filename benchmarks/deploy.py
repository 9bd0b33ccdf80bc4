"""Deploy: what a pruned SmolLM2 is where people run models — file sizes per format, perplexity through
llama.cpp on ebft's own windows, llama.cpp speed pruned vs dense (docs/deploy.md).

    python benchmarks/deploy.py --work runs/deploy          # resumable: finished runs are kept

For each model (dense SmolLM2; Wanda 50 % + EBFT; Wanda 2:4 + EBFT; FLAP uniform and adaptive at 20 and
30 % + EBFT; all with ebft's best recipe, 32 × 256 offline calibration windows, 2 epochs): the saved
folder's size, GGUF files in f32, f16, q8_0 and q4_k_m (``ebft export``; k-quants need llama-cpp-python),
perplexity of the offline text (8 windows of 512 tokens) computed by ebft on the saved model and by
llama.cpp on each GGUF file (the same token windows, f32 KV cache), and llama.cpp's prompt (256 tokens)
and generation (64 tokens) speed of the f16 files, every model timed in the same process with the dense
one (median of 3, 2 threads), reported as the ratio pruned / dense. And what `ebft eval --model FILE.gguf`
gives for the f32 file (ebft reading the GGUF back, `deci` included) against run.json's own figure for the
recovered model (the folder is saved in bfloat16 for this GGUF source: the difference is that rounding).
Writes benchmarks/results/deploy.json and prints the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COMMON = ["--model", "builtin:smollm2", "--calib", "offline", "--nsamples", "32", "--seqlen", "256",
          "--eval", "offline", "--eval-seqlen", "512", "--eval-windows", "8", "--epochs", "2"]
MODELS = {
    "wanda50-ebft": ["--method", "wanda", "--sparsity", "0.5"],
    "wanda2:4-ebft": ["--method", "wanda", "--pattern", "2:4"],
    "flap-uniform20-ebft": ["--method", "flap", "--sparsity", "0.2", "--flap-structure", "uniform"],
    "flap-uniform30-ebft": ["--method", "flap", "--sparsity", "0.3", "--flap-structure", "uniform"],
    "flap-adaptive20-ebft": ["--method", "flap", "--sparsity", "0.2"],
    "flap-adaptive30-ebft": ["--method", "flap", "--sparsity", "0.3"],
}
TYPES = ("f32", "f16", "q8_0", "q4_k_m")


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def ensure_run(work: Path, name: str, args: list[str]) -> Path:
    out = work / name.replace(":", "of")
    if not (out / "run.json").is_file():
        print(f"run {name} ...", flush=True)
        subprocess.run([sys.executable, "-m", "ebft", "run", *COMMON, *args, "--no-speed", "--out", str(out)],
                       check=True, env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    return out


def eval_windows(model_dir: str):
    """ebft's own evaluation windows of the offline text (the runs' protocol) and its perplexity."""
    import torch

    from ebft import RunConfig
    from ebft.evaluation.perplexity import model_perplexities
    from ebft.models import load_model
    from ebft.pipeline import prepare_data

    cfg = RunConfig(model=model_dir)
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = ["offline"], 512, 8
    model, tokenizer = load_model(model_dir, "float32")
    data = prepare_data(model, tokenizer, cfg, calibrate=False)
    with torch.no_grad():
        ppl = model_perplexities(model, data.evals, "cpu")
    return data.evals["offline"], ppl["offline"]


def llama_cpp_perplexity(path: Path, windows) -> float:
    import llama_cpp
    import numpy as np

    model = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=windows.shape[1], n_batch=512,
                            type_k=0, type_v=0, n_threads=2)
    total, count = 0.0, 0
    try:
        for window in windows.tolist():
            model.reset()
            model.eval(window)
            logits = np.array(model.scores[: len(window)], dtype=np.float64)
            logits -= logits.max(-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
            total -= float(sum(logp[i, window[i + 1]] for i in range(len(window) - 1)))
            count += len(window) - 1
    finally:
        model.close()
    return math.exp(total / count)


def llama_cpp_speed(paths: dict[str, Path], prompt: int = 256, new: int = 64, repeats: int = 3) -> dict:
    """Prompt and generation tokens/s of each file, timed in turn in this process (median of ``repeats``)."""
    import llama_cpp

    models = {name: llama_cpp.Llama(str(p), verbose=False, n_ctx=prompt + new, n_threads=2, n_batch=512)
              for name, p in paths.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"prompt": [], "generate": []} for name in paths}
    tokens = [(i * 7919) % 40000 + 100 for i in range(prompt)]
    try:
        for _ in range(repeats):
            for name, model in models.items():
                model.reset()
                start = time.perf_counter()
                model.eval(tokens)
                times[name]["prompt"].append(prompt / (time.perf_counter() - start))
                start = time.perf_counter()
                for i in range(new):
                    model.eval([tokens[i]])
                times[name]["generate"].append(new / (time.perf_counter() - start))
    finally:
        for model in models.values():
            model.close()
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, default=Path("runs/deploy"), help="folder for the runs and files")
    parser.add_argument("--only", help="comma list of models (default: all): dense, " + ", ".join(MODELS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "src"))
    from ebft.export import export

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    names = ["dense", *MODELS] if not args.only else args.only.split(",")
    folders = {}
    for name in names:
        if name == "dense":
            folders[name] = "builtin:smollm2"
        else:
            folders[name] = str(ensure_run(work, name, MODELS[name]))
    rows = {}
    for name, folder in folders.items():
        windows, ebft_ppl = eval_windows(folder)
        row = {"saved_mib": None if name == "dense" else round(folder_mib(Path(folder)), 1), "ebft_ppl": ebft_ppl,
               "gguf": {}}
        for kind in TYPES:
            path = work / f"{name.replace(':', 'of')}-{kind}.gguf"
            if not path.exists():
                export(folder, path, kind=kind)
            ppl = llama_cpp_perplexity(path, windows)
            row["gguf"][kind] = {"mib": round(path.stat().st_size / 2**20, 1), "ppl": round(ppl, 3),
                                 "vs_ebft": round(ppl / ebft_ppl - 1, 5)}
            print(f"{name} {kind}: {row['gguf'][kind]}", flush=True)
        row["gguf_f32_ebft_ppl"] = eval_windows(str(work / f"{name.replace(':', 'of')}-f32.gguf"))[1]
        if name != "dense":
            row["run_json_ppl"] = json.loads((Path(folder) / "run.json").read_text())["perplexity"]["offline"]["recovered"]
            row["gguf_vs_run_json"] = round(row["gguf_f32_ebft_ppl"] / row["run_json_ppl"] - 1, 5)
        print(f"{name}: ebft eval of the f32 file {row['gguf_f32_ebft_ppl']:.4f}, run.json "
              f"{row.get('run_json_ppl', '-')}", flush=True)
        rows[name] = row
    speed = llama_cpp_speed({name: work / f"{name.replace(':', 'of')}-f16.gguf" for name in folders})
    for name, row in rows.items():
        row["speed_f16"] = speed[name]
        if "dense" in speed:
            row["speed_vs_dense"] = {k: round(speed[name][k] / speed["dense"][k], 3) for k in speed[name]}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "deploy.json"
    kept = json.loads(out.read_text()) if args.only and out.is_file() else {}  # --only: the other rows stay
    out.write_text(json.dumps({**kept, **rows}, indent=1))
    print("| model | saved (MiB) | f16 | q8_0 | q4_k_m (MiB) | ppl ebft | llama.cpp f32 / f16 / q8_0 / q4_k_m "
          "| prompt × | generate × | run.json | ebft eval f32.gguf |\n|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        g = r["gguf"]
        print(f"| {name} | {r['saved_mib'] or '-'} | {g['f16']['mib']} | {g['q8_0']['mib']} | {g['q4_k_m']['mib']} | "
              f"{r['ebft_ppl']:.2f} | {g['f32']['ppl']:.2f} / {g['f16']['ppl']:.2f} / {g['q8_0']['ppl']:.2f} / "
              f"{g['q4_k_m']['ppl']:.2f} | {r.get('speed_vs_dense', {}).get('prompt', '-')} | "
              f"{r.get('speed_vs_dense', {}).get('generate', '-')} | {r.get('run_json_ppl', '-')} | "
              f"{r['gguf_f32_ebft_ppl']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
