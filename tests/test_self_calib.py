"""``--calib self``: the dense model writes its own calibration windows (ebft.selfcalib): reproducible by seed,
cached (read the second time, regenerated when damaged), one draw of which every consumer takes a prefix,
plain text, refused where it cannot work, counted by the plan."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, build_tokenizer, make_tiny_model, one_line, small_run_args
from ebft import selfcalib
from ebft.cli import main
from ebft.config import RunConfig
from ebft.selfcalib import Sampling, generate_windows, sample_next, self_windows

SEQ = 16


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test its own cache folder."""
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / selfcalib.CACHE_FOLDER


@pytest.fixture
def batches(monkeypatch):
    """The batches generated, counted (each call of generate_batch)."""
    calls, real = [], selfcalib.generate_batch
    monkeypatch.setattr(selfcalib, "generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _never_generate(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the windows were generated again")
    monkeypatch.setattr(selfcalib, "generate_batch", fail)


def _args(root, out, *extra):
    return small_run_args(root, out, "--calib", "self", "--self-batch-size", "4", *extra)


# ----------------------------------------------------------------------------- sampling

def test_the_sampler_keeps_top_k_then_top_p_and_inverts_the_cdf():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    banned = torch.zeros(4, dtype=torch.bool)

    def pick(u, **settings):
        return sample_next(logits, torch.tensor([u]), banned, Sampling(**settings)).item()

    assert [pick(u, top_p=1.0) for u in (0.1, 0.6, 0.9, 0.99)] == [0, 1, 2, 3]  # CDF 0.5, 0.8, 0.95, 1
    assert [pick(u, top_p=0.75) for u in (0.5, 0.7, 0.999)] == [0, 1, 1]  # tokens 0, 1 hold 0.8 >= 0.75
    assert {pick(u, top_k=1) for u in (0.0, 0.5, 0.999)} == {0}
    assert [pick(u, top_k=2, top_p=1.0) for u in (0.6, 0.7)] == [0, 1]  # 0.625 / 0.375 of the two kept
    assert {pick(u, temperature=1e-30, top_p=1.0) for u in (0.0, 0.999)} == {0}  # no overflow: greedy
    banned[0] = True
    assert [pick(u, top_p=1.0) for u in (0.0, 0.59, 0.61, 0.999)] == [1, 1, 2, 3]  # 0.6, 0.3, 0.1 of the rest


def test_windows_are_reproducible_by_seed_and_each_batch_stands_alone(tokenizer):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    sampling = Sampling(batch=4)
    a = generate_windows(model, tokenizer, 0, 8, SEQ, 0, sampling, "cpu")
    assert a.shape == (8, SEQ) and len({tuple(w.tolist()) for w in a}) == 8
    assert torch.equal(a, generate_windows(model, tokenizer, 0, 8, SEQ, 0, sampling, "cpu"))
    assert not torch.equal(a, generate_windows(model, tokenizer, 0, 8, SEQ, 1, sampling, "cpu"))
    assert not torch.equal(a, generate_windows(model, tokenizer, 0, 8, SEQ, 0, Sampling(batch=4, top_k=3), "cpu"))
    # windows 4..7 alone are the draw's windows 4..7: a draw of N is the first N of any larger one
    assert torch.equal(generate_windows(model, tokenizer, 4, 4, SEQ, 0, sampling, "cpu"), a[4:])
    with pytest.raises(ValueError, match="whole batches"):
        generate_windows(model, tokenizer, 0, 6, SEQ, 0, sampling, "cpu")


