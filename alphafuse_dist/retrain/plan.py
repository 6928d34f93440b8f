"""The plan of one retraining period: from the previous run (its folder and registry entry), the
config and the new data's time range, decide what the period runs, before anything runs.

Pure: no Ray, no stage, no data read; only small JSON files (manifests, ``config.json``,
``retrain.json``, the registry) are read, and nothing is written. Every input error is raised here,
so a bad period changes nothing.

Example::

    registry = Registry(registry_root(previous, run_root))
    prev = load_previous(resolve_previous(previous), registry)
    data_cfg = period_config(prev and prev.config, config, interactions, items, overrides)
    first, last = read_time_range(data_cfg)   # the one step that reads the data (job.py)
    plan = plan_period(registry, prev, first, last, interactions=..., items=..., overrides=...)
    plan.cfg, plan.run_dir, plan.incumbent_cfg()
"""
from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..config import (RunConfig, _apply, load_config, parse_override, parse_split_times, parse_time,
                      train_stage_name)
from ..errors import AlphaFuseError, ConfigError, DataError
from ..model.items import METHOD_INPUTS
from ..runtime.manifest import read_manifest, require_stage
from .registry import LATEST_FILE, Registry

RETRAIN_FILE = "retrain.json"  # <run>/retrain.json: the period's record (run id, window, previous run)
PROMOTION_FILE = "promotion.json"  # <run>/promotion.json: the decision, its evidence, the deployed model
INCUMBENT_DIR = "incumbent"
DEPLOY_DIR = "deploy"  # <run>/deploy: the promoted configuration refit on all the period's data
RUNS_DIR = "runs"
CACHE_DIR = "embed-cache"

_log = logging.getLogger(__name__)


def iso(seconds: int) -> str:
    """``2016-01-01T00:00:00Z`` for epoch seconds."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def period_run_id(period_end: int) -> str:
    """The run id of the period ending (exclusive) at ``period_end`` epoch seconds: UTC, e.g.
    ``20160101T000000Z`` (sortable; the same inputs always give the same id)."""
    return datetime.fromtimestamp(period_end, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def read_json(path: Path) -> dict | None:
    """A small JSON file's body, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _major(version: str) -> str:
    return str(version).split(".", 1)[0]


# ----------------------------------------------------------------------------- the previous run

@dataclass(frozen=True)
class Previous:
    """A complete previous run.

    Attributes:
        run_dir: its run directory.
        train_dir: the train stage folder (``model.safetensors``, ``config.json``) of the model it
            deployed (``serving_dir``): the next period's warm start and incumbent.
        config: the ``config.json`` body of its gated candidate (the next period's base config).
        end: the exclusive end of its data in epoch seconds, None when it records none.
        serving_dir: the folder of the model it deployed (``<run>/deploy``, ``<run>/incumbent``,
            or ``run_dir`` for a run without a deployment record); its ``prepare`` is the id map.
    """

    run_dir: Path
    train_dir: Path
    config: dict
    end: int | None
    serving_dir: Path | None = None


def _train_folder(run_dir: Path, method: str | None, seed: int | None) -> Path:
    """The previous run's finished train stage folder holding ``config.json``."""
    recorded = read_json(run_dir / RETRAIN_FILE) or {}
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


def _previous_end(run_dir: Path, config: dict, registry: Registry) -> int | None:
    """When the previous run's data ends (exclusive epoch seconds): its retrain.json, its
    registry entry, else the t2 of a time split (a lower bound); None when unknown."""
    recorded = read_json(run_dir / RETRAIN_FILE) or {}
    if isinstance(recorded.get("period_end"), int):
        return recorded["period_end"]
    for entry in registry.runs():
        if entry.run_dir == run_dir and isinstance(entry.data_window.get("end"), int):
            return entry.data_window["end"]
    data = config.get("data", {})
    if data.get("split") == "time" and len(data.get("split_times") or []) == 2:
        return parse_split_times(data["split_times"])[1]
    return None


