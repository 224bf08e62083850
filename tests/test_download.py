"""scripts/download_checkpoint.py against a local HTTP server: resume, Range quirks, verification, CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download_checkpoint.py"
PAYLOAD = random.Random(1234).randbytes(3 * 1024 * 1024 + 17)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
CUT = 1024 * 1024 + 123  # bytes sent before a "cut" response drops the connection


def _load_script():
    spec = importlib.util.spec_from_file_location("download_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    return module


dl = _load_script()


class _Server(ThreadingHTTPServer):
    """Serves PAYLOAD at /file with optional Range support and cut connections; records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.honour_range = True
        self.cut_first = False  # the first /file response stops after CUT bytes
        self.cut_always = False  # every /file response stops after CUT bytes
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.lock = threading.Lock()

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skip HTTPServer's reverse-DNS lookup of the host
        self.server_name, self.server_port = self.server_address[:2]

    def url(self, path: str = "/file") -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"

    def file_requests(self) -> list[str | None]:
        """Range headers of the requests for /file, in order."""
        with self.lock:
            return [header for path, header in self.requests if path == "/file"]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""

    def do_GET(self) -> None:
        server = self.server
        range_header = self.headers.get("Range")
        with server.lock:
            server.requests.append((self.path, range_header))
            first = sum(path == "/file" for path, _ in server.requests) == 1
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/file")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path != "/file":
            self.send_error(404)
            return
        start = 0
        if range_header is not None and server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(PAYLOAD):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if server.cut_always or (server.cut_first and first):
            body = body[:CUT]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _download(server: _Server, dest: Path, path: str = "/file", **kwargs: object) -> Path:
    kwargs = {"timeout": 5.0, "retries": 3, "backoff": 0.0, "progress": False, **kwargs}
    return dl.download(server.url(path), dest, **kwargs)


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_plain_download_checks_sha256(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "model.ckpt"
    assert _download(server, dest, sha256=PAYLOAD_SHA256.upper()) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not dl.part_path(dest).exists()
    assert server.file_requests() == [None]


def test_resume_after_cut_connection(server: _Server, tmp_path: Path) -> None:
    server.cut_first = True
    dest = tmp_path / "model.ckpt"
    _download(server, dest, sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.file_requests() == [None, f"bytes={CUT}-"]


def test_resume_part_left_by_earlier_run_through_redirect(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    dl.part_path(dest).write_bytes(PAYLOAD[:12345])
    _download(server, dest, path="/redirect", sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == [("/redirect", "bytes=12345-"), ("/file", "bytes=12345-")]


def test_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path) -> None:
    server.honour_range = False
    server.cut_first = True
    dest = tmp_path / "model.ckpt"
    _download(server, dest, sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.file_requests() == [None, f"bytes={CUT}-"]


def test_complete_part_answered_416_is_finished(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    dl.part_path(dest).write_bytes(PAYLOAD)
    _download(server, dest, sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.file_requests() == [f"bytes={len(PAYLOAD)}-"]


def test_oversized_part_answered_416_starts_over(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    dl.part_path(dest).write_bytes(PAYLOAD + b"junk")
    _download(server, dest, sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.file_requests() == [f"bytes={len(PAYLOAD) + 4}-", None]


def test_retries_exhausted_keeps_part_for_resume(server: _Server, tmp_path: Path) -> None:
    server.cut_always = True
    dest = tmp_path / "model.ckpt"
    with pytest.raises(dl.DownloadError, match=re.escape(server.url())):
        _download(server, dest, retries=1)
    assert not dest.exists()
    assert dl.part_path(dest).read_bytes() == PAYLOAD[: 2 * CUT]
    server.cut_always = False
    _download(server, dest, sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == PAYLOAD
    assert server.file_requests() == [None, f"bytes={CUT}-", f"bytes={2 * CUT}-"]


def test_wrong_sha256_leaves_no_file(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    with pytest.raises(dl.VerificationError, match="sha256"):
        _download(server, dest, sha256="0" * 64)
    assert not dest.exists()
    assert not dl.part_path(dest).exists()


def test_wrong_size_leaves_no_file(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    with pytest.raises(dl.VerificationError, match="bytes instead of"):
        _download(server, dest, expected_size=len(PAYLOAD) + 1)
    assert not dest.exists()
    assert not dl.part_path(dest).exists()


def test_forced_download_failing_sha256_keeps_old_output(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    dest.write_bytes(b"old")
    with pytest.raises(dl.VerificationError):
        _download(server, dest, sha256="1" * 64, force=True)
    assert dest.read_bytes() == b"old"


def test_existing_output_needs_force(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    dest.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--force"):
        _download(server, dest)
    with pytest.raises(FileExistsError, match="--force"):
        _download(server, dest, sha256=PAYLOAD_SHA256)
    assert dest.read_bytes() == b"old"
    assert server.requests == []
    _download(server, dest, force=True)
    assert dest.read_bytes() == PAYLOAD


def test_existing_output_with_matching_sha256_is_kept(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "model.ckpt"
    dest.write_bytes(PAYLOAD)
    assert _download(server, dest, sha256=PAYLOAD_SHA256) == dest
    assert server.requests == []


def test_http_404_names_url_and_is_not_retried(server: _Server, tmp_path: Path) -> None:
    url = server.url("/missing.ckpt")
    with pytest.raises(dl.DownloadError, match=rf"HTTP 404 .*{re.escape(url)}"):
        dl.download(url, tmp_path / "model.ckpt", retries=3, backoff=0.0, progress=False)
    assert server.requests == [("/missing.ckpt", None)]


def test_bad_sha256_argument_is_rejected() -> None:
    with pytest.raises(ValueError, match="abc"):
        dl.parse_sha256("abc")


def test_known_sources_default_outputs() -> None:
    root = SCRIPT.parents[1]
    outputs = {name: dl.default_output(source.url).relative_to(root) for name, source in dl.SOURCES.items()}
    assert outputs == {
        "berkeley": Path("models/instruct-pix2pix/instruct-pix2pix-00-22000.ckpt"),
        "huggingface": Path("models/instruct-pix2pix/instruct-pix2pix-00-22000.safetensors"),
    }


def test_cli_download_then_refuse_then_accept(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "models" / "x.ckpt"
    args = ("--url", server.url(), "--output", str(dest), "--timeout", "5")
    done = _run_cli(*args, "--sha256", PAYLOAD_SHA256, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert dest.read_bytes() == PAYLOAD
    assert f"sha256 verified: {PAYLOAD_SHA256}" in done.stderr
    refused = _run_cli(*args, cwd=tmp_path)
    assert refused.returncode == dl.EXIT_EXISTS
    assert "--force" in refused.stderr and str(dest) in refused.stderr
    accepted = _run_cli(*args, "--sha256", PAYLOAD_SHA256, cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    assert "already there" in accepted.stdout
    assert server.file_requests() == [None]


def test_cli_404_exits_non_zero_naming_url(server: _Server, tmp_path: Path) -> None:
    url = server.url("/missing.ckpt")
    done = _run_cli("--url", url, "--output", str(tmp_path / "m.ckpt"), cwd=tmp_path)
    assert done.returncode == dl.EXIT_FAILED
    assert "HTTP 404" in done.stderr and url in done.stderr
    assert not (tmp_path / "m.ckpt").exists()