@pytest.mark.parametrize("arch", FAMILIES)
def test_with_a_kv_cache_each_family_continues_as_a_full_forward_does(arch, tokenizer):
    """At a temperature near 0 the windows are the greedy continuation that a forward over the whole window
    (no cache) gives, token for token: the cached steps see what the full forward sees, per family."""
    model = make_tiny_model(arch, vocab_size=len(tokenizer))
    windows = generate_windows(model, tokenizer, 0, 2, 24, 0, Sampling(temperature=1e-6, top_p=1.0, batch=2), "cpu")
    start = torch.full((2, 1), selfcalib.start_token(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=torch.cat([start, windows[:, :-1]], 1), use_cache=False).logits
    top = logits.masked_fill(selfcalib.banned_tokens(tokenizer, logits.shape[-1]), float("-inf")).topk(2, dim=-1)
    clear = top.values[..., 0] - top.values[..., 1] > 1e-4  # (a tie: Gemma's zero padding row starts at all zeros)
    assert clear.float().mean() > 0.9 and torch.equal(windows[clear], top.indices[..., 0][clear])


@pytest.mark.parametrize("settings", [dict(top_p=1.0), dict(top_p=0.9), dict(top_k=5)])
def test_special_tokens_and_rows_past_the_vocabulary_are_never_sampled(settings):
    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": ["<x1>", "<x2>"]})
    model = make_tiny_model("llama", vocab_size=len(tok) + 13)  # an embedding padded past the vocabulary
    never = torch.tensor(sorted(set(tok.all_special_ids)) + list(range(len(tok), len(tok) + 13)))
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, never, torch.full((*out.shape[:-1], len(never)), 50.0)))
    with torch.no_grad():  # without the ban, those tokens would be all but every sample
        logits = model(input_ids=torch.tensor([[tok.bos_token_id]])).logits[0, -1]
    assert logits.softmax(-1)[never].sum() > 0.99
    assert selfcalib.start_token(tok) == tok.bos_token_id
    windows = generate_windows(model, tok, 0, 8, 32, 0, Sampling(batch=4, **settings), "cpu")
    assert not torch.isin(windows, never).any()
    assert tok.decode(windows[0]) == tok.decode(windows[0], skip_special_tokens=True)


# ----------------------------------------------------------------------------- the cache

def test_the_cache_is_read_the_second_time_and_extended_by_the_batches_missing(tokenizer, cache, batches, caplog):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    sampling = Sampling(batch=4)
    first = self_windows(model, tokenizer, 6, SEQ, 0, sampling, "cpu")
    assert len(batches) == 2 and first.windows.shape == (6, SEQ)
    assert first.record["generated"] and first.record["windows_generated"] == 8 and first.record["cache_windows"] == 8
    assert [p.name for p in cache.iterdir()] == [Path(first.record["cache_file"]).name]
    with caplog.at_level(logging.INFO, "ebft.selfcalib"):
        again = self_windows(model, tokenizer, 6, SEQ, 0, sampling, "cpu")
    assert len(batches) == 2 and torch.equal(again.windows, first.windows) and not again.record["generated"]
    assert "read from the cache" in caplog.text
    assert torch.equal(self_windows(model, tokenizer, 3, SEQ, 0, sampling, "cpu").windows, first.windows[:3])
    more = self_windows(model, tokenizer, 12, SEQ, 0, sampling, "cpu")
    assert len(batches) == 3 and more.record["windows_generated"] == 4 and torch.equal(more.windows[:6], first.windows)
    assert torch.equal(more.windows, generate_windows(model, tokenizer, 0, 12, SEQ, 0, sampling, "cpu"))
    other = self_windows(model, tokenizer, 4, SEQ, 1, sampling, "cpu")  # another seed: another file
    assert len(list(cache.iterdir())) == 2 and not torch.equal(other.windows, first.windows[:4])


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "another key"])
def test_a_damaged_cache_is_regenerated_with_a_warning(tokenizer, cache, batches, caplog, damage):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    sampling = Sampling(batch=4)
    first = self_windows(model, tokenizer, 8, SEQ, 0, sampling, "cpu")
    path = Path(first.record["cache_file"])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # a token id changed: the file still parses, its checksum does not hold
        path.write_bytes(data[:-8] + bytes([data[-8] ^ 1]) + data[-7:])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:  # a file of another key under this key's name
        other = self_windows(model, tokenizer, 8, SEQ, 5, sampling, "cpu")
        shutil.copy(other.record["cache_file"], path)
    batches.clear()
    with caplog.at_level(logging.WARNING):
        again = self_windows(model, tokenizer, 8, SEQ, 0, sampling, "cpu")
    assert "damaged" in caplog.text and len(batches) == 2 and again.record["generated"]
    assert torch.equal(again.windows, first.windows)
    batches.clear()
    assert torch.equal(self_windows(model, tokenizer, 8, SEQ, 0, sampling, "cpu").windows, first.windows)
    assert not batches  # the regenerated file is whole again


