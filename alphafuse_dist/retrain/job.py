"""``alphafuse retrain``: the next period's model from the last one, registered, promoted only if not worse.

One call = one period::

    out = retrain("runs/registry", "data/interactions.parquet", "data/items.parquet",
                  promote_tolerance=0.002)
    out["promoted"], out["reason"], out["run_dir"]

What it does, in order (nothing in the registry changes before step 5, and ``LATEST`` only in 6):

1. **Previous run**: ``previous`` is a run directory or a registry root (its ``LATEST``; see
   :func:`~.registry.resolve_previous`), or None for the first period (a full train from
   ``config``). It must be complete (``prepare``, the stages its method reads, a finished
   ``train-<method>-s<seed>`` with ``config.json``) and written by this major code version.
2. **Inputs**: the interaction (and item) files are read through the previous run's data source
   and column names (``data.path`` / ``data.items_path``: an append-only log or a full snapshot,
   the current data either way). A changed schema (missing or renamed columns, template columns
   gone) is a :class:`DataError` before anything is written. The period ends at ``period_end``
   (default: the newest interaction + 1 s), which must be later than the previous run's end and
   every other registered run's end (a time window that goes backwards is an error).
3. **Config** of the period = the previous run's ``config.json`` (``config`` for a first run) +
   the retrain settings + ``overrides`` (applied last, so they win): ``run_dir =
   <root>/runs/<run id>``, ``data.id_map = <prev>/prepare`` (stable ids), ``data.split = time``
   with ``data.split_times = [t1, t2]``: test = the newest period ``[t2, period_end)`` with
   ``t2`` = the previous period's end, valid = ``[t1, t2)`` with ``t1`` = the previous run's t2
   (its test period, which its model never trained on), train = before t1 (within
   ``data.train_window_days`` if set); ``embed.cache_dir = <root>/embed-cache`` (shared by every
   period: only new or changed texts are encoded); ``decompose.reuse_basis = <prev>/decompose``;
   ``train.warm_start = <prev>/train-<method>-s<seed>``; for alphafuse ``train.cold_items =
   neighbours`` (items without training interactions, e.g. the period's new ones, take the ID part
   of their semantic neighbours: ``train/cold_items.py``). The run id is the period end in UTC
   (``20160101T000000Z``), so rerunning a killed job with the same inputs lands in the same run
   directory and the stage manifests skip every finished stage.
4. **Candidate and incumbent**: :func:`~..pipeline.run_pipeline` in the run directory (the
   candidate); then the incumbent, "no retrain": the previous model applied to the new catalogue
   (same config with ``train.epochs=0``: old items keep their trained rows, new items have their
   semantic vector alone), trained and evaluated in ``<run>/incumbent``, whose ``prepare``,
   ``embed`` and ``decompose`` are relative symlinks to the candidate's stage folders. Only its
   ``train`` and ``evaluate`` stages run there (``run_pipeline(stages=("train", "evaluate"))``),
   so the shared stages are read, never rebuilt or replaced through the links; both models are
   scored on the same ``test.parquet`` (the newest period), with the same ``eval`` settings.
   Symlinks rather than copies: no second copy of the embeddings, and relative links move with
   the registry.
5. **Register** the run: data window (start, end, split times, train window), metrics
   (``candidate`` and ``incumbent``: their ``metrics.json`` bodies), parent, and facts (code
   version, method, seed, id-map and drift facts). Registering the same run again is a no-op.
6. **Promote** (atomic ``LATEST``) iff :func:`~.registry.decide_promotion` says the candidate is
   not worse than the incumbent by more than ``promote_tolerance`` (absolute, in the metric's
   units) on ``metric`` (default ``overall/NDCG@10``). A first period is always promoted. The
   decision is also written to ``<run>/promotion.json``.

Every input error is an :class:`~..errors.AlphaFuseError` (one line), raised before the registry
or ``LATEST`` is written; the previous run is only read. A period already registered is rerun only
with the same inputs and settings (a :class:`ConfigError` otherwise, before any stage runs: its
files may be served); given a registry as ``previous``, such a rerun starts from the previous run
it recorded, not from ``LATEST`` (which may be the period itself), so rerunning a finished job is a
no-op.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from .. import __version__
from ..errors import AlphaFuseError, ConfigError, DataError

Log = Callable[[str], None]

DEFAULT_METRIC = "overall/NDCG@10"
RETRAIN_FILE = "retrain.json"  # <run>/retrain.json: the period's plan (run id, window, previous run)
PROMOTION_FILE = "promotion.json"  # <run>/promotion.json: the decision and its reason
INCUMBENT_DIR = "incumbent"
RUNS_DIR = "runs"
CACHE_DIR = "embed-cache"
SHARED_STAGES = ("prepare", "embed", "decompose")

__all__ = ["DEFAULT_METRIC", "add_retrain_arguments", "retrain", "retrain_command"]


# ----------------------------------------------------------------------------- small helpers

def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def period_run_id(period_end: int) -> str:
    """The run id of the period ending (exclusive) at ``period_end`` epoch seconds: UTC, e.g.
    ``20160101T000000Z`` (sortable; the same inputs always give the same id)."""
    return datetime.fromtimestamp(period_end, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _seconds(value, what: str) -> int:
    from ..config import parse_time

    return parse_time(value, what)


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _period_lock(run_dir: Path):
    """One retrain of a period at a time (the candidate, the incumbent and the registration)."""
    from ..runtime.manifest import exclusive_lock

    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(run_dir / ".retrain.lock",
                          f"retrain: another retrain of this period is running in {run_dir}; wait for it to finish")


# ----------------------------------------------------------------------------- the previous run

def _train_folder(run_dir: Path, method: str | None, seed: int | None) -> Path:
    """The previous run's finished train stage folder holding ``config.json``."""
    from ..runtime.manifest import read_manifest

    recorded = _read_json(run_dir / RETRAIN_FILE) or {}
    method = method or recorded.get("method")
    seed = seed if seed is not None else recorded.get("seed")
    found = sorted(p for p in run_dir.glob("train-*-s*") if p.is_dir() and read_manifest(p) is not None
                   and (p / "config.json").is_file())
    if method is not None:
        found = [p for p in found if p.name.rsplit("-s", 1)[0] == f"train-{method}"]
    if seed is not None:
        found = [p for p in found if p.name.rsplit("-s", 1)[1] == str(seed)]
    if not found:
        raise AlphaFuseError(f"previous run {run_dir} is incomplete: no finished train stage "
                             f"(train-{method or '<method>'}-s{seed if seed is not None else '<seed>'} with "
                             "manifest.json and config.json); finish that run first or pass another previous run")
    if len(found) > 1:
        raise ConfigError(f"previous run {run_dir} holds several trained models ({', '.join(p.name for p in found)}): "
                          "choose one with the overrides method=... seed=...")
    return found[0]


