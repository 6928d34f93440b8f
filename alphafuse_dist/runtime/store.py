"""A run directory on an object store (``run_dir=s3://bucket/prefix``, ``gs://...``, ``hdfs://...``):
the stages run in a local mirror folder (``config.run_mirror``: ``<cache folder>/runs/<hash of the
URI>``) and each stage folder is synchronised with the store through pyarrow's file systems.

Before a run, the stage folders it reads that the store holds with a manifest are fetched and
checked against that manifest, so an up-to-date stage is skipped as with a local run_dir. After a
stage finishes, its folder is uploaded with the manifest last, so a reader never sees a manifest
without its files (the object store's counterpart of the local stage's atomic rename). The store
is the reference: a mirror's stage folder whose manifest differs from the store's is replaced.
Ray Train keeps its checkpoints under ``<run_dir>/.ray-train`` on the store itself
(:meth:`RunStore.ray_storage`), so a rerun on any machine resumes from them.

Credentials, region and endpoint come from the store's usual settings (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL``, ...) or from the URI's query (``s3://b/run?endpoint_override=127.0.0.1:9000&scheme=http``).
The run_dir lock holds on the mirror, i.e. on one machine: an object store has no lock, so two
machines must not run on one URI at once.

Example::

    store = RunStore("s3://my-bucket/runs/quickstart")
    store.pull(["prepare"])     # the store's finished prepare stage, into store.local
    store.push("prepare")       # the mirror's prepare stage, to the store
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from ..config import is_uri, run_mirror
from ..errors import ConfigError, FileSystemError, one_line
from .manifest import MANIFEST, make_run_dir, stage_problem

_log = logging.getLogger(__name__)


class RunStore:
    """The run directory ``uri`` on its object store and its local mirror (``local``).

    Raises:
        ConfigError: naming ``key`` (``run_dir``, ``--run``) when the store cannot be reached, its
            bucket does not exist or the URI names a file.
    """

    def __init__(self, uri: str, key: str = "run_dir"):
        import pyarrow as pa
        import pyarrow.fs as pa_fs

        self.uri, self.key, self.local = uri, key, run_mirror(uri)
        self.name = uri.split("?", 1)[0].rstrip("/")  # shown in messages: the query may hold secrets
        try:
            self.fs, root = pa_fs.FileSystem.from_uri(uri)
            self.root = root.rstrip("/")
            bucket = self.fs.get_file_info(self.root.split("/", 1)[0])
            info = self.fs.get_file_info(self.root)
        except (OSError, pa.ArrowException) as e:
            raise ConfigError(f"{key}={self.name}: cannot be reached ({_first_line(e)})") from None
        if bucket.type == pa_fs.FileType.NotFound:
            raise ConfigError(f"{key}={self.name}: bucket '{bucket.path}' does not exist; create it or choose "
                              f"another {key}")
        if info.type == pa_fs.FileType.File:
            raise ConfigError(f"{key}={self.name}: is a file, not a folder; choose another {key}")

    def ray_storage(self) -> tuple[str, object]:
        """(storage_path, storage_filesystem) of Ray Train's runs: ``<run_dir>/.ray-train`` on the store."""
        return f"{self.root}/.ray-train", self.fs

    def pull(self, stages: Iterable[str] | None = None) -> Path:
        """Fetch the store's finished stage folders ``stages`` (default: all) whose manifest differs
        from the mirror's; return the mirror. A folder whose files do not match its manifest (an
        upload cut short and then overwritten, an edited object) is left out with a warning: the
        stage runs again as a local stage whose files changed."""
        import pyarrow.fs as pa_fs

        make_run_dir(self.local)
        if stages is None:
            listing = self._do("list", lambda: self.fs.get_file_info(pa_fs.FileSelector(self.root, allow_not_found=True)))
            stages = sorted(i.base_name for i in listing
                            if i.type == pa_fs.FileType.Directory and not i.base_name.startswith("."))
        for stage in stages:
            remote = self._read_manifest(stage)
            mine = self.local / stage / MANIFEST
            if remote is not None and not (mine.is_file() and mine.read_bytes() == remote):
                self._fetch(stage, remote)
        return self.local

    def push(self, stage: str) -> None:
        """Upload the mirror's finished stage folder unless the store holds this very manifest: the
        store's old manifest is deleted first, then its files are replaced, the manifest written last."""
        import pyarrow.fs as pa_fs

        folder, remote = self.local / stage, f"{self.root}/{stage}"
        body = (folder / MANIFEST).read_bytes()
        if self._read_manifest(stage) == body:
            return
        local = pa_fs.LocalFileSystem()

        def upload() -> None:
            if self.fs.get_file_info(f"{remote}/{MANIFEST}").type == pa_fs.FileType.File:
                self.fs.delete_file(f"{remote}/{MANIFEST}")  # no reader may pair it with the new files
            self.fs.delete_dir_contents(remote, missing_dir_ok=True)
            for rel in json.loads(body)["files"]:
                pa_fs.copy_files(str(folder / rel), f"{remote}/{rel}", source_filesystem=local,
                                 destination_filesystem=self.fs)
            with self.fs.open_output_stream(f"{remote}/{MANIFEST}") as out:
                out.write(body)

        self._do(f"upload stage '{stage}'", upload)
        _log.info(f"[{stage}] uploaded to {self.name}/{stage}")

    def put(self, rel: str) -> str:
        """Upload the mirror's file or folder ``rel`` (a comparison's results, its report) as it is;
        its address on the store."""
        import pyarrow.fs as pa_fs

        self._do(f"upload {rel}", lambda: pa_fs.copy_files(str(self.local / rel), f"{self.root}/{rel}",
                                                             source_filesystem=pa_fs.LocalFileSystem(),
                                                             destination_filesystem=self.fs))
        return f"{self.name}/{rel}"

    def _fetch(self, stage: str, body: bytes) -> None:
        import pyarrow.fs as pa_fs

        tmp = self.local / f".{stage}.tmp-pull-{uuid.uuid4().hex[:8]}"
        old = self.local / f".{stage}.tmp-old-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()  # copy_files writes into an existing folder
            self._do(f"fetch stage '{stage}'", lambda: pa_fs.copy_files(
                f"{self.root}/{stage}", str(tmp), source_filesystem=self.fs,
                destination_filesystem=pa_fs.LocalFileSystem()))
            (tmp / MANIFEST).write_bytes(body)  # the manifest read first: the files are checked against it
            try:
                manifest = json.loads(body)
            except ValueError:
                manifest = {}
            problem = stage_problem(tmp, manifest) if isinstance(manifest, dict) else "not a JSON object"
            if problem is not None:
                _log.warning(f"[{stage}] {self.name}/{stage} does not match its manifest, not fetched: "
                             f"{problem.replace(str(tmp), f'{self.name}/{stage}')}")
                return
            for rel, rec in manifest["files"].items():  # checked above: later checks need only a stat
                os.utime(tmp / rel, ns=(rec["mtime_ns"], rec["mtime_ns"]))
            final = self.local / stage
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            _log.info(f"[{stage}] fetched from {self.name}/{stage}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)

    def _read_manifest(self, stage: str) -> bytes | None:
        """The store's ``<stage>/manifest.json``, None when there is none (never finished)."""
        import pyarrow.fs as pa_fs

        path = f"{self.root}/{stage}/{MANIFEST}"

        def read() -> bytes | None:
            if self.fs.get_file_info(path).type != pa_fs.FileType.File:
                return None
            with self.fs.open_input_stream(path) as f:
                return f.read()

        return self._do(f"read {stage}/{MANIFEST}", read)

    def _do(self, action: str, call):
        import pyarrow as pa

        try:
            return call()
        except (OSError, pa.ArrowException) as e:
            raise FileSystemError(f"{self.key}={self.name}: cannot {action} ({_first_line(e)})") from None


def local_run(path: str, key: str = "--run") -> str:
    """``path`` itself, or for an object-store URI its mirror with every finished stage fetched."""
    return str(RunStore(path, key).pull()) if is_uri(path) else path


def _first_line(error: Exception) -> str:
    text = one_line(str(error))
    return text[:300] if text else type(error).__name__