def test_the_key_follows_the_weights_the_tokenizer_and_the_settings(tokenizer):
    model = make_tiny_model("llama", vocab_size=len(tokenizer))

    def key(**changes):
        args = dict(seqlen=SEQ, seed=0, sampling=Sampling(), device="cpu") | changes
        return selfcalib.cache_key(model, tokenizer, **args)[0]

    base = key()
    assert key() == base and len({base, key(seed=1), key(seqlen=SEQ + 1), key(sampling=Sampling(batch=8)),
                                  key(sampling=Sampling(temperature=0.7)), key(sampling=Sampling(top_p=0.9)),
                                  key(sampling=Sampling(top_k=40))}) == 7
    tok = build_tokenizer()
    tok.add_special_tokens({"bos_token": "<bos>"})
    assert selfcalib.cache_key(model, tok, SEQ, 0, Sampling(), "cpu")[0] != base
    with torch.no_grad():  # pruned: not the dense model's windows
        weight = model.model.layers[1].mlp.down_proj.weight
        weight[weight.abs() < weight.abs().median()] = 0
    assert key() != base


# ----------------------------------------------------------------------------- one draw, every consumer a prefix

def test_every_consumer_takes_a_prefix_of_one_draw(three_blocks):
    from ebft.models import load_model
    from ebft.pipeline import GUARD, prepare_data
    from ebft.recover.finish import FinishSettings, prepare_finish

    model, tokenizer = load_model(str(three_blocks / "model"), "float32", "cpu")
    config = RunConfig(model=str(three_blocks / "model"))
    config.calib.source, config.calib.nsamples, config.calib.seqlen, config.calib.self_batch_size = "self", 4, SEQ, 4
    config.recover.guard, config.finish = 3, FinishSettings(method="lm", holdout=2)
    assert config.windows_drawn() == 7  # 4 calibration + 3 held out for the guard (the finish: 4 + 2)
    data = prepare_data(model, tokenizer, config)
    drawn = data.self_draw.windows
    assert drawn.shape == (7, SEQ) and data.self_draw.record["cache_windows"] == 8
    assert torch.equal(data.calib, drawn[:4]) and torch.equal(data.guards[GUARD], drawn[4:7])
    finish = prepare_finish(model, tokenizer, data.training_text(config), 4, config.finish)
    assert torch.equal(finish.train, drawn[:4]) and torch.equal(finish.heldout, drawn[4:6])
    config.recover.method, config.finish = "lora", FinishSettings()
    config.recover.lora_steps, config.recover.lora_batch_size = 3, 2
    assert config.windows_drawn() == 10  # 3 steps of 2 windows, then 4 held out
    lora_data = prepare_data(model, tokenizer, config)
    text = lora_data.training_text(config)
    assert torch.equal(text.windows(tokenizer, 10)[:7], drawn) and not lora_data.guards
    with pytest.raises(Exception, match="declares the windows it takes"):
        text.windows(tokenizer, 11)


def test_a_run_with_a_pruner_and_ebft_then_again_from_the_cache(three_blocks, tmp_path, monkeypatch, capsys):
    out = tmp_path / "one"
    assert main(_args(three_blocks, out, "--method", "wanda", "--recover", "ebft", "--epochs", "1")) == 0
    assert "self-calibration: 8 windows of 32 tokens (all the run takes), 8 generated in" in capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    draw = record["self_calibration"]
    assert draw["generated"] and draw["windows"] == 8 and draw["start_token"] == "<eos>"  # no BOS: the EOS
    assert draw["sampling"] == {"temperature": 1.0, "top_p": 0.95, "top_k": 0, "batch": 4}
    assert Path(draw["cache_file"]).is_file() and "self-calibration" in record["phases"]["seconds"]
    assert record["recovery"]["guard"]["windows"] == 4
    _never_generate(monkeypatch)
    assert main(_args(three_blocks, tmp_path / "two", "--method", "wanda", "--recover", "ebft", "--epochs", "1")) == 0
    again = json.loads((tmp_path / "two" / "run.json").read_text())
    assert not again["self_calibration"]["generated"] and again["perplexity"] == record["perplexity"]
    assert again["blocks"][0]["loss_after"] == record["blocks"][0]["loss_after"]


