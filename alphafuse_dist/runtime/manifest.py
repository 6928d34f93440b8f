"""Stage directories with manifests: atomic outputs, skip-if-unchanged, nothing half-written.

A stage writes everything into a fresh hidden temporary folder inside the run directory, ends by
writing ``manifest.json`` there, and only then the folder is renamed to ``<run_dir>/<stage>``.
A stage killed midway leaves only a ``.<stage>.tmp-*`` folder, which no later stage reads and the
next run removes. A rerun whose manifest matches (same config hash, input fingerprints and code
fingerprint of the stage's source, :func:`code_fingerprint`) skips the stage, once its files are
checked against the manifest (:func:`stage_problem`).

The manifest records each output file's size, modification time and blake2b hash, and carries its
own digest (``manifest_digest``). A reused stage whose manifest was edited, or whose files were
removed, added, resized or rewritten, is reported naming the file and run again; a stage read by a
later one (:func:`require_stage`) is refused the same way. The hash is read only when a file's
size and modification time are not the recorded ones, so an unchanged stage costs a ``stat`` per file.

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
from ..errors import AlphaFuseError, FileSystemError, filesystem_error

MANIFEST = "manifest.json"

_log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one; a file-system
    error (no space, no permission) is a FileSystemError naming it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named by the file meant, not its temporary (a full disk names no file at all)
        if filesystem_error(e, path) is None:
            raise
        raise FileSystemError(f"{path}: {e.strerror}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, 64 hex digits."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_blake2b(path: str | Path) -> str:
    """The 128-bit blake2b of a file's bytes, 32 hex digits: the manifest's content hash (hashlib's,
    streamed: xxhash is not a dependency, and blake2b hashes about 1 GB/s, small next to any stage)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


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


def _visible_files(folder: Path) -> list[str]:
    """The stage's files, relative and sorted: everything but the manifest and hidden names."""
    rels = (f.relative_to(folder) for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST)
    return sorted(r.as_posix() for r in rels if not any(part.startswith(".") for part in r.parts))


def _file_records(folder: Path) -> dict[str, dict]:
    """``{relative path: {"bytes", "mtime_ns", "blake2b"}}`` of a stage folder's files."""
    records = {}
    for rel in _visible_files(folder):
        st = (folder / rel).stat()
        records[rel] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "blake2b": file_blake2b(folder / rel)}
    return records


