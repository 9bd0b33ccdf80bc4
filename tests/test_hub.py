"""Wheels from a package index: progress to a callback, checksums, pip as the fallback, one-line errors.

A small index on 127.0.0.1 stands in for PyPI (PEP 691 JSON listing + the file), so nothing here
reaches the network.
"""
import hashlib
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ebft import hub
from ebft.errors import EbftError

WHEEL = "tiny_pkg-1.0-py3-none-any.whl"
PAYLOAD = bytes(range(256)) * 12_000  # 3 MB: several chunks


@pytest.fixture
def index(tmp_path, monkeypatch):
    """``(files, requests)``: what the index serves by path, and the paths asked for."""
    files, requests = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("PIP_INDEX_URL", f"{base}/simple")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("EBFT_CACHE", str(tmp_path / "cache"))
    yield files, requests
    server.shutdown()
    server.server_close()


def serve(files, payload=PAYLOAD, sha256=None):
    files["/files/" + WHEEL] = payload
    listing = {"files": [
        {"filename": "tiny_pkg-1.0.tar.gz", "url": "/files/tiny_pkg-1.0.tar.gz", "hashes": {}},
        {"filename": WHEEL, "url": "/files/" + WHEEL, "size": len(payload),
         "hashes": {"sha256": sha256 or hashlib.sha256(payload).hexdigest()}},
    ]}
    files["/simple/tiny-pkg/"] = json.dumps(listing).encode()


def test_download_reports_progress_and_is_cached(index, tmp_path):
    files, requests = index
    serve(files)
    events = []
    with hub.download_progress(lambda event, **info: events.append((event, info))):
        path = hub.pypi_wheel("tiny-pkg", "1.0", "a test")
    assert path == tmp_path / "cache" / WHEEL and path.read_bytes() == PAYLOAD
    assert events[0] == ("download_start", {"name": WHEEL, "total": len(PAYLOAD), "purpose": "a test"})
    done = [info["done"] for event, info in events if event == "download"]
    assert len(done) > 1 and done == sorted(done) and done[-1] == len(PAYLOAD)
    assert events[-1] == ("download_end", {"name": WHEEL, "ok": True})
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [WHEEL]  # no partial file left
    asked = len(requests)
    assert hub.pypi_wheel("tiny-pkg", "1.0", "a test") == path and len(requests) == asked  # from the cache
    hub._report("download", name="x", done=1, total=2)  # no callback outside the block: nothing happens


def test_a_wrong_checksum_is_refused_then_pip_is_tried(index, tmp_path, monkeypatch):
    files, _ = index
    serve(files, sha256="0" * 64)
    commands, events = [], []

    def pip_fails(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (test)\n")

    monkeypatch.setattr(hub.subprocess, "run", pip_fails)
    with hub.download_progress(lambda event, **info: events.append((event, info))), \
            pytest.raises(EbftError) as info:
        hub.pypi_wheel("tiny-pkg", "1.0", "a test")
    message = str(info.value)
    assert message.startswith("could not download tiny-pkg==1.0 (a test): ") and "\n" not in message
    assert "is not the expected 000" in message and "pip download: ERROR: Could not find a version" in message
    assert f"put its wheel in {tmp_path / 'cache'}" in message
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert events[-1] == ("download_end", {"name": WHEEL, "ok": False})
    assert list((tmp_path / "cache").iterdir()) == []  # the refused bytes are gone


def test_an_index_without_the_json_listing_falls_back_to_pip(index, tmp_path, monkeypatch):
    files, _ = index
    files["/simple/tiny-pkg/"] = b"<html><a href='/files/x.whl'>x</a></html>"  # PEP 503 HTML only

    def pip_downloads(command, **kwargs):
        folder = command[command.index("-d") + 1]
        with open(f"{folder}/{WHEEL}", "wb") as fh:
            fh.write(PAYLOAD)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(hub.subprocess, "run", pip_downloads)
    assert hub.pypi_wheel("tiny-pkg", "1.0", "a test").read_bytes() == PAYLOAD


def test_a_cached_wheel_with_the_wrong_digest_is_downloaded_again(index, tmp_path):
    files, _ = index
    serve(files)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / WHEEL).write_bytes(PAYLOAD[:100])
    want = hashlib.sha256(PAYLOAD).hexdigest()
    assert hub.pypi_wheel("tiny-pkg", "1.0", "a test", sha256=want).read_bytes() == PAYLOAD
    assert hub.file_sha256(tmp_path / "cache" / WHEEL) == want
