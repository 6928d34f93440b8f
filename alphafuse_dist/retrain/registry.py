"""The run registry: every retrained run with its data window and metrics, and the promoted one.

A registry is a folder (the root) holding

- ``registry.json``: ``{"format_version": 1, "runs": [entry, ...]}`` in registration order; an
  entry is ``{"run_id", "run_dir", "data_window", "metrics", "parent", "extra", "registered_at",
  "promotions": [{"promoted_at", "reason", "previous"}, ...]}``. ``run_dir`` is stored relative to
  the root when it lies inside it (the registry can be moved with its runs), else absolute.
- ``LATEST``: ``{"run_id", "run_dir", "promoted_at", "reason"}``, the run serving should use
  (its :attr:`RunEntry.serving_dir`: the model it deployed).
- ``.registry.lock``: taken with ``fcntl.flock`` by every writer.

Both files are only ever replaced whole (``os.replace`` of a fully written, fsynced temporary), so a
reader sees the old or the new content, never a mix, and needs no lock. Writers (``register``,
``promote``) hold the lock for their read-modify-write, so two processes promoting at once both
land. ``LATEST`` is the truth for "which run serves": ``promote`` records the promotion in
``registry.json`` first, then replaces ``LATEST``; if that replace fails, the registry is rewritten
to what it was and the error raised, so the previous pointer stays valid and the history does not
claim a promotion that did not happen (only a kill between the two replaces can leave such a
record, with ``LATEST`` still on the previous run).

Whether to promote is decided in :mod:`.decision` (``decide_promotion``).

Example::

    registry = Registry("runs/registry")
    registry.register("2026-11-27", "runs/registry/2026-11-27", data_window={"start": ..., "end": ...},
                      metrics={"NDCG@10": 0.101}, parent="2026-11-20")
    incumbent = registry.latest()
    registry.promote("2026-11-27", "promote: candidate NDCG@10 0.101 vs incumbent 0.100")
    previous_dir = resolve_previous("runs/registry")   # or a run directory itself
"""
from __future__ import annotations

import contextlib
import fcntl
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import AlphaFuseError, DataError
from ..runtime.manifest import atomic_write_json, require_stage

REGISTRY_FILE = "registry.json"
LATEST_FILE = "LATEST"
LOCK_FILE = ".registry.lock"
FORMAT_VERSION = 1
_ENTRY_KEYS = ("run_id", "run_dir", "data_window", "metrics", "parent", "extra", "registered_at", "promotions")
# what makes two registrations of one run_id the same run (times are not part of it)
_IDENTITY_KEYS = ("run_dir", "data_window", "metrics", "parent", "extra")


