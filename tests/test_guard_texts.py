"""The guard's further texts (``--recover-guard-on``): the recovered model must do no worse end to end on each of
them as on the held-out calibration windows, else the model pruning alone gives is kept; their windows come from
a validation split, never from a text the run is scored on."""
import json

import pytest

from conftest import TEXT
from test_gradual import assert_same_tensors


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "valid.txt"
    path.write_text(" ".join(reversed(TEXT.split())))  # another text of the same words
    return path


def base_args(model, text, valid):
    return ["run", "--model", str(model), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(text), "--eval-seqlen", "32", "--eval-windows", "2", "--epochs", "1", "--sparsity", "0.7",
            "--recover-guard", "2", "--recover-guard-on", str(valid)]


def worse_only_on(name_part: str, real):
    """``stage_perplexities`` with the guard's verdict forced on one text: the recovered model twice as bad there,
    and better on every other guard text."""
    def scored(model, result, evals, device, final):
        ppl = real(model, result, evals, device, final)
        for name in ppl:
            if name.startswith("held-out"):
                ppl[name]["recovered"] = (2 if name_part in name else 0.5) * ppl[name]["pruned"]
        return ppl
    return scored


def test_the_guard_scores_each_further_text_and_records_it(tiny_model_dir, text_file, valid_file, tmp_path):
    from ebft.cli import main

    assert main([*base_args(tiny_model_dir, text_file, valid_file), "--out", str(tmp_path / "out")]) == 0
    guard = json.loads((tmp_path / "out" / "run.json").read_text())["recovery"]["guard"]
    assert set(guard["texts"]) == {"held-out calibration", "held-out valid.txt"}
    assert guard["texts"]["held-out valid.txt"]["windows"] == 2
    assert guard["texts"]["held-out calibration"]["pruned_ppl"] == guard["pruned_ppl"]
    for scored in guard["texts"].values():
        assert scored["pruned_ppl"] > 1 and scored["recovered_ppl"] > 1
    worse = [n for n, t in guard["texts"].items() if t["recovered_ppl"] > t["pruned_ppl"]]
    assert guard["kept"] == ("pruned" if worse else "recovered")


def test_worse_on_a_further_text_alone_keeps_the_model_pruning_alone_gives(tiny_model_dir, text_file, valid_file,
                                                                           tmp_path, monkeypatch):
    """Better on the held-out calibration windows, worse on the further text: the pruned-alone model is kept,
    tensor for tensor a --recover none run's; the record names the text."""
    import ebft.pipeline as pipeline
    from ebft.cli import main

    args = base_args(tiny_model_dir, text_file, valid_file)
    monkeypatch.setattr(pipeline, "stage_perplexities", worse_only_on("valid.txt", pipeline.stage_perplexities))
    assert main([*args, "--out", str(tmp_path / "guarded")]) == 0
    guard = json.loads((tmp_path / "guarded" / "run.json").read_text())["recovery"]["guard"]
    assert guard["kept"] == "pruned" and guard["worse_on"] == ["held-out valid.txt"]
    assert guard["recovered_ppl"] < guard["pruned_ppl"]  # the calibration text alone would have kept it
    monkeypatch.undo()
    alone = args[:args.index("--epochs")] + args[args.index("--sparsity"):args.index("--recover-guard")]
    assert main([*alone, "--recover", "none", "--out", str(tmp_path / "alone")]) == 0
    assert_same_tensors(tmp_path / "guarded", tmp_path / "alone")


def test_better_on_every_guard_text_keeps_the_recovered_model(tiny_model_dir, text_file, valid_file, tmp_path,
                                                              monkeypatch):
    import ebft.pipeline as pipeline
    from ebft.cli import main

    monkeypatch.setattr(pipeline, "stage_perplexities", worse_only_on("no such text", pipeline.stage_perplexities))
    assert main([*base_args(tiny_model_dir, text_file, valid_file), "--out", str(tmp_path / "out")]) == 0
    guard = json.loads((tmp_path / "out" / "run.json").read_text())["recovery"]["guard"]
    assert guard["kept"] == "recovered" and "worse_on" not in guard


