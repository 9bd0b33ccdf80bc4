"""The README's commands and Python snippet work as written.

Every ``ebft ...`` command in a ```bash block parses, and its settings validate (placeholder paths
``path/to/...`` excepted; commands that need a GPU or the hub validate all the same, they just are not
run). The Python API snippet runs for real, on a tiny local model and text instead of the demo model.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def bash_commands() -> list[str]:
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
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


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


COMMANDS = bash_commands()


def test_the_readme_has_commands_and_a_snippet():
    assert len(COMMANDS) >= 10 and python_snippets()


@pytest.mark.parametrize("command", COMMANDS, ids=range(len(COMMANDS)))
def test_every_readme_command_parses_and_validates(command, monkeypatch):
    from ebft.cli import build_parser, config_from_args, sweep_config_from_args

    monkeypatch.chdir(README.parent)  # commands are written for the repository root
    argv = shlex.split(command)[1:]
    args = build_parser().parse_args(argv)  # unknown flags or bad values exit here
    if "path/to/" in command:
        return  # a placeholder for the user's own file
    if args.command == "sweep":
        sweep_config_from_args(args).validate()
    elif args.command in ("run", "plan"):
        config = config_from_args(args)
        config.validate(need_out=False, need_device=False)
    elif args.command == "eval":
        config = config_from_args(args)
        config.check_types()


def test_the_python_api_snippet_runs(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for snippet in python_snippets():
        if "from ebft import" not in snippet:
            continue
        code = (snippet.replace('"builtin:smollm2"', repr(str(tiny_model_dir)))
                .replace('["offline"]', repr([str(text_file)])).replace('"offline"', repr(str(text_file))))
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})


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


def test_the_offline_readme_commands_run_at_a_tiny_size(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Every README command that needs neither the hub nor a GPU (nor a placeholder path) runs, in the
    README's order (a later `ebft eval --model runs/x` reads what an earlier command saved), with the
    tiny model and text standing in for the demo's and tiny lengths: exit code 0."""
    from ebft.cli import main
    from ebft.export.gguf import llama_cpp_available

    monkeypatch.chdir(tmp_path)
    ran, previous = 0, None
    for command in COMMANDS:
        if "path/to/" in command or HUB_OR_GPU.search(command) or command == previous:
            continue  # (the same command twice: the resume demonstration's rerun of a killed run)
        previous = command
        if K_QUANT.search(command) and not llama_cpp_available():
            continue  # k-quants need the optional llama-cpp-python (pip install "ebft[gguf]")
        argv = _tiny_argv(command, str(tiny_model_dir), str(text_file), README.parent)
        if argv[0] == "plan":
            argv = shlex.split(command)[1:]
            argv = [str(README.parent / a) if a.startswith("configs/") else a for a in argv]
        assert main(argv) == 0, command
        ran += 1
    assert ran >= 5


def test_the_readme_flag_table_is_the_generated_one():
    """The README's flag table is `ebft.cli.flag_table()`, which is generated from the settings' declarations
    (regenerate it with `python -c "from ebft.cli import flag_table; print(flag_table())"`)."""
    from ebft.cli import flag_table

    assert flag_table() in README.read_text()


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_inside_the_readme_points_at_a_heading_and_every_linked_file_exists():
    text = README.read_text()
    outside_code = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", outside_code, flags=re.M)}
    links = re.findall(r"\]\(([^)\s]+)\)", outside_code)
    assert links
    for link in links:
        if link.startswith("#"):
            assert link[1:] in anchors, f"README links to {link}, which no heading has"
        elif not re.match(r"[a-z]+://", link):
            assert (README.parent / link.split("#")[0]).exists(), f"README links to {link}, which is not in the repo"


def test_the_anchor_rule_is_githubs():
    assert _anchor("Deploy: GGUF for llama.cpp and ollama (`ebft export`)") == "deploy-gguf-for-llamacpp-and-ollama-ebft-export"
    assert _anchor("High sparsity: 60–80 % and 2:4, the paper's recipe") == "high-sparsity-6080--and-24-the-papers-recipe"
