"""The `ebft` command end to end on a tiny local model: outputs, reload, config files, bad input."""
import json
import math

import pytest
import torch
import yaml

from ebft.cli import main


def _run_args(model_dir, text_file, out, *extra):
    return ["run", "--model", str(model_dir), "--calib", str(text_file), "--nsamples", "8", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "64", "--eval-windows", "4", "--out", str(out), *extra]


def test_run_writes_model_record_and_plot(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_run_args(tiny_model_dir, text_file, out, "--method", "sparsegpt", "--pattern", "2:4",
                          "--epochs", "2", "--recover-batch-size", "4"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "recovered" in printed and "sparsity 50.00%" in printed
    record = json.loads((out / "run.json").read_text())
    for key in ("config", "versions", "seed", "blocks", "sparsity", "perplexity", "wall_seconds", "peak_memory_bytes"):
        assert key in record
    assert [b["index"] for b in record["blocks"]] == [0, 1]
    assert all({"seconds", "loss_before", "loss_after", "epoch_losses"} <= set(b) for b in record["blocks"])
    assert record["sparsity"]["overall"] == pytest.approx(0.5)
    ppl = record["perplexity"]["corpus.txt"]
    assert set(ppl) == {"dense", "pruned", "recovered"}
    assert (out / "model.safetensors").exists() and (out / "block_losses.png").exists()
    assert not list(tmp_path.glob(".run.tmp-*"))
    # where the time went: the run's phases, the time to the first block, each block's split
    phases = record["phases"]
    assert {"load", "tokenize", "capture", "walk", "evaluate"} <= set(phases["seconds"])
    assert 0 < phases["seconds"]["load"] < phases["to_first_block"] < record["wall_seconds"]
    for b in record["blocks"]:
        split = b["seconds_by_phase"]
        assert {"load block", "statistics", "prune", "recover", "streams", "checkpoint"} <= set(split)
        assert sum(split.values()) <= b["seconds"] + 0.01
    assert phases["blocks"]["recover"] == pytest.approx(sum(b["seconds_by_phase"]["recover"] for b in record["blocks"]),
                                                         abs=0.01)


def test_no_eval_pruned_skips_the_pruned_stage_and_is_refused_where_it_does_nothing(tiny_model_dir, text_file,
                                                                                     tmp_path, capsys):
    out = tmp_path / "run"
    args = _run_args(tiny_model_dir, text_file, out, "--epochs", "1", "--recover-guard", "0", "--no-eval-pruned")
    assert main(args) == 0
    record = json.loads((out / "run.json").read_text())
    assert set(record["perplexity"]["corpus.txt"]) == {"dense", "recovered"}
    capsys.readouterr()
    assert main(_run_args(tiny_model_dir, text_file, tmp_path / "none", "--recover", "none", "--no-eval-pruned")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval.pruned" in err
    assert not (tmp_path / "none").exists()


def test_saved_model_reloads_with_identical_logits_and_recorded_perplexity(tiny_model_dir, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ebft import RunConfig, run
    from ebft.data import eval_tokens
    from ebft.evaluation.perplexity import perplexity

    cfg = RunConfig(model=str(tiny_model_dir), out=str(tmp_path / "m"))
    cfg.prune.method, cfg.prune.sparsity, cfg.recover.method = "wanda", 0.5, "none"
    cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen = str(text_file), 8, 32
    cfg.eval.sources, cfg.eval.seqlen = [str(text_file)], 64
    record = run(cfg)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    # exact zeros where pruned, in the saved file
    for name, frac in record["sparsity"]["layers"].items():
        w = dict(model.named_modules())[name].weight
        assert (w == 0).float().mean().item() == pytest.approx(frac)
    ids = eval_tokens(tokenizer, str(text_file))
    assert perplexity(model, ids, 64) == pytest.approx(record["perplexity"]["corpus.txt"]["pruned"], rel=1e-4)
    # a second save/reload round trip gives bit-identical logits
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(model(ids[:, :64]).logits, again(ids[:, :64]).logits)


def test_config_file_with_flag_override(tiny_model_dir, text_file, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "out": str(tmp_path / "from-yaml"),
        "prune": {"method": "magnitude", "sparsity": 0.3},
        "recover": {"method": "none"},
        "calib": {"source": str(text_file), "nsamples": 4, "seqlen": 32},
        "eval": {"sources": [str(text_file)], "seqlen": 64, "windows": 2},
    }))
    assert main(["run", "--config", str(cfg_path), "--sparsity", "0.6"]) == 0
    record = json.loads((tmp_path / "from-yaml" / "run.json").read_text())
    assert record["config"]["prune"]["method"] == "magnitude"
    assert record["config"]["prune"]["sparsity"] == 0.6
    assert record["sparsity"]["overall"] == pytest.approx(0.6, abs=1e-3)


def test_eval_command(tiny_model_dir, text_file, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--eval", str(text_file), "--eval-seqlen", "64"]) == 0
    out = capsys.readouterr().out
    value = float(out.strip().splitlines()[-1].split("|")[2])
    assert math.isfinite(value) and value > 1


def test_overwrite_replaces_only_what_ebft_wrote(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = _run_args(tiny_model_dir, text_file, out, "--recover", "none")
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 2  # a folder ebft did not write is never replaced
    assert "ebft did not write it" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    mine = tmp_path / "mine"
    assert main(_run_args(tiny_model_dir, text_file, mine, "--recover", "none")) == 0
    first = (mine / "run.json").read_text()
    assert main(_run_args(tiny_model_dir, text_file, mine, "--recover", "none")) == 2  # exists: needs --overwrite
    assert main(_run_args(tiny_model_dir, text_file, mine, "--recover", "none", "--seed", "1", "--overwrite")) == 0
    assert (mine / "run.json").read_text() != first and not list(tmp_path.glob(".mine.*"))


BAD = [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--pattern", "4:4"], "pattern"),
    (["--pattern", "5:4"], "pattern"),
    (["--pattern", "2:3"], "in_features"),  # 3 does not divide the width 64
    (["--pattern", "2:4", "--sparsity", "0.7"], "sparsity"),
    (["--pattern", "diagonal"], "pattern"),
    (["--method", "oracle"], "method"),
    (["--recover", "magic"], "recover"),
    (["--epochs", "0"], "recover.epochs"),
    (["--scope", "column"], "scope"),
    (["--seqlen", "0"], "calib.seqlen"),
    (["--lr", "nan"], "recover.lr"),
    (["--grad-clip", "inf"], "recover.grad_clip"),
    (["--weight-decay", "-1"], "recover.weight_decay"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**70)], "seed"),
    (["--eval-windows", "0"], "eval.windows"),
    (["--allocation", "owl", "--pattern", "2:4"], "prune.allocation"),
    (["--allocation", "atp", "--pattern", "2:4"], "prune.allocation"),
    (["--allocation", "atp", "--atp-beta", "1.01"], "prune.atp_beta: got 1.01; with 2 blocks"),  # beta < 1 for 2
    (["--layers", "no_such_linear"], "prune.layers"),
    (["--holdout", "8"], "holdout"),
    (["--dtype", "int8"], "dtype"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_one_line_exit_2_nothing_written(tiny_model_dir, text_file, tmp_path, capsys, extra, needle):
    out = tmp_path / "out"
    assert main(_run_args(tiny_model_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_seqlen_above_the_context_is_clamped_with_a_warning_in_the_record(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "long"
    assert main(_run_args(tiny_model_dir, text_file, out, "--seqlen", "100000", "--recover", "none")) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["resolved"]["calib_seqlen"] == 256  # the tiny model's context
    assert any("calib.seqlen 100000" in note for note in record["resolved"]["notes"])


@pytest.mark.parametrize("what", ["model", "calib-missing", "calib-empty", "eval-missing"])
def test_bad_paths(tiny_model_dir, text_file, tmp_path, capsys, what):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    model, calib, ev = str(tiny_model_dir), str(text_file), str(text_file)
    if what == "model":
        model = str(tmp_path / "no-such-model")
    elif what == "calib-missing":
        calib = str(tmp_path / "nope.txt")
    elif what == "calib-empty":
        calib = str(empty)
    else:
        ev = str(tmp_path / "nope.jsonl")
    out = tmp_path / "out"
    args = ["run", "--model", model, "--calib", calib, "--eval", ev, "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("nope" in err or "no-such-model" in err or "empty" in err)
    assert not out.exists()


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    from ebft.config import RunConfig
    from ebft.validate import validate

    validate(RunConfig.from_yaml(path), need_out=False)


def test_unknown_config_key_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nprune: {methd: wanda}\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "prune.methd" in err and len(err.strip().splitlines()) == 1


def test_eval_of_a_saved_run_reuses_its_evaluation_settings(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "saved"
    assert main(_run_args(tiny_model_dir, text_file, out, "--recover", "none")) == 0
    record = json.loads((out / "run.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", str(out)]) == 0
    captured = capsys.readouterr()
    assert "evaluation settings of the saved run" in captured.err
    row = next(line for line in captured.out.splitlines() if line.startswith(f"| {text_file.name}"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[1]) == pytest.approx(record["perplexity"][text_file.name]["pruned"], rel=1e-4)
    assert cells[2:] == ["64", "4", "256"]  # seqlen, windows, tokens: the protocol beside the number


def test_auto_eval_text_falls_back_to_offline_in_one_line(monkeypatch, caplog):
    from ebft import data, hub

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "ConnectError (test)")
    assert data.resolve_source("auto") == "offline"
    assert sum("out of reach" in r.message for r in caplog.records) == 1
    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    assert data.resolve_source("auto") == "wikitext2"
    assert data.resolve_source("ptb") == "ptb"


def test_plan_reads_only_the_config(tmp_path, capsys, monkeypatch):
    import ebft.models

    monkeypatch.setattr(ebft.models, "load_model", lambda *a, **k: pytest.fail("plan loaded weights"))
    path = tmp_path / "plan.json"
    assert main(["plan", "--model", "configs/models/llama-2-70b", "--calib", "c4", "--nsamples", "256",
                 "--seqlen", "1024", "--eval", "wikitext2", "--device", "cuda", "--free-accelerator", "80GB",
                 "--free-host", "128GB", "--plan-json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "68.98 B" in out and "placement" in out
    plan = json.loads(path.read_text())
    assert plan["parameters"]["total"] == 68_976_648_192 and plan["load"] == "lazy"  # 138 GB of bf16 > host


def test_run_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(_run_args(tiny_model_dir, text_file, out, "--dry-run")) == 0
    assert "parameters" in capsys.readouterr().out and not out.exists()
