"""Resumable downloads against a real HTTP server on 127.0.0.1 that implements Range itself."""
from __future__ import annotations

import hashlib
import random
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.data.download import download
from alphafuse_dist.errors import DataError

PAYLOAD = random.Random(0).randbytes(4 << 20)  # 4 MiB
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
CUT = 1_500_000  # bytes sent before the server drops an interrupted response


@dataclass
class ServerState:
    """What the handler serves and how, and a log of ``(Range header, status, body bytes sent)``."""

    honour_range: bool = True
    cut_after: list[int] = field(default_factory=list)  # per response, in order: send only this many
    requests: list[tuple[str | None, int, int]] = field(default_factory=list)


class Handler(BaseHTTPRequestHandler):
    """Serves ``PAYLOAD`` at any path but ``*/missing`` (404); answers ``Range: bytes=N-`` with 206
    unless told to ignore it. Each request is logged before it is answered: the client may look at
    the log as soon as it has the bytes."""

    def do_GET(self):
        state: ServerState = self.server.state
        if self.path.endswith("/missing"):
            state.requests.append((self.headers.get("Range"), 404, 0))
            self.send_error(404)
            return
        wanted = self.headers.get("Range")
        start, status = 0, 200
        if wanted and state.honour_range:
            start, status = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1)), 206
            if start >= len(PAYLOAD):
                state.requests.append((wanted, 416, 0))
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(PAYLOAD)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = PAYLOAD[start:]
        # an interrupted transfer: fewer bytes than Content-Length, then the connection closes
        sent = body[: state.cut_after.pop(0)] if state.cut_after else body
        state.requests.append((wanted, status, len(sent)))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.end_headers()
        self.wfile.write(sent)

    def log_message(self, *args):
        pass  # keep the test output clean


class QuietServer(ThreadingHTTPServer):
    """A test server that does not print a traceback when a client hangs up mid-answer (a refused
    download closes the connection early; the printout would land in the test's captured stderr)."""

    def handle_error(self, request, client_address):
        pass


@pytest.fixture
def server():
    """``(url, state)`` of a fresh threaded HTTP server on 127.0.0.1, shut down after the test."""
    httpd = QuietServer(("127.0.0.1", 0), Handler)
    httpd.state = ServerState()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/data/file.bin", httpd.state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_full_download_with_progress(server, tmp_path, capsys):
    url, state = server
    dest = tmp_path / "sub" / "file.bin"
    assert download(url, dest, DIGEST.upper(), chunk=1 << 16) == dest
    assert dest.read_bytes() == PAYLOAD
    assert list(tmp_path.joinpath("sub").iterdir()) == [dest]  # no .partial left
    assert state.requests == [(None, 200, len(PAYLOAD))]
    assert re.search(r"4\.0 MiB / 4\.0 MiB  [\d.]+ [KMG]?i?B/s  ETA 0s\n$", capsys.readouterr().err)
    download(url, dest, DIGEST, progress=False)  # already there and verified: no request
    assert len(state.requests) == 1


def test_resume_after_interrupted_transfer(server, tmp_path):
    url, state = server
    dest = tmp_path / "file.bin"
    partial = tmp_path / "file.bin.partial"
    state.cut_after = [CUT]
    with pytest.raises(DataError, match=re.escape(f"download of {url} failed (HTTPException: connection closed "
                                                  f"after {CUT} of {len(PAYLOAD)} bytes)")) as e:
        download(url, dest, DIGEST, progress=False)
    assert f"{partial} is kept and the next call resumes it" in str(e.value)
    assert partial.read_bytes() == PAYLOAD[:CUT] and not dest.exists()
    download(url, dest, DIGEST, progress=False)
    assert dest.read_bytes() == PAYLOAD and not partial.exists()
    # the second request asked for the rest only, and the server sent just that
    assert state.requests == [(None, 200, CUT), (f"bytes={CUT}-", 206, len(PAYLOAD) - CUT)]