def _check_previous(run_dir: Path, method: str | None, seed: int | None) -> tuple[Path, dict]:
    """(train folder, config dict) of a complete previous run of a compatible code version.

    Raises:
        AlphaFuseError: a stage the model needs did not finish, or a manifest is from another
            major version (both naming the folder).
    """
    from ..config import METHOD_INPUTS
    from ..runtime.manifest import read_manifest, require_stage

    train = _train_folder(run_dir, method, seed)
    config = _read_json(train / "config.json")
    if not isinstance(config, dict):
        raise DataError("previous run: unreadable config.json", file=train / "config.json")
    needs = METHOD_INPUTS.get(config.get("method"), frozenset())
    required = ["prepare"] + (["embed"] if needs else []) + (["decompose"] if needs & {"semantic", "basis"} else [])
    for stage in required:
        try:
            require_stage(run_dir, stage)
        except AlphaFuseError as e:
            raise AlphaFuseError(f"previous run {run_dir} is incomplete: {e}") from None
    for stage in required + [train.name]:
        version = (read_manifest(run_dir / stage) or {}).get("code_version")
        if version is None or _major(version) != _major(__version__):
            raise AlphaFuseError(f"previous run {run_dir}: stage '{stage}' was written by alphafuse_dist "
                                 f"{version}, this is {__version__} (another major version): its files may not "
                                 "be readable; retrain from scratch (no previous run) or with that version")
    return train, config