def _body_digest(body: dict) -> str:
    """sha256 (16 hex digits) of a manifest's content without its own ``manifest_digest``."""
    blob = json.dumps({k: v for k, v in body.items() if k != "manifest_digest"}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stage_problem(stage_dir: Path, manifest: dict) -> str | None:
    """What in ``stage_dir`` no longer matches its ``manifest``, naming the file; None when all does.

    The manifest must carry its own digest and list the files; each listed file must exist with the
    recorded size and, when its modification time differs from the recorded one, the recorded
    blake2b; no other (visible) file may be there."""
    stage_dir = Path(stage_dir)
    if manifest.get("manifest_digest") != _body_digest(manifest):
        return f"{stage_dir / MANIFEST} was edited (its content does not match its manifest_digest)"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return f"{stage_dir / MANIFEST} lists no output files"
    for rel, rec in files.items():
        path = stage_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        st = path.stat()
        if st.st_size != rec.get("bytes"):
            return f"{path} has {st.st_size} bytes, the manifest records {rec.get('bytes')}"
        if st.st_mtime_ns != rec.get("mtime_ns") and file_blake2b(path) != rec.get("blake2b"):
            return f"{path} was changed (its blake2b differs from the manifest's)"
    extra = [rel for rel in _visible_files(stage_dir) if rel not in files]
    if extra:
        return f"{stage_dir / extra[0]} is not an output of the stage (not in its manifest)"
    return None


def read_manifest(stage_dir: Path) -> dict | None:
    m = Path(stage_dir) / MANIFEST
    if not m.is_file():
        return None
    try:
        body = json.loads(m.read_bytes())
    except (OSError, ValueError):  # UnicodeDecodeError included
        return None
    return body if isinstance(body, dict) else None


def require_stage(run_dir: Path, stage: str, verify: bool = True) -> Path:
    """The folder of a finished stage; an error if the stage never completed or, with ``verify``,
    if its files no longer match its manifest (:func:`stage_problem`)."""
    d = Path(run_dir) / stage
    manifest = read_manifest(d)
    if manifest is None:
        raise AlphaFuseError(f"stage '{stage}' has no manifest in {d}: run it first (alphafuse run ... )")
    if verify and (problem := stage_problem(d, manifest)) is not None:
        raise AlphaFuseError(f"stage '{stage}' no longer matches its manifest: {problem}; run it again "
                             f"(alphafuse run ... --force {stage_kind(stage)})")
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


def up_to_date(final: Path, *, config_hash: str, inputs: dict[str, str], kind: str | None = None) -> bool:
    """Whether the finished stage folder ``final`` may be reused: its manifest's ``config_hash``,
    ``inputs`` and ``code_version`` (the :func:`code_fingerprint` of ``kind``, default
    :func:`stage_kind` of the folder's name) are those given and its files match it. A folder that
    matches but whose files do not is reported (a warning naming the file)."""
    final = Path(final)
    old = read_manifest(final)
    if not (old and old.get("config_hash") == config_hash and old.get("inputs") == inputs
            and old.get("code_version") == code_fingerprint(kind or stage_kind(final.name))):
        return False
    problem = stage_problem(final, old)
    if problem is not None:
        _log.warning(f"[{final.name}] output changed since it was written: {problem}; running the stage again")
        return False
    return True


def make_run_dir(run_dir: Path) -> Path:
    """Create the run directory (and its parents); a FileSystemError naming it when it is a file or
    cannot be created."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileSystemError(f"run_dir {run_dir}: is a file, not a folder; choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        where = f": {e.filename}" if e.filename and str(e.filename) != str(run_dir) else ""
        raise FileSystemError(f"run_dir {run_dir}: cannot be created ({e.strerror}{where})") from None
    return run_dir


def run_stage(run_dir: Path, stage: str, *, config_hash: str, inputs: dict[str, str],
              build: Callable[[Path], dict], force: bool = False, kind: str | None = None) -> Path:
    """Run ``build(tmp_dir)`` unless the stage is :func:`up_to_date`; return the stage folder.

    ``force`` runs the stage regardless. Only a stage folder (one holding a ``manifest.json``) or an
    empty folder is replaced; anything else at the stage's path is refused, never deleted.
    ``build`` writes its outputs into ``tmp_dir`` and returns a dict for the manifest (put row
    counts under ``"rows"``). On any exception the temporary
    folder is removed and nothing of the stage is left behind (a previous complete output, if any,
    stays untouched); a file-system error (no space, no permission) becomes a FileSystemError
    naming its file, or else the stage's temporary folder.
    """
    run_dir = make_run_dir(run_dir)
    final = run_dir / stage
    if not force and up_to_date(final, config_hash=config_hash, inputs=inputs, kind=kind or stage_kind(stage)):
        _log.info(f"[{stage}] up to date (manifest {final / MANIFEST}), skipped")
        return final
    if final.exists() and not (final.is_dir() and ((final / MANIFEST).is_file() or not any(final.iterdir()))):
        # only a stage folder (or an empty one) is ever replaced: nothing a user put there is lost
        raise FileSystemError(f"{final}: exists and is not a stage folder (no {MANIFEST}); it is not replaced: move "
                              "it away or choose another path")
    code_version = code_fingerprint(kind or stage_kind(stage))
    tmp = run_dir / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
    trash = None
    t0 = time.time()
    try:
        tmp.mkdir()
        info = build(tmp) or {}
        body = {"stage": stage, "config_hash": config_hash, "inputs": inputs, "code_version": code_version,
                "package_version": __version__, "seconds": round(time.time() - t0, 3),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info, "files": _file_records(tmp)}
        outputs = {rel: [rec["bytes"], rec["blake2b"]] for rel, rec in body["files"].items()}
        body["digest"] = hashlib.sha256(json.dumps({k: body[k] for k in ("config_hash", "inputs", "stage")}
                                                   | {"outputs": outputs}, sort_keys=True).encode()).hexdigest()[:16]
        body = json.loads(json.dumps(body, default=str))  # as it is read back: its digest covers that
        body["manifest_digest"] = _body_digest(body)
        atomic_write_json(tmp / MANIFEST, body)
        # swap in: the old output (if any) is moved aside first so the final name never points at a
        # half-written folder
        trash = run_dir / f".{stage}.tmp-old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not final.exists():
            os.replace(trash, final)  # the swap failed half-way: the previous output goes back
        fs = filesystem_error(e, tmp)
        if fs is not None:
            raise FileSystemError(f"stage '{stage}' not written: {fs}") from None
        raise
    _log.info(f"[{stage}] done in {time.time() - t0:.1f}s -> {final}")
    return final


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
