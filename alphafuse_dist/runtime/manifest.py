"""Stage directories with manifests: atomic outputs, skip-if-unchanged, nothing half-written.

A stage writes everything into a fresh hidden temporary folder inside the run directory, ends by
writing ``manifest.json`` there, and only then the folder is renamed to ``<run_dir>/<stage>``.
A stage killed midway leaves only a ``.<stage>.tmp-*`` folder, which no later stage reads and the
next run removes. A rerun whose manifest matches (same config hash, input fingerprints and code
fingerprint of the stage's source, :func:`code_fingerprint`) skips the stage.

Example::

    out = run_stage(run_dir, "prepare", config_hash="ab12", inputs={"ratings": fingerprint_path(p)},
                    build=lambda tmp: {"rows": {"items": write_items(tmp)}})
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import AlphaFuseError

MANIFEST = "manifest.json"

_log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, 64 hex digits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint_path(path: str | Path, hash_limit: int = 64 << 20) -> str:
    """Content fingerprint of a file or folder: sha256 of files up to ``hash_limit`` bytes, else
    (size, mtime) of larger ones. Hidden files (temporaries) are ignored."""
    path = Path(path)
    if not path.exists():
        raise AlphaFuseError(f"input {path}: does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                  if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if st.st_size <= hash_limit:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# The package source each stage kind's output depends on (folders or files relative to the package):
# a stage reruns when any of them changes. Whole folders rather than exact import closures: a
# comment edit may rerun a stage needlessly, but no helper module a stage reads is missed. A stage
# kind not listed here (the part of its name before the first "-") depends on the whole package.
STAGE_SOURCES: dict[str, tuple[str, ...]] = {
    "prepare": ("data",),
    "embed": ("embed",),
    "decompose": ("decompose",),
    "train": ("train", "model", "data/sequences.py", "runtime/seeding.py"),
    "evaluate": ("evaluate", "model"),
    "export": ("serve", "model"),
}

_PACKAGE = Path(__file__).resolve().parent.parent


def stage_kind(stage: str) -> str:
    """``train-alphafuse-s1`` -> ``train``: the key of :data:`STAGE_SOURCES`."""
    return stage.split("-", 1)[0]


def code_fingerprint(kind: str) -> str:
    """The :func:`source_fingerprint` of the source the stage kind's output depends on
    (:data:`STAGE_SOURCES`): the manifest's ``code_version``."""
    return source_fingerprint(*STAGE_SOURCES.get(kind, (".",)))


@functools.lru_cache(maxsize=None)
def source_fingerprint(*sources: str) -> str:
    """sha256 (16 hex digits) of the package version and of the ``.py`` files of ``sources``
    (folders or files relative to the package), by path and content."""
    h = hashlib.sha256(__version__.encode())
    for rel in sources:
        root = _PACKAGE / rel
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            h.update(f.relative_to(_PACKAGE).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def stage_identity(kind: str, config_hash: str, inputs: dict[str, str]) -> str:
    """One hash (16 hex digits) of everything a stage's output depends on: its config hash, its
    inputs' digests and its code fingerprint. Resumable state outside the stage folder (the Ray
    Train run) is keyed by it, so that it is never resumed under another identity."""
    blob = json.dumps({"config_hash": config_hash, "inputs": inputs, "code": code_fingerprint(kind)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_manifest(stage_dir: Path) -> dict | None:
    m = Path(stage_dir) / MANIFEST
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def require_stage(run_dir: Path, stage: str) -> Path:
    """The folder of a finished stage; an error if the stage never completed."""
    d = Path(run_dir) / stage
    if read_manifest(d) is None:
        raise AlphaFuseError(f"stage '{stage}' has no manifest in {d}: run it first (alphafuse run ... )")
    return d


def stage_digest(run_dir: Path, stage: str) -> str:
    """Fingerprint of a finished stage (its manifest's digest), used as a downstream input."""
    return read_manifest(require_stage(run_dir, stage))["digest"]


def clean_temporaries(run_dir: Path) -> None:
    """Remove leftovers of killed stages."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for p in run_dir.glob(".*.tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run_stage(run_dir: Path, stage: str, *, config_hash: str, inputs: dict[str, str],
              build: Callable[[Path], dict], force: bool = False, kind: str | None = None) -> Path:
    """Run ``build(tmp_dir)`` unless the stage's manifest already matches; return the stage folder.

    The manifest matches when its ``config_hash``, ``inputs`` and ``code_version`` (the
    :func:`code_fingerprint` of ``kind``, default :func:`stage_kind` of ``stage``) are those given;
    ``force`` runs the stage regardless.

    ``build`` writes its outputs into ``tmp_dir`` and returns a dict for the manifest (put row
    counts under ``"rows"``). On any exception the temporary folder is removed and nothing of the
    stage is left behind (a previous complete output, if any, stays untouched).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / stage
    old = read_manifest(final)
    code_version = code_fingerprint(kind or stage_kind(stage))
    if not force and old and old.get("config_hash") == config_hash and old.get("inputs") == inputs \
            and old.get("code_version") == code_version:
        _log.info(f"[{stage}] up to date (manifest {final / MANIFEST}), skipped")
        return final
    tmp = run_dir / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    trash = None
    tmp.mkdir()
    t0 = time.time()
    try:
        info = build(tmp) or {}
        body = {"stage": stage, "config_hash": config_hash, "inputs": inputs, "code_version": code_version,
                "package_version": __version__, "seconds": round(time.time() - t0, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **info}
        body["digest"] = hashlib.sha256(json.dumps({k: body[k] for k in ("config_hash", "inputs", "stage")}
                                                   | {"outputs": _outputs_digest(tmp)},
                                                   sort_keys=True).encode()).hexdigest()[:16]
        atomic_write_json(tmp / MANIFEST, body)
        # swap in: the old output (if any) is moved aside first so the final name never points at a
        # half-written folder
        trash = run_dir / f".{stage}.tmp-old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not final.exists():
            os.replace(trash, final)  # the swap failed half-way: the previous output goes back
        raise
    _log.info(f"[{stage}] done in {time.time() - t0:.1f}s -> {final}")
    return final


def _outputs_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(folder)}:{st.st_size}".encode())
        if st.st_size <= 16 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str):
    """Hold an advisory ``flock`` on ``path`` for the block; ``AlphaFuseError(busy)`` at once if
    another process holds it (the lock goes with the process, so a killed holder frees it)."""
    import fcntl

    try:  # O_NOFOLLOW: a symlink planted at the lock's path is refused, not followed and truncated
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        kind = "is a symbolic link" if path.is_symlink() else f"cannot be opened ({e.strerror})"
        raise AlphaFuseError(f"lock file {path} {kind}; remove it or choose another folder") from None
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlphaFuseError(busy) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_dir_lock(run_dir: Path):
    """One pipeline per run directory at a time: a second one would delete the first one's
    temporary stage folders as leftovers."""
    return exclusive_lock(run_dir / ".lock", f"run_dir {run_dir}: another alphafuse run is using it; wait for it "
                                             "or choose another run_dir")
