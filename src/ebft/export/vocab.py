"""The tokenizer of a GGUF file: carried over from the source GGUF, or rebuilt from the Hugging Face tokenizer
so that llama.cpp tokenizes exactly as transformers does.

What llama.cpp needs to tokenize a rebuilt byte-level BPE tokenizer like transformers:

- **the pre-tokenizer's name** (``tokenizer.ggml.pre``): llama.cpp splits text with regexes of its own, chosen by
  name. ebft reads the regexes of the tokenizer's pre-tokenizer (``Split`` patterns, ``Digits``, ``ByteLevel``'s
  GPT-2 regex) and names the one llama.cpp implements for exactly those (:data:`PRE_TOKENIZERS`); another
  pre-tokenizer is written as ``default`` with one warning (token ids are unaffected; text may split
  differently in llama.cpp);
- **token types**: added tokens marked special are CONTROL (llama.cpp then matches ``<|im_start|>`` whole
  instead of splitting it into pieces), other added tokens USER_DEFINED, the rest NORMAL; ids the model has
  beyond the tokenizer's are UNUSED ``[PAD<id>]`` tokens (the embedding's rows and the token list agree, as
  llama.cpp requires);
- **what encoding adds**: ``add_bos_token`` / ``add_eos_token`` from what the tokenizer really does to a text,
  the special token ids, the merges, and the chat template.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ..errors import EbftError

log = logging.getLogger(__name__)

# The regexes of a byte-level pre-tokenizer, in Hugging Face's spelling, and llama.cpp's name for the
# pre-tokenizer it implements with the same splits. GPT2 stands for ByteLevel's own regex (use_regex).
GPT2 = "<ByteLevel GPT-2 regex>"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (GPT2,): "gpt-2",  # GPT-2, and a tokenizer rebuilt by transformers from a GGUF (SmolLM2's)
    (r"\p{N}", GPT2): "smollm",  # SmolLM/SmolLM2, StarCoder: each digit alone, then GPT-2's regex
    (LLAMA3_SPLIT,): "llama-bpe",  # Llama 3
    (QWEN2_SPLIT,): "qwen2",  # Qwen2, Qwen2.5, Qwen3
}
SPECIAL_IDS = ("bos", "eos", "unk", "sep", "pad", "mask")


def add_tokenizer(writer, tokenizer, source_reader, vocab_size: int) -> None:
    """The ``tokenizer.*`` keys: every one of ``source_reader`` (a ``GGUFReader`` of the source GGUF) as it is,
    else rebuilt from the Hugging Face ``tokenizer`` for a model of ``vocab_size`` token embeddings."""
    if source_reader is not None:
        _copy_tokenizer(writer, source_reader)
        return
    import gguf

    with tempfile.TemporaryDirectory(prefix="ebft-tokenizer-") as folder:
        tokenizer.save_pretrained(folder)
        data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8")) \
            if (Path(folder) / "tokenizer.json").is_file() else {}
        model = data.get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            llama = gguf.LlamaHfVocab(Path(folder))
            tokens, scores, types = (list(x) for x in zip(*llama.all_tokens()))
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")  # llama.cpp's sentencepiece-style tokenizer reads no regex
        elif model.get("type") == "BPE":
            tokens, types = _bpe_tokens(data)
            scores = None
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre_tokenizer_name(data))
            writer.add_token_merges(_merges(model))
        else:
            raise EbftError(f"gguf: a {model.get('type') or type(tokenizer).__name__} tokenizer cannot be written "
                            "to GGUF by ebft (byte-level BPE and Llama's BPE can)")
    tokens, scores, types = _fit(tokens, scores, types, vocab_size)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    _add_specials(writer, tokenizer, len(tokens))


def pre_tokenizer_name(data: dict) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer (``data``: tokenizer.json), recognised by its regexes;
    ``default`` (with one warning) for one llama.cpp has no name for."""
    pieces = _split_regexes(data.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(tuple(pieces)) if pieces is not None else None
    if name is None:
        log.warning("gguf: the tokenizer's pre-tokenizer is not one llama.cpp implements by name (%s): written as "
                    "'default'; llama.cpp may split text differently from transformers",
                    json.dumps(data.get("pre_tokenizer"))[:200])
        return "default"
    return name


def _split_regexes(pre) -> list[str] | None:
    """The regexes a pre-tokenizer splits text with, in order (isolated pieces), or None where it does
    anything else (removes or merges pieces, adds a prefix space, splits on a fixed string)."""
    if not isinstance(pre, dict):
        return None
    kind = pre.get("type")
    if kind == "Sequence":
        parts = [_split_regexes(p) for p in pre.get("pretokenizers") or []]
        return None if any(p is None for p in parts) else [r for p in parts for r in p]
    if kind == "ByteLevel":
        return None if pre.get("add_prefix_space") else [GPT2] if pre.get("use_regex", True) else []
    if kind == "Digits":
        return [r"\p{N}" if pre.get("individual_digits") else r"\p{N}+"]
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert"):
        regex = (pre.get("pattern") or {}).get("Regex")
        return [regex] if isinstance(regex, str) else None
    return None


def _bpe_tokens(data: dict) -> tuple[list[str], list[int]]:
    """Byte-level BPE: the vocabulary by id (added tokens included), with llama.cpp's token types; a gap in the
    ids is a ``[PAD<id>]`` token."""
    import gguf

    by_id = {int(i): text for text, i in data["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in data.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    count = max(by_id) + 1
    return ([by_id.get(i, f"[PAD{i}]") for i in range(count)],
            [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(count)])


def _fit(tokens: list, scores: list | None, types: list, vocab_size: int):
    """The token list made as long as the model's embedding: unused ``[PAD<id>]`` tokens added, or the tokens
    the model has no embedding for left out (with a warning)."""
    import gguf

    if len(tokens) > vocab_size:
        log.warning("gguf: the tokenizer has %d tokens beyond the model's %d token embeddings (%s...): left out",
                    len(tokens) - vocab_size, vocab_size, tokens[vocab_size])
    extra = range(len(tokens), vocab_size)
    pad = [f"[PAD{i}]" for i in extra]
    tokens = list(tokens[:vocab_size]) + ([p.encode() for p in pad] if isinstance(tokens[0], bytes) else pad)
    types = [int(t) for t in types[:vocab_size]] + [int(gguf.TokenType.UNUSED)] * len(extra)
    scores = None if scores is None else list(scores[:vocab_size]) + [-1000.0] * len(extra)
    return tokens, scores, types


def _merges(model: dict) -> list[str]:
    """BPE merges as llama.cpp reads them: ``"left right"`` (tokenizer.json has that, or pairs)."""
    merges = model.get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _add_specials(writer, tokenizer, count: int) -> None:
    """The special token ids, whether encoding adds BOS / EOS (from what the tokenizer does to a text), and
    the chat template."""
    for kind in SPECIAL_IDS:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < count:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    with_specials = tokenizer("a b")["input_ids"]
    bare = tokenizer("a b", add_special_tokens=False)["input_ids"]
    added = len(with_specials) - len(bare)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(added > 0 and bos is not None and with_specials[0] == bos and bare[:1] != [bos]))
    writer.add_add_eos_token(bool(added > 0 and eos is not None and with_specials[-1] == eos
                                  and bare[-1:] != [eos]))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)


def _copy_tokenizer(writer, reader) -> None:
    """Every ``tokenizer.*`` key of the source GGUF, as it is."""
    from gguf import GGUFValueType

    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), vtype, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), vtype)