def load_previous(run_dir: Path, registry: Registry, overrides: Sequence[str] = ()) -> Previous:
    """The previous run in ``run_dir``, checked complete and of this major code version.

    Args:
        overrides: ``method=...`` / ``seed=...`` among them choose its model when it holds several.

    Raises:
        AlphaFuseError: a stage the model needs did not finish, or a manifest is from another
            major version (both naming the folder).
        ConfigError: several trained models and no method/seed override to choose one.
        DataError: an unreadable ``config.json``.
    """
    method = override_value(overrides, "method")
    seed_text = override_value(overrides, "seed")
    seed = int(seed_text) if seed_text is not None and seed_text.lstrip("-").isdigit() else None
    run_dir = Path(run_dir)
    train = _train_folder(run_dir, method, seed)
    config = read_json(train / "config.json")
    if not isinstance(config, dict):
        raise DataError("previous run: unreadable config.json", file=train / "config.json")
    needs = METHOD_INPUTS.get(config.get("method"), frozenset())
    required = ["prepare"] + (["embed"] if needs else []) + (["decompose"] if needs & {"semantic", "basis"} else [])
    for stage in required:
        try:
            require_stage(run_dir, stage, verify=False)  # complete; what is read from it is checked there
        except AlphaFuseError as e:
            raise AlphaFuseError(f"previous run {run_dir} is incomplete: {e}") from None
    for stage in required + [train.name]:
        manifest = read_manifest(run_dir / stage) or {}
        # package_version; manifests that have none hold the package version in code_version
        version = manifest.get("package_version", manifest.get("code_version"))
        if version is None or _major(version) != _major(__version__):
            raise AlphaFuseError(f"previous run {run_dir}: stage '{stage}' was written by alphafuse_dist "
                                 f"{version}, this is {__version__} (another major version): its files may not "
                                 "be readable; retrain from scratch (no previous run) or with that version")
    serving = deployed_dir(run_dir)
    served_train = serving / train.name
    if read_manifest(served_train) is None or read_manifest(serving / "prepare") is None:
        raise AlphaFuseError(f"previous run {run_dir} is incomplete: its deployed model {served_train} (or its "
                             "prepare) did not finish; rerun that period to finish it")
    return Previous(run_dir, served_train, config, _previous_end(run_dir, config, registry), serving)


def deployed_dir(run_dir: Path) -> Path:
    """The folder of the model a period deployed (``deployed`` of its ``promotion.json``), or
    ``run_dir`` itself for a run without one."""
    name = (read_json(Path(run_dir) / PROMOTION_FILE) or {}).get("deployed", {})
    name = name.get("dir") if isinstance(name, dict) else None
    return Path(run_dir) / name if name in (DEPLOY_DIR, INCUMBENT_DIR) else Path(run_dir)


def registry_root(previous: str | Path | None, run_root: str | Path | None) -> Path:
    """The registry folder: ``run_root``, else the registry ``previous`` belongs to."""
    if run_root is not None:
        return Path(run_root).absolute()
    if previous is None:
        raise ConfigError("retrain: a first period (no --previous) needs the registry folder: --registry DIR")
    path = Path(previous).absolute()
    if path.is_file() and path.name == LATEST_FILE:
        return path.parent
    if path.is_dir() and Registry.is_registry(path):
        return path
    if path.parent.name == RUNS_DIR and Registry.is_registry(path.parent.parent):
        return path.parent.parent  # <root>/runs/<id>
    raise ConfigError(f"retrain: --previous {previous} is a run directory outside a registry; pass the registry "
                      "folder for the new run: --registry DIR")


# ----------------------------------------------------------------------------- the period's config

def override_value(overrides: Sequence[str], key: str) -> str | None:
    """The value the last ``key=value`` override of ``key`` gives, as text; None without one."""
    value = None
    for o in overrides:
        k, _, v = o.partition("=")
        if k.strip() == key:
            value = v.strip()
    return value


def _base_config(previous_config: dict | None, config: str | None) -> RunConfig:
    if previous_config is None:
        return load_config(config or "quickstart", [])
    cfg = RunConfig()
    try:
        _apply(cfg, previous_config)
    except ConfigError as e:
        raise ConfigError(f"the previous run's config.json cannot be read by alphafuse_dist {__version__}: {e}") \
            from None
    return cfg


def _with_settings(cfg: RunConfig, settings: dict, overrides: Sequence[str]) -> RunConfig:
    cfg = copy.deepcopy(cfg)
    _apply(cfg, settings)
    for o in overrides:
        _apply(cfg, parse_override(o))
    return cfg.validate()