@dataclass(frozen=True)
class RunEntry:
    """One registered run.

    Attributes:
        run_id: unique name of the run in the registry.
        run_dir: the run directory, absolute.
        data_window: the data the run was trained on, e.g. ``{"start": ..., "end": ...}``.
        metrics: its evaluation results (any JSON), e.g. ``{"NDCG@10": 0.1}``.
        parent: the run it was warm-started from, or None.
        extra: anything else (config hash, code version, basis facts...).
        registered_at: ISO 8601 UTC time of the first registration.
        promotions: ``[{"promoted_at", "reason", "previous"}]``, oldest first; ``previous`` is the
            run_id LATEST pointed at before (None for the first promotion).
    """

    run_id: str
    run_dir: Path
    data_window: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    parent: str | None = None
    extra: dict = field(default_factory=dict)
    registered_at: str = ""
    promotions: list = field(default_factory=list)

    @property
    def serving_dir(self) -> Path:
        """The folder of the model the run deployed (``extra["deployed"]["dir"]`` under
        ``run_dir``: what ``export`` and ``recommend`` of the registry read), else ``run_dir``."""
        deployed = self.extra.get("deployed") if isinstance(self.extra, dict) else None
        name = deployed.get("dir") if isinstance(deployed, dict) else None
        return self.run_dir / name if isinstance(name, str) and name and "/" not in name and name != ".." \
            else self.run_dir


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays, torch tensors
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _canonical(obj: Any, what: str) -> Any:
    """``obj`` as it reads back from JSON (numpy numbers to Python ones), or a ValueError naming it."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"registry: {what} must be JSON serialisable: {e}") from None


class Registry:
    """The runs of one retraining lineage, kept in a root folder (module docstring).

    Args:
        root: the registry folder; created on the first write.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.file = self.root / REGISTRY_FILE
        self.latest_file = self.root / LATEST_FILE

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    @staticmethod
    def is_registry(path: str | Path) -> bool:
        """Whether ``path`` is a folder holding ``registry.json`` or ``LATEST``."""
        path = Path(path)
        return (path / REGISTRY_FILE).is_file() or (path / LATEST_FILE).is_file()

    # -- reading ---------------------------------------------------------------------------------

    def _read(self) -> list[dict]:
        """The raw entries; [] without a registry file."""
        if not self.file.is_file():
            return []
        try:
            body = json.loads(self.file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"not a readable registry ({e}); restore it from a backup or move it away",
                            file=self.file) from None
        if not isinstance(body, dict) or body.get("format_version") != FORMAT_VERSION \
                or not isinstance(body.get("runs"), list):
            raise DataError(f"expected {{\"format_version\": {FORMAT_VERSION}, \"runs\": [...]}}, got "
                            f"format_version {body.get('format_version') if isinstance(body, dict) else None!r}",
                            file=self.file)
        for i, entry in enumerate(body["runs"]):
            if not isinstance(entry, dict) or any(k not in entry for k in _ENTRY_KEYS):
                missing = [k for k in _ENTRY_KEYS if not isinstance(entry, dict) or k not in entry]
                raise DataError(f"run entry {i} lacks {missing}", file=self.file)
        return body["runs"]

    def _entry(self, raw: dict) -> RunEntry:
        return RunEntry(raw["run_id"], self.root / raw["run_dir"], raw["data_window"], raw["metrics"],
                        raw["parent"], raw["extra"], raw["registered_at"], list(raw["promotions"]))

    def runs(self) -> list[RunEntry]:
        """Every registered run, in registration order."""
        return [self._entry(raw) for raw in self._read()]

    def __contains__(self, run_id: str) -> bool:
        return any(raw["run_id"] == run_id for raw in self._read())

    def get(self, run_id: str) -> RunEntry:
        """The entry of ``run_id``.

        Raises:
            DataError: naming the registry file, when ``run_id`` is not registered.
        """
        return self._entry(self._find(self._read(), run_id))

    def _find(self, runs: list[dict], run_id: str) -> dict:
        for raw in runs:
            if raw["run_id"] == run_id:
                return raw
        known = ", ".join(repr(r["run_id"]) for r in runs[-5:]) or "none"
        raise DataError(f"run {run_id!r} is not registered (latest registered: {known})", file=self.file)

    def _read_pointer(self) -> dict | None:
        if not self.latest_file.is_file():
            return None
        try:
            pointer = json.loads(self.latest_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"not a readable pointer ({e}); promote a run again to rewrite it",
                            file=self.latest_file) from None
        if not isinstance(pointer, dict) or not isinstance(pointer.get("run_id"), str):
            raise DataError("expected {\"run_id\": ..., \"run_dir\": ..., \"promoted_at\": ...}; promote a run "
                            "again to rewrite it", file=self.latest_file)
        return pointer

    def latest(self) -> RunEntry | None:
        """The promoted run (``LATEST``), or None when nothing was promoted yet.

        Raises:
            DataError: naming ``LATEST`` when it is unreadable, names a run the registry does not
                hold, or a run directory that no longer exists; naming ``registry.json`` when that
                is unreadable.
        """
        pointer = self._read_pointer()
        if pointer is None:
            return None
        runs = self._read()
        raw = next((r for r in runs if r["run_id"] == pointer["run_id"]), None)
        if raw is None:
            raise DataError(f"points to run {pointer['run_id']!r}, which {self.file} does not hold",
                            file=self.latest_file)
        entry = self._entry(raw)
        if not entry.run_dir.is_dir():
            raise DataError(f"points to run {entry.run_id!r} whose directory {entry.run_dir} does not exist",
                            file=self.latest_file)
        return entry

    # -- writing ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive writer lock (``flock``: released by the OS if the holder dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, runs: list[dict]) -> None:
        atomic_write_json(self.file, {"format_version": FORMAT_VERSION, "runs": runs})

    def _stored_dir(self, run_dir: Path) -> str:
        run_dir = Path(run_dir).absolute()
        try:
            return str(run_dir.relative_to(self.root))
        except ValueError:
            return str(run_dir)

    def register(self, run_id: str, run_dir: str | Path, data_window: Mapping | None = None,
                 metrics: Mapping | None = None, parent: str | None = None,
                 extra: Mapping | None = None) -> RunEntry:
        """Add a run; registering the same run_id again with the same content is a no-op.

        Args:
            run_id: unique, non-empty, no whitespace.
            run_dir: an existing run directory.
            data_window, metrics, extra: JSON-serialisable mappings (numpy numbers are converted).
            parent: the run_id it was warm-started from (it need not be registered: the previous
                run may have been given as a directory).

        Returns:
            The entry as stored (the existing one for a repeated registration).

        Raises:
            DataError: ``run_dir`` does not exist; ``run_id`` is registered with other content
                (naming the registry file and the differing fields); the registry is unreadable.
            ValueError: a bad run_id or non-serialisable content.
        """
        if not isinstance(run_id, str) or not run_id or run_id != "".join(run_id.split()):
            raise ValueError(f"registry: run_id {run_id!r} must be a non-empty string without whitespace")
        if parent is not None and not isinstance(parent, str):
            raise ValueError(f"registry: parent {parent!r} must be a run_id string or None")
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise DataError("is not a directory; register a run after it was written", file=run_dir)
        new = {"run_id": run_id, "run_dir": self._stored_dir(run_dir),
               "data_window": _canonical(dict(data_window or {}), "data_window"),
               "metrics": _canonical(dict(metrics or {}), "metrics"), "parent": parent,
               "extra": _canonical(dict(extra or {}), "extra")}
        with self._locked():
            runs = self._read()
            old = next((r for r in runs if r["run_id"] == run_id), None)
            if old is not None:
                differ = [k for k in _IDENTITY_KEYS if json.dumps(old[k], sort_keys=True) != json.dumps(new[k],
                                                                                                    sort_keys=True)]
                if differ:
                    raise DataError(f"run {run_id!r} is already registered with other {', '.join(differ)}; "
                                    "register the new run under another run_id", file=self.file)
                return self._entry(old)
            raw = {**new, "registered_at": _now(), "promotions": []}
            self._write(runs + [raw])
        return self._entry(raw)

    def promote(self, run_id: str, reason: str) -> RunEntry:
        """Point ``LATEST`` at ``run_id`` and record the promotion (time, reason, previous run).

        Returns:
            The promoted run's entry, with the new promotion record last.

        Raises:
            DataError: ``run_id`` not registered, or its directory gone; the registry unreadable.
            OSError: the pointer could not be replaced (the registry is restored; LATEST unchanged).
        """
        with self._locked():
            runs = self._read()
            raw = self._find(runs, run_id)
            run_dir = self.root / raw["run_dir"]
            if not run_dir.is_dir():
                raise DataError(f"run {run_id!r} cannot be promoted: its directory {run_dir} does not exist",
                                file=self.file)
            try:
                pointer = self._read_pointer()
            except DataError:
                pointer = None  # a damaged pointer is what promoting repairs
            record = {"promoted_at": _now(), "reason": str(reason),
                      "previous": pointer["run_id"] if pointer else None}
            before = json.loads(json.dumps(runs))
            raw["promotions"] = list(raw["promotions"]) + [record]
            self._write(runs)
            try:
                atomic_write_json(self.latest_file, {"run_id": run_id, "run_dir": raw["run_dir"],
                                                     "promoted_at": record["promoted_at"], "reason": record["reason"]})
            except BaseException:
                self._write(before)
                raise
        return self._entry(raw)


