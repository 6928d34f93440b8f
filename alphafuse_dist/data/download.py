"""Resumable, checksum-verified downloads of data files.

A download streams into ``<dest>.partial`` next to the destination; an interrupted one leaves that
file behind and the next call continues it with an HTTP ``Range`` request (a server that ignores
``Range`` answers with the whole file, and the download starts over). Only a file whose sha256
matches is renamed to ``dest``, atomically, so ``dest`` is either absent or complete and verified.

Only ``https://`` addresses are fetched (plain ``http://`` only from a loopback address: a local
mirror or a test server), redirects may not leave https, and a download stops at ``max_bytes``.
A local file is given as a plain path: it is copied the same way, checksum first.

Example::

    download("https://example.org/reviews_Beauty_5.json.gz", Path("data/reviews_Beauty_5.json.gz"),
             sha256=DIGEST_PUBLISHED_WITH_THE_FILE)
"""
from __future__ import annotations

import hashlib
import http.client
import ipaddress
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..errors import DataError
from ..runtime.manifest import file_sha256

# seconds without a byte from the server before a download is abandoned (and can be resumed)
_TIMEOUT_S = 60
# seconds between two progress lines
_PROGRESS_EVERY_S = 0.5
# the default cap on a download's size: far above any public recommendation data set's file
MAX_BYTES = 64 << 30


def download(url: str, dest: Path, sha256: str, *, chunk: int = 1 << 20, progress: bool = True,
             max_bytes: int = MAX_BYTES) -> Path:
    """Download ``url`` to ``dest`` unless ``dest`` already has the expected sha256; returns ``dest``.

    Args:
        url: an ``https://`` address (``http://`` only on a loopback host), or a local file's path.
        dest: the final path; its folder is created. The download goes to ``<dest>.partial`` first.
        sha256: the expected digest, 64 hex digits (case-insensitive).
        chunk: bytes read and written per step.
        progress: print bytes, rate and ETA to stderr about twice a second.
        max_bytes: a larger download (by its announced length or by what arrives) is refused.

    Raises:
        DataError: the digest is malformed; the source is not https, a loopback http address or a
            local file, or is larger than ``max_bytes`` (nothing is kept); the server fails or the connection breaks (the partial
            file is kept for the next call to resume); or the downloaded bytes have another sha256
            (the partial file is deleted, as resuming it could never succeed).
    """
    dest = Path(dest)
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise DataError(f"sha256 {sha256!r} is not a sha256 digest: expected 64 hexadecimal digits")
    local = _check_source(url)
    if dest.is_file() and file_sha256(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    try:
        if local is not None:
            if local.stat().st_size > max_bytes:
                raise DataError(f"{local}: {local.stat().st_size} bytes, over the limit of {max_bytes} (--max-size)")
            shutil.copyfile(local, partial)
            digest = file_sha256(partial)
        else:
            digest = _fetch(url, partial, chunk, progress, max_bytes)
    except DataError:  # over max_bytes: what arrived can never be completed
        partial.unlink(missing_ok=True)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", None) or e
        kept = f"; {partial} is kept and the next call resumes it" if partial.is_file() else ""
        raise DataError(f"download of {url} failed ({type(e).__name__}: {reason}){kept}") from None
    if digest != expected:
        partial.unlink()
        raise DataError(f"checksum mismatch for {url}: expected sha256 {expected}, got {digest}; the "
                        "download was deleted", file=dest)
    os.replace(partial, dest)
    return dest


def _check_source(url: str) -> Path | None:
    """The local file that ``url`` names, or None for an allowed web address; DataError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "" or (len(parts.scheme) == 1 and Path(url).exists()):  # a path (C:\ on Windows)
        path = Path(url)
        if not path.is_file():
            raise DataError(f"{url}: no such file (a source is an https:// address or a local file's path)")
        return path
    if not _allowed(url):
        raise DataError(f"{url}: only https:// addresses are downloaded (http:// only from a loopback host); "
                        "give a local file as a plain path")
    return None


def _allowed(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        return True
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to https, or from loopback http to loopback http: an https server
    can never send the client to a local plain-http service."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = urllib.parse.urlsplit(newurl).scheme
        from_loopback = urllib.parse.urlsplit(req.full_url).scheme == "http"
        if not (target == "https" or (from_loopback and _allowed(newurl))):
            raise urllib.error.URLError(f"refused a redirect to {newurl!r} (only https:// is followed)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameSchemeRedirects)


def _fetch(url: str, partial: Path, chunk: int, progress: bool, max_bytes: int) -> str:
    """Complete ``partial`` from ``url`` (resuming it when the server honours Range); its sha256."""
    offset = partial.stat().st_size if partial.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = _OPENER.open(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        # 416 Range Not Satisfiable: the partial file already holds every byte; the digest decides
        e.close()
        return file_sha256(partial)
    with response:
        resumed = response.status == 206
        if resumed and _range_start(response) != offset:
            raise http.client.HTTPException(f"asked for bytes {offset}- but the server sent "
                                            f"{response.headers.get('Content-Range')!r}")
        if not resumed:
            offset = 0  # a fresh download, or a server that ignores Range and sends everything
        digest = hashlib.sha256()
        if resumed:
            _hash_into(digest, partial, chunk)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        if total is not None and total > max_bytes:
            raise DataError(f"{url}: {total} bytes, over the limit of {max_bytes} (--max-size)")
        meter = _Progress(offset, total) if progress else None
        received = offset
        with open(partial, "ab" if resumed else "wb") as out:
            while block := response.read(chunk):
                out.write(block)
                digest.update(block)
                received += len(block)
                if received > max_bytes:
                    raise DataError(f"{url}: more than {max_bytes} bytes arrived, over the limit (--max-size)")
                if meter:
                    meter.update(received)
            out.flush()
            os.fsync(out.fileno())
        if meter:
            meter.finish(received)
        if total is not None and received != total:
            raise http.client.HTTPException(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _range_start(response) -> int | None:
    """The first byte position of a 206 response's ``Content-Range: bytes START-END/TOTAL``."""
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _hash_into(digest, path: Path, chunk: int) -> None:
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)


class _Progress:
    """One self-overwriting stderr line: bytes so far (of the total), rate of this call, ETA."""

    def __init__(self, start: int, total: int | None):
        self.start, self.total = start, total
        self.began = self.shown = time.monotonic()

    def update(self, received: int) -> None:
        now = time.monotonic()
        if now - self.shown >= _PROGRESS_EVERY_S:
            self.shown = now
            print(f"\r{self._line(received, now)}", end="", file=sys.stderr, flush=True)

    def finish(self, received: int) -> None:
        print(f"\r{self._line(received, time.monotonic())}", file=sys.stderr, flush=True)

    def _line(self, received: int, now: float) -> str:
        rate = (received - self.start) / max(now - self.began, 1e-9)
        done = _size(received) + (f" / {_size(self.total)}" if self.total else "")
        if self.total and rate > 0:
            eta = f"ETA {max(self.total - received, 0) / rate:.0f}s"
        else:
            eta = "ETA ?"
        return f"{done}  {_size(rate)}/s  {eta}"


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    power = 0
    while n >= 1024 and power < len(units) - 1:
        n, power = n / 1024, power + 1
    return f"{n:.1f} {units[power]}" if power else f"{n:.0f} B"
