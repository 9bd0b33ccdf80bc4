"""Every file ebft writes goes through one atomic writer (ebft.atomic.write_atomic) that checks the destination
at the moment it renames into place: a file that appeared meanwhile, a user's file, or a file the run reads is
never replaced; what a killed writer left (a `.NAME.gguf.tmp-PID`, a k-quant scratch folder) is removed by the
next export; two processes never share one output (exports, sweeps)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tokenizer, make_tiny_model, tiny_run_folder
from ebft.atomic import rename_new, take_lock, write_atomic, write_text
from ebft.cli import main
from ebft.errors import EbftError
from ebft.export import export, write_gguf
from ebft.export import gguf as gguf_module


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("writers"), 2)


# ----------------------------------------------------------------------------- the writer

def test_a_file_that_appears_during_the_write_is_not_replaced(tmp_path):
    path = tmp_path / "f.txt"

    def write(tmp):
        tmp.write_text("ebft")
        path.write_text("the user's")  # someone else writes the name meanwhile

    with pytest.raises(EbftError, match="appeared while ebft was writing"):
        write_atomic(path, write, replace=False)
    assert path.read_text() == "the user's" and os.listdir(tmp_path) == ["f.txt"]


def test_the_replace_rule_is_asked_at_the_rename(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    asked = []

    def rule(p):
        asked.append(p.read_text())
        return None if p.read_text() == "old" else "it changed"

    write_text(path, "new", replace=rule)
    assert path.read_text() == "new" and asked == ["old"]
    with pytest.raises(EbftError, match="not replacing .*: it changed"):
        write_text(path, "newer", replace=rule)
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]
    write_text(path, "anything")  # the default: ebft's own files in its own folders are replaced
    assert path.read_text() == "anything"


def test_rename_new_never_replaces(tmp_path):
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    with pytest.raises(FileExistsError):
        rename_new(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "b"
    rename_new(tmp_path / "a", tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["b", "c"]


# ----------------------------------------------------------------------------- GGUF export

def test_write_gguf_never_replaces_a_users_file(tmp_path):
    tok = build_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok))
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(EbftError, match="not replacing"):
            write_gguf(model, tok, mine, "f32", overwrite=overwrite)
    assert mine.read_text() == "keep me"
    first = write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    with pytest.raises(EbftError, match="exists"):
        write_gguf(model, tok, tmp_path / "m.gguf", "f32")
    again = write_gguf(model, tok, tmp_path / "m.gguf", "f32", overwrite=True)
    assert again.bytes == first.bytes
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "notes.txt"]


def test_a_file_appearing_during_an_export_is_kept(tmp_path, monkeypatch):
    """Two exports to one --out, or a user saving there meanwhile: the checks at the start both pass; the
    rename finds the newcomer and refuses in one line (exit 2), leaving it as it is."""
    tok = build_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok))
    out = tmp_path / "m.gguf"
    write = gguf_module._write

    def racing(*args):
        write(*args)
        out.write_bytes(b"GGUF the other process's file")

    monkeypatch.setattr(gguf_module, "_write", racing)
    with pytest.raises(EbftError, match="appeared while ebft was writing"):
        write_gguf(model, tok, out, "f32")
    assert out.read_bytes() == b"GGUF the other process's file" and os.listdir(tmp_path) == ["m.gguf"]


def test_export_never_replaces_the_gguf_the_run_came_from(tiny, tmp_path, capsys):
    tok = build_tokenizer()
    source = tmp_path / "source.gguf"
    write_gguf(make_tiny_model("llama", vocab_size=len(tok)), tok, source, "f32")
    before = source.read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    for f in (tiny / "model").iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "run.json").write_text(json.dumps({"config": {"model": str(source)}}))
    err = _refused(capsys, ["export", str(run), "--out", str(source), "--overwrite"])
    assert "is the model being exported" in err
    assert source.read_bytes() == before


def test_export_removes_what_a_killed_export_left(tiny, tmp_path, caplog):
    dead = _dead_pid()
    left = tmp_path / f".other.gguf.tmp-{dead}"
    left.write_bytes(b"GGUF" + bytes(1000))
    scratch = tmp_path / f".ebft-gguf-{dead}-abc123"
    scratch.mkdir()
    (scratch / "f32.gguf").write_bytes(b"GGUF")
    alive = tmp_path / f".running.gguf.tmp-{os.getpid()}"  # a live writer's: left alone
    alive.write_bytes(b"GGUF")
    mine = tmp_path / f".notes.tmp-{dead}"  # not an export's name: not ebft's to remove
    mine.write_text("mine")
    export(str(tiny / "model"), tmp_path / "new.gguf", kind="f32")
    assert sorted(os.listdir(tmp_path)) == sorted(["new.gguf", alive.name, mine.name])
    assert "left by an interrupted process" in caplog.text


def test_a_kquant_scratch_folder_carries_the_writers_pid(tiny, tmp_path, monkeypatch):
    seen = []

    def fake_quantize(src, dst, kind):
        seen.append(src.parent.name)
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(gguf_module, "_k_quantize", fake_quantize)
    monkeypatch.setattr(gguf_module, "llama_cpp_available", lambda: True)
    export(str(tiny / "model"), tmp_path / "k.gguf", kind="q4_k_m")
    assert seen and seen[0].startswith(f".ebft-gguf-{os.getpid()}-")
    assert os.listdir(tmp_path) == ["k.gguf"]


# ----------------------------------------------------------------------------- plan, sweep

def test_plan_json_replaces_only_a_plan(tiny, tmp_path, capsys):
    config = tiny / "model" / "config.json"
    before = config.read_bytes()
    base = ["plan", "--model", str(tiny / "model"), "--nsamples", "4", "--seqlen", "32"]
    assert "not a plan ebft wrote" in _refused(capsys, [*base, "--plan-json", str(config)])
    assert config.read_bytes() == before
    text = tmp_path / "notes.json"
    text.write_text('{"mine": 1}')
    assert "not a plan ebft wrote" in _refused(capsys, [*base, "--plan-json", str(text)])
    plan = tmp_path / "plan.json"
    assert main([*base, "--plan-json", str(plan)]) == 0
    assert main([*base, "--nsamples", "8", "--plan-json", str(plan)]) == 0  # an earlier plan: replaced
    assert json.loads(plan.read_text())["sizes"]["calib_nsamples"] == 8
    assert text.read_text() == '{"mine": 1}'


def test_two_sweeps_never_share_a_folder(tiny, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / ".ebft-sweep").write_text(json.dumps({"written_by": "ebft", "kind": "sweep"}))
    fd = take_lock(out / "lock", True, "held")  # another sweep in this folder
    try:
        err = _refused(capsys, ["sweep", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"),
                                "--eval", str(tiny / "text.txt"), "--nsamples", "2", "--seqlen", "16",
                                "--eval-seqlen", "16", "--methods", "magnitude", "--sparsities", "0.5",
                                "--recover", "none", "--out", str(out)])
    finally:
        os.close(fd)
    assert "another ebft sweep is using" in err
    assert sorted(os.listdir(out)) == [".ebft-sweep", "lock"]


# ----------------------------------------------------------------------------- ebft knows its own files

def test_an_export_into_a_run_folder_keeps_it_ebfts(tiny, tmp_path):
    """`ebft export RUN --out RUN/model.gguf`, then `ebft run --out RUN --overwrite`: the folder is still ebft's
    (the export is listed in its marker), whether the exported file is still there or was deleted."""
    run = tmp_path / "run"
    args = ["run", "--model", str(tiny / "model"), "--calib", str(tiny / "text.txt"), "--eval", str(tiny / "text.txt"),
            "--nsamples", "2", "--seqlen", "16", "--eval-seqlen", "16", "--recover", "none", "--out", str(run)]
    assert main(args) == 0
    assert main(["export", str(run), "--out", str(run / "model.gguf"), "--type", "f32"]) == 0
    assert json.loads((run / ".ebft-output").read_text())["added"] == ["model.gguf"]
    assert main([*args, "--overwrite"]) == 0
    assert main(["export", str(run), "--out", str(run / "other.gguf"), "--type", "f32"]) == 0
    (run / "other.gguf").unlink()
    assert main([*args, "--overwrite"]) == 0
    (run / "mine.txt").write_text("the user's")  # a file ebft did not write still stops it
    assert main([*args, "--overwrite"]) == 2
    assert (run / "mine.txt").read_text() == "the user's"