def resolve_previous(path_or_registry: str | Path | Registry, *, required_stages: tuple[str, ...] = ()) -> Path:
    """The previous run's directory, from a run directory, a registry root, its ``LATEST`` file, or
    a :class:`Registry` (the promoted run).

    Args:
        path_or_registry: what the user passed as the previous run.
        required_stages: stages that must have finished in that run (e.g. ``("decompose",
            "train")``): their manifests are checked.

    Returns:
        The run directory, absolute.

    Raises:
        DataError: the path does not exist; a registry with nothing promoted or a broken pointer.
        AlphaFuseError: a required stage has no manifest (the run is incomplete).
    """
    if isinstance(path_or_registry, Registry):
        registry = path_or_registry
    else:
        path = Path(path_or_registry)
        if not path.exists():
            raise DataError("does not exist; expected a previous run directory or a registry folder", file=path)
        if path.is_file() and path.name == LATEST_FILE:
            registry = Registry(path.parent)
        elif path.is_dir() and Registry.is_registry(path):
            registry = Registry(path)
        elif path.is_dir():
            registry = None
            run_dir = path.absolute()
        else:
            raise DataError(f"is a file; expected a previous run directory, a registry folder or its {LATEST_FILE}",
                            file=path)
    if registry is not None:
        entry = registry.latest()
        if entry is None:
            raise DataError("no run was promoted in this registry yet; pass a run directory instead",
                            file=registry.latest_file)
        run_dir = entry.run_dir
    for stage in required_stages:
        try:
            require_stage(run_dir, stage, verify=False)  # complete; what is read from it is checked there
        except AlphaFuseError as e:
            raise AlphaFuseError(f"previous run {run_dir} is incomplete: {e}") from None
    return run_dir
