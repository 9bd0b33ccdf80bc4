"""Fuzz the command line: random valid and invalid flag values on a tiny model, for `ebft run`, `ebft sweep`,
`ebft plan`, `ebft eval --tasks` on damaged task files, runs resumed from damaged checkpoints or with changed
commands, `ebft export` onto new names, users' files and its own source with a dead export's leftovers
beside, plugin registrations good and bad, and two processes as two ranks. Every case exits 0 or 2, never prints a traceback, writes nothing
under --out unless it succeeded, and changes no file outside --out. A longer run:
``python benchmarks/fuzz.py --cases 500``."""
import random
import shutil
import socket

import pytest

from fuzz_cases import (check_case, check_export_case, check_ranks, check_register_case, check_resume_case,
                        hostile_paths, make_case, make_plan_case, make_sweep_case, make_task_case, reset)

CASES = {"run": 40, "sweep": 10, "plan": 12, "tasks": 8, "resume": 10, "export": 12, "register": 12}
MAKERS = {"run": make_case, "sweep": make_sweep_case, "plan": make_plan_case, "tasks": make_task_case}


@pytest.fixture(scope="module")
def playground(tmp_path_factory, tiny_model_dir, text_file):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copy(text_file, root / "corpus.txt")
    return root, hostile_paths(root, root / "model", root / "corpus.txt")


@pytest.mark.parametrize("kind,seed", [(k, s) for k, n in CASES.items() for s in range(n)])
def test_random_command_lines_keep_the_contract(playground, kind, seed):
    root, paths = playground
    out = root / "out"
    reset(out)
    rng = random.Random(f"{kind}-{seed}")
    if kind == "resume":
        check_resume_case(rng, paths, root)
    elif kind == "export":
        check_export_case(rng, paths, root)
    elif kind == "register":
        check_register_case(rng)
    else:
        check_case(MAKERS[kind](rng, paths), root, out)
    reset(out)


@pytest.mark.parametrize("seed", range(2))
def test_two_processes_as_two_ranks_agree_or_both_stop(playground, seed):
    root, paths = playground
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / "out"
    reset(out)
    random_case = random.Random(f"ranks-{seed}")
    check_ranks(random_case, {**paths, "out": str(out)}, root, port)
    reset(out)