def test_lora_trains_on_the_draws_windows(three_blocks, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ebft.recover import TrainingText

    taken, real = [], TrainingText.windows
    monkeypatch.setattr(TrainingText, "windows", lambda self, tok, n: taken.append(real(self, tok, n)) or taken[-1])
    out = tmp_path / "lora"
    assert main(_args(three_blocks, out, "--recover", "lora", "--lora-steps", "2", "--lora-batch-size", "3")) == 0
    draw = json.loads((out / "run.json").read_text())["self_calibration"]
    assert draw["windows"] == 10 and draw["cache_windows"] == 12
    cached = load_file(draw["cache_file"])["windows"]
    assert len(taken) == 1 and torch.equal(taken[0], cached[:10])


def test_a_killed_run_resumes_on_the_same_windows(three_blocks, tmp_path, monkeypatch):
    from ebft import checkpoint as ckpt
    from ebft.cli import config_from_args, build_parser
    from ebft.pipeline import run

    class Killed(BaseException):
        pass

    def kill(point, index=None):
        if point == "saved" and index == 2:
            raise Killed

    def config():
        args = _args(three_blocks, tmp_path / "out", "--epochs", "1")
        return config_from_args(build_parser().parse_args(args))

    monkeypatch.setattr(ckpt, "kill_hook", kill)
    with pytest.raises(Killed):
        run(config())
    assert (tmp_path / ".out.ckpt" / "checkpoint.json").is_file()
    monkeypatch.setattr(ckpt, "kill_hook", None)
    _never_generate(monkeypatch)
    record = run(config())  # the checkpoint's hash of the windows holds: the same windows, from the cache
    assert not record["self_calibration"]["generated"] and (tmp_path / "out" / "run.json").is_file()


# ----------------------------------------------------------------------------- refused where it cannot work

@pytest.mark.parametrize("extra,needle", [
    (["--lazy"], "lazy: got True; --calib self samples every window from the whole model"),
    (["--self-temperature", "0"], "calib.self_temperature: got 0.0; must be a finite number > 0"),
    (["--self-temperature", "-1"], "calib.self_temperature: got -1.0"),
    (["--self-top-p", "0"], "(0, 1]"), (["--self-top-p", "1.5"], "(0, 1]"), (["--self-top-k", "-1"], ">= 0"),
    (["--self-batch-size", "0"], "[1, 1024]"), (["--eval", "self"], "is for calibration, --calib self"),
])
def test_self_calibration_that_cannot_work_is_refused_in_one_line(three_blocks, tmp_path, capsys, cache, extra,
                                                                  needle):
    assert main(_args(three_blocks, tmp_path / "out", *extra)) == 2
    assert needle in one_line(capsys)
    assert not (tmp_path / "out").exists() and not cache.exists()


@pytest.mark.parametrize("flag,value", [("--self-temperature", "0.7"), ("--self-top-p", "0.95"),
                                        ("--self-top-k", "40"), ("--self-batch-size", "16")])
def test_self_settings_without_calib_self_are_refused(three_blocks, tmp_path, capsys, flag, value):
    assert main(small_run_args(three_blocks, tmp_path / "out", flag, value)) == 2
    assert one_line(capsys).startswith(f"ebft: error: {flag} (calib.{flag[2:].replace('-', '_')}): got ")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- sweeps, resume keys, the plan

def test_a_sweep_cell_key_follows_the_sampling_settings():
    from ebft.checkpoint import settings_of
    from ebft.sweeps import cell_key

    cell = RunConfig(model="m")
    plain = cell_key(cell)
    cell.calib.self_temperature = 0.7  # (refused as a flag; a key does not see it when the source is a text)
    assert cell_key(cell) == plain
    old = RunConfig(model="m").to_dict()  # a run recorded before the self_* settings existed resumes as it was
    old["calib"] = {k: v for k, v in old["calib"].items() if not k.startswith("self_")}
    assert settings_of(old) == settings_of(RunConfig(model="m").to_dict())
    cell.calib.source = "self"
    keys = {cell_key(cell)}
    for name, value in (("self_temperature", 0.8), ("self_top_p", 0.9), ("self_top_k", 40), ("self_batch_size", 8)):
        setattr(cell.calib, name, value)
        keys.add(cell_key(cell))
    assert len(keys) == 5 and plain not in keys


def test_a_sweeps_cells_share_one_generation(three_blocks, tmp_path, monkeypatch, capsys):
    calls, real = [], selfcalib.generate_windows
    monkeypatch.setattr(selfcalib, "generate_windows", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    args = _args(three_blocks, tmp_path / "sweep", "--recover", "none,lora", "--lora-steps", "3",
                 "--lora-batch-size", "4")
    assert main(["sweep", *args[1:]]) == 0
    assert calls == [16]  # once, for the cell that takes the most (LoRA: 3 × 4 + 4), in whole batches
    cells = json.loads((tmp_path / "sweep" / "results.json").read_text())["cells"]
    assert [c["recover"] for c in cells] == ["none", "lora"]


def test_the_plan_counts_the_generation(three_blocks):
    from ebft.estimate import RunSizes, estimate_time, plan_resources
    from ebft.estimate.shape import load_config

    config = RunConfig(model=str(three_blocks / "model"))
    config.calib.nsamples, config.calib.seqlen, config.eval.sources = 6, 32, [str(three_blocks / "text.txt")]
    model_config = load_config(str(three_blocks / "model"))
    plain = plan_resources(model_config, RunSizes.of(config, 256))
    assert "self-calibration" not in plain.phases
    config.calib.source, config.calib.self_batch_size = "self", 4
    sizes = RunSizes.of(config, 256)
    assert sizes.self_windows == 12  # 6 + the guard's 4 = 10, in whole batches of 4
    plan = plan_resources(model_config, sizes)
    kv = 4 * 32 * 3 * 2 * 2 * 16 * 4  # batch × seqlen × blocks × (k, v) × kv heads × head dim × fp32
    assert plan.phases["self-calibration"]["KV cache of one generation batch"] == kv
    assert plan.working == plain.working  # it comes before the walk: the walk's working memory is unchanged
    wide = dataclasses.replace(sizes, self_batch=1024, eval_windows=2)  # a generation batch larger than the walk
    walk_host = plan_resources(model_config, dataclasses.replace(wide, self_windows=0), free_host=2**40)
    short = plan_resources(model_config, wide, free_host=int(walk_host.placement.host_bytes / 0.8) + 1024)
    assert walk_host.placement.decision == "host" and short.placement.decision == "reduce"
    assert "--calib self's generation" in short.placement.reason
    assert any(r.flag == "--self-batch-size" and r.fits_at for r in short.reductions)
    timed = estimate_time(model_config, sizes, device="cpu", iters=1, warmup=0)
    assert timed.generation_seconds > 0 and timed.total_seconds > timed.generation_seconds


# ----------------------------------------------------------------------------- torchrun

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_ranks_share_rank_zeros_windows(three_blocks, tmp_path):
    """Rank 0 generates and broadcasts, each rank takes its share of the same windows: the 2-rank run equals
    one process's."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1",
           "EBFT_CACHE": str(tmp_path / "cache-2")}
    args = _args(three_blocks, tmp_path / "two", "--recover", "none")
    done = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "-m", "ebft", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert main(_args(three_blocks, tmp_path / "one", "--recover", "none")) == 0
    one, two = (json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "two"))
    assert two["resolved"]["world_size"] == 2 and two["self_calibration"]["generated"]
    for name, stages in one["perplexity"].items():
        assert two["perplexity"][name] == pytest.approx(stages, rel=1e-5)
    assert two["sparsity"] == one["sparsity"]
