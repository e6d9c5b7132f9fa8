"""Hub weights on first use, through ``mulo.torch``: a loopback server (``http.server`` in a
thread, 127.0.0.1, an ephemeral port) speaks the part of the Hub's HTTP API ``huggingface_hub``
uses for the fixture meta-network, with ``HF_ENDPOINT`` pointing at it and a temporary
``HF_HOME``. Each use runs in a fresh interpreter, because ``huggingface_hub`` reads its
variables when it is imported (as a user's process does).

First use downloads; the second works with the server gone and ``HF_HUB_OFFLINE=1``; a missing
repository, a truncated file and a server that never answers each give a clear error and leave
the cache as it was.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")

WEIGHTS = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "golden" / "weights"
REPO = "mulo-test/fixture"
COMMIT = "2222222222222222222222222222222222222222"
#: Requests one server answers at most: a client in a loop fails the test instead of hanging.
MAX_REQUESTS = 40


def fixture_files():
    return {f: (WEIGHTS / f).read_bytes() for f in ("model.safetensors", "config.json")}


class Hub:
    """A loopback Hub serving ``repos`` ({key: {file: bytes}}) at ``COMMIT``; ``mode`` is
    ``"normal"``, ``"truncate"`` (half of each file body, then the connection closes) or
    ``"hang"`` (requests are read and never answered)."""

    def __init__(self, repos, mode="normal"):
        self.repos, self.mode, self.log = repos, mode, []
        self.release = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.answer(body=False)

            def do_GET(self):
                self.answer(body=True)

            def send(self, status, headers, payload):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Connection", "close")
                self.end_headers()
                if payload:
                    try:
                        self.wfile.write(payload)
                        self.wfile.flush()
                    except OSError:
                        pass
                self.close_connection = True

            def answer(self, body):
                hub.log.append((self.command, self.path, self.headers.get("authorization")))
                if len(hub.log) > MAX_REQUESTS:
                    self.send(500, {"Content-Length": "0"}, b"")
                    return
                if hub.mode == "hang":
                    hub.release.wait(30)
                    return
                path = self.path.split("?")[0]
                missing = json.dumps({"error": "Repository not found"}).encode()
                not_found = {
                    "X-Error-Code": "RepositoryNotFound",
                    "Content-Type": "application/json",
                    "Content-Length": str(len(missing)),
                }
                if path.startswith("/api/models/"):
                    rest = path[len("/api/models/"):]
                    repo = rest.split("/revision/")[0].split("/tree/")[0]
                    if repo not in hub.repos:
                        self.send(404, not_found, missing if body else b"")
                        return
                    files = hub.repos[repo]
                    if "/tree/" in rest:  # the file listing (a page without a next link)
                        listing = [
                            {"type": "file", "path": f, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                            for f, d in files.items()
                        ]
                    else:  # the repository's revision info
                        listing = {
                            "id": repo,
                            "modelId": repo,
                            "sha": COMMIT,
                            "siblings": [{"rfilename": f} for f in files],
                        }
                    info = json.dumps(listing).encode()
                    headers = {"Content-Type": "application/json", "Content-Length": str(len(info))}
                    self.send(200, headers, info if body else b"")
                    return
                repo, _, rest = path.lstrip("/").partition("/resolve/")
                _rev, _, name = rest.partition("/")
                data = hub.repos.get(repo, {}).get(name)
                if data is None:
                    self.send(404, not_found, missing if body else b"")
                    return
                etag = hashlib.sha256(data).hexdigest()
                headers = {
                    "X-Repo-Commit": COMMIT,
                    "ETag": f'"{etag}"',
                    "Accept-Ranges": "bytes",
                    "Content-Length": str(len(data)),
                }
                payload = data
                rng = self.headers.get("range")
                status = 200
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[len("bytes="):].partition("-")
                    a, b = int(a), (int(b) if b else len(data) - 1)
                    payload = data[a : b + 1]
                    headers["Content-Length"] = str(len(payload))
                    headers["Content-Range"] = f"bytes {a}-{a + len(payload) - 1}/{len(data)}"
                    status = 206
                if not body:
                    self.send(status, headers, b"")
                    return
                if hub.mode == "truncate" and len(payload) > 1:
                    payload = payload[: len(payload) // 2]
                self.send(status, headers, payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


LOAD = r"""
import sys
key = None if sys.argv[1] == "-" else sys.argv[1]
if sys.argv[2] == "torch":  # the optimizer's own path, as a user's code takes it
    import torch
    from mulo.torch import AdafacLO
    kw = {} if key is None else {"hf_key": key}
    lopt = AdafacLO([torch.nn.Parameter(torch.zeros(3))], **kw).lopt
else:  # the native loader, which resolves a Hub key the same way (no torch: slow to import)
    from mulo import LearnedOptimizer
    from mulo.hub import DEFAULT_HF_KEY
    lopt = LearnedOptimizer.load(key or DEFAULT_HF_KEY)