def _previous_end(run_dir: Path, config: dict, registry) -> int | None:
    """When the previous run's data ends (exclusive epoch seconds): its retrain.json, its
    registry entry, else the t2 of a time split (a lower bound); None when unknown."""
    recorded = _read_json(run_dir / RETRAIN_FILE) or {}
    if isinstance(recorded.get("period_end"), int):
        return recorded["period_end"]
    for entry in registry.runs():
        if entry.run_dir == run_dir and isinstance(entry.data_window.get("end"), int):
            return entry.data_window["end"]
    data = config.get("data", {})
    if data.get("split") == "time" and len(data.get("split_times") or []) == 2:
        from ..config import parse_split_times

        return parse_split_times(data["split_times"])[1]
    return None


def _registry_root(previous, run_root) -> Path:
    from .registry import LATEST_FILE, Registry

    if run_root is not None:
        return Path(run_root).absolute()
    if previous is None:
        raise ConfigError("retrain: a first period (no previous run) needs run_root, the registry folder")
    path = Path(previous).absolute()
    if path.is_file() and path.name == LATEST_FILE:
        return path.parent
    if path.is_dir() and Registry.is_registry(path):
        return path
    if path.parent.name == RUNS_DIR and Registry.is_registry(path.parent.parent):
        return path.parent.parent  # <root>/runs/<id>
    raise ConfigError(f"retrain: previous={previous} is a run directory outside a registry; pass run_root, "
                      "the registry folder for the new run")


# ----------------------------------------------------------------------------- the period's config

def _base_config(previous_config: dict | None, config: str | None):
    from ..config import RunConfig, _apply, load_config

    if previous_config is None:
        return load_config(config or "quickstart", [])
    cfg = RunConfig()
    try:
        _apply(cfg, previous_config)
    except ConfigError as e:
        raise ConfigError(f"the previous run's config.json cannot be read by alphafuse_dist {__version__}: {e}") \
            from None
    return cfg


def _apply_settings(cfg, settings: dict, overrides: Sequence[str]):
    from ..config import _apply, parse_override

    cfg = copy.deepcopy(cfg)
    _apply(cfg, settings)
    for o in overrides:
        _apply(cfg, parse_override(o))
    return cfg.validate()


def _override_value(overrides: Sequence[str], key: str) -> str | None:
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            return v.strip()
    return None


def _read_inputs(cfg, previous: Path | None) -> tuple[int, int]:
    """(first, last) timestamp of the new interactions; checks the schema and the item text."""
    from ..data.sources import load_source
    from ..data.text import item_text

    try:
        src = load_source(cfg.data)
        item_text(cfg.data, src)  # the template's columns must still be there
    except DataError as e:
        if previous is None:
            raise
        raise DataError(f"the new data does not have the previous run's schema (data.source={cfg.data.source}, "
                        f"columns {cfg.data.user_col}/{cfg.data.item_col}/{cfg.data.time_col}, template "
                        f"{cfg.data.text_template!r}; previous run {previous}): {e}") from None
    ts = src.interactions["timestamp"]
    return int(ts.min()), int(ts.max())


# ----------------------------------------------------------------------------- the job

