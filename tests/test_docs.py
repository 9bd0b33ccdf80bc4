"""The README, CHANGELOG.md and every docs/*.md work as written.

- Every ``ebft ...`` command in a ```bash block parses, and its settings validate (placeholder paths
  ``path/to/...`` excepted; commands that need a GPU or the hub validate all the same, they just are not
  run); the offline ones run at a tiny size, in order through the files.
- Every ```python block that imports ebft runs, file by file in one namespace, on a tiny local model and
  text instead of the demo's (the Python API, the tutorials); a block that imports nothing of ebft quotes
  the source, and its lines appear, in order, in a file under src/.
- Every relative link points at a file that exists and, with an anchor, at a heading of that file.
- docs/cli.md's flag table is ``ebft.cli.flag_table()`` (``make docs`` rewrites it).
- The README is the front door: the two set-up commands first, at most 250 lines, a link to every docs file.
"""
from __future__ import annotations

import importlib.util
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
# the README first and docs/cli.md next: later files' commands read the runs theirs save (`ebft export runs/flap20`)
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"), key=lambda p: (p.name != "cli.md", p.name)),
        ROOT / "CHANGELOG.md"]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def bash_commands(path: Path) -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        variables = {}  # NAME="..." lines of the block, expanded in its commands as $NAME
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            assignment = re.fullmatch(r'([A-Z_]+)="(.*)"', line)
            if assignment:
                variables[assignment[1]] = re.sub(r"\s+", " ", assignment[2])
            elif line.startswith("ebft "):
                commands.append(re.sub(r"\$([A-Z_]+)", lambda m: variables[m[1]], line))
    return commands


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def runs_ebft(block: str) -> bool:
    return re.search(r"^\s*(from ebft\b|import ebft\b)", block, flags=re.M) is not None


COMMANDS = [(path, command) for path in DOCS for command in bash_commands(path)]


def test_every_doc_file_is_checked_and_they_have_commands_and_snippets():
    assert {p.name for p in DOCS} >= {"README.md", "CHANGELOG.md", "cli.md", "methods.md", "results.md", "scale.md",
                                      "deploy.md", "reliability.md", "architecture.md"}
    assert len(COMMANDS) >= 10 and any(runs_ebft(b) for p in DOCS for b in python_blocks(p))


@pytest.mark.parametrize("path,command", COMMANDS,
                         ids=[f"{_name(p)}:{i}" for i, (p, _) in enumerate(COMMANDS)])
def test_every_command_parses_and_validates(path, command, monkeypatch):
    from ebft.cli import build_parser, config_from_args, sweep_config_from_args
    from ebft.validate import validate

    monkeypatch.chdir(ROOT)  # commands are written for the repository root
    argv = shlex.split(command)[1:]
    args = build_parser().parse_args(argv)  # unknown flags or bad values exit here
    if "path/to/" in command:
        return  # a placeholder for the user's own file
    if args.command == "sweep":
        sweep_config_from_args(args).validate()
    elif args.command in ("run", "plan"):
        config = config_from_args(args)
        validate(config, need_out=False, need_device=False)
    elif args.command == "eval":
        config = config_from_args(args)
        config.check_types()


# ----------------------------------------------------------------------------- Python blocks

def _on_tiny(code: str, model: Path, text: Path) -> str:
    return (code.replace('"builtin:smollm2"', repr(str(model)))
            .replace('["offline"]', repr([str(text)])).replace('"offline"', repr(str(text))))


PYTHON_DOCS = [p for p in DOCS if any(runs_ebft(b) for b in python_blocks(p))]


