"""Hostile and careless input at the edges of a run: loading models, choosing --out, saving.

* no code from model files runs unless asked (and nothing is asked on stdin);
* --out never replaces a folder ebft did not write, nor one that holds an input, and a destination
  that cannot be written fails before any model is loaded;
* a kill at any moment of a save leaves the old complete output or the new complete one, and the
  next start removes the leftovers;
* a damaged model file or folder is one EbftError line naming it, never a traceback.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ebft import atomic, output
from ebft.errors import ConfigError, EbftError
from ebft.output import atomic_folder, check_out, clean_stale, ebft_output_problem, is_ebft_output

SRC = str(Path(__file__).resolve().parents[1] / "src")


def one_line(error) -> str:
    msg = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def python(code: str, *, stdin: str | None = None, env: dict | None = None, timeout: float = 240, **kw):
    """Run ``code`` in a fresh interpreter that imports ebft from this checkout."""
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], input=stdin, capture_output=True,
                          text=True, env=full_env, timeout=timeout, **kw)


# ============================================================================ 1. no code from model files

EVIL_CODE = """
import os, pathlib
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("the model's code ran")
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
class EvilConfig(PretrainedConfig):
    model_type = "evil-thing"
class EvilModel(PreTrainedModel):
    config_class = EvilConfig
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def evil_folder(tmp_path: Path) -> Path:
    """A model folder whose config needs its own code (auto_map + unknown model_type); the code
    writes the file named by $EVIL_MARKER."""
    folder = tmp_path / "evil-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil-thing", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(EVIL_CODE)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    return folder


def _load_in_subprocess(folder: Path, marker: Path, tmp_path: Path, extra: str = "", trust: bool = False):
    code = f"""
        from ebft import models
        from ebft.errors import EbftError
        {extra}
        try:
            models.load_model({str(folder)!r}, trust_remote_code={trust})
        except EbftError as error:
            print("EBFT-ERROR:", error)
        else:
            print("LOADED")
    """
    env = {"EVIL_MARKER": str(marker), "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    return python(code, stdin="y\ny\ny\n", env=env)


def test_custom_code_folder_refused_even_with_yes_on_stdin(tmp_path):
    folder, marker = evil_folder(tmp_path), tmp_path / "marker"
    result = _load_in_subprocess(folder, marker, tmp_path)
    assert not marker.exists(), "the model folder's code ran"
    assert "[y/N]" not in result.stdout + result.stderr  # never asked
    line = result.stdout.split("EBFT-ERROR: ", 1)[1].strip()
    assert str(folder) in line and "--trust-remote-code" in line and "\n" not in line


def test_transformers_itself_is_told_not_to_run_code(tmp_path):
    """Without ebft's own check of config.json, the explicit trust_remote_code=False still stops it."""
    folder, marker = evil_folder(tmp_path), tmp_path / "marker"
    result = _load_in_subprocess(folder, marker, tmp_path, extra="models.check_model_folder = lambda *a: None")
    assert not marker.exists(), "the model folder's code ran"
    assert "[y/N]" not in result.stdout + result.stderr
    line = result.stdout.split("EBFT-ERROR: ", 1)[1].strip()
    assert "--trust-remote-code" in line


def test_trust_remote_code_true_does_run_it(tmp_path):
    """The opt-in works (and so the two tests above would notice the code running)."""
    folder, marker = evil_folder(tmp_path), tmp_path / "marker"
    result = _load_in_subprocess(folder, marker, tmp_path, trust=True)
    assert marker.exists(), result.stdout + result.stderr
    assert "Traceback" not in result.stdout  # it fails to load (no weights) as one line


def test_custom_tokenizer_code_is_not_run(tmp_path, tiny_model_dir):
    folder, marker = tmp_path / "model", tmp_path / "marker"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "evil.py").write_text(EVIL_CODE)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    result = _load_in_subprocess(folder, marker, tmp_path)
    assert not marker.exists(), "the tokenizer's code ran"
    assert "[y/N]" not in result.stdout + result.stderr and "Traceback" not in result.stdout
    assert "LOADED" in result.stdout or "EBFT-ERROR:" in result.stdout