def retrain(previous: str | Path | None = None, interactions: str | Path | None = None,
            items: str | Path | None = None, *, run_root: str | Path | None = None, config: str | None = None,
            overrides: Sequence[str] = (), split_times: Sequence | None = None, period_end=None,
            run_id: str | None = None, promote_tolerance: float = 0.0, metric: str = DEFAULT_METRIC,
            log: Log = print) -> dict:
    """Train, evaluate, register and (maybe) promote the next period's model (module docstring).

    Args:
        previous: the previous run: a run directory, a registry root or its ``LATEST`` file; None
            for the first period (a full train).
        interactions: the new interactions (``data.path``: a file, or a folder for folder
            sources); None keeps the previous run's ``data.path`` (an append-only log at a fixed path).
        items: the item (meta) file (``data.items_path``); None keeps the previous run's.
        run_root: the registry folder; default: the registry ``previous`` belongs to. New runs go
            to ``<run_root>/runs/<run id>``.
        config: preset or YAML file of a first period (ignored when there is a previous run: its
            config.json is the base).
        overrides: ``key=value`` config overrides, applied last.
        split_times: ``[t1, t2]`` (epoch seconds or ISO 8601): valid = [t1, t2), test = [t2, ...).
            Default with a previous run: ``[previous t2, previous period end]``; a first period
            needs them (here or as ``data.split_times`` in its config).
        period_end: the exclusive end of this period's data (epoch seconds or ISO 8601); default
            the newest interaction + 1. It names the run (:func:`period_run_id`).
        run_id: another run id than the period's.
        promote_tolerance: the largest absolute drop of ``metric`` that still promotes.
        metric: '/'-path into a ``metrics.json`` body's ``metrics`` (default ``overall/NDCG@10``).
        log: progress lines.

    Returns:
        ``{"run_id", "run_dir", "registry", "previous", "parent", "promoted", "reason", "latest",
        "data_window", "candidate", "incumbent", "metric"}``: ``candidate`` / ``incumbent`` are the
        ``metrics`` of the two ``metrics.json`` (incumbent None for a first period), ``latest`` the
        run id ``LATEST`` names afterwards.

    Raises:
        ConfigError / DataError / AlphaFuseError: bad input (the registry and ``LATEST`` untouched).
    """
    from ..config import METHOD_INPUTS
    from ..config import evaluate_stage_name, parse_split_times, train_stage_name
    from ..pipeline import run_pipeline
    from .registry import Registry, decide_promotion, resolve_previous

    if not (promote_tolerance >= 0 and math.isfinite(promote_tolerance)):
        raise ConfigError(f"retrain: promote_tolerance={promote_tolerance!r}: must be a finite absolute drop >= 0")
    overrides = list(overrides)
    root = _registry_root(previous, run_root)
    registry = Registry(root)
    method_o, seed_o = _override_value(overrides, "method"), _override_value(overrides, "seed")
    seed_o = int(seed_o) if seed_o is not None and seed_o.lstrip("-").isdigit() else None
    by_pointer = previous is not None and not (Path(previous).is_dir() and not Registry.is_registry(previous))

    def load_previous(prev_dir: Path | None):
        if prev_dir is None:
            return None, None, None
        train_dir, prev_config = _check_previous(prev_dir, method_o, seed_o)
        return train_dir, prev_config, _previous_end(prev_dir, prev_config, registry)

    def period_config(prev_config: dict | None):
        """The base config with the new data paths and data overrides, for reading the inputs."""
        cfg = _base_config(prev_config, config)
        data: dict = {}
        if interactions is not None:
            data["path"] = str(Path(interactions).absolute())
        if items is not None:
            data["items_path"] = str(Path(items).absolute())
        # the data keys of the overrides too: a first period may name its source there
        return _apply_settings(cfg, {"data": data}, [o for o in overrides if o.startswith("data.")])

    # 1. the previous run, the inputs, the period
    prev_dir = resolve_previous(previous) if previous is not None else None
    train_dir, prev_config, prev_end = load_previous(prev_dir)
    data_cfg = period_config(prev_config)
    first_ts, last_ts = _read_inputs(data_cfg, prev_dir)
    end = _seconds(period_end, "period_end") if period_end is not None else last_ts + 1
    if end <= last_ts:
        raise DataError(f"period_end={period_end!r} ({_iso(end)}) is not after the newest interaction "
                        f"({_iso(last_ts)}): pass a later period_end or leave it out",
                        file=data_cfg.data.path)
    rid = run_id or period_run_id(end)

    # a rerun of a period already registered (e.g. promoted, then the job was run again): its
    # previous run is the one it recorded, not LATEST (which may be the period itself)
    if rid in registry and by_pointer:
        recorded = registry.get(rid)
        recorded_prev = recorded.extra.get("previous_dir")
        if recorded_prev is None:
            raise DataError(f"the time window goes backwards: the new data ends at {_iso(end)}, where the registered "
                            f"first period {rid!r} ends; pass newer interactions (or rerun that first period with "
                            "its own command, without a previous run)", file=registry.file)
        if str(prev_dir) != recorded_prev:
            log(f"[retrain] period {rid} is already registered: rerunning it from its recorded previous run "
                f"{recorded_prev}")
            prev_dir = Path(recorded_prev) if recorded_prev else None
            train_dir, prev_config, prev_end = load_previous(prev_dir)
            data_cfg = period_config(prev_config)
    parent = None
    if prev_dir is not None:
        parent = next((e.run_id for e in registry.runs() if e.run_dir == prev_dir), prev_dir.name)

    # 2. the time window must move forward
    if prev_end is not None and end <= prev_end:
        raise DataError(f"the time window goes backwards: the new data ends at {_iso(end)} (period_end {end}), "
                        f"the previous run {prev_dir} at {_iso(prev_end)} ({prev_end}); pass newer interactions",
                        file=data_cfg.data.path)
    if prev_dir is not None and prev_end is None:
        log(f"[retrain] warning: the previous run {prev_dir} records no period end (no {RETRAIN_FILE}, not "
            "registered, no time split): the time window cannot be checked against it")
    later = [e for e in registry.runs() if e.run_id != rid and isinstance(e.data_window.get("end"), int)
             and e.data_window["end"] >= end]
    if later:
        newest = max(later, key=lambda e: e.data_window["end"])
        raise DataError(f"the time window goes backwards: the new data ends at {_iso(end)}, but the registry "
                        f"already holds run {newest.run_id!r} ending at {_iso(newest.data_window['end'])}; "
                        "pass newer interactions", file=registry.file)

    # 3. the split of this period
    if split_times is not None:
        times = list(split_times)
    elif prev_dir is not None and prev_end is not None:
        prev_data = prev_config.get("data", {})
        prev_t2 = (parse_split_times(prev_data["split_times"])[1]
                   if prev_data.get("split") == "time" and len(prev_data.get("split_times") or []) == 2 else None)
        t2 = prev_end
        t1 = prev_t2 if prev_t2 is not None and prev_t2 < t2 else t2 - (end - t2)
        times = [t1, t2]
    elif data_cfg.data.split == "time" and len(data_cfg.data.split_times) == 2:
        times = list(data_cfg.data.split_times)
    else:
        raise ConfigError("retrain: the first period needs split_times [t1, t2] (valid = [t1, t2), test = the "
                          "newest period [t2, period end)), or data.split=time with data.split_times in its config")
    t1, t2 = parse_split_times([str(t) for t in times])
    if t2 >= end:
        raise ConfigError(f"retrain: split time t2={_iso(t2)} is not before the period end {_iso(end)}: the "
                          "test period (the newest) would be empty")

    run_dir = root / RUNS_DIR / rid
    settings: dict = {
        "name": rid, "run_dir": str(run_dir),
        "data": {"split": "time", "split_times": [str(t1), str(t2)],
                 "id_map": str(prev_dir / "prepare") if prev_dir else None},
        "embed": {"cache_dir": str(root / CACHE_DIR)},
        "train": {"warm_start": str(train_dir) if train_dir else None},
        "decompose": {"reuse_basis": None},
    }
    if interactions is not None:
        settings["data"]["path"] = str(Path(interactions).absolute())
    if items is not None:
        settings["data"]["items_path"] = str(Path(items).absolute())
    base = _base_config(prev_config, config)
    if (_override_value(overrides, "method") or base.method) == "alphafuse":
        # new items of the period never trained: their ID part from their semantic neighbours
        settings["train"]["cold_items"] = "neighbours"
    if prev_dir is not None and METHOD_INPUTS[base.method] & {"semantic", "basis"} \
            and _override_value(overrides, "method") in (None, base.method):
        settings["decompose"]["reuse_basis"] = str(prev_dir / "decompose")
    cfg = _apply_settings(base, settings, overrides)
    if cfg.run_path != run_dir:
        raise ConfigError(f"retrain: run_dir is chosen by retrain ({run_dir}); do not override run_dir")
    t1, t2 = parse_split_times(cfg.data.split_times)  # as overridden
    if cfg.train.warm_start and cfg.data.id_map is None:
        raise ConfigError("retrain: train.warm_start needs data.id_map (the previous run's prepare folder)")

    window = {"start": first_ts if cfg.data.train_window_days is None
              else max(first_ts, t1 - math.ceil(cfg.data.train_window_days * 86400)),
              "end": end, "split_times": [t1, t2], "train_window_days": cfg.data.train_window_days,
              "start_iso": None, "end_iso": _iso(end), "test": [_iso(t2), _iso(end)]}
    window["start_iso"] = _iso(window["start"])
    plan = {"run_id": rid, "period_end": end, "split_times": [t1, t2], "previous_dir": str(prev_dir) if prev_dir else None,
            "parent": parent, "method": cfg.method, "seed": cfg.seed, "data_path": cfg.data.path,
            "items_path": cfg.data.items_path, "code_version": __version__}
    log(f"[retrain] period {rid}: data until {_iso(end)}, valid [{_iso(t1)}, {_iso(t2)}), test [{_iso(t2)}, "
        f"{_iso(end)}); previous run: {prev_dir or 'none (full train)'}; run dir {run_dir}")

    from ..runtime.manifest import atomic_write_json

    if rid in registry:  # a registered run is only rerun as it was: its files may be served
        trained = _read_json(run_dir / train_stage_name(cfg) / "config.json")
        strip = lambda d: {k: v for k, v in (d or {}).items() if k != "ray"}  # noqa: E731
        if _read_json(run_dir / RETRAIN_FILE) != plan or strip(trained) != strip(cfg.to_dict()):
            raise ConfigError(f"retrain: period {rid} is already registered ({run_dir}) with other inputs or "
                              "settings; rerun it with the same ones, or pass another run_id for a new run")

    with _period_lock(run_dir):
        # 4. the candidate, then the incumbent on the same prepared data
        if _read_json(run_dir / RETRAIN_FILE) != plan:
            atomic_write_json(run_dir / RETRAIN_FILE, plan)
        out = run_pipeline(cfg, log=log)
        candidate = out["metrics"]["metrics"]
        incumbent = None
        if train_dir is not None:
            inc_cfg = _incumbent_config(cfg, run_dir)
            _link_shared_stages(run_dir, run_dir / INCUMBENT_DIR)
            log(f"[retrain] incumbent: the previous model {train_dir} on this period's catalogue (train.epochs=0)")
            inc_out = run_pipeline(inc_cfg, stages=("train", "evaluate"), log=log)
            incumbent = inc_out["metrics"]["metrics"]

        # 5. register, 6. promote
        promote, reason = decide_promotion(candidate, incumbent, metric=metric, tolerance=promote_tolerance)
        extra = {"code_version": __version__, "method": cfg.method, "seed": cfg.seed,
                 "previous_dir": str(prev_dir) if prev_dir else None,
                 "train_stage": train_stage_name(cfg), "evaluate_stage": evaluate_stage_name(cfg),
                 **_facts(run_dir)}
        metrics = {"metric": metric, "candidate": candidate, "incumbent": incumbent}
        registry.register(rid, run_dir, data_window=window, metrics=metrics, parent=parent, extra=extra)
        atomic_write_json(run_dir / PROMOTION_FILE, {"promote": promote, "reason": reason, "metric": metric,
                                                    "tolerance": promote_tolerance})
        current = registry.latest()
        if promote and (current is None or current.run_id != rid):
            registry.promote(rid, reason)
            log(f"[retrain] PROMOTED {rid}: {reason}")
        elif promote:
            log(f"[retrain] {rid} is already the promoted run: {reason}")
        else:
            log(f"[retrain] NOT promoted, LATEST stays {current.run_id if current else None}: {reason}")
        latest = registry.latest()
    return {"run_id": rid, "run_dir": str(run_dir), "registry": str(root), "previous": str(prev_dir) if prev_dir else None,
            "parent": parent, "promoted": bool(promote), "reason": reason,
            "latest": latest.run_id if latest else None, "data_window": window, "metric": metric,
            "candidate": candidate, "incumbent": incumbent}


