"""ebft-gradual: the mask tightens during the block's training, ends exactly on the pattern, never worse than the
pruner's one-shot mask; FLAP's bias compensation from the dense model's means; the end-to-end guard."""
import json

import pytest
import torch

from conftest import make_tiny_model, recover_spec
from ebft.masks import Pattern, check_mask, check_weight, parse_pattern
from ebft.models import find_blocks, find_linears
from ebft.prune import get_pruner
from ebft.recover.gradual import cubic, tighten
from ebft.walk import PruneSpec, walk


def _ids(n=8, s=32, seed=0):
    return torch.randint(0, 320, (n, s), generator=torch.Generator().manual_seed(seed))


def test_the_cubic_schedule_starts_and_ends_where_it_should():
    assert cubic(0.5, 0, 8) == 0.5 and cubic(0.5, 8, 8) == 1.0
    steps = [cubic(0.3, k, 8) for k in range(9)]
    assert steps == sorted(steps)


@pytest.mark.parametrize("pattern", [Pattern(0.7, scope="row"), Pattern(0.6, scope="layer"), Pattern(0.5, 2, 4)])
def test_tightening_is_monotone_and_ends_on_the_pattern(pattern):
    torch.manual_seed(0)
    w, norms = torch.randn(16, 32), torch.rand(32) + 0.1
    keep = torch.ones(16, 32, dtype=torch.bool)
    previous = keep
    for k in range(1, 5):
        keep = tighten(w * keep, keep, norms, pattern, cubic(0.4, k, 4))
        assert not (keep & ~previous).any()  # pruned stays pruned
        previous = keep
    check_mask(keep, pattern, "w")


@pytest.mark.parametrize("text,sparsity", [("unstructured", 0.7), ("2:4", None)])
def test_the_walk_ends_on_exact_masks_never_worse_than_one_shot(text, sparsity):
    model = make_tiny_model("llama")
    pattern = parse_pattern(text, sparsity, None, "row")
    result = walk(model, _ids(), PruneSpec(get_pruner("wanda"), pattern),
                  recover_spec("ebft-gradual", epochs=3, batch_size=4, lr=1e-3), batch_size=4)
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            mask = result.masks[f"{prefix}.{i}.{name}"]
            check_mask(mask, pattern, name)
            check_weight(linear.weight.data, mask, name)
    for record in result.blocks:
        assert record["loss_after"] <= record["loss_before"]
        assert record["restored"] is not None or record["mask_flips"] > 0  # the mask really moved


def test_lr_zero_keeps_the_one_shot_result():
    """Nothing trains: the tightened dense weights cannot beat the pruner's, so its mask and weights stay."""
    model = make_tiny_model("llama")
    reference = make_tiny_model("llama")
    spec = PruneSpec(get_pruner("wanda"), parse_pattern("unstructured", 0.6, None, "row"))
    walk(reference, _ids(), spec, recover_spec("none"))
    walk(model, _ids(), spec, recover_spec("ebft-gradual", epochs=1, batch_size=4, lr=0.0, train_norms=False))
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_flap_compensation_from_the_dense_model_uses_its_means():
    from ebft.allocation import flap_allocator
    from ebft.prune.flap import FlapSettings
    from ebft.walk import planning_pass

    ids = _ids()
    biases = {}
    for stats in ("chain", "dense"):
        model = make_tiny_model("llama", layers=3)
        settings = FlapSettings(flap_structure="uniform", flap_bias_stats=stats, bias_compensation=True)
        allocation = planning_pass(model, ids, flap_allocator(Pattern(0.3, structured=True), settings, model.config))
        assert (allocation.structures[1].dense_means is not None) == (stats == "dense")
        walk(model, ids, PruneSpec(get_pruner("flap"), allocation.patterns, None, settings, allocation.structures))
        biases[stats] = [model.model.layers[i].mlp.down_proj.bias.detach().clone() for i in range(3)]
    assert torch.equal(biases["chain"][0], biases["dense"][0])  # block 0: its inputs are the dense model's
    assert not torch.equal(biases["chain"][2], biases["dense"][2])  # later blocks see the pruned chain


def recovery_looks_worse(real):
    """``stage_perplexities`` with the guard's verdict forced: the recovered model twice as bad on its windows."""
    import ebft.pipeline as pipeline

    def scored(model, result, evals, device, final):
        ppl = real(model, result, evals, device, final)
        if pipeline.GUARD in evals:
            ppl[pipeline.GUARD]["recovered"] = 2 * ppl[pipeline.GUARD]["pruned"]
        return ppl
    return scored


