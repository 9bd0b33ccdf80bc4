"""Fuzz the command line: random valid and invalid flag values on a tiny model. Every case exits 0 or
2, never prints a traceback, writes nothing under --out unless it succeeded, and changes no file
outside --out. A longer run: ``python benchmarks/fuzz.py --cases 500``."""
import random
import shutil

import pytest

from fuzz_cases import check_case, hostile_paths, make_case, reset

CASES = 40


@pytest.fixture(scope="module")
def playground(tmp_path_factory, tiny_model_dir, text_file):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_model_dir, root / "model")
    shutil.copy(text_file, root / "corpus.txt")
    return root, hostile_paths(root, root / "model", root / "corpus.txt")


@pytest.mark.parametrize("seed", range(CASES))
def test_random_command_lines_keep_the_contract(playground, seed):
    root, paths = playground
    out = root / "out"
    reset(out)
    check_case(make_case(random.Random(seed), paths), root, out)
    reset(out)