def _incumbent_config(cfg, run_dir: Path):
    """The candidate's config with ``train.epochs=0`` in ``<run>/incumbent`` (same data, eval, warm start)."""
    inc = copy.deepcopy(cfg)
    inc.run_dir = str(run_dir / INCUMBENT_DIR)
    inc.train.epochs = 0
    return inc.validate()


def _link_shared_stages(run_dir: Path, inc_dir: Path) -> None:
    """``<inc_dir>/<stage> -> ../<stage>`` for every finished shared stage (replaced atomically)."""
    import shutil

    inc_dir.mkdir(parents=True, exist_ok=True)
    for stage in SHARED_STAGES:
        if not (run_dir / stage).is_dir():
            continue
        link, target = inc_dir / stage, os.path.join("..", stage)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        tmp = inc_dir / f".{stage}.link"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(target, tmp)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)  # a stage once built here: the candidate's is the one to share
        os.replace(tmp, link)


def _facts(run_dir: Path) -> dict:
    """Id-map and drift facts of the period, for the registry (read from finished stages)."""
    facts: dict = {}
    stats = _read_json(run_dir / "prepare" / "stats.json") or {}
    if stats:
        facts["items"] = stats.get("items")
        facts["users"] = stats.get("users")
        facts["id_map"] = stats.get("id_map")
    drift = _read_json(run_dir / "decompose" / "drift.json")
    if drift:
        facts["drift"] = {k: drift.get(k) for k in ("new_items", "refit", "reason")}
        if isinstance(drift.get("drift"), dict):
            facts["drift"]["explained_ratio_old_mean"] = drift["drift"].get("explained_ratio_old_mean")
    return facts