@pytest.mark.parametrize("path", PYTHON_DOCS, ids=[_name(p) for p in PYTHON_DOCS])
def test_every_python_block_runs(path, tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The file's blocks in order, in one namespace (a tutorial's second block runs what its first
    registered); what they register is unregistered afterwards."""
    from ebft.metrics import METRICS, unregister_metric
    from ebft.prune import PRUNERS, unregister_pruner
    from ebft.recover import RECOVERIES, unregister_recovery

    monkeypatch.chdir(tmp_path)
    pruners, recoveries, metrics = set(PRUNERS), set(RECOVERIES), set(METRICS)
    module = types.ModuleType(f"docs_{path.stem}")  # a module of the reader's, as their plugin would be
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for block in python_blocks(path):
            if runs_ebft(block):  # (dont_inherit: without this file's `from __future__ import annotations`)
                code = compile(_on_tiny(block, tiny_model_dir, text_file), str(path), "exec", dont_inherit=True)
                exec(code, module.__dict__)
    finally:
        for name in set(PRUNERS) - pruners:
            unregister_pruner(name)
        for name in set(RECOVERIES) - recoveries:
            unregister_recovery(name)
        for name in set(METRICS) - metrics:
            unregister_metric(name)


def _code_lines(text: str) -> list[str]:
    """Lines of code without their comments and indentation, blank lines dropped."""
    lines = (re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


QUOTES = [(p, b) for p in DOCS for b in python_blocks(p) if not runs_ebft(b)]


@pytest.mark.parametrize("path,block", QUOTES, ids=[f"{_name(p)}:{i}" for i, (p, _) in enumerate(QUOTES)])
def test_every_quoted_python_block_is_in_the_source(path, block):
    quoted = _code_lines(block)
    for source in (ROOT / "src").rglob("*.py"):
        lines = _code_lines(source.read_text())
        if any(lines[i:i + len(quoted)] == quoted for i in range(len(lines) - len(quoted) + 1)):
            return
    pytest.fail(f"{_name(path)} quotes code that no file under src/ holds:\n{block}")


# ----------------------------------------------------------------------------- commands, run

HUB_OR_GPU = re.compile(r"(--(calib|eval) (c4|wikitext2|ptb)\b)|meta-llama/|--device cuda|torchrun|--task-data builtin"
                        r"|--tasks(?! .*--task-data path)|--zeroshot")
K_QUANT = re.compile(r"--(export-)?type q\d_k")
TINY = {"--nsamples": "4", "--seqlen": "16", "--eval-seqlen": "32", "--eval-windows": "2", "--epochs": "1",
        "--finish-steps": "2", "--finish-holdout": "1", "--lora-steps": "2", "--limit": "4"}


def _tiny_argv(command: str, model: str, text: str, root: Path) -> list[str]:
    """The command's arguments at a tiny size: the tiny model and text for the demo's, small lengths."""
    argv = shlex.split(command)[1:]
    out = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev in TINY:
            arg = TINY[prev]
        elif arg == "builtin:smollm2":
            arg = model
        elif prev in ("--calib", "--eval") and arg.startswith("offline"):
            arg = text
        elif prev == "--config":
            arg = str(root / arg)
        out.append(arg)
    if argv[0] in ("run", "sweep"):
        out += ["--model", model, "--calib", text, *(x for k, v in TINY.items() if k in (
            "--nsamples", "--seqlen") for x in (k, v))]
        recover = argv[argv.index("--recover") + 1] if "--recover" in argv else "ebft"
        if any(r in ("ebft", "ebft-mask") for r in recover.split(",")):  # block training: fewer epochs
            out += ["--epochs", TINY["--epochs"]]
    if argv[0] in ("run", "sweep", "eval") and "--tasks" not in argv:
        out += ["--eval", text, "--eval-seqlen", "32", "--eval-windows", "2"]
    return out


def test_the_offline_commands_run_at_a_tiny_size(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Every command that needs neither the hub nor a GPU (nor a placeholder path) runs, in the files'
    order (a later `ebft eval --model runs/x` reads what an earlier command saved), with the tiny model and
    text standing in for the demo's and tiny lengths: exit code 0. A command met again (the resume
    demonstration's rerun of a killed run, a command the README and docs/cli.md both show) runs once."""
    from ebft.cli import main
    from ebft.export.gguf import llama_cpp_available

    monkeypatch.chdir(tmp_path)
    ran, seen = 0, set()
    for path, command in COMMANDS:
        if "path/to/" in command or HUB_OR_GPU.search(command) or command in seen:
            continue
        seen.add(command)
        if K_QUANT.search(command) and not llama_cpp_available():
            continue  # k-quants need the optional llama-cpp-python (pip install "ebft[gguf]")
        argv = _tiny_argv(command, str(tiny_model_dir), str(text_file), ROOT)
        if argv[0] == "plan":
            argv = shlex.split(command)[1:]
            argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
        assert main(argv) == 0, f"{_name(path)}: {command}"
        ran += 1
    assert ran >= 5