def period_config(previous_config: dict | None, config: str | None, interactions, items,
                  overrides: Sequence[str]) -> RunConfig:
    """The config to read the new data with: the previous run's (``config`` for a first period)
    with the new data paths and the ``data.`` overrides (a first period may name its source there)."""
    data: dict = {}
    if interactions is not None:
        data["path"] = str(Path(interactions).absolute())
    if items is not None:
        data["items_path"] = str(Path(items).absolute())
    return _with_settings(_base_config(previous_config, config), {"data": data},
                          [o for o in overrides if o.startswith("data.")])


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class RetrainPlan:
    """What one period runs.

    Attributes:
        run_id: the period's id in the registry.
        root: the registry folder.
        run_dir: ``<root>/runs/<run_id>``, the candidate's run directory.
        cfg: the candidate's config (validated).
        previous: the previous run, None for a first period (a full train).
        parent: the previous run's registry id (its folder name when it is not registered).
        window: the data window registered with the run (start, end, split times, train window,
            their ISO 8601 forms and the test period).
        record: the body of ``<run_dir>/retrain.json``.
        registered: the period is registered already (a rerun, checked to have the same inputs
            and settings).
    """

    run_id: str
    root: Path
    run_dir: Path
    cfg: RunConfig
    previous: Previous | None
    parent: str | None
    window: dict
    record: dict
    registered: bool

    def deploy_cfg(self, epochs: int) -> RunConfig:
        """The candidate's configuration refit on all the period's data (``data.split=all``, no
        validation: ``epochs`` epochs, the candidate's best), in ``<run_dir>/deploy``, with the
        candidate's prepare as the id map (the same item ids)."""
        dep = copy.deepcopy(self.cfg)
        dep.run_dir = str(self.run_dir / DEPLOY_DIR)
        dep.data.split, dep.data.split_times = "all", []
        dep.data.id_map = str(self.run_dir / "prepare")
        dep.train.epochs = epochs
        return dep.validate()

    def incumbent_cfg(self) -> RunConfig | None:
        """The incumbent, "no retrain": the previous model applied to this period's catalogue
        (the candidate's config with ``train.epochs=0``, in ``<run_dir>/incumbent``); None for a
        first period."""
        if self.previous is None:
            return None
        inc = copy.deepcopy(self.cfg)
        inc.run_dir = str(self.run_dir / INCUMBENT_DIR)
        inc.train.epochs = 0
        return inc.validate()


def _split_times(split_times: Sequence | None, previous: Previous | None, end: int, data_cfg: RunConfig
                 ) -> tuple[int, int]:
    """``[t1, t2]`` of the period: given, else valid = the previous run's test period and test
    = the newest period, else a first period's own ``data.split_times``."""
    if split_times is not None:
        times = list(split_times)
    elif previous is not None and previous.end is not None:
        prev_data = previous.config.get("data", {})
        prev_t2 = (parse_split_times(prev_data["split_times"])[1]
                   if prev_data.get("split") == "time" and len(prev_data.get("split_times") or []) == 2 else None)
        t2 = previous.end
        t1 = prev_t2 if prev_t2 is not None and prev_t2 < t2 else t2 - (end - t2)
        times = [t1, t2]
    elif data_cfg.data.split == "time" and len(data_cfg.data.split_times) == 2:
        times = list(data_cfg.data.split_times)
    else:
        raise ConfigError("retrain: the first period needs --split-times T1,T2 (valid = [t1, t2), test = the "
                          "newest period [t2, period end)), or data.split=time with data.split_times in its config")
    t1, t2 = parse_split_times([str(t) for t in times])
    if t2 >= end:
        raise ConfigError(f"retrain: split time t2={iso(t2)} is not before the period end {iso(end)}: the "
                          "test period (the newest) would be empty")
    return t1, t2


