"""Resumable, checksum-verified downloads of data files.

A download streams into ``<dest>.partial`` next to the destination; an interrupted one leaves that
file behind and the next call continues it with an HTTP ``Range`` request (a server that ignores
``Range`` answers with the whole file, and the download starts over). Only a file whose sha256
matches is renamed to ``dest``, atomically, so ``dest`` is either absent or complete and verified.

Only ``https://`` addresses are fetched (plain ``http://`` only from a loopback address: a local
mirror or a test server), redirects may not leave https, and a download stops at ``max_bytes``.
A local file is given as a plain path: it is copied the same way, checksum first.

Named data sets (:data:`DATASETS`, ``alphafuse download NAME --to DIR``) pin every file's address
and sha256; ``--from`` takes the same files from a local folder or another https address.

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
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------- named data sets

@dataclass(frozen=True)
class DataFile:
    """One file of a named data set: where it is published and its sha256."""

    url: str
    sha256: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[1]


@dataclass(frozen=True)
class DataSet:
    """A public data set that ``alphafuse download NAME`` fetches into one folder.

    Attributes:
        about: what it is, where the copy comes from, and its licence terms.
        source: the ``data.source`` that reads the folder.
        files: every file, pinned by sha256 (a Git LFS object's id is the sha256 of its content).
    """

    about: str
    source: str
    files: tuple[DataFile, ...]


_COWPIREC = ("https://raw.githubusercontent.com/ysh-1998/CoWPiRec/"
             "db47560c2364650d22afc77080717287daec5079/dataset/Scientific")
_RECBOLE_SAE = ("https://media.githubusercontent.com/media/parepic/RecBole_SAE/"
                "cebc1fa9eed33dcf9af27b7d3fe4b4a2121ad0e1/dataset/Amazon_Beauty")
_LRD = ("https://raw.githubusercontent.com/ysh-1998/LRD/"
        "ccbd8299c71bb0d26488d67b622706caf9139e21/data/Office")
# Amazon review data (McAuley lab) may be used for research but not redistributed: these copies are
# downloaded by each user, never shipped or committed.
DATASETS: dict[str, DataSet] = {
    "amazon-scientific": DataSet(
        "Amazon 2018 'Industrial and Scientific' in UniSRec's layout (8,442 users, 4,385 items with "
        "title + categories + brand text, 59,384 interactions), from the CoWPiRec repository",
        "unisrec",
        (DataFile(f"{_COWPIREC}/Scientific.test.inter",
                  "546da7e5f44002b4518d7fd58066684bc09613f76c240914e16976d57cfe7083"),
         DataFile(f"{_COWPIREC}/Scientific.item2index",
                  "896ab1017508cf20834d3d0537da9f8f624324223a835af272a98ba16f8c087a"),
         DataFile(f"{_COWPIREC}/Scientific.text",
                  "95887e6bda76e54f59b71b566320520d5da74e21d3b6ff8f20bfb6e8e84aa831"))),
    "amazon-office": DataSet(
        "Amazon 2014 'Office Products' 5-core in ReChorus' layout (4,905 users, 2,420 items with title "
        "+ category + brand text, 53,258 interactions; each user's last two in dev.csv / test.csv), "
        "from the LRD repository",
        "rechorus",
        (DataFile(f"{_LRD}/train.csv", "015236e98589dac0801be8fe16519d95735b2efbd64bec890685297a1bc69fec"),
         DataFile(f"{_LRD}/dev.csv", "f94b18e4be2f7322905b7fd152bce78e4d554cb7561426fab6855e7df07790a0"),
         DataFile(f"{_LRD}/test.csv", "5b5fb42bf500ca344d565461706cdb548ebf21b371f3f871d517d8c967e63ed6"),
         DataFile(f"{_LRD}/Office.item2index",
                  "4a1d4bb829f89ce23f7f8e6637238a2f9049ca28fed4e73840b36fdba479a046"),
         DataFile(f"{_LRD}/Office.text", "34932e3a6cd6b6d9e999608b309cfa5c6811084dc8be77a18ae89de50da7f862"))),
    "amazon-beauty": DataSet(
        "Amazon 2014 'Beauty' as RecBole atomic files (every rating of the release, with title, "
        "categories, brand; the presets keep the 5-core), Git LFS objects of the RecBole_SAE repository",
        "recbole",
        (DataFile(f"{_RECBOLE_SAE}/Amazon_Beauty.inter",
                  "2e24b454c4b17675b4bb697ba17d60c1de3de2fd6ec98fbae3e980cbb8e2aa9a"),
         DataFile(f"{_RECBOLE_SAE}/Amazon_Beauty.item",
                  "a8d3f2a09c8842e07f118c67817bb84df815329f5289f791888b2fa71b7d982c"))),
}


def download_dataset(name: str, folder: Path, *, mirror: str | None = None, progress: bool = True,
                     catalogue: dict[str, DataSet] | None = None) -> list[Path]:
    """Every file of the named data set into ``folder`` (each verified by its pinned sha256, see
    :func:`download`); returns their paths.

    Args:
        name: a key of ``catalogue`` (default :data:`DATASETS`).
        folder: destination; the files keep their published names.
        mirror: a local folder or an https address holding the same file names, used instead of
            the published addresses (a machine without internet access: copy the files there first).

    Raises:
        DataError: an unknown name (the known ones listed), or any error of :func:`download`.
    """
    catalogue = DATASETS if catalogue is None else catalogue
    if name not in catalogue:
        raise DataError(f"no data set named {name!r}: known ones are {', '.join(sorted(catalogue))} "
                        "(or give an https:// address with --sha256)")
    out = []
    for f in catalogue[name].files:
        url = f.url if mirror is None else (str(Path(mirror) / f.name) if "://" not in mirror
                                             else f"{mirror.rstrip('/')}/{f.name}")
        out.append(download(url, Path(folder) / f.name, f.sha256, progress=progress))
    return out
