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
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("ebft "):
                commands.append(line)
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
