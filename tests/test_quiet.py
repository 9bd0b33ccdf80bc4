"""Nothing silent, no noise: ``ebft eval`` shows its progress; third-party chatter the user cannot act
on is gone (lm-eval's notes on how ebft calls it, its ``git describe``, transformers' GGUF bar), and real
warnings (lm-eval truncating what does not fit the model) still reach the user, once per task."""
import json
import logging

import pytest

from conftest import make_tiny_model
from ebft.evaluation import zeroshot as zs


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    """Two tiny tasks; BoolQ's passage is longer than the tiny model's 256 positions."""
    folder = tmp_path_factory.mktemp("tasks")
    piqa = [{"query": f"Question: how to do thing {i}?\n", "choices": ["this way", "that way"], "gold": i % 2}
            for i in range(3)]
    boolq = [{"query": "Passage: " + "The river runs past the old mill. " * 40 + "\nQuestion: does it run?",
              "choices": ["no", "yes"], "gold": 1}]
    for name, records in (("piqa", piqa), ("boolq", boolq)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_lm_eval_noise_goes_and_truncation_is_reported_once(task_files, tokenizer, tmp_path, monkeypatch, caplog,
                                                            capfd):
    monkeypatch.chdir(tmp_path)  # not a git repository: lm-eval's `git describe` would complain here
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    events = []
    with caplog.at_level(logging.WARNING):
        got = zs.zeroshot(model, tokenizer, "piqa,boolq", str(task_files),
                          progress=lambda event, **info: events.append((event, info.get("name"))))
    assert got["piqa"]["n"] == 3 and got["boolq"]["n"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [w for w in warnings if "Custom kwargs" in w or "`pretrained`" in w or "already-initialized" in w]
    assert not [w for w in warnings if "exceeds model's maximum length" in w]  # one line per request: summarised
    assert [w for w in warnings if "requests are longer than the model's 256-token context" in w] == [
        "zero-shot boolq: 2 requests are longer than the model's 256-token context; lm-eval scored them on their "
        "last tokens (cut from the left)"]
    assert "not a git repository" not in capfd.readouterr().err
    assert events == [("task_start", "piqa"), ("task_end", "piqa"), ("task_start", "boolq"), ("task_end", "boolq")]
    import lm_eval.evaluator

    assert lm_eval.evaluator.get_git_commit_hash.__name__ == "get_git_commit_hash"  # put back afterwards


def test_a_real_lm_eval_warning_still_passes(caplog):
    with caplog.at_level(logging.WARNING), zs._quiet_lm_eval():
        logging.getLogger("lm_eval.api.task").warning("ebft_piqa: something is really wrong")
        logging.getLogger("lm_eval.models.huggingface").warning("`pretrained` model kwarg is not of type `str`.")
    assert [r.getMessage() for r in caplog.records] == ["ebft_piqa: something is really wrong"]
    assert not logging.getLogger("lm_eval.api.task").filters  # the filter goes with the block


def test_eval_command_shows_progress_over_blocks_and_tasks(tiny_model_dir, text_file, task_files, capsys):
    from ebft.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--eval", str(text_file), "--eval-seqlen", "64",
                 "--eval-windows", "2", "--tasks", "piqa", "--task-data", str(task_files)]) == 0
    err = capsys.readouterr().err
    assert "perplexity: 100%" in err and "2/2" in err  # the tiny model's two blocks
    assert "zero-shot 1/1: piqa, 3 items" in err
    assert "Custom kwargs" not in err and "`pretrained` model kwarg" not in err


def test_gguf_bar_follows_transformers_switch(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from ebft.models import _gguf_bar_follows_transformers

    original, enabled = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _gguf_bar_follows_transformers():
            assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
        assert "de-quantizing" not in capsys.readouterr().err
        hf_logging.enable_progress_bar()
        with _gguf_bar_follows_transformers():
            list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
        assert "de-quantizing" in capsys.readouterr().err  # shown where transformers' bars are on (ebft -v)
    finally:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    assert gguf_utils.tqdm is original
