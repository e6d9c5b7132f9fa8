"""Hub weights on first use: a Hub key (``owner/name``) becomes a directory of the local Hugging
Face cache, downloaded there with ``huggingface_hub`` when it is not there yet.

The cache is the standard one (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), laid out as the Hub client lays it out, which is also where mulo's
Rust side (``mulo-compile``) looks. ``huggingface_hub`` itself honors ``HF_ENDPOINT``,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``HF_HUB_ETAG_TIMEOUT`` and
``HF_HUB_DOWNLOAD_TIMEOUT``, and draws its own progress bars; mulo bounds the whole download
(:func:`download_limit`). A download that fails, runs out of time or is interrupted leaves the
cache as it was: what this attempt added is removed and the repository's ref restored, so a
snapshot that was usable stays usable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

#: The Hub key of the trained μLO_M.
DEFAULT_HF_KEY = "btherien/mulo"

#: The files of a learned optimizer's Hub repository that mulo reads.
FILES = ["model.safetensors", "config.json"]

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_key(spec: str) -> bool:
    """Whether ``spec`` has the form of a Hub key, ``owner/name``."""
    return bool(_KEY.match(spec)) and ".." not in spec


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _describe(hf_key: str, revision: Optional[str]) -> str:
    return f"hf_key={hf_key!r}" + (f" (revision={revision!r})" if revision else "")


def _state(paths: List[Path]) -> Dict[Path, Optional[bytes]]:
    """Every path under ``paths``: directories and links map to None, files to their bytes (only
    the small ref files are read; blobs are kept by name)."""
    out: Dict[Path, Optional[bytes]] = {}
    for top in paths:
        for root, dirs, files in os.walk(top):
            out[Path(root)] = None
            for name in files:
                p = Path(root) / name
                out[p] = p.read_bytes() if "refs" in p.parts and not p.is_symlink() else None
    return out


def _restore(before: Dict[Path, Optional[bytes]], paths: List[Path]) -> None:
    """Removes what is under ``paths`` and not in ``before`` (files first, then directories,
    deepest first) and rewrites the ref files whose content changed."""
    after = _state(paths)
    added = sorted((p for p in after if p not in before), key=lambda p: len(p.parts), reverse=True)
    for p in added:
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        except OSError:
            pass  # a directory that still holds something another process wrote is kept
    for p, content in before.items():
        if content is not None and after.get(p) != content:
            p.write_bytes(content)


def _cache_paths(hf_key: str) -> Tuple[Path, List[Path]]:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    folder = "models--" + hf_key.replace("/", "--")
    return cache, [cache / folder, cache / ".locks" / folder]


def local_weights(hf_key: str, revision: Optional[str] = None) -> str:
    """The directory (or file) to load for ``hf_key``: an existing path as given, ``"demo"`` as
    given, and a Hub key's snapshot directory in the local cache, downloaded first when it is not
    there (unless ``HF_HUB_OFFLINE`` is set).

    Raises ``ValueError`` for something that is none of these, ``FileNotFoundError`` when the key
    is not cached and downloading is off, and ``OSError`` (from the Hub client's error) when the
    download fails; the cache is then as it was.
    """
    if hf_key == "demo" or os.path.exists(hf_key):
        return hf_key
    what = _describe(hf_key, revision)
    if not is_hub_key(hf_key):
        raise ValueError(
            f"{what}: no such file or directory, and not a Hub key of the form 'owner/name' "
            "(or 'demo' for the bundled demo network)"
        )
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # a declared dependency; a broken install says so
        raise ImportError(
            f"{what}: downloading Hub weights needs the huggingface_hub package "
            "(`pip install huggingface_hub`), or pass hf_key= a directory holding "
            "model.safetensors and config.json"
        ) from e
    cache, paths = _cache_paths(hf_key)
    try:
        return _snapshot(huggingface_hub.hf_hub_download, hf_key, revision, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise FileNotFoundError(
            f"{what} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
            f"unset it to download, or pass hf_key= a directory holding model.safetensors and "
            "config.json"
        )
    from huggingface_hub import constants

    limit = download_limit()
    before = _state(paths)
    try:
        # A child process, so that a download past its limit, or interrupted, can be stopped for
        # good before the cache is restored (a thread could not be, and would write on later).
        # It inherits the environment (HF_*) and standard error (the client's progress bars).
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps([hf_key, revision, FILES])],
            stdout=subprocess.PIPE,
            text=True,
            timeout=limit,
        )
        lines = child.stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines else {"error": f"exit status {child.returncode}"}
        if "error" in answer:
            raise OSError(" ".join(answer["error"].split()))  # one line, the Hub's text included
        return str(answer["snapshot"])
    except BaseException as e:  # KeyboardInterrupt too: an interrupted download is undone
        _restore(before, paths)
        if not isinstance(e, Exception):
            raise
        if isinstance(e, subprocess.TimeoutExpired):
            why = (
                f"no complete answer within {limit:g} s (for each file, HF_HUB_ETAG_TIMEOUT + "
                "HF_HUB_DOWNLOAD_TIMEOUT seconds)"
            )
        else:
            why = str(e)
        raise OSError(
            f"{what}: could not download from {constants.ENDPOINT} into {cache}: {why}; "
            "the cache is as it was"
        ) from e


def download_limit() -> float:
    """Seconds a first-use download may take in all: for each file, ``HF_HUB_ETAG_TIMEOUT`` +
    ``HF_HUB_DOWNLOAD_TIMEOUT`` (10 each by default). huggingface_hub applies these to each
    request, but retries a request that timed out with a fixed 60 s timeout, several times; mulo
    bounds the whole instead (μLO_M's files are a few kilobytes)."""
    from huggingface_hub import constants

    return float(len(FILES) * (constants.HF_HUB_ETAG_TIMEOUT + constants.HF_HUB_DOWNLOAD_TIMEOUT))


# The child's program: each file through hf_hub_download, model.safetensors first; the last line
# of standard output is {"snapshot": dir} or {"error": text}.
_CHILD = r"""
import json, os, sys
repo, revision, files = json.loads(sys.argv[1])
try:
    from huggingface_hub import hf_hub_download
    paths = [hf_hub_download(repo, f, revision=revision) for f in files]
    print(json.dumps({"snapshot": os.path.dirname(paths[0])}))
except Exception as e:
    why = f"{type(e).__name__}: {e}"
    cause = e.__cause__ or e.__context__
    if cause is not None:
        why += f" (from {type(cause).__name__}: {cause})"
    print(json.dumps({"error": why}))
"""


def _snapshot(hf_hub_download, hf_key: str, revision: Optional[str], **kw) -> str:
    """Each file of :data:`FILES` through ``hf_hub_download``, model.safetensors first; returns
    their snapshot directory."""
    paths = [hf_hub_download(hf_key, name, revision=revision, **kw) for name in FILES]
    return os.path.dirname(paths[0])