# ----------------------------------------------------------------------------- the flag table

def _flag_table_tool():
    spec = importlib.util.spec_from_file_location("flag_table_tool", ROOT / "tools" / "flag_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_flag_table_in_docs_cli_is_the_generated_one():
    """docs/cli.md's table between its markers is `ebft.cli.flag_table()`, generated from the settings'
    declarations; `make docs` (tools/flag_table.py) rewrites it."""
    from ebft.cli import flag_table

    text = CLI_DOC.read_text()
    assert _flag_table_tool().with_table(text, flag_table()) == text, (
        "docs/cli.md's flag table differs from the settings' declarations (ebft run --help): run `make docs`")


def test_make_docs_rewrites_a_stale_table_and_nothing_else(tmp_path, capsys):
    from ebft.cli import flag_table

    tool = _flag_table_tool()
    stale = tmp_path / "cli.md"
    current = CLI_DOC.read_text()
    stale.write_text(current.replace("| `--seed` |", "| `--seed` | an old help text |\n| `--gone` |", 1))
    assert tool.main([str(stale), "--check"]) == 1 and "make docs" in capsys.readouterr().out
    assert tool.main([str(stale)]) == 0
    assert stale.read_text() == tool.with_table(current, flag_table())
    assert tool.main([str(stale), "--check"]) == 0
    # `make docs` is this tool
    assert re.search(r"^docs:.*\n\t.*tools/flag_table\.py$", (ROOT / "Makefile").read_text(), flags=re.M)


# ----------------------------------------------------------------------------- links

def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _outside_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(path: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", _outside_code(path.read_text()), flags=re.M)}


LINKED = [p for p in DOCS if re.search(r"\]\(([^)\s]+)\)", _outside_code(p.read_text()))]


@pytest.mark.parametrize("path", LINKED, ids=[_name(p) for p in LINKED])
def test_every_link_points_at_a_file_and_a_heading_that_exist(path):
    for link in re.findall(r"\]\(([^)\s]+)\)", _outside_code(path.read_text())):
        if re.match(r"[a-z]+://", link):
            continue
        target, _, anchor = link.partition("#")
        target_path = (path.parent / target).resolve() if target else path
        assert target_path.exists(), f"{_name(path)} links to {link}, which is not in the repository"
        if anchor:
            assert anchor in _anchors(target_path), f"{_name(path)} links to {link}, which no heading has"


def test_the_anchor_rule_is_githubs():
    assert _anchor("Deploy: GGUF for llama.cpp and ollama (`ebft export`)") == "deploy-gguf-for-llamacpp-and-ollama-ebft-export"
    assert _anchor("High sparsity: 60–80 % and 2:4, the paper's recipe") == "high-sparsity-6080--and-24-the-papers-recipe"


# ----------------------------------------------------------------------------- the front door

def test_the_readme_is_the_front_door():
    """The two set-up commands first (CI and the Makefile's comment name them), at most 250 lines, and a
    link to every file under docs/ and to the changelog."""
    text = README.read_text()
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S)[1]
    assert [line.split()[:2] for line in first.splitlines()] == [["make", "demo"], ["make", "test"]]
    assert len(text.splitlines()) <= 250
    linked = set(re.findall(r"\]\(([^)#\s]+)", _outside_code(text)))
    missing = {_name(p) for p in DOCS if p != README} - linked
    assert not missing, f"the README does not link {sorted(missing)}"