class _Recorder:
    """Stands in for transformers' Auto classes: records the keyword arguments of every call."""

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, kind):
        recorder = self

        class Fake:
            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                recorder.calls.append((kind, "from_pretrained", kwargs))
                return _FakeModel()

            @classmethod
            def from_config(cls, *args, **kwargs):
                recorder.calls.append((kind, "from_config", kwargs))
                return _FakeModel()

        return Fake


class _FakeModel:
    def __init__(self):
        self.config = type("Config", (), {})()

    def state_dict(self):
        return {}

    def load_state_dict(self, *a, **k):
        pass

    def tie_weights(self):
        pass

    def named_parameters(self):
        return iter(())

    def get_input_embeddings(self):  # as wide as any tokenizer (the vocabulary check)
        return type("Embedding", (), {"weight": torch.empty(10**6, 1, device="meta")})()

    def __len__(self):  # (also the stand-in tokenizer)
        return 1

    def eval(self):
        return self


@pytest.mark.parametrize("kind", ["folder", "gguf", "hub"])
@pytest.mark.parametrize("trust", [False, True])
def test_every_transformers_load_gets_trust_remote_code_explicitly(kind, trust, tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    import transformers

    from ebft import hub, models

    calls = []
    fake = _Recorder(calls)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", fake("model"))
    monkeypatch.setattr(transformers, "AutoTokenizer", fake("tokenizer"))
    monkeypatch.setattr(transformers, "AutoConfig", fake("config"))
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: {"tensors": {}})
    monkeypatch.setattr(models, "check_gguf", lambda path: None)
    monkeypatch.setattr(hub, "hub_offline", lambda: True)
    source = {"folder": str(tiny_model_dir), "hub": "some-org/some-model"}.get(kind)
    if kind == "gguf":
        source = str(tmp_path / "m.gguf")
        Path(source).write_bytes(b"GGUF")
    models.load_model(source, trust_remote_code=trust)
    assert calls and all(kwargs.get("trust_remote_code") is trust for _, _, kwargs in calls), calls
    if kind == "gguf":
        assert ("model", "from_config") in [(k, f) for k, f, _ in calls]


# ============================================================================ 4. bad model files: one line

def _tiny_copy(tiny_model_dir, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def _bad_config_not_json(f):
    (f / "config.json").write_text('{"model_type": "llama", ')


def _bad_config_list(f):
    (f / "config.json").write_text("[1, 2]")


def _bad_config_binary(f):
    (f / "config.json").write_bytes(os.urandom(300) + b"\xff\xfe")


def _no_config(f):
    (f / "config.json").unlink()


def _no_weights(f):
    (f / "model.safetensors").unlink()


def _unknown_model_type(f):
    cfg = json.loads((f / "config.json").read_text())
    (f / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-architecture"}))


def _weights_random_bytes(f):
    (f / "model.safetensors").write_bytes(os.urandom(4096))


def _weights_truncated(f):
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[: len(data) // 2])


def _weights_cut_in_header(f):
    data = (f / "model.safetensors").read_bytes()
    (f / "model.safetensors").write_bytes(data[:100])


def _weights_empty(f):
    (f / "model.safetensors").write_bytes(b"")


def _weights_bad_header(f):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, "x"]}}).encode()
    (f / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)