def plan_period(registry: Registry, previous: Previous | None, first_ts: int, last_ts: int, *,
                interactions=None, items=None, config: str | None = None, overrides: Sequence[str] = (),
                split_times: Sequence | None = None, period_end=None, run_id: str | None = None,
                by_pointer: bool = False) -> RetrainPlan:
    """Decide the period: its id, window, split, config, parent (see ``job.py`` for the steps).

    Args:
        registry: the registry the period goes to.
        previous: the previous run (:func:`load_previous`), None for a first period.
        first_ts, last_ts: the oldest and newest interaction of the new data (epoch seconds).
        interactions, items, config, overrides, split_times, period_end, run_id: as
            :func:`~.job.retrain` takes them.
        by_pointer: ``previous`` was named through the registry (its ``LATEST``), not as a run
            directory: a rerun of a registered period then starts from the previous run it recorded.

    Raises:
        ConfigError / DataError / AlphaFuseError: the period cannot run as asked (nothing written).
    """
    overrides = list(overrides)
    root = registry.root
    data_cfg = period_config(previous and previous.config, config, interactions, items, overrides)
    end = parse_time(period_end, "period_end") if period_end is not None else last_ts + 1
    if end <= last_ts:
        raise DataError(f"--period-end {period_end} ({iso(end)}) is not after the newest interaction "
                        f"({iso(last_ts)}): pass a later --period-end or leave it out", file=data_cfg.data.path)
    rid = run_id or period_run_id(end)

    # a rerun of a period already registered (e.g. promoted, then the job was run again): its
    # previous run is the one it recorded, not LATEST (which may be the period itself)
    if rid in registry and by_pointer:
        recorded_prev = registry.get(rid).extra.get("previous_dir")
        if recorded_prev is None:
            raise DataError(f"the time window goes backwards: the new data ends at {iso(end)}, where the registered "
                            f"first period {rid!r} ends; pass newer interactions (or rerun that first period with "
                            "its own command, without a previous run)", file=registry.file)
        if previous is None or str(previous.run_dir) != recorded_prev:
            _log.info(f"[retrain] period {rid} is already registered: rerunning it from its recorded previous run "
                f"{recorded_prev}")
            previous = load_previous(Path(recorded_prev), registry, overrides)
            data_cfg = period_config(previous.config, config, interactions, items, overrides)
    parent = None
    if previous is not None:
        parent = next((e.run_id for e in registry.runs() if e.run_dir == previous.run_dir), previous.run_dir.name)

    # the time window must move forward
    if previous is not None and previous.end is not None and end <= previous.end:
        raise DataError(f"the time window goes backwards: the new data ends at {iso(end)} (--period-end {end}), "
                        f"the previous run {previous.run_dir} at {iso(previous.end)} ({previous.end}); pass newer "
                        "interactions", file=data_cfg.data.path)
    if previous is not None and previous.end is None:
        _log.warning(f"[retrain] warning: the previous run {previous.run_dir} records no period end (no "
                     f"{RETRAIN_FILE}, not registered, no time split): the time window cannot be checked against it")
    later = [e for e in registry.runs() if e.run_id != rid and isinstance(e.data_window.get("end"), int)
             and e.data_window["end"] >= end]
    if later:
        newest = max(later, key=lambda e: e.data_window["end"])
        raise DataError(f"the time window goes backwards: the new data ends at {iso(end)}, but the registry "
                        f"already holds run {newest.run_id!r} ending at {iso(newest.data_window['end'])}; "
                        "pass newer interactions", file=registry.file)

    t1, t2 = _split_times(split_times, previous, end, data_cfg)
    run_dir = root / RUNS_DIR / rid
    cfg = _candidate_config(previous, config, overrides, interactions, items, run_dir, rid, t1, t2)
    t1, t2 = parse_split_times(cfg.data.split_times)  # as overridden

    window = {"start": first_ts if cfg.data.train_window_days is None
              else max(first_ts, t1 - math.ceil(cfg.data.train_window_days * 86400)),
              "end": end, "split_times": [t1, t2], "train_window_days": cfg.data.train_window_days,
              "start_iso": None, "end_iso": iso(end), "test": [iso(t2), iso(end)]}
    window["start_iso"] = iso(window["start"])
    prev_dir = str(previous.run_dir) if previous else None
    record = {"run_id": rid, "period_end": end, "split_times": [t1, t2], "previous_dir": prev_dir,
              "parent": parent, "method": cfg.method, "seed": cfg.seed, "data_path": cfg.data.path,
              "items_path": cfg.data.items_path, "code_version": __version__}

    registered = rid in registry
    if registered:  # a registered run is only rerun as it was: its files may be served
        trained = read_json(run_dir / train_stage_name(cfg) / "config.json")
        strip = lambda d: {k: v for k, v in (d or {}).items() if k != "ray"}  # noqa: E731
        if read_json(run_dir / RETRAIN_FILE) != record or strip(trained) != strip(cfg.to_dict()):
            raise ConfigError(f"retrain: period {rid} is already registered ({run_dir}) with other inputs or "
                              "settings; rerun it with the same ones, or pass another --run-id for a new run")
    return RetrainPlan(rid, root, run_dir, cfg, previous, parent, window, record, registered)


def _candidate_config(previous: Previous | None, config: str | None, overrides: Sequence[str], interactions,
                      items, run_dir: Path, rid: str, t1: int, t2: int) -> RunConfig:
    """The previous run's config + the retrain settings + ``overrides`` (applied last, so they win)."""
    settings: dict = {
        "name": rid, "run_dir": str(run_dir),
        "data": {"split": "time", "split_times": [str(t1), str(t2)],
                 "id_map": str((previous.serving_dir or previous.run_dir) / "prepare") if previous else None},
        "embed": {"cache_dir": str(run_dir.parent.parent / CACHE_DIR)},
        "train": {"warm_start": str(previous.train_dir) if previous else None},
        "decompose": {"reuse_basis": None},
    }
    if interactions is not None:
        settings["data"]["path"] = str(Path(interactions).absolute())
    if items is not None:
        settings["data"]["items_path"] = str(Path(items).absolute())
    base = _base_config(previous and previous.config, config)
    method = override_value(overrides, "method")
    if (method or base.method) == "alphafuse":
        # new items of the period never trained: their ID part from their semantic neighbours
        settings["train"]["cold_items"] = "neighbours"
    if previous is not None and METHOD_INPUTS[base.method] & {"semantic", "basis"} and method in (None, base.method):
        settings["decompose"]["reuse_basis"] = str(previous.run_dir / "decompose")
    cfg = _with_settings(base, settings, overrides)
    if cfg.run_path != run_dir:
        raise ConfigError(f"retrain: run_dir is chosen by retrain ({run_dir}); do not override run_dir")
    return cfg