@pytest.mark.parametrize("change, expected", [
    (["--recover-guard", "0"], "--recover-guard is 0"),
    (["--recover-guard-on", "offline"], "has no validation split"),
    (["--recover-guard-on", "auto"], "has no validation split"),
    (["--recover-guard-on", "TEXT"], "is also an --eval text"),
    (["--recover-guard-on", "CALIB"], "is the calibration text"),
    (["--recover-guard-on", "VALID", "VALID"], "names a text twice"),
    (["--recover-guard-on", "VALID", "TWIN"], "two files of one name"),
    (["--recover-guard-on", "/no/such/valid.raw"], "no such file"),
    (["--recover", "none"], "--recover"),
])
def test_bad_guard_texts_are_refused_in_one_line_before_any_work(tiny_model_dir, text_file, valid_file, tmp_path,
                                                                 capsys, change, expected):
    from ebft.cli import main

    calib = tmp_path / "calib.txt"
    calib.write_text(text_file.read_text())
    args = base_args(tiny_model_dir, text_file, valid_file)
    args[args.index("--calib") + 1] = str(calib)
    (tmp_path / "twin").mkdir()
    twin = tmp_path / "twin" / valid_file.name
    twin.write_text(valid_file.read_text())
    names = {"TEXT": str(text_file), "CALIB": str(calib), "VALID": str(valid_file), "TWIN": str(twin)}
    flag = change[0]
    if flag in args and flag != "--recover-guard-on":
        args[args.index(flag) + 1] = change[1]
    elif flag == "--recover-guard-on":
        args = args[:args.index(flag)] + [flag, *(names.get(v, v) for v in change[1:])]
    else:
        args += change
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_guard_text_shorter_than_one_window_is_refused_in_one_line(tiny_model_dir, text_file, tmp_path, capsys):
    from ebft.cli import main

    short = tmp_path / "short.txt"
    short.write_text("the fox")
    args = base_args(tiny_model_dir, text_file, short)
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than one window of the evaluation length 32" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_guard_texts_read_the_validation_split_of_hub_texts(tokenizer, monkeypatch):
    """wikitext2 and ptb: their validation split; c4: the validation documents after the 1100 that are scored."""
    import datasets

    from ebft import data, hub

    asked = []

    def load_dataset(repo, config=None, data_files=None, split=None):
        asked.append(split)
        return {"text": [f"row {i} of {split}" for i in range(2500)], "sentence": [f"s {split}"] * 3}

    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for source in ("wikitext2", "ptb"):
        data.eval_tokens(tokenizer, source, split="validation")
    assert asked == ["validation", "validation"]
    c4_valid = tokenizer.decode(data.eval_tokens(tokenizer, "c4", bos=False, split="validation")[0])
    c4_test = tokenizer.decode(data.eval_tokens(tokenizer, "c4", bos=False)[0])
    assert "row 1100 " in c4_valid and "row 1099 " not in c4_valid and "row 2200 " not in c4_valid
    assert "row 1099 " in c4_test and "row 1100 " not in c4_test


def test_the_sweep_key_and_the_plan_count_the_guard_texts(valid_file):
    from ebft import RunConfig
    from ebft.estimate import RunSizes
    from ebft.sweeps import cell_key

    plain = RunConfig(model="m")
    further = RunConfig(model="m")
    further.recover.guard_texts = [str(valid_file)]
    assert cell_key(plain) != cell_key(further)
    off = RunConfig(model="m")
    off.recover.guard, off.recover.guard_texts = 0, [str(valid_file)]
    assert RunSizes.of(further).guard_text_windows() == 4 and RunSizes.of(plain).guard_text_windows() == 0
    assert RunSizes.of(off).guard_text_windows() == 0


def test_a_run_with_guard_texts_resumes_bit_identical_and_refuses_a_changed_guard_text(four_blocks, tmp_path,
                                                                                     monkeypatch, capsys):
    """Killed as block 2 starts, the run resumes to the uninterrupted run's result (the guard texts' streams
    are in the checkpoint); a guard text changed in between is refused in one line, like any text."""
    from test_resume import SimulatedKill, _args, _assert_same_run, _fail_at

    from ebft.cli import main

    guard = tmp_path / "valid.txt"
    guard.write_text(" ".join(reversed(TEXT.split())))
    extra = ["--recover-guard", "2", "--recover-guard-on", str(guard)]
    assert main(_args(four_blocks, tmp_path / "ref", *extra)) == 0
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_at(m, "block", 2)
        with pytest.raises(SimulatedKill):
            main(_args(four_blocks, out, *extra))
    guard.write_text(TEXT)
    capsys.readouterr()
    assert main(_args(four_blocks, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "held-out valid.txt" in err and len(err.splitlines()) == 1, err
    guard.write_text(" ".join(reversed(TEXT.split())))
    assert main(_args(four_blocks, out, *extra)) == 0
    _assert_same_run(tmp_path / "ref", out)
    record = json.loads((out / "run.json").read_text())
    assert "held-out valid.txt" in record["recovery"]["guard"]["texts"]


def test_a_guard_text_the_hub_cannot_give_names_a_local_copy_of_its_validation_split(tokenizer, monkeypatch):
    import datasets

    from ebft import data, hub
    from ebft.errors import EbftError

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(EbftError) as info:
        data.eval_tokens(tokenizer, "ptb", split="validation")
    message = str(info.value)
    assert "--recover-guard-on path/to/ptb.valid.txt" in message and "offline" not in message, message