def _index_missing_shard(f):
    (f / "model.safetensors").rename(f / "model-00001-of-00002.safetensors")
    (f / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


BAD_FOLDERS = {
    "config-not-json": (_bad_config_not_json, "config.json"),
    "config-a-list": (_bad_config_list, "config.json"),
    "config-binary": (_bad_config_binary, "config.json"),
    "no-config": (_no_config, "config.json"),
    "no-weights": (_no_weights, "no weights"),
    "unknown-model-type": (_unknown_model_type, "no-such-architecture"),
    "weights-random-bytes": (_weights_random_bytes, "model.safetensors"),
    "weights-truncated": (_weights_truncated, "model.safetensors"),
    "weights-cut-in-header": (_weights_cut_in_header, "model.safetensors"),
    "weights-empty": (_weights_empty, "model.safetensors"),
    "weights-bad-header": (_weights_bad_header, "model.safetensors"),
    "index-missing-shard": (_index_missing_shard, "model-00002-of-00002.safetensors"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_model_folder_is_one_line_naming_it(case, tiny_model_dir, tmp_path):
    from ebft.models import load_model

    folder = _tiny_copy(tiny_model_dir, tmp_path)
    damage, expected = BAD_FOLDERS[case]
    damage(folder)
    with pytest.raises(EbftError) as err:
        load_model(str(folder))
    msg = one_line(err)
    assert str(folder) in msg and expected in msg


def test_a_file_that_is_not_gguf_is_one_line(tmp_path):
    from ebft.models import load_model

    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"whatever")
    with pytest.raises(EbftError) as err:
        load_model(str(path))
    assert str(path) in one_line(err) and ".gguf" in one_line(err)


def _synthetic_gguf(path: Path) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    writer.add_tensor("output.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cut(path: Path, keep) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep(len(data))])


GGUF_CASES = {
    "empty": lambda p: p.write_bytes(b""),
    "two-bytes": lambda p: _cut(p, lambda n: 2),
    "random-bytes": lambda p: p.write_bytes(os.urandom(5000)),
    "cut-in-metadata": lambda p: _cut(p, lambda n: 60),
    "cut-in-tensor-data": lambda p: _cut(p, lambda n: n - 1000),
    "cut-by-one-byte": lambda p: _cut(p, lambda n: n - 1),
    "magic-then-garbage": lambda p: p.write_bytes(b"GGUF" + os.urandom(3000)),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_bad_gguf_is_one_line_naming_it(case, tmp_path):
    from ebft.models import check_gguf, load_model

    path = _synthetic_gguf(tmp_path / "model.gguf")
    check_gguf(path)  # the intact file passes
    GGUF_CASES[case](path)
    with pytest.raises(EbftError) as err:
        load_model(str(path))
    assert str(path) in one_line(err)


@pytest.mark.parametrize("keep", [3000, 50_000_000])
def test_truncated_real_gguf_is_one_line(keep, tmp_path):
    from conftest import smollm2_gguf

    from ebft.models import load_model

    source = smollm2_gguf()
    if source is None:
        pytest.skip("SmolLM2 GGUF not available offline")
    path = tmp_path / "smol.gguf"
    with open(source, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(EbftError) as err:
        load_model(str(path))
    assert str(path) in one_line(err)


def test_cli_bad_model_folder_exits_2_without_traceback(tiny_model_dir, text_file, tmp_path, capsys):
    from ebft.cli import main

    folder = _tiny_copy(tiny_model_dir, tmp_path)
    _weights_truncated(folder)
    code = main(["eval", "--model", str(folder), "--eval", str(text_file), "--eval-seqlen", "32",
                 "--eval-windows", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(folder) in err


# ============================================================================ 2. --out: no user data lost

def make_output(folder: Path, tag: str = "old", parts: int = 3) -> Path:
    """An output as ebft writes it (through atomic_folder)."""
    with atomic_folder(folder, overwrite=True) as tmp:
        for i in range(parts):
            (tmp / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
        (tmp / "version.txt").write_text(tag)
        (tmp / "run.json").write_text(json.dumps({"config": {}, "versions": {"ebft": "0"}}))
    return folder


def assert_complete(folder: Path, tag: str | None = None, parts: int = 3) -> str:
    assert is_ebft_output(folder), ebft_output_problem(folder)
    for i in range(parts):
        assert (folder / f"part{i}.bin").read_bytes() == bytes([i]) * 1000
    found = (folder / "version.txt").read_text()
    assert tag is None or found == tag
    return found


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def legacy_output(folder: Path, *extra: str) -> Path:
    """An output written before the marker existed: run.json with ebft's keys and model files."""
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "block_losses.png", *extra):
        (folder / name).write_text("x")
    (folder / "run.json").write_text(json.dumps({"config": {"model": "m"}, "versions": {"ebft": "0.1.0"}}))
    return folder


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _refused(out, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        check_out(out, *args, **kwargs)
    msg = one_line(err)
    assert msg.startswith(kwargs.get("field", "out") + ": ")
    return msg


def test_new_folders_are_fine_and_the_check_creates_nothing(in_tmp):
    assert check_out("new") == in_tmp / "new"
    assert check_out(str(in_tmp / "a" / "b" / "c")) == in_tmp / "a" / "b" / "c"
    assert check_out("~/../" + str(in_tmp / "x")[1:]) == in_tmp / "x"  # ~ and .. understood
    assert sorted(os.listdir(in_tmp)) == []


def test_empty_existing_folder_needs_no_overwrite(in_tmp):
    (in_tmp / "empty").mkdir()
    check_out("empty")
    with atomic_folder("empty") as tmp:
        (tmp / "f").write_text("x")
    assert (in_tmp / "empty" / "f").read_text() == "x"


@pytest.mark.parametrize("value", [None, "", "   ", "a\0b", 123, ["x"]])
def test_impossible_names(value, in_tmp):
    _refused(value)


def test_existing_output_needs_overwrite_and_then_is_fine(in_tmp):
    make_output(in_tmp / "out")
    assert "--overwrite" in _refused("out")
    check_out("out", overwrite=True)
    legacy_output(in_tmp / "legacy")
    check_out("legacy", overwrite=True)


def _user_folder(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work")


def _foreign_run_json(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "run.json").write_text(json.dumps({"config": {}, "versions": {"other-tool": "1"}}))


def _run_json_not_json(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "run.json").write_text("not json")


def _output_plus_user_file(tmp):
    make_output(tmp / "out")
    (tmp / "out" / "notes.txt").write_text("mine")


def _output_plus_user_folder(tmp):
    make_output(tmp / "out")
    (tmp / "out" / "data").mkdir()
    (tmp / "out" / "data" / "x.csv").write_text("mine")


def _legacy_plus_user_file(tmp):
    legacy_output(tmp / "out", "notes.txt")


def _forged_marker(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / output.MARKER).write_text(json.dumps({"written_by": "someone", "files": []}))
    (tmp / "out" / "a.txt").write_text("mine")


def _output_with_symlink(tmp):
    make_output(tmp / "out")
    (tmp / "elsewhere").mkdir()
    (tmp / "out" / "link").symlink_to(tmp / "elsewhere")


NOT_OURS = {f.__name__.strip("_"): f for f in (_user_folder, _foreign_run_json, _run_json_not_json,
                                                _output_plus_user_file, _output_plus_user_folder,
                                                _legacy_plus_user_file, _forged_marker, _output_with_symlink)}


@pytest.mark.parametrize("case", NOT_OURS)
def test_overwrite_refuses_folders_ebft_did_not_write(case, in_tmp):
    NOT_OURS[case](in_tmp)
    before = sorted(str(p) for p in (in_tmp / "out").rglob("*"))
    msg = _refused("out", overwrite=True)
    assert "did not write" in msg or "run record" in msg or "links" in msg
    # and the save itself refuses too, if validation was skipped
    with pytest.raises(EbftError):
        with atomic_folder(in_tmp / "out", overwrite=True) as tmp:
            (tmp / "new.bin").write_text("new")
    assert sorted(str(p) for p in (in_tmp / "out").rglob("*")) == before
    assert leftovers(in_tmp / "out") == []


def test_out_is_a_file_or_inside_one(in_tmp):
    (in_tmp / "file.txt").write_text("x")
    assert "is a file" in _refused("file.txt", overwrite=True)
    assert "file.txt is a file" in _refused("file.txt/sub/out")
    (in_tmp / "broken").symlink_to(in_tmp / "nowhere")
    assert "broken link" in _refused("broken/out")


def test_out_is_a_symlink(in_tmp):
    make_output(in_tmp / "real")
    (in_tmp / "link").symlink_to(in_tmp / "real")
    assert "symbolic link" in _refused("link", overwrite=True)


def test_out_is_the_current_folder_or_above_it(in_tmp, monkeypatch):
    make_output(in_tmp / "work")
    monkeypatch.chdir(in_tmp / "work")
    assert "current folder" in _refused(".", overwrite=True)
    assert "current folder" in _refused(str(in_tmp / "work"), overwrite=True)
    assert "above the current folder" in _refused("..", overwrite=True)
    assert "root folder" in _refused("/", overwrite=True)


def test_out_and_the_inputs(in_tmp):
    model, data, corpus = in_tmp / "model", in_tmp / "tasks", in_tmp / "texts" / "corpus.txt"
    for folder in (model, data, corpus.parent):
        folder.mkdir()
    (model / "config.json").write_text("{}")
    corpus.write_text("text")
    inputs = [str(model), str(corpus), str(data), "wikitext2", "some-org/hub-model", None]
    assert "is an input" in _refused("model", True, inputs)
    assert "holds an input" in _refused("texts", True, inputs)
    assert "holds an input" in _refused(str(in_tmp / "texts" / ".." / "texts"), True, inputs)
    assert "inside an input folder" in _refused("tasks/out", True, inputs)
    (in_tmp / "model-link").symlink_to(model)
    assert "is an input" in _refused("model", True, [str(in_tmp / "model-link")])  # links resolved
    # a model folder that happens to be an ebft output is still an input
    make_output(in_tmp / "pruned")
    assert "is an input" in _refused("pruned", True, [str(in_tmp / "pruned")])
    check_out("fresh", True, inputs)  # names that are not paths are not inputs
    check_out("wikitext2", True, inputs)


def test_reuse_mode_for_a_sweep_folder(in_tmp):
    """A sweep writes into its folder (and resumes there); it never writes into a folder holding a user's
    files, the current folder, or a run's output."""
    (in_tmp / "sweep").mkdir()
    (in_tmp / "sweep" / "results.md").write_text("x")
    (in_tmp / "sweep" / "corpus.txt").write_text("text")
    assert "did not write (corpus.txt)" in _refused("sweep", reuse=True)
    assert "did not write" in _refused(".", reuse=True)  # the current folder holds the user's files
    output.mark_sweep_folder(in_tmp / "sweep")  # a sweep's folder (an input beside its results is fine)
    assert check_out("sweep", reuse=True, inputs=[str(in_tmp / "sweep" / "corpus.txt")]) == in_tmp / "sweep"
    assert "is an input" in _refused("sweep", reuse=True, inputs=[str(in_tmp / "sweep")])
    (in_tmp / "legacy" / "cells").mkdir(parents=True)  # a sweep folder from before the marker: only its files
    (in_tmp / "legacy" / "results.json").write_text("{}")
    assert check_out("legacy", reuse=True) == in_tmp / "legacy"
    (in_tmp / "empty").mkdir()
    assert check_out("empty", reuse=True) == in_tmp / "empty"
    (in_tmp / "run").mkdir()  # a run's output (its marker lists its files)
    (in_tmp / "run" / "config.json").write_text("{}")
    (in_tmp / "run" / output.MARKER).write_text(json.dumps({"written_by": "ebft", "files": ["config.json"]}))
    assert "output folder of an ebft run" in _refused("run", reuse=True)
    assert _refused("sweep", field="sweep.out").startswith("sweep.out: ")


def test_name_too_long(in_tmp):
    assert "too long" in _refused("x" * 300)
    assert "too long" in _refused("y" * 250)  # fits, but its temporary name would not


def _as_nobody():
    os.setgid(65534)
    os.setuid(65534)


def _unprivileged_python() -> str | None:
    """An interpreter that user nobody may run (ebft.output needs nothing beyond the standard library)."""
    for candidate in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if not candidate:
            continue
        try:
            probe = subprocess.run([candidate, "-c", f"import sys; sys.path.insert(0, {SRC!r}); import ebft.output"],
                                   cwd="/", preexec_fn=_as_nobody, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return candidate
    return None


def _unwritable_check(parent: Path) -> subprocess.CompletedProcess:
    """check_out(parent/out) in a process running as an unprivileged user (root passes any chmod)."""
    code = f"""
        import sys
        sys.path.insert(0, {SRC!r})
        from ebft.output import check_out
        from ebft.errors import ConfigError
        try:
            check_out({str(parent / 'out')!r})
        except ConfigError as error:
            print("REFUSED:", error)
        else:
            print("ACCEPTED")
    """
    interpreter = _unprivileged_python() if os.geteuid() == 0 else sys.executable
    if interpreter is None:
        pytest.skip("no interpreter and checkout that an unprivileged user may run")
    return subprocess.run([interpreter, "-c", textwrap.dedent(code)], cwd="/", capture_output=True, text=True,
                          timeout=60, preexec_fn=_as_nobody if os.geteuid() == 0 else None)


def test_unwritable_destination_fails_up_front():
    """chmod 0555: refused for an ordinary user (as root, the check runs as user nobody)."""
    root = Path(tempfile.mkdtemp(prefix="ebft-ro-"))
    try:
        os.chmod(root, 0o755)
        ro = root / "ro"
        ro.mkdir(mode=0o555)
        os.chmod(ro, 0o555)
        rw = root / "rw"
        rw.mkdir()
        os.chmod(rw, 0o777)
        result = _unwritable_check(ro)
        assert result.stdout.startswith("REFUSED: out: "), result.stdout + result.stderr
        assert str(ro) in result.stdout and "Permission denied" in result.stdout
        nested = _unwritable_check(ro / "a" / "b")
        assert nested.stdout.startswith("REFUSED: ") and str(ro) in nested.stdout
        assert _unwritable_check(rw).stdout.strip() == "ACCEPTED"  # the same user can write elsewhere
    finally:
        os.chmod(root / "ro", 0o755)
        shutil.rmtree(root)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_even_for_root():
    """os.access says yes to root for any folder; the probe asks the filesystem itself."""
    assert "cannot write in /proc" in _refused("/proc/ebft-out")


# ============================================================================ 3. saves: complete or absent

def test_saved_files_get_normal_permissions(tmp_path, tiny_model_dir):
    from ebft.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o027, 0o640, 0o750)):
        previous = os.umask(umask)
        try:
            out = tmp_path / f"out-{umask:o}"
            with atomic_folder(out / "inner") as tmp:
                output.save_pretrained(model, tokenizer, tmp)
                fd = os.open(tmp / "private.bin", os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
                (tmp / "sub").mkdir(mode=0o700)
                (tmp / "sub" / "f").write_text("x")
                atomic.write_json(tmp / "run.json", {"config": {}, "versions": {"ebft": "0"}})
        finally:
            os.umask(previous)
        inner = out / "inner"
        for path in [inner, out, inner / "sub"]:
            assert stat.S_IMODE(path.stat().st_mode) == dir_mode, path
        for path in [p for p in inner.rglob("*") if p.is_file()]:
            assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
        assert (inner / "model.safetensors").exists()
        assert is_ebft_output(inner)


def test_marker_lists_every_file(tmp_path):
    out = make_output(tmp_path / "out")
    marker = json.loads((out / output.MARKER).read_text())
    assert marker["written_by"] == "ebft"
    assert set(marker["files"]) == {"part0.bin", "part1.bin", "part2.bin", "version.txt", "run.json"}
    (out / "part1.bin").unlink()
    assert "incomplete" in ebft_output_problem(out)


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_an_output(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    out = make_output(tmp_path / "out", "old")
    make_output(out, "new", parts=2)
    assert_complete(out, "new", parts=2)
    assert not (out / "part2.bin").exists()
    assert leftovers(out) == []


def test_exchange_is_used_where_the_filesystem_has_it(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not output._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) not available here")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


def test_failed_body_leaves_the_old_output(tmp_path):
    out = make_output(tmp_path / "out", "old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "part0.bin").write_text("half")
            raise RuntimeError("boom")
    assert_complete(out, "old")
    assert leftovers(out) == []


def test_failed_first_save_leaves_no_trace(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "a" / "b" / "c" / "out") as tmp:
            (tmp / "f").write_text("x")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["a"] and os.listdir(tmp_path / "a") == []


def test_nohup_keeps_sighup_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with output.interrupt_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.1)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(EbftError) as err:
        with atomic_folder(out) as tmp:
            legacy_output(out)  # written meanwhile by another run
            (tmp / "f").write_text("x")
    assert str(out) in one_line(err)
    assert is_ebft_output(out) and not (out / "f").exists()
    assert leftovers(out) == []


def test_clean_stale_removes_dead_leftovers_and_keeps_live_ones(tmp_path):
    out = make_output(tmp_path / "out", "current")
    dead, live = dead_pid(), os.getppid()
    for name in (f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{live}", f".outer.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
    removed = clean_stale(out)
    assert sorted(p.name for p in removed) == [f".out.old-{dead}", f".out.tmp-{dead}"]
    assert leftovers(out) == [f".out.tmp-{live}"]
    assert (tmp_path / f".outer.tmp-{dead}").exists()  # another output's, not ours to judge here
    assert_complete(out, "current")


def test_clean_stale_restores_a_complete_old_output(tmp_path):
    out = make_output(tmp_path / "out", "old")
    dead = dead_pid()
    out.rename(tmp_path / f".out.old-{dead}")  # killed between the two renames of a swap
    partial = make_output(tmp_path / "partial", "new")
    partial.rename(tmp_path / f".out.tmp-{dead}")
    check_out(out, overwrite=True)  # validation at the next start restores and cleans
    assert_complete(out, "old")
    assert leftovers(out) == []


def test_clean_stale_does_not_restore_a_half_deleted_old_output(tmp_path):
    out = make_output(tmp_path / "out", "old")
    dead = dead_pid()
    old = tmp_path / f".out.old-{dead}"
    out.rename(old)
    (old / "part0.bin").unlink()
    clean_stale(out)
    assert not out.exists() and leftovers(out) == []


def test_write_json_is_atomic_and_cleans_dead_leftovers(tmp_path):
    dead = dead_pid()
    (tmp_path / f".cell.json.tmp-{dead}").write_text("{half")
    atomic.write_json(tmp_path / "cell.json", {"a": 1, "p": tmp_path})
    assert json.loads((tmp_path / "cell.json").read_text()) == {"a": 1, "p": str(tmp_path)}
    assert sorted(os.listdir(tmp_path)) == ["cell.json"]
    with pytest.raises(TypeError):
        atomic.write_json(tmp_path / "cell.json", {"a": object()})
    assert sorted(os.listdir(tmp_path)) == ["cell.json"]
    assert json.loads((tmp_path / "cell.json").read_text())["a"] == 1


def test_sigterm_becomes_keyboard_interrupt_and_handler_is_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as err:
        with output.interrupt_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert isinstance(err.value, output.Interrupted) and err.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_ctrl_c_during_the_swap_waits_for_it(tmp_path, monkeypatch):
    """SIGINT between the two renames of the fallback swap is delivered once the swap is done."""
    out = make_output(tmp_path / "out", "old")
    monkeypatch.setattr(output, "_exchange", lambda a, b: False)
    rename = output._rename

    def rename_then_sigint(src, dst):
        rename(src, dst)
        if ".old-" in Path(dst).name:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)

    monkeypatch.setattr(output, "_rename", rename_then_sigint)
    with pytest.raises(KeyboardInterrupt):
        make_output(out, "new")
    assert_complete(out, "new")
    assert leftovers(out) == []


# ---------------------------------------------------------------------------- killed at every moment

KILL_SCRIPT = """
import os, sys, time
from pathlib import Path
from ebft import output

out, stage, tag, fallback = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
HELD = 1.0  # a signal held during the swap waits this long

def pause(name, seconds=60.0):
    if name == stage:
        print("READY", flush=True)
        time.sleep(seconds)

if fallback:
    output._exchange = lambda a, b: False
rename, remove, seal = output._rename, output._remove_tree, output._seal

def slow_rename(src, dst):
    rename(src, dst)
    if ".old-" in Path(dst).name:
        pause("mid-swap", HELD)

def slow_remove(path):
    path = Path(path)
    if (path / "version.txt").exists() and (path / "version.txt").read_text() == "old":
        for name in (output.MARKER, "run.json", "part0.bin"):  # what a deletion removes first
            (path / name).unlink(missing_ok=True)
        pause("deleting-old", HELD)
    remove(path)

def slow_seal(folder):
    seal(folder)
    pause("sealed")

output._rename, output._remove_tree, output._seal = slow_rename, slow_remove, slow_seal
try:
    with output.interrupt_on_signals():
        with output.atomic_folder(out, overwrite=True) as tmp:
            for i in range(3):
                (tmp / f"part{i}.bin").write_bytes(bytes([i]) * 1000)
                if i == 1:
                    pause("body")
            (tmp / "version.txt").write_text(tag)
            (tmp / "run.json").write_text('{"config": {}, "versions": {"ebft": "0"}}')
except KeyboardInterrupt:
    sys.exit(130)
print("DONE", flush=True)
"""

# stage -> (what `out` holds right after the kill: by signal kind), for an overwrite
# "held": SIGINT/SIGTERM are held during the swap, so the swap completes first.
KILL_STAGES = {
    ("body", False): {"kill": "old", "term": "old"},
    ("sealed", False): {"kill": "old", "term": "old"},
    ("deleting-old", False): {"kill": "new", "term": "new"},  # after the exchange
    ("mid-swap", True): {"kill": None, "term": "new"},  # SIGKILL between the renames: out missing...
    ("deleting-old", True): {"kill": "new", "term": "new"},
}


def _kill_at(stage, fallback, sig, out, tag="new") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), stage, tag, "1" if fallback else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    assert line.strip() == "READY", line + proc.stderr.read()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("stage,fallback", list(KILL_STAGES), ids=lambda v: str(v))
def test_killed_during_an_overwrite(stage, fallback, sig, tmp_path):
    out = make_output(tmp_path / "out", "old")
    proc = _kill_at(stage, fallback, sig, out)
    assert "Traceback" not in proc.stderr, proc.stderr
    expected = KILL_STAGES[(stage, fallback)]["kill" if sig == signal.SIGKILL else "term"]
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130
    if expected is None:
        assert not out.exists()  # ... and the complete old output is aside, restored below
    else:
        assert_complete(out, expected, parts=3)
    clean_stale(out)  # what the next start does
    assert_complete(out, expected or "old")
    assert leftovers(out) == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("stage", ["body", "sealed"])
def test_killed_during_a_first_save(stage, sig, tmp_path):
    out = tmp_path / "out"
    proc = _kill_at(stage, False, sig, out)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()
    if sig != signal.SIGKILL:
        assert leftovers(out) == []  # removed on the way out
    clean_stale(out)
    assert leftovers(out) == [] and not out.exists()
    make_output(out, "new")  # and the next save works
    assert_complete(out, "new")


def test_an_uninterrupted_script_run_completes(tmp_path):
    out = make_output(tmp_path / "out", "old")
    env = {**os.environ, "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out), "none", "new", "1"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.stdout.strip() == "DONE", result.stderr
    assert_complete(out, "new")
    assert leftovers(out) == []


@pytest.mark.parametrize("command", ["run", "eval"])
def test_the_trust_remote_code_flag_reaches_the_loader(command, tmp_path, monkeypatch):
    """`ebft run/eval --trust-remote-code` hands the user's choice to the loader (and nothing else
    turns it on): the flag is not just parsed."""
    from ebft import models
    from ebft.cli import main

    seen = []

    def fake_load(source, dtype="auto", device="cpu", trust_remote_code=False):
        seen.append(trust_remote_code)
        raise models.EbftError("stop here")

    monkeypatch.setattr(models, "load_model", fake_load)
    monkeypatch.setattr("ebft.pipeline.load_model", fake_load)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    base = [command, "--model", str(folder), "--eval", str(text)]
    if command == "run":
        base += ["--calib", str(text), "--out", str(tmp_path / "out")]
    for extra, expected in (([], False), (["--trust-remote-code"], True)):
        assert main(base + extra) == 2
        assert seen[-1] is expected