@pytest.mark.parametrize("checkpoint", ["--checkpoint", "--no-checkpoint"])  # blocks as pruned: on disk / in memory
def test_the_guard_keeps_the_pruned_blocks_when_recovery_makes_the_model_worse(tiny_model_dir, text_file, tmp_path,
                                                                                 monkeypatch, checkpoint):
    """When the held-out windows say the recovered model is worse end to end than the pruned one, every block
    goes back to how it was pruned: the saved model's perplexity is the pruned one, the masks the pruner's.
    (Tiny random models are near uniform, so no recovery makes them measurably worse: the verdict is forced.)"""
    import ebft.pipeline as pipeline
    from ebft.cli import main

    args = ["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--recover", "ebft-gradual",
            "--epochs", "2", "--sparsity", "0.7", checkpoint]
    assert main([*args, "--out", str(tmp_path / "free")]) == 0
    free = json.loads((tmp_path / "free" / "run.json").read_text())
    assert free["recovery"]["guard"]["kept"] == "recovered"
    real = pipeline.stage_perplexities
    monkeypatch.setattr(pipeline, "stage_perplexities", recovery_looks_worse(real))
    assert main([*args, "--out", str(tmp_path / "guarded")]) == 0
    record = json.loads((tmp_path / "guarded" / "run.json").read_text())
    assert record["recovery"]["guard"]["kept"] == "pruned"
    text = next(iter(record["perplexity"]))
    ppl = record["perplexity"][text]
    assert ppl["recovered"] == ppl["pruned"] != free["perplexity"][text]["recovered"]
    monkeypatch.setattr(pipeline, "stage_perplexities", real)
    saved = pipeline.evaluate(str(tmp_path / "guarded"), [str(text_file)], 32, 2)
    assert saved[text] == pytest.approx(ppl["pruned"], rel=1e-4)  # the saved model is the pruned one
    assert record["sparsity"]["overall"] == free["sparsity"]["overall"]
    # and that model is exactly what pruning alone gives: a --recover none run, tensor for tensor
    alone = [a if a != "ebft-gradual" else "none" for a in args]
    del alone[alone.index("--epochs"):alone.index("--epochs") + 2]
    assert main([*alone, "--out", str(tmp_path / "alone")]) == 0
    record_alone = json.loads((tmp_path / "alone" / "run.json").read_text())
    assert record_alone["perplexity"][text]["pruned"] == ppl["pruned"]
    assert_same_tensors(tmp_path / "guarded", tmp_path / "alone")


def assert_same_tensors(a, b):
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    first, second = tensors(a), tensors(b)
    assert first.keys() == second.keys() and first
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("pruning", [["--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "owl"],
                                     ["--method", "flap", "--sparsity", "0.2", "--flap-bias-stats", "chain"]])
def test_the_pruned_stage_of_a_guarded_run_is_the_model_pruning_alone_gives(tiny_model_dir, text_file, tmp_path,
                                                                            pruning):
    """With the guard (the default), a recovered run's "pruned" perplexity is a --recover none run's, to the bit,
    for a pruner that reads the Hessian and updates weights (SparseGPT) with OWL's per-block sparsities, and for
    FLAP compensating from the chain's inputs; without the guard it is the stitched model (each block pruned on
    the recovered chain), which differs."""
    from ebft.cli import main

    base = ["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
            "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", *pruning]
    ppl = {}
    for name, extra in (("none", ["--recover", "none"]), ("guarded", ["--epochs", "1"]),
                        ("unguarded", ["--epochs", "1", "--recover-guard", "0"])):
        assert main([*base, *extra, "--out", str(tmp_path / name)]) == 0
        record = json.loads((tmp_path / name / "run.json").read_text())
        ppl[name] = next(iter(record["perplexity"].values()))["pruned"]
    assert ppl["guarded"] == ppl["none"]
    if "sparsegpt" in pruning:  # (on the tiny model EBFT gives FLAP's blocks back as pruned: no difference there)
        assert ppl["unguarded"] != ppl["none"]


def test_the_guard_never_saves_the_model_it_rejected_when_the_pruned_blocks_cannot_be_read(
        tiny_model_dir, text_file, tmp_path, monkeypatch, caplog, capsys):
    """A snapshot damaged in the checkpoint folder during the run: the guard finds the recovered model worse and
    cannot put the blocks as pruned back, so the run stops in one line rather than save the model it has just
    rejected (a resume is then refused up front: tests/test_resume.py)."""
    import ebft.pipeline as pipeline
    from ebft.checkpoint import PrunedBlocks, _damaged
    from ebft.cli import main

    def damaged(self, index):
        raise _damaged(self.folder / f"block-{index:05d}.safetensors", ValueError("truncated"))

    monkeypatch.setattr(pipeline, "stage_perplexities", recovery_looks_worse(pipeline.stage_perplexities))
    monkeypatch.setattr(PrunedBlocks, "load", damaged)
    assert main(["run", "--model", str(tiny_model_dir), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                 "--eval", str(text_file), "--eval-seqlen", "32", "--eval-windows", "2", "--epochs", "1",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "not saving the rejected model" in err[-1] and not (tmp_path / "out").exists()
    assert any("is damaged" in r.message for r in caplog.records)