# ----------------------------------------------------------------------------- command line

def add_retrain_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``[--previous DIR|REGISTRY] [--interactions F] [--items F] [--registry DIR] [--config C]
    [--split-times T1,T2] [--period-end T] [--run-id ID] [--tolerance X] [--metric M] [key=value ...]``."""
    p.add_argument("--previous", default=None,
                   help="the previous run: a run directory, or a registry folder (its promoted run); "
                        "leave out for the first period (a full train)")
    p.add_argument("--interactions", default=None,
                   help="the new interactions (data.path; append-only log or full snapshot); default: the "
                        "previous run's data.path")
    p.add_argument("--items", default=None, help="the item file (data.items_path); default: the previous run's")
    p.add_argument("--registry", default=None,
                   help="the registry folder (runs go to <registry>/runs/<period>); default: --previous's registry")
    p.add_argument("--config", default=None, help="preset or YAML of a first period (default quickstart)")
    p.add_argument("--split-times", default=None,
                   help="t1,t2 (epoch seconds or ISO 8601): valid [t1,t2), test [t2, end); default: "
                        "[previous t2, previous end]")
    p.add_argument("--period-end", default=None,
                   help="exclusive end of the period's data (default: newest interaction + 1 s); names the run")
    p.add_argument("--run-id", default=None, help="run id instead of the period end (UTC, YYYYMMDDTHHMMSSZ)")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="promote unless the candidate's metric is worse than the incumbent's by more than this "
                        "(absolute; default 0)")
    p.add_argument("--metric", default=DEFAULT_METRIC, help=f"promotion metric (default {DEFAULT_METRIC})")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5")
    return p


def run_from_args(args: argparse.Namespace, overrides: Sequence[str] | None = None,
                  log: Log = lambda s: print(s, file=sys.stderr, flush=True)) -> dict:
    """:func:`retrain` with the parsed arguments."""
    split_times = [t.strip() for t in args.split_times.split(",")] if args.split_times else None
    return retrain(args.previous, args.interactions, args.items, run_root=args.registry, config=args.config,
                   overrides=list(args.overrides if overrides is None else overrides), split_times=split_times,
                   period_end=args.period_end, run_id=args.run_id, promote_tolerance=args.tolerance,
                   metric=args.metric, log=log)


def format_result(out: dict) -> str:
    """The decision lines; the registry path last."""
    def value(metrics):
        if metrics is None:
            return "-"
        node = metrics
        for part in out["metric"].split("/"):
            node = node.get(part, {}) if isinstance(node, dict) else {}
        return f"{node:.6g}" if isinstance(node, (int, float)) else "?"

    return "\n".join([
        f"run: {out['run_id']} ({out['run_dir']})",
        f"{out['metric']}: candidate {value(out['candidate'])}, incumbent {value(out['incumbent'])}",
        f"{'promoted' if out['promoted'] else 'not promoted'}: {out['reason']}",
        f"latest: {out['latest']}",
        f"registry: {out['registry']}",
    ])


def retrain_command(args: argparse.Namespace) -> None:
    """Run ``alphafuse retrain``: progress on stderr, the decision and the registry path on stdout."""
    print(format_result(run_from_args(args)))