print("FINGERPRINT", lopt.fingerprint)
"""


def load(home, endpoint, key=REPO, via="light", **env):
    """Loads ``key`` (None: the default) in a fresh interpreter, through ``AdafacLO(...,
    hf_key=key)`` when ``via`` is ``"torch"``; returns (rc, stdout, stderr, seconds)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1")
    e.update(HF_HUB_ETAG_TIMEOUT="20", HF_HUB_DOWNLOAD_TIMEOUT="20")
    e.update(env)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", LOAD, key if key else "-", via],
        env=e,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return out.returncode, out.stdout, out.stderr, time.monotonic() - start


def tree(root):
    """Every path under ``root`` with the bytes of files (links read through)."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes() if os.path.exists(p) else b"dangling"
    return out


def fixture_fingerprint():
    from mulo import LearnedOptimizer

    return LearnedOptimizer.load(str(WEIGHTS)).fingerprint


def test_first_use_downloads_then_the_cache_serves_offline(tmp_path):
    hub = Hub({REPO: fixture_files(), "btherien/mulo": fixture_files()})
    try:
        rc, out, err, _ = load(tmp_path, hub.url, via="torch", HF_TOKEN="tok-2")
        assert rc == 0, err
        assert f"FINGERPRINT {fixture_fingerprint()}" in out
        snap = tmp_path / "hub" / "models--mulo-test--fixture" / "snapshots" / COMMIT
        for name, data in fixture_files().items():
            assert (snap / name).read_bytes() == data, name
        assert (tmp_path / "hub/models--mulo-test--fixture/refs/main").read_text() == COMMIT
        assert hub.log and all(auth == "Bearer tok-2" for _, _, auth in hub.log), hub.log
        # The default hf_key, btherien/mulo, downloads the same way (not the demo).
        rc, out, err, _ = load(tmp_path, hub.url, key=None, via="torch")
        assert rc == 0, err
        assert f"FINGERPRINT {fixture_fingerprint()}" in out
    finally:
        hub.close()
    before = tree(tmp_path / "hub")
    for key in (REPO, None):
        rc, out, err, _ = load(tmp_path, "http://127.0.0.1:9", key=key, HF_HUB_OFFLINE="1")
        assert rc == 0, err
        assert f"FINGERPRINT {fixture_fingerprint()}" in out
    # Not offline either: the cache comes first, no request leaves.
    rc, out, err, _ = load(tmp_path, "http://127.0.0.1:9")
    assert rc == 0, err
    assert tree(tmp_path / "hub") == before
    # Offline with nothing cached: a clear error that speaks Python.
    rc, out, err, _ = load(
        tmp_path, "http://127.0.0.1:9", key="mulo-test/other", via="torch", HF_HUB_OFFLINE="1"
    )
    assert rc != 0
    assert "hf_key='mulo-test/other'" in err and "HF_HUB_OFFLINE" in err, err
    assert "--weights" not in err, err
    # The same through mulo.LearnedOptimizer.load itself.
    rc, out, err, _ = load(tmp_path, "http://127.0.0.1:9", key="mulo-test/other", HF_HUB_OFFLINE="1")
    assert rc != 0
    assert "hf_key='mulo-test/other'" in err and "HF_HUB_OFFLINE" in err, err
    assert "--weights" not in err, err


def failure_leaves_the_cache_as_it_was(tmp_path, mode, repos, expect):
    good = Hub({"btherien/mulo": fixture_files()})
    try:
        rc, _, err, _ = load(tmp_path, good.url, key=None)
        assert rc == 0, err
    finally:
        good.close()
    before = tree(tmp_path / "hub")
    hub = Hub(repos, mode)
    try:
        rc, out, err, secs = load(
            tmp_path, hub.url, HF_HUB_ETAG_TIMEOUT="1", HF_HUB_DOWNLOAD_TIMEOUT="1"
        )
        requests = list(hub.log)
    finally:
        hub.close()
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc != 0, out
    for word in [f"hf_key={REPO!r}", "the cache is as it was", *expect]:
        assert word in last, f"{word!r} not in {last!r}"
    assert secs < 90, secs  # the limit is 4 s; the rest is starting interpreters on a busy machine
    assert len(requests) <= 20, requests
    assert tree(tmp_path / "hub") == before
    rc, out, err, _ = load(tmp_path, "http://127.0.0.1:9", key=None, HF_HUB_OFFLINE="1")
    assert rc == 0, err


def test_a_missing_repository_is_a_clear_error(tmp_path):
    failure_leaves_the_cache_as_it_was(tmp_path, "normal", {}, ["404 Not Found"])


def test_a_truncated_file_is_a_clear_error(tmp_path):
    failure_leaves_the_cache_as_it_was(tmp_path, "truncate", {REPO: fixture_files()}, [])


def test_a_server_that_never_answers_times_out(tmp_path):
    failure_leaves_the_cache_as_it_was(tmp_path, "hang", {REPO: fixture_files()}, ["no complete answer within 4 s"])


def test_bad_hf_keys_speak_python():
    from mulo.hub import local_weights

    with pytest.raises(ValueError, match=r"hf_key='no/such/path'.*not a Hub key"):
        local_weights("no/such/path")
    assert local_weights("demo") == "demo"
    assert local_weights(str(WEIGHTS)) == str(WEIGHTS)
