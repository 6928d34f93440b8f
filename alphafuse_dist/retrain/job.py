"""``alphafuse retrain``: the next period's model from the last one, gated against it, refit on all the data, served.

One call = one period::

    from alphafuse_dist.pipeline import run_pipeline

    out = retrain("runs/registry", "data/interactions.parquet", "data/items.parquet",
                  pipeline=run_pipeline, promote_tolerance=0.002)
    out["promoted"], out["reason"], out["run_dir"]

Steps 1-3 are the plan (:mod:`.plan`: pure, every input error is raised there), step 4 runs the
``pipeline`` the caller passes (``pipeline.run_pipeline``), step 5 is the decision
(:mod:`.decision`), step 6 the deployable model, step 7 the registry.

What it does, in order (nothing in the registry changes before step 7):

1. **Previous run**: ``previous`` is a run directory or a registry root (its ``LATEST``; see
   :func:`~.registry.resolve_previous`), or None for the first period (a full train from
   ``config``). It must be complete (``prepare``, the stages its method reads, a finished
   ``train-<method>-s<seed>`` with ``config.json``, and the model it deployed) and written by
   this major code version. Its gated candidate's ``config.json`` is the base config; the model
   it deployed (``<prev>/deploy`` or ``<prev>/incumbent``, :func:`.plan.deployed_dir`) is the
   warm start and the id map.
2. **Inputs**: the interaction (and item) files are read through the previous run's data source
   and column names (``data.path`` / ``data.items_path``): the full log up to the period's end,
   or, with ``new_rows``, only the rows since the previous period, appended to the previous log
   into ``<root>/logs/``. A changed schema (missing or renamed columns, template columns gone) is
   a :class:`DataError` before anything is written. The period ends at ``period_end`` (default:
   the newest interaction + 1 s), which must be later than the previous run's end and every other
   registered run's end (a time window that goes backwards is an error).
3. **Config** of the period = the previous candidate's ``config.json`` (``config`` for a first
   run) + the retrain settings + ``overrides`` (applied last, so they win): ``run_dir =
   <root>/runs/<run id>``, ``data.id_map = <prev served>/prepare`` (stable ids), ``data.split =
   time`` with ``data.split_times = [t1, t2]``: test = the newest period ``[t2, period_end)``
   with ``t2`` = the previous period's end, valid = ``[t1, t2)`` with ``t1`` = the previous run's
   t2, train = before t1 (within ``data.train_window_days`` if set); ``embed.cache_dir =
   <root>/embed-cache`` (shared by every period: only new or changed texts are encoded);
   ``decompose.reuse_basis = <prev>/decompose``; ``train.warm_start = <prev served>/train-<method>-s<seed>``;
   for alphafuse ``train.cold_items = neighbours`` (items without training interactions, e.g.
   the period's new ones, take the ID part of their semantic neighbours:
   ``train/cold_items.py``). The run id is the period end in UTC (``20160101T000000Z``), so
   rerunning a killed job with the same inputs lands in the same run directory and the stage
   manifests skip every finished stage.
4. **Candidate and incumbent**: ``pipeline`` in the run directory (the candidate); then the
   incumbent, "no retrain": the previously served model applied to the new catalogue (same
   config with ``train.epochs=0``: old items keep their trained rows, new items take the
   cold-item rule), trained and evaluated in ``<run>/incumbent``, whose ``prepare``, ``embed``
   and ``decompose`` are relative symlinks to the candidate's stage folders (read, never rebuilt
   through the links; no second copy of the embeddings; the links move with the registry). Both
   models are scored on the same ``test.parquet`` (the newest period), with the same ``eval``
   settings; the evaluate stage also writes each user's rank (``ranks.parquet``).
5. **Decision**: :func:`~.decision.decide_promotion` promotes the candidate iff it is not worse
   than the incumbent by more than ``promote_tolerance`` (absolute, in the metric's units) on
   ``metric`` (default ``overall/NDCG@10``). Beside it, the evidence: the difference candidate -
   incumbent with a paired bootstrap interval over the test users (``retrain.bootstrap_*``,
   ``retrain.confidence``), and the users of the valid and test parts: fewer than
   ``retrain.min_eval_users`` flags the period, and its candidate is not promoted unless
   ``retrain.promote_few_users`` (the reason says so; a first period, having no incumbent, is
   served with the flag in its reason and a warning).
6. **Deployable model**: the candidate won (or a first period): its configuration is REFIT in
   ``<run>/deploy`` on every interaction up to the period's end (``data.split=all``, nothing held
   out), warm-started as the candidate was, for the candidate's best epoch count (chosen on its
   validation part), so the valid and test periods' items and users are trained; its ``embed``
   and ``decompose`` are links to the candidate's (the same catalogue: the candidate's prepare
   is its id map). A refit rather than continuing the candidate: the candidate never saw the
   newest two parts, and the refit repeats exactly the training the gate judged, on all the data.
   The incumbent won: ``<run>/incumbent`` is served (the previous model on this catalogue).
7. **Register and serve**: the run is registered with its data window, ``metrics``
   (``candidate``, ``incumbent``: their ``metrics.json`` bodies; ``evidence``), parent and facts
   (code version, method, seed, id-map and drift facts, ``deployed``: which model, its folder and
   epochs); ``<run>/promotion.json`` holds the decision, the evidence and ``deployed``; then
   ``LATEST`` (atomic) names the period, whose deployed model serves (``export``/``recommend``
   of the registry): every item of the catalogue up to the period's end has a row.
   Registering the same run again is a no-op.

Every input error is an :class:`~..errors.AlphaFuseError` (one line), raised before the registry
or ``LATEST`` is written; the previous run is only read. A period whose stages fail on their
input (e.g. an empty train part) leaves no run folder behind unless it existed before. A period
already registered is rerun only with the same inputs and settings (a :class:`ConfigError`
otherwise, before any stage runs: its files may be served); given a registry as ``previous``,
such a rerun starts from the previous run it recorded, not from ``LATEST`` (which may be the
period itself), so rerunning a finished job is a no-op.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path
from typing import Callable, Sequence

from .. import __version__
from ..config import evaluate_stage_name, train_stage_name
from ..errors import AlphaFuseError, ConfigError, DataError
from .decision import DEFAULT_METRIC
from .plan import (DEPLOY_DIR, INCUMBENT_DIR, PROMOTION_FILE, RETRAIN_FILE, RetrainPlan, iso, load_previous,
                   period_config, plan_period, read_json, registry_root)

Pipeline = Callable[..., dict]  # pipeline.run_pipeline: (cfg, *, stages=...) -> {"metrics": ...}

_log = logging.getLogger(__name__)

SHARED_STAGES = ("prepare", "embed", "decompose")
RANKS_FILE = "ranks.parquet"  # the evaluate stage's per-user ranks

__all__ = ["DEFAULT_METRIC", "add_retrain_arguments", "read_time_range", "retrain", "retrain_command", "run_plan"]


def read_time_range(data_cfg, previous_dir: Path | None) -> tuple[int, int]:
    """(first, last) timestamp of the new interactions; checks the schema and the item text.

    Raises:
        DataError: the data cannot be read with the period's source settings (with a previous
            run: its schema, named in the message).
    """
    from ..data.sources import load_source
    from ..data.text import item_text

    try:
        src = load_source(data_cfg.data)
        item_text(data_cfg.data, src)  # the template's columns must still be there
    except DataError as e:
        if previous_dir is None:
            raise
        d = data_cfg.data
        raise DataError(f"the new data does not have the previous run's schema (data.source={d.source}, "
                        f"columns {d.user_col}/{d.item_col}/{d.time_col}, template {d.text_template!r}; previous "
                        f"run {previous_dir}): {e}") from None
    ts = src.interactions["timestamp"]
    return int(ts.min()), int(ts.max())


def _period_lock(run_dir: Path):
    """One retrain of a period at a time (the candidate, the incumbent and the registration)."""
    from ..runtime.manifest import exclusive_lock

    run_dir.mkdir(parents=True, exist_ok=True)
    return exclusive_lock(run_dir / ".retrain.lock",
                          f"retrain: another retrain of this period is running in {run_dir}; wait for it to finish")


# ----------------------------------------------------------------------------- the job

def retrain(previous: str | Path | None = None, interactions: str | Path | None = None,
            items: str | Path | None = None, *, pipeline: Pipeline, run_root: str | Path | None = None,
            config: str | None = None, overrides: Sequence[str] = (), split_times: Sequence | None = None,
            period_end=None, run_id: str | None = None, promote_tolerance: float = 0.0,
            metric: str = DEFAULT_METRIC, new_rows: bool = False) -> dict:
    """Train, evaluate, register and (maybe) promote the next period's model (module docstring).

    Args:
        previous: the previous run: a run directory, a registry root or its ``LATEST`` file; None
            for the first period (a full train).
        interactions: the new interactions (``data.path``: a file, or a folder for folder
            sources); None keeps the previous run's ``data.path`` (an append-only log at a fixed path).
        items: the item (meta) file (``data.items_path``); None keeps the previous run's.
        pipeline: runs the stages of a config: ``pipeline.run_pipeline`` (called as
            ``pipeline(cfg)`` and ``pipeline(cfg, stages=("train", "evaluate"))``).
        run_root: the registry folder; default: the registry ``previous`` belongs to. New runs go
            to ``<run_root>/runs/<run id>``.
        config: preset or YAML file of a first period (ignored when there is a previous run: its
            config.json is the base).
        overrides: ``key=value`` config overrides, applied last.
        split_times: ``[t1, t2]`` (epoch seconds or ISO 8601): valid = [t1, t2), test = [t2, ...).
            Default with a previous run: ``[previous t2, previous period end]``; a first period
            needs them (here or as ``data.split_times`` in its config).
        period_end: the exclusive end of this period's data (epoch seconds or ISO 8601); default
            the newest interaction + 1. It names the run (:func:`.plan.period_run_id`).
        run_id: another run id than the period's.
        promote_tolerance: the largest absolute drop of ``metric`` that still promotes.
        metric: '/'-path into a ``metrics.json`` body's ``metrics`` (default ``overall/NDCG@10``).
        new_rows: ``interactions`` holds only the rows since the previous period: they are
            appended to the previous run's log (``data.source=interactions``) into
            ``<registry>/logs/interactions-<digest>.parquet``, the period's full log.

    Returns:
        ``{"run_id", "run_dir", "registry", "previous", "parent", "promoted", "reason", "latest",
        "data_window", "candidate", "incumbent", "metric"}``: ``candidate`` / ``incumbent`` are the
        ``metrics`` of the two ``metrics.json`` (incumbent None for a first period), ``latest`` the
        run id ``LATEST`` names afterwards.

    Raises:
        ConfigError / DataError / AlphaFuseError: bad input (the registry and ``LATEST`` untouched).
    """
    from .registry import Registry, resolve_previous

    if not (promote_tolerance >= 0 and math.isfinite(promote_tolerance)):
        raise ConfigError(f"retrain: --tolerance {promote_tolerance!r}: must be a finite absolute drop >= 0")
    overrides = list(overrides)

    # 1-3: the plan (the one data read: the new interactions' time range)
    registry = Registry(registry_root(previous, run_root))
    by_pointer = previous is not None and not (Path(previous).is_dir() and not Registry.is_registry(previous))
    prev = load_previous(resolve_previous(previous), registry, overrides) if previous is not None else None
    if new_rows:
        interactions = _full_log(prev, interactions, registry.root)
    data_cfg = period_config(prev and prev.config, config, interactions, items, overrides)
    first_ts, last_ts = read_time_range(data_cfg, prev and prev.run_dir)
    plan = plan_period(registry, prev, first_ts, last_ts, interactions=interactions, items=items, config=config,
                       overrides=overrides, split_times=split_times, period_end=period_end, run_id=run_id,
                       by_pointer=by_pointer)
    fresh = not plan.run_dir.exists()
    try:
        return run_plan(plan, registry, pipeline=pipeline, promote_tolerance=promote_tolerance, metric=metric)
    except Exception as e:
        from ..errors import user_error

        # an input error found by a stage (e.g. an empty train part): no stray run folder; a
        # crash or a kill keeps the finished stages for the rerun to skip
        if fresh and user_error(e) is not None and plan.run_id not in registry:
            import shutil

            shutil.rmtree(plan.run_dir, ignore_errors=True)
            _log.info(f"[retrain] period {plan.run_id} failed on its input: removed {plan.run_dir}")
        raise


def _full_log(prev, new_rows, root: Path) -> Path:
    """``--new-rows``: the previous run's log + ``new_rows``, as ``<root>/logs/interactions-<digest>.parquet``
    (named by both files' content, so a rerun with the same inputs reads the same file)."""
    import hashlib

    from ..data.sources import append_interactions
    from ..runtime.manifest import file_sha256

    if prev is None or new_rows is None:
        raise ConfigError("retrain: --new-rows appends --interactions to the previous period's log: it needs "
                          "--previous and --interactions")
    data = prev.config.get("data", {})
    log = data.get("path")
    if data.get("source") != "interactions" or not log or not Path(log).is_file():
        raise ConfigError(f"retrain: --new-rows needs a previous run that read one interactions file "
                          f"(data.source=interactions), not data.source={data.get('source')} with data.path={log}; "
                          "pass the full log without --new-rows")
    if not Path(new_rows).is_file():
        raise DataError("does not exist; expected the new interaction rows (--interactions)", file=new_rows)
    digest = hashlib.sha256(f"{file_sha256(log)} {file_sha256(new_rows)}".encode()).hexdigest()[:16]
    out = root / "logs" / f"interactions-{digest}.parquet"
    if not out.is_file():
        rows = append_interactions(Path(log), Path(new_rows), out)
        _log.info(f"[retrain] --new-rows: {log} + {new_rows} -> {out} ({rows:,} rows)")
    return out


def run_plan(plan: RetrainPlan, registry, *, pipeline: Pipeline, promote_tolerance: float = 0.0,
             metric: str = DEFAULT_METRIC) -> dict:
    """Steps 4-7 of a planned period: the candidate and the incumbent, the decision and its
    evidence, the deployable model, the registration and ``LATEST`` (see :func:`retrain` for the
    result)."""
    from ..runtime.manifest import atomic_write_json
    from . import decision

    t1, t2 = plan.window["split_times"]
    end, run_dir, cfg = plan.window["end"], plan.run_dir, plan.cfg
    prev_dir = plan.previous.run_dir if plan.previous else None
    _log.info(f"[retrain] period {plan.run_id}: data until {plan.window['end_iso']}, valid [{iso(t1)}, {iso(t2)}), "
        f"test [{iso(t2)}, {iso(end)}); previous run: {prev_dir or 'none (full train)'}; run dir {run_dir}")
    with _period_lock(run_dir):
        # 4. the candidate, then the incumbent on the same prepared data
        if read_json(run_dir / RETRAIN_FILE) != plan.record:
            atomic_write_json(run_dir / RETRAIN_FILE, plan.record)
        candidate = pipeline(cfg)["metrics"]["metrics"]
        incumbent = None
        inc_cfg = plan.incumbent_cfg()
        if inc_cfg is not None:
            _link_stages(run_dir, run_dir / INCUMBENT_DIR, SHARED_STAGES)
            _log.info(f"[retrain] incumbent: the previous model {plan.previous.train_dir} on this period's catalogue "
                "(train.epochs=0)")
            incumbent = pipeline(inc_cfg, stages=("train", "evaluate"))["metrics"]["metrics"]

        # 5. the decision and its evidence
        evidence = _evidence(plan, metric)
        promote, reason = decision.decide_promotion(candidate, incumbent, metric=metric, tolerance=promote_tolerance)
        reason = f"{reason}; {decision.describe(evidence['interval'], metric)}" if incumbent is not None else reason
        if evidence["flag"]:
            _log.warning(f"[retrain] warning: period {plan.run_id}: {evidence['flag']}")
            if incumbent is not None and promote and not cfg.retrain.promote_few_users:
                promote, reason = False, (f"keep the incumbent: {evidence['flag']} (retrain.promote_few_users=true "
                                          f"promotes it by the metric rule); the rule alone: {reason}")
            else:
                reason = f"{reason}; FLAGGED: {evidence['flag']}"

        # 6. the deployable model: the promoted configuration on all the period's data
        deployed = _deploy(plan, pipeline, promote or incumbent is None)

        # 7. register, and serve the deployed model (LATEST)
        extra = {"code_version": __version__, "method": cfg.method, "seed": cfg.seed,
                 "previous_dir": str(prev_dir) if prev_dir else None,
                 "train_stage": train_stage_name(cfg), "evaluate_stage": evaluate_stage_name(cfg),
                 "deployed": deployed, **_facts(run_dir)}
        metrics = {"metric": metric, "candidate": candidate, "incumbent": incumbent, "evidence": evidence}
        registry.register(plan.run_id, run_dir, data_window=plan.window, metrics=metrics, parent=plan.parent,
                          extra=extra)
        atomic_write_json(run_dir / PROMOTION_FILE, {"promote": promote, "reason": reason, "metric": metric,
                                                    "tolerance": promote_tolerance, "evidence": evidence,
                                                    "deployed": deployed})
        verdict = "PROMOTED the candidate" if promote else "NOT promoted: the incumbent serves"
        _log.info(f"[retrain] {verdict} ({reason}); deployed: {deployed['model']} in {run_dir / deployed['dir']}")
        current = registry.latest()
        if current is None or current.run_id != plan.run_id:
            registry.promote(plan.run_id, f"serve {deployed['model']}: {reason}")
        latest = registry.latest()
    return {"run_id": plan.run_id, "run_dir": str(run_dir), "registry": str(plan.root),
            "previous": str(prev_dir) if prev_dir else None, "parent": plan.parent, "promoted": bool(promote),
            "reason": reason, "latest": latest.run_id if latest else None, "data_window": plan.window,
            "metric": metric, "candidate": candidate, "incumbent": incumbent, "evidence": evidence,
            "deployed": deployed, "serving_dir": str(run_dir / deployed["dir"])}


def _evidence(plan: RetrainPlan, metric: str) -> dict:
    """Users of the valid and test parts, the few-users flag and the bootstrap interval of the
    difference candidate - incumbent (None for a first period)."""
    import pyarrow.parquet as pq

    from ..runtime.manifest import read_manifest
    from . import decision

    settings, run_dir = plan.cfg.retrain, plan.run_dir
    rows = (read_manifest(run_dir / "prepare") or {}).get("rows", {})
    users = {"valid": int(rows.get("valid", 0)), "test": int(rows.get("test", 0))}
    interval = None
    ranks = run_dir / evaluate_stage_name(plan.cfg) / RANKS_FILE
    if plan.previous is not None:
        interval = decision.bootstrap_difference(
            pq.read_table(ranks), pq.read_table(run_dir / INCUMBENT_DIR / evaluate_stage_name(plan.cfg) / RANKS_FILE),
            metric, samples=settings.bootstrap_samples, seed=settings.bootstrap_seed,
            confidence=settings.confidence)
    return {"users": users, "min_eval_users": settings.min_eval_users,
            "flag": decision.few_users_flag(users, settings.min_eval_users), "interval": interval}


def _deploy(plan: RetrainPlan, pipeline: Pipeline, candidate_wins: bool) -> dict:
    """The model the period serves. The candidate won: its configuration REFIT on every
    interaction up to the period's end (``<run>/deploy``: warm-started as the candidate was, from
    the previously served model, for the candidate's best epoch count, with no data held out), so
    the valid and test periods' items and users are trained. The incumbent won: the previous
    model on this period's catalogue (``<run>/incumbent``, already trained: new items take the
    cold-item rule), since the gate found no gain in retraining."""
    name = train_stage_name(plan.cfg)
    if not candidate_wins:
        return {"model": "the incumbent", "dir": INCUMBENT_DIR, "train_stage": name, "epochs": 0,
                "data_end": plan.window["end"]}
    history = read_json(plan.run_dir / name / "history.json") or {}
    epochs = max(1, int(history.get("best_epoch") or 0))
    dep = plan.deploy_cfg(epochs)
    _link_stages(plan.run_dir, dep.run_path, ("embed", "decompose"))
    _log.info(f"[retrain] deploy: the candidate's configuration refit on all the data until {plan.window['end_iso']} "
              f"({epochs} epochs, the candidate's best) in {dep.run_path}")
    pipeline(dep, stages=("prepare",))
    _same_items(plan.run_dir / "prepare", dep.run_path / "prepare")
    pipeline(dep, stages=("train",))
    return {"model": "the candidate refit on all data", "dir": DEPLOY_DIR, "train_stage": name, "epochs": epochs,
            "data_end": plan.window["end"]}


def _same_items(candidate_prepare: Path, deploy_prepare: Path) -> None:
    """The deploy prepare must hold the candidate's catalogue (it shares the candidate's embed and
    decompose stages)."""
    import pyarrow.parquet as pq

    a, b = (pq.read_table(p / "items.parquet", columns=["item_idx", "item_id"]) for p in (candidate_prepare,
                                                                                        deploy_prepare))
    if not a.equals(b):
        raise AlphaFuseError(f"retrain: the deployable model's catalogue ({b.num_rows} items, {deploy_prepare}) "
                             f"differs from the candidate's ({a.num_rows}, {candidate_prepare})")


def _link_stages(run_dir: Path, inc_dir: Path, stages: Sequence[str]) -> None:
    """``<inc_dir>/<stage> -> ../<stage>`` for every finished one of ``stages`` (replaced atomically)."""
    import shutil

    inc_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
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
    stats = read_json(run_dir / "prepare" / "stats.json") or {}
    if stats:
        facts["items"] = stats.get("items")
        facts["users"] = stats.get("users")
        facts["id_map"] = stats.get("id_map")
    drift = read_json(run_dir / "decompose" / "drift.json")
    if drift:
        facts["drift"] = {k: drift.get(k) for k in ("new_items", "reliable", "reliability", "refit", "reason")}
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
                   help="the interactions up to this period's end (data.path: the full log or a snapshot); "
                        "with --new-rows only the rows since the previous period; default: the previous run's "
                        "data.path")
    p.add_argument("--new-rows", action="store_true",
                   help="--interactions holds only the new rows: append them to the previous period's log "
                        "(written to <registry>/logs/) instead of reading it as the full log")
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


def run_from_args(args: argparse.Namespace, pipeline: Pipeline, overrides: Sequence[str] | None = None) -> dict:
    """:func:`retrain` with the parsed arguments and ``pipeline`` (``pipeline.run_pipeline``)."""
    split_times = [t.strip() for t in args.split_times.split(",")] if args.split_times else None
    return retrain(args.previous, args.interactions, args.items, pipeline=pipeline, run_root=args.registry,
                   config=args.config,
                   overrides=list(args.overrides if overrides is None else overrides), split_times=split_times,
                   period_end=args.period_end, run_id=args.run_id, promote_tolerance=args.tolerance,
                   metric=args.metric, new_rows=args.new_rows)


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
        f"serving: {out['deployed']['model']} ({out['serving_dir']})",
        f"latest: {out['latest']}",
        f"registry: {out['registry']}",
    ])


def retrain_command(args: argparse.Namespace, pipeline: Pipeline) -> None:
    """Run ``alphafuse retrain``: progress on stderr, the decision and the registry path on stdout."""
    print(format_result(run_from_args(args, pipeline)))
