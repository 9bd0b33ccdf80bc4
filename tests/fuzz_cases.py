"""Random command lines, valid and invalid, for the fuzz test and its long benchmark run.

Each case picks a few flags with values drawn from what a careless or hostile user might type
(extremes, wrong types, non-finite numbers, impossible paths) next to valid ones, on a tiny model.
:func:`check_case` runs one and asserts the contract: exit code 0 or 2, never a traceback, nothing
under ``--out`` unless the run succeeded, and no file outside ``--out`` changed.

Kinds of case (:data:`KINDS`): ``run`` (`ebft run`), ``sweep`` (`ebft sweep`, sometimes into a user's
folder or a run's output), ``plan`` (`ebft plan` with sizes that are and are not sizes, ``--plan-json``
anywhere), ``tasks`` (`ebft eval --tasks` on a task file with one record damaged at random) and
``resume`` (a run stopped at a random block, its checkpoint damaged or its command changed at random,
then run again), ``export`` (`ebft export` of good and bad sources onto new names, a user's files, the
source itself, with a dead export's leftovers in the folder) and ``register`` (a plugin registered with
names and settings good and bad); :func:`check_ranks` runs two processes as two ranks with settings that
may differ.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
import shutil
from pathlib import Path

VALID = {
    "--method": ["wanda", "magnitude", "sparsegpt", "flap"],
    "--sparsity": ["0", "0.3", "0.5", "0.9"],
    "--pattern": ["unstructured", "2:4", "1:4", "structured"],
    "--scope": ["row", "layer"],
    "--recover": ["none", "ebft", "dsnot", "ebft-mask", "lora", "ebft-gradual"],
    "--recipe": ["best", "paper"],
    "--nsamples": ["2", "3"],
    "--seqlen": ["8", "16", "100000"],
    "--epochs": ["1"],
    "--lr": ["0", "1e-3", "1"],
    "--weight-decay": ["0", "0.1"],
    "--grad-clip": ["1e-6", "1"],
    "--seed": ["0", "1", str(2**32 - 1)],
    "--eval-seqlen": ["16", "24"],
    "--eval-windows": ["1", "2"],
    "--layers": ["mlp", "q_proj|v_proj"],
    "--allocation": ["uniform", "owl", "atp"],
    "--dtype": ["auto", "float32", "bfloat16"],
    "--save-dtype": ["auto", "float16"],
    "--batch-size": ["1", "2"],
    "--target": ["dense-block", "dense-model"],
    "--loss": ["mse", "token-norm"],
    "--holdout": ["0", "1"],
    "--lora-steps": ["1"],
    "--dsnot-cycles": ["1", "3"],
    "--flap-structure": ["uniform", "adaptive"],
}
INVALID = {
    "--method": ["oracle", "", "WANDA"],
    "--sparsity": ["-0.1", "1", "1.5", "nan", "inf", "half", ""],
    "--pattern": ["4:4", "0:4", "a:b", "2:3", "", "1:0"],
    "--scope": ["column"],
    "--recover": ["magic"],
    "--recipe": ["fast"],
    "--nsamples": ["0", "-1", str(2**70), "x", "1.5"],
    "--seqlen": ["0", "-5"],
    "--epochs": ["0", "-1"],
    "--lr": ["nan", "inf", "-1", "-inf"],
    "--weight-decay": ["nan", "-0.5"],
    "--grad-clip": ["0", "inf", "nan"],
    "--seed": ["-1", str(2**64), "abc"],
    "--eval-seqlen": ["0", "-1"],
    "--eval-windows": ["0"],
    "--layers": ["(", "no_such_linear"],
    "--allocation": ["random"],
    "--dtype": ["int8", ""],
    "--save-dtype": ["int4"],
    "--batch-size": ["0", "-2"],
    "--target": ["nowhere"],
    "--loss": ["l1"],
    "--holdout": ["-1", "99"],
    "--lora-steps": ["0"],
    "--dsnot-cycles": ["0"],
    "--flap-structure": ["random"],
    "--owl-lambda": ["0.9", "-1"],
    "--atp-beta": ["-0.01", "nan", "2"],
}


KINDS = ("run", "sweep", "plan", "tasks", "resume", "export", "register")
# what a killed export leaves (ebft.export.gguf.LEFTOVERS): removed by the next export, not a user's file
_LEFTOVER = re.compile(r"\.(?:.+\.gguf\.tmp|ebft-gguf)-(\d+)(?:-.+)?")


def make_case(rng: random.Random, paths: dict) -> list[str]:
    """One command line: the tiny model and text, a few random flags, perhaps one invalid value, and
    sometimes a hostile path."""
    args = ["run", "--model", paths["model"], "--calib", paths["text"], "--eval", paths["text"],
            "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "16", "--eval-windows", "1",
            "--out", paths["out"]]
    for flag in rng.sample(sorted(VALID), rng.randint(1, 5)):
        args += [flag, rng.choice(VALID[flag])]
    recover = args[len(args) - 1 - args[::-1].index("--recover") + 1] if "--recover" in args else "ebft"
    if recover in ("ebft", "ebft-mask", "ebft-gradual") and "--epochs" not in args:
        args += ["--epochs", "1"]  # (a setting of a recovery that does not run would be refused)
    if rng.random() < 0.6:
        flag = rng.choice(sorted(INVALID))
        args += [flag, rng.choice(INVALID[flag])]
    if rng.random() < 0.15:  # a hostile or careless path
        which, value = rng.choice([("--calib", paths["missing"]), ("--calib", paths["empty"]),
                                   ("--calib", paths["binary"]), ("--eval", paths["folder"]),
                                   ("--model", paths["missing"]), ("--model", paths["text"]),
                                   ("--out", paths["inside_file"]), ("--out", paths["user_folder"]),
                                   ("--out", paths["model"]), ("--out", "/")])
        args += [which, value]
    return args


def make_sweep_case(rng: random.Random, paths: dict) -> list[str]:
    """`ebft sweep`: random grids, valid and not, into a new folder, a user's folder or a run's output."""
    methods = rng.choice(["wanda", "magnitude,wanda", "sparsegpt", "flap", "wanda,oracle", "", "wanda,,wanda"])
    sparsities = rng.choice(["0.5", "0.3,0.6", "1.5", "nan", "0.5,x", ""])
    recover = rng.choice(["none", "none,dsnot", "none,ebft", "magic", "none,lora"])
    args = ["sweep", "--model", paths["model"], "--calib", paths["text"], "--eval", paths["text"],
            "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "16", "--eval-windows", "1",
            "--methods", methods, "--sparsities", sparsities, "--recover", recover,
            "--out", rng.choice([paths["out"], paths["out"], paths["user_folder"], paths["run_output"]])]
    if "ebft" in recover:
        args += ["--epochs", "1"]
    if rng.random() < 0.3:
        flag = rng.choice(["--lora-steps", "--dsnot-cycles", "--lr", "--recover-budget"])
        args += [flag, rng.choice(["1", "0", "-1", "nan", "1e308"])]
    return args


def make_plan_case(rng: random.Random, paths: dict) -> list[str]:
    """`ebft plan`: memory sizes that are and are not sizes, --plan-json anywhere."""
    sizes = ["16GB", "8GiB", "512M", "1024", "0", "nan", "-1GB", "lots", "1e30GB", "99999999PB", "", "1.5TB"]
    args = ["plan", "--model", paths["model"], "--nsamples", rng.choice(["2", "256", "0"]),
            "--device", rng.choice(["cpu", "cuda", "auto", "tpu"])]
    for flag in rng.sample(["--free-host", "--free-accelerator"], rng.randint(0, 2)):
        args.append(f"{flag}={rng.choice(sizes)}")
    if rng.random() < 0.5:
        args += ["--plan-json", rng.choice([paths["out"] + ".json", paths["folder"], paths["inside_file"],
                                            str(Path(paths["out"]).parent / "no" / "such" / "p.json")])]
    return args


def make_task_case(rng: random.Random, paths: dict) -> list[str]:
    """`ebft eval --tasks piqa` on a task file with one record damaged at random (or none)."""
    good = {"query": "Question: which is it?", "choices": ["this one", "that one"], "gold": 0}
    damage = rng.choice([None, ("choices", "this one"), ("choices", []), ("choices", ["a"]), ("gold", 5),
                         ("gold", -1), ("gold", "0"), ("gold", True), ("query", ""), ("query", 3), ("drop", "gold"),
                         ("line", "{not json"), ("line", "[1, 2]")])
    lines = [json.dumps(good)] * 3
    if damage is not None:
        kind, value = damage
        if kind == "line":
            lines[1] = value
        elif kind == "drop":
            lines[1] = json.dumps({k: v for k, v in good.items() if k != value})
        else:
            lines[1] = json.dumps({**good, kind: value})
    Path(paths["task_file"]).write_text("\n".join(lines) + "\n")
    return ["eval", "--model", paths["model"], "--tasks", "piqa", "--task-data", f"piqa={paths['task_file']}",
            "--limit", "2"]


def check_resume_case(rng: random.Random, paths: dict, root: Path) -> int:
    """A run stopped at a random block (as SIGKILL stops it: the checkpoint stays), its checkpoint
    damaged, its command changed or the model replaced at random; run again: exit 0 (resumed or started
    over) or 2 in one line, never a traceback; with --no-resume it then succeeds."""
    from ebft import checkpoint as ckpt
    from ebft.cli import main

    out = Path(paths["out"])
    args = make_case(random.Random(rng.randrange(1 << 30)), {**paths, "out": str(out)})
    args = [a for a in args if a not in ("--lazy",)]

    class Stop(BaseException):
        pass

    at = rng.randint(0, 1)

    def hook(point, index=None):
        if point == "block" and index == at:
            raise Stop

    ckpt.kill_hook = hook
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            first = main(args)
    except Stop:
        first = None
    finally:
        ckpt.kill_hook = None
    if first is not None:  # refused or finished before the block: an ordinary case
        return first
    folder = out.parent / f".{out.name}.ckpt"
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "lock"]
    change = rng.choice(["none", "truncate", "empty", "garbage", "args", "args", "none"])
    if change in ("truncate", "empty", "garbage") and files:
        victim = rng.choice(files)
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2] if change == "truncate" else b"" if change == "empty"
                           else bytes(rng.randrange(256) for _ in range(64)))
    elif change == "args":
        args = args + rng.choice([["--seed", "7"], ["--sparsity", "0.3"], ["--resume"], ["--no-resume"],
                                  ["--checkpoint-every", "5"], ["--no-checkpoint"]])
    code = check_case(args, root, out)
    if code == 2:
        assert check_case([*args, "--no-resume"] if "--resume" not in args else args, root, out) in (0, 2)
    return code


def check_ranks(rng: random.Random, paths: dict, root: Path, port: int) -> tuple[int, int]:
    """Two processes as two ranks (RANK 0 and 1 of WORLD_SIZE 2, started by hand), with the same settings
    or one differing: both exit 0, or both exit 2 naming the difference; never a traceback, never a hang."""
    import os
    import subprocess
    import sys

    base = make_case(random.Random(rng.randrange(1 << 30)), paths)
    base = [a for a in base if a != "--lazy"] + ["--rank-timeout", "60"]
    other = list(base)
    if rng.random() < 0.7:
        other += rng.choice([["--seed", "5"], ["--sparsity", "0.6"], ["--nsamples", "3"], ["--eval-windows", "2"]])
    src = str(Path(__file__).resolve().parents[1] / "src")
    procs = []
    for rank, args in enumerate((base, other)):
        env = {**os.environ, "PYTHONPATH": src, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "ebft", *args], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            results.append((p.wait(timeout=300), p.stderr.read()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"ranks hung: {base} vs {other}")
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, (code, base, other, err[-2000:])
    codes = tuple(code for code, _ in results)
    assert codes[0] == codes[1] or 2 in codes, (codes, base, other)
    return codes


def fingerprint(root: Path, skip: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except those under ``skip`` (the run's output)."""
    out = {}
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        beside = any(part.startswith(f".{skip.name}.") or _LEFTOVER.fullmatch(part) for part in parts)
        if path.is_file() and skip not in path.parents and path != skip and not beside:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def check_case(args: list[str], root: Path, out: Path) -> int:
    """Run one case; assert the contract; return its exit code."""
    from ebft.cli import main

    before = fingerprint(root, out)
    plan_json = Path(args[args.index("--plan-json") + 1]) if "--plan-json" in args else None
    plan_existed = plan_json is not None and plan_json.is_file()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    text = err.getvalue()
    assert code in (0, 2), (code, args, text[-2000:])
    assert "Traceback" not in text, (args, text[-2000:])
    target = Path(args[args.index("--out") + 1]) if "--out" in args else None
    if code == 2:
        assert not out.exists(), (args, "output written by a failed run")
        lines = [line for line in text.splitlines() if line.startswith("ebft")]
        assert len(lines) == 1 and "error" in lines[0], (args, text[-2000:])
    elif args[0] == "run":
        assert (out / "run.json").is_file(), args
    elif args[0] == "sweep":
        assert target == out and (out / "results.json").is_file(), args
    after = fingerprint(root, out)
    if plan_json is not None:
        assert code == 0 or (plan_json.is_file() == plan_existed), (args, "a plan written by a refused command")
        if code == 0 and (not plan_existed or before.get(str(plan_json)) is None or _is_plan(plan_json)):
            after.pop(str(plan_json), None)  # a new plan, or ebft's earlier plan replaced: never a user's file
            before.pop(str(plan_json), None)
    assert after == before, (args, "a file outside --out changed")
    leftovers = [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    assert not leftovers, (args, f"leftover temporary folders {leftovers}")
    return code


def _is_plan(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("written_by") == "ebft plan"
    except (OSError, ValueError, AttributeError):
        return False


def make_export_case(rng: random.Random, paths: dict) -> list[str]:
    """`ebft export`: good and bad sources, types and destinations (new, a user's file, an earlier export, the
    source itself, a folder), with or without --overwrite."""
    source = rng.choice([paths["model"], paths["model"], paths["run_output"], paths["text"], paths["missing"],
                         paths["fake_gguf"]])
    out = rng.choice([paths["out"] + ".gguf", paths["out"] + ".gguf", paths["user_gguf"], paths["fake_gguf"],
                      paths["folder"], paths["out"] + ".bin", str(Path(paths["run_output"]) / "model.gguf")])
    args = ["export", source, "--out", out, "--type", rng.choice(["f32", "f16", "q8_0", "q8_0", "q9", ""])]
    if rng.random() < 0.5:
        args.append("--overwrite")
    return args


def check_export_case(rng: random.Random, paths: dict, root: Path) -> int:
    """One export case, with a dead export's leftovers planted in the folder: exit 0 or 2 in one line, never a
    traceback; no file but the destination changes (and a run folder's marker, which lists the export); the
    destination is replaced only by a success with --overwrite and only if it was a GGUF; after a success in
    that folder no leftover of the dead process is there."""
    import subprocess
    import sys

    from ebft.cli import main

    args = make_export_case(rng, paths)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    planted = [root / f".gone.gguf.tmp-{dead.pid}", root / f".ebft-gguf-{dead.pid}-x1y2"]
    planted[0].write_bytes(b"GGUF" + bytes(64))
    planted[1].mkdir(exist_ok=True)
    out = Path(args[args.index("--out") + 1])
    existed = out.read_bytes() if out.is_file() else None
    before = fingerprint(root, out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    text = err.getvalue()
    assert code in (0, 2) and "Traceback" not in text, (code, args, text[-2000:])
    if code == 2:
        lines = [line for line in text.splitlines() if line.startswith("ebft")]
        assert len(lines) == 1 and "error" in lines[0], (args, text[-2000:])
    after = fingerprint(root, out)
    if code == 0:
        marker = str(out.parent / ".ebft-output")
        before.pop(marker, None), after.pop(marker, None)
    assert after == before, (args, "a file other than the export's changed")
    if existed is not None and not (code == 0 and "--overwrite" in args and existed[:4] == b"GGUF"):
        assert out.read_bytes() == existed, (args, "the destination was replaced")
    if existed is None and code == 2:
        assert not out.is_file(), (args, "a refused export wrote its file")
    if code == 0 and out.parent == root:
        assert not any(p.exists() for p in planted), (args, "a dead export's leftovers were not removed")
    for p in planted:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if code == 0 and out.parent == root and existed is None:
        out.unlink()
    return code


def check_register_case(rng: random.Random) -> int:
    """A plugin registered with a name and settings good or bad: refused at once (one line naming the method)
    or accepted; either way every later command still parses, and a good one shows in --help."""
    import dataclasses

    from ebft.cli import main
    from ebft.prune import PRUNERS, register_pruner, unregister_pruner
    from ebft.recover import RECOVERIES, register_recovery, unregister_recovery
    from ebft.settings import option

    name = rng.choice(["fuzzy", "fuzz-2", "fuzz_3", "a/b", "a,b", "", "Fuzzy", "x" * 70, "wanda", "ebft", " sp", 7])
    field_name = rng.choice(["fuzz_power", "sparsity", "epochs", "method", "fuzz_steps"])
    kind_of_field = rng.choice([(float, option(1.0, "a fuzz setting")), (int, option(2, "a fuzz setting")),
                                (str, option("x", "a fuzz setting")), (dict, dataclasses.field(default_factory=dict))])
    settings = dataclasses.make_dataclass("FuzzSettings", [(field_name, *kind_of_field)])
    pruner = rng.random() < 0.5
    register, registry = (register_pruner, PRUNERS) if pruner else (register_recovery, RECOVERIES)
    known = set(registry)
    try:
        register(name, settings=settings)(lambda *a: None)
        accepted = True
    except ValueError as error:
        assert "\n" not in str(error) and repr(name) in str(error) or "registered twice" in str(error), str(error)
        assert set(registry) == known, "a refused registration was kept"
        accepted = False
    try:
        with contextlib.redirect_stdout(io.StringIO()) as help_text:
            assert main(["run", "--help"]) == 0
        if accepted:
            assert name in help_text.getvalue()
    finally:
        if accepted:
            (unregister_pruner if pruner else unregister_recovery)(name)
    return 0 if accepted else 2


def reset(out: Path) -> None:
    """Remove the output and anything beside it a previous case left on purpose (a resumable checkpoint)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    for extra in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(extra, ignore_errors=True) if extra.is_dir() else extra.unlink()


def hostile_paths(root: Path, model_dir: Path, text_file: Path) -> dict:
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "folder").mkdir(exist_ok=True)
    (root / "a-file").write_text("not a folder")
    (root / "mine").mkdir(exist_ok=True)
    (root / "mine" / "notes.txt").write_text("keep me")
    (root / "tasks").mkdir(exist_ok=True)
    (root / "mine.gguf").write_text("my notes, in a file named .gguf")
    (root / "fake.gguf").write_text("not a model")
    return {"user_gguf": str(root / "mine.gguf"), "fake_gguf": str(root / "fake.gguf"), "model": str(model_dir), "text": str(text_file), "out": str(root / "out"),
            "missing": str(root / "missing.txt"), "empty": str(root / "empty.txt"),
            "binary": str(root / "binary.txt"), "folder": str(root / "folder"),
            "inside_file": str(root / "a-file" / "out"), "user_folder": str(root / "mine"),
            "run_output": str(_run_output(root, model_dir, text_file)), "task_file": str(root / "tasks" / "piqa.jsonl")}


def _run_output(root: Path, model_dir: Path, text_file: Path) -> Path:
    """An ebft run's output folder (a sweep must never write into it)."""
    from ebft.cli import main

    out = root / "a-run"
    if not out.exists():
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            assert main(["run", "--model", str(model_dir), "--calib", str(text_file), "--eval", str(text_file),
                         "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "16", "--eval-windows", "1",
                         "--recover", "none", "--out", str(out)]) == 0
    return out
