"""Random `ebft run` command lines, valid and invalid, for the fuzz test and its long benchmark run.

Each case picks a few flags with values drawn from what a careless or hostile user might type
(extremes, wrong types, non-finite numbers, impossible paths) next to valid ones, on a tiny model.
:func:`check_case` runs one and asserts the contract: exit code 0 or 2, never a traceback, nothing
under ``--out`` unless the run succeeded, and no file outside ``--out`` changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import random
from pathlib import Path

VALID = {
    "--method": ["wanda", "magnitude", "sparsegpt", "flap"],
    "--sparsity": ["0", "0.3", "0.5", "0.9"],
    "--pattern": ["unstructured", "2:4", "1:4", "structured"],
    "--scope": ["row", "layer"],
    "--recover": ["none", "ebft", "dsnot", "ebft-mask", "lora"],
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
    "--allocation": ["uniform", "owl"],
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
}


def make_case(rng: random.Random, paths: dict) -> list[str]:
    """One command line: the tiny model and text, a few random flags, perhaps one invalid value, and
    sometimes a hostile path."""
    args = ["run", "--model", paths["model"], "--calib", paths["text"], "--eval", paths["text"],
            "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "16", "--eval-windows", "1",
            "--epochs", "1", "--out", paths["out"]]
    for flag in rng.sample(sorted(VALID), rng.randint(1, 5)):
        args += [flag, rng.choice(VALID[flag])]
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


def fingerprint(root: Path, skip: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except those under ``skip`` (the run's output)."""
    out = {}
    for path in sorted(root.rglob("*")):
        beside = any(part.startswith(f".{skip.name}.") for part in path.relative_to(root).parts)
        if path.is_file() and skip not in path.parents and path != skip and not beside:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def check_case(args: list[str], root: Path, out: Path) -> int:
    """Run one case; assert the contract; return its exit code."""
    from ebft.cli import main

    before = fingerprint(root, out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    text = err.getvalue()
    assert code in (0, 2), (code, args, text[-2000:])
    assert "Traceback" not in text, (args, text[-2000:])
    if code == 2:
        assert not out.exists(), (args, "output written by a failed run")
        lines = [line for line in text.splitlines() if line.startswith("ebft")]
        assert len(lines) == 1 and "error" in lines[0], (args, text[-2000:])
    else:
        assert (out / "run.json").is_file(), args
    assert fingerprint(root, out) == before, (args, "a file outside --out changed")
    leftovers = [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name)]
    assert not leftovers, (args, f"leftover temporary folders {leftovers}")
    return code


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
    return {"model": str(model_dir), "text": str(text_file), "out": str(root / "out"),
            "missing": str(root / "missing.txt"), "empty": str(root / "empty.txt"),
            "binary": str(root / "binary.txt"), "folder": str(root / "folder"),
            "inside_file": str(root / "a-file" / "out"), "user_folder": str(root / "mine")}