def test_partial_already_complete(server, tmp_path):
    url, state = server
    (tmp_path / "file.bin.partial").write_bytes(PAYLOAD)
    download(url, tmp_path / "file.bin", DIGEST, progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD
    assert state.requests == [(f"bytes={len(PAYLOAD)}-", 416, 0)]  # nothing left to send


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, state = server
    dest = tmp_path / "file.bin"
    wrong = "0" * 64
    (tmp_path / "file.bin.partial").write_bytes(b"stale bytes from another file")
    with pytest.raises(DataError) as e:
        download(url, dest, wrong, progress=False)
    actual = hashlib.sha256(b"stale bytes from another file" + PAYLOAD[29:]).hexdigest()
    assert str(e.value) == (f"file {dest}: checksum mismatch for {url}: expected sha256 {wrong}, got {actual}; "
                            "the download was deleted")
    assert list(tmp_path.iterdir()) == []


def test_server_ignoring_range_restarts(server, tmp_path):
    url, state = server
    state.honour_range = False
    partial = tmp_path / "file.bin.partial"
    partial.write_bytes(b"x" * CUT)  # not a prefix of the payload: appending to it would be wrong
    download(url, tmp_path / "file.bin", DIGEST, progress=False)
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD and not partial.exists()
    assert state.requests == [(f"bytes={CUT}-", 200, len(PAYLOAD))]


def test_bad_digest_and_unreachable_server(tmp_path):
    with pytest.raises(DataError, match=r"sha256 'abc' is not a sha256 digest: expected 64 hexadecimal digits"):
        download("http://127.0.0.1:9/x", tmp_path / "x", "abc")
    with pytest.raises(DataError, match=r"^download of http://127\.0\.0\.1:9/x failed \(URLError: .*\)$"):
        download("http://127.0.0.1:9/x", tmp_path / "x", DIGEST, progress=False)  # nothing to resume later


def test_http_error(server, tmp_path):
    url, state = server
    with pytest.raises(DataError) as e:
        download(url.replace("file.bin", "missing"), tmp_path / "file.bin", DIGEST, progress=False)
    assert str(e.value) == f"download of {url.replace('file.bin', 'missing')} failed (HTTPError: Not Found)"
    assert list(tmp_path.iterdir()) == [] and state.requests == [(None, 404, 0)]


def test_cli_download(server, tmp_path, capsys):
    url, _ = server
    dest = tmp_path / "file.bin"
    assert main(["download", url, "--sha256", "0" * 64, "--to", str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"alphafuse: error: file {dest}: checksum mismatch for {url}") and err.count("\n") == 1
    assert main(["download", url, "--sha256", DIGEST, "--to", str(dest)]) == 0
    assert capsys.readouterr().out == f"{dest}\n" and dest.read_bytes() == PAYLOAD


class Redirect(BaseHTTPRequestHandler):
    """Answers every GET with a 302 to the address in ``server.target``."""

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.org/x.csv", "http://example.org/x.csv",
                                 "gopher://127.0.0.1/x"])
def test_only_https_or_loopback_http_is_fetched(url, tmp_path):
    with pytest.raises(DataError, match=r"only https:// addresses are downloaded .*give a local file as a plain path$"):
        download(url, tmp_path / "x", DIGEST, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_redirect_away_from_https_is_refused(tmp_path):
    httpd = QuietServer(("127.0.0.1", 0), Redirect)
    httpd.target = "file:///etc/passwd"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/x"
    try:
        for target in ("file:///etc/passwd", "http://example.org/x"):
            httpd.target = target
            # urllib itself refuses file: targets; ours refuses http to a non-loopback host
            with pytest.raises(DataError, match=rf"(?i)redirect\w* to (url )?{re.escape(repr(target))}"):
                download(url, tmp_path / "x", DIGEST, progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()
    assert list(tmp_path.iterdir()) == []


def test_size_cap_by_announced_length_and_by_bytes(server, tmp_path):
    url, state = server
    with pytest.raises(DataError, match=re.escape(f"{url}: {len(PAYLOAD)} bytes, over the limit of 1000 (--max-size)")):
        download(url, tmp_path / "file.bin", DIGEST, progress=False, max_bytes=1000)
    assert list(tmp_path.iterdir()) == []
    # a resumed download counts what is already on disk
    (tmp_path / "file.bin.partial").write_bytes(PAYLOAD[:CUT])
    with pytest.raises(DataError, match=r"over the limit of 2000000 \(--max-size\)$"):
        download(url, tmp_path / "file.bin", DIGEST, progress=False, max_bytes=2_000_000)
    assert list(tmp_path.iterdir()) == []


def test_local_file_is_copied_and_verified(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "out" / "file.bin"
    assert download(str(source), dest, DIGEST) == dest and dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]
    with pytest.raises(DataError, match=r"checksum mismatch"):
        download(str(source), tmp_path / "other.bin", "0" * 64)
    assert not (tmp_path / "other.bin").exists() and not (tmp_path / "other.bin.partial").exists()
    with pytest.raises(DataError, match=r"no such file \(a source is an https:// address or a local file's path\)$"):
        download(str(tmp_path / "absent.bin"), tmp_path / "x", DIGEST)


def test_cli_max_size(server, tmp_path, capsys):
    url, _ = server
    assert main(["download", url, "--sha256", DIGEST, "--to", str(tmp_path / "f"), "--max-size", "1M"]) == 2
    assert capsys.readouterr().err == (f"alphafuse: error: {url}: {len(PAYLOAD)} bytes, over the limit of "
                                       f"{1 << 20} (--max-size)\n")
    with pytest.raises(SystemExit):
        main(["download", url, "--sha256", DIGEST, "--to", str(tmp_path / "f"), "--max-size", "lots"])
    assert "'lots' is not a size" in capsys.readouterr().err


def test_an_https_redirect_to_loopback_http_is_refused():
    """The handler itself: from https, only https is followed (no request forgery to local services)."""
    import urllib.request

    from alphafuse_dist.data.download import _OPENER

    handler = next(h for h in _OPENER.handlers if isinstance(h, urllib.request.HTTPRedirectHandler))
    req = urllib.request.Request("https://example.org/data.csv")
    with pytest.raises(Exception, match=re.escape("refused a redirect to 'http://127.0.0.1:8080/admin'")):
        handler.redirect_request(req, None, 302, "Found", {}, "http://127.0.0.1:8080/admin")
    assert handler.redirect_request(req, None, 302, "Found", {}, "https://mirror.example.org/data.csv") is not None
