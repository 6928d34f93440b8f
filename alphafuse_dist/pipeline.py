"""The stage graph: prepare -> embed -> decompose -> train -> evaluate, each skipped when its
manifest matches (see ``runtime/manifest.py``).

Stage folders in the run directory: ``prepare``, ``embed``, ``decompose`` (shared by every method
and seed run on the same data), then ``train-<method>-s<seed>`` and ``evaluate-<method>-s<seed>``.
A method runs only the stages its item module reads (``model.items.METHOD_INPUTS``): the ID-only
baseline (``method=sasrec_id``) needs no embed/decompose, morec/unisrec only embed. A run_dir on an
object store (``s3://...``) runs the stages in a local mirror, fetching its stage folders from the
store first and uploading each stage as it finishes (``runtime/store.py``).

Example::

    cfg = load_config("quickstart", ["train.epochs=2"])
    out = run_pipeline(cfg)          # {"metrics_path": ..., "metrics": {...}}
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from .config import (RunConfig, check_against_data, evaluate_stage_name, is_uri, section_hash,
                     train_stage_name, with_overrides)
from .errors import AlphaFuseError, ConfigError
from .model.items import METHOD_INPUTS
from .runtime.manifest import (clean_temporaries, make_run_dir, read_manifest, require_stage, run_dir_lock, run_stage,
                               stage_digest, stage_kind, stage_identity, stage_problem)
from .runtime.ray import ensure_ray
from .runtime.store import RunStore
from .runtime.gpu import check_gpus, out_of_memory_hint
from .runtime.tracking import track_run

_log = logging.getLogger(__name__)


def prepare_stage(cfg: RunConfig, force: bool = False) -> Path:
    from .data.prepare import prepare
    from .data.sources import source_inputs

    run_dir = cfg.run_path
    tokenizer = None
    if cfg.data.text_max_tokens is not None:
        from .embed.encoder import resolve_model

        tokenizer = resolve_model(cfg.embed.model)  # texts are cut by the tokens of the model that embeds them
    return run_stage(run_dir, "prepare", config_hash=section_hash(cfg.data, tokenizer),
                     inputs=source_inputs(cfg.data),
                     build=lambda tmp: prepare(cfg.data, tmp, tokenizer_path=tokenizer), force=force)


def embed_stage(cfg: RunConfig, force: bool = False) -> Path:
    from .embed.cache import model_fingerprint
    from .embed.encoder import resolve_model
    from .embed.job import embed_items

    run_dir = cfg.run_path
    prep = require_stage(run_dir, "prepare")

    # outside the stage folder and hidden, so that it survives reruns of the stage and is not part
    # of the stage's fingerprint
    cache_dir = Path(cfg.embed.cache_dir).expanduser() if cfg.embed.cache_dir else run_dir / ".embed-cache"

    def build(tmp: Path) -> dict:
        ensure_ray(cfg)
        return embed_items(prep / "items.parquet", cfg.embed, tmp, cache_dir=cache_dir)

    # the model folder's fingerprint joins the hash: new weights under the same name rerun the stage
    return run_stage(run_dir, "embed", config_hash=section_hash(cfg.embed, model_fingerprint(resolve_model(cfg.embed.model))),
                     inputs={"prepare": stage_digest(run_dir, "prepare")}, build=build, force=force)


def _previous_digest(folder: str, key: str) -> str:
    """The manifest digest of a previous run's finished stage folder named by config ``key``."""
    path = Path(folder).expanduser()
    manifest = read_manifest(path)
    if not manifest or "digest" not in manifest:
        raise ConfigError(f"{key}={folder}: not a finished stage folder (no readable manifest.json); "
                          "the previous run did not complete this stage")
    problem = stage_problem(path, manifest)
    if problem is not None:
        raise ConfigError(f"{key}={folder}: the stage no longer matches its manifest: {problem}")
    return manifest["digest"]


def _check_data(cfg: RunConfig, run_dir: Path, decomposed: Path | None = None) -> int:
    """:func:`config.check_against_data` with the finished prepare (embed, decompose) stages; the
    item count."""
    num_items = read_manifest(require_stage(run_dir, "prepare"))["rows"]["items"]
    embedded = read_manifest(run_dir / "embed") if METHOD_INPUTS[cfg.method] & {"semantic", "basis"} else None
    derived = None
    if decomposed is not None:
        from .decompose.basis import recorded_id_dims

        derived = recorded_id_dims(decomposed)
    check_against_data(cfg, num_items=num_items, language_dim=(embedded or {}).get("dim"), derived_id_dims=derived)
    return num_items


def decompose_stage(cfg: RunConfig, force: bool = False) -> Path:
    from .decompose.stage import decompose

    run_dir = cfg.run_path
    emb = require_stage(run_dir, "embed")
    prep = require_stage(run_dir, "prepare")
    num_items = _check_data(cfg, run_dir)

    def build(tmp: Path) -> dict:
        ensure_ray(cfg)
        weights = None
        if cfg.decompose.weighted_mean or cfg.decompose.weighted_covariance:
            import numpy as np
            from .runtime.parquet import read_table

            items = read_table(prep / "items.parquet", columns=["item_idx", "popularity"])
            weights = np.zeros(num_items)
            weights[items.column("item_idx").to_numpy()] = items.column("popularity").to_numpy()
        return decompose(emb, cfg.decompose, cfg.model.dim, num_items, tmp, weights=weights)

    inputs = {"embed": stage_digest(run_dir, "embed")}
    if cfg.decompose.reuse_basis:  # a rebuilt previous basis reruns this stage
        inputs["reuse_basis"] = _previous_digest(cfg.decompose.reuse_basis, "decompose.reuse_basis")
    if cfg.decompose.weighted_mean or cfg.decompose.weighted_covariance:  # weights: prepare's popularity column
        inputs["prepare"] = stage_digest(run_dir, "prepare")
    return run_stage(run_dir, "decompose", config_hash=section_hash(cfg.decompose, cfg.model.dim),
                     inputs=inputs, build=build, force=force)


def train_config_hash(cfg: RunConfig) -> str:
    """The train stage's config hash: the sections that change the trained model (the validation
    protocol picks the kept epoch; named only when filtered, so unfiltered stages keep their hash)."""
    filtered = ("validation filtered",) if cfg.eval.exclude_history else ()
    return section_hash(cfg.method, cfg.seed, cfg.model, cfg.train, cfg.eval.ks,
                        cfg.decompose if METHOD_INPUTS[cfg.method] & {"semantic", "basis"} else None, *filtered)


def train_identity(cfg: RunConfig, inputs: dict[str, str]) -> str:
    """The train stage's full identity (config hash, inputs' digests, code fingerprint): the key of
    its Ray Train run, so that a run is resumed only by the very stage that started it."""
    return stage_identity("train", train_config_hash(cfg), inputs)


def train_inputs(cfg: RunConfig) -> tuple["TrainInputs", dict[str, str]]:
    """What the train stage of ``cfg`` reads (the finished upstream stage folders of its run
    directory, checked against the config) and their digests."""
    from .train.inputs import TrainInputs

    run_dir = cfg.run_path
    prep = require_stage(run_dir, "prepare")
    inputs = {"prepare": stage_digest(run_dir, "prepare")}
    needs = METHOD_INPUTS[cfg.method]
    semantic = language = basis = decomposed = None
    if needs & {"semantic", "basis"}:
        decomposed = require_stage(run_dir, "decompose").resolve()
        inputs["decompose"] = stage_digest(run_dir, "decompose")
        semantic = str(decomposed / "semantic.safetensors") if "semantic" in needs else None
        basis = str(decomposed) if "basis" in needs else None
    if "language" in needs:
        language = str(require_stage(run_dir, "embed").resolve())
        inputs["embed"] = stage_digest(run_dir, "embed")
    if cfg.train.warm_start:  # a retrained previous model reruns this stage
        inputs["warm_start"] = _previous_digest(cfg.train.warm_start, "train.warm_start")
    num_items = _check_data(cfg, run_dir, decomposed)
    return TrainInputs(prepare_dir=str(prep.resolve()), semantic_path=semantic, num_items=num_items,
                       language_path=language, basis_path=basis), inputs


def train_stage(cfg: RunConfig, force: bool = False) -> Path:
    from .train.launch import train_local, train_with_ray

    run_dir = cfg.run_path
    train_in, inputs = train_inputs(cfg)

    def build(tmp: Path) -> dict:
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        if cfg.train.backend == "torch" and cfg.train.num_workers == 1:
            # its lines go to the log file (the terminal with --verbose), as Ray Train workers' do; a bar shows progress
            return train_local(cfg, train_in, tmp, _log.debug)
        ensure_ray(cfg)
        storage = RunStore(cfg.run_uri).ray_storage() if cfg.run_uri else None  # checkpoints on the store
        return train_with_ray(cfg, train_in, tmp, identity=train_identity(cfg, inputs), storage=storage)

    return run_stage(run_dir, train_stage_name(cfg), config_hash=train_config_hash(cfg), inputs=inputs, build=build,
                     force=force)


def evaluate_stage(cfg: RunConfig, force: bool = False) -> Path:
    from .evaluate.stage import evaluate

    run_dir = cfg.run_path
    prep = require_stage(run_dir, "prepare")
    trained = require_stage(run_dir, train_stage_name(cfg))
    return run_stage(run_dir, evaluate_stage_name(cfg),
                     config_hash=section_hash(cfg.eval, cfg.model, cfg.method, cfg.seed),
                     inputs={"prepare": stage_digest(run_dir, "prepare"),
                             "train": stage_digest(run_dir, train_stage_name(cfg))},
                     build=lambda tmp: evaluate(cfg, trained / "model.safetensors", prep, tmp), force=force)


STAGES = ("prepare", "embed", "decompose", "train", "evaluate")
SHARED_STAGES = ("prepare", "embed", "decompose")  # one folder for every method and seed


def run_pipeline(cfg: RunConfig, *, stages: tuple[str, ...] = STAGES, force: tuple[str, ...] = ()) -> dict:
    """Run the stages in order (skipping up-to-date ones, except those in ``force``); return the
    metrics and their path."""
    store = RunStore(cfg.run_uri) if cfg.run_uri else None  # a bad URI or bucket: one line, before any work
    run_dir = cfg.run_path
    make_run_dir(run_dir)
    with run_dir_lock(run_dir):
        return _run_stages(cfg, run_dir, stages, force=set(force), store=store)


def stage_folders(cfg: RunConfig) -> tuple[str, ...]:
    """The stage folders a run of ``cfg`` writes or reads."""
    return (*SHARED_STAGES, train_stage_name(cfg), evaluate_stage_name(cfg))


def _run_stages(cfg: RunConfig, run_dir: Path, stages: tuple[str, ...], clean: bool = True,
                force: set[str] | None = None, store: RunStore | None = None) -> dict:
    """``force``: stages to run even when up to date; a shared stage leaves the set once it ran, so
    that the runs of ``compare`` after the first reuse it. With a run_dir on an object store, the
    store's stage folders of the run are fetched first and each stage is uploaded once it ran."""
    force = set() if force is None else force
    if clean:
        clean_temporaries(run_dir)
    t0 = time.time()
    fns = {"prepare": prepare_stage, "embed": embed_stage, "decompose": decompose_stage,
           "train": train_stage, "evaluate": evaluate_stage}
    needs = METHOD_INPUTS[cfg.method]
    skipped = {"embed"} if not needs else set()
    if not needs & {"semantic", "basis"}:
        skipped.add("decompose")
    if store is None and cfg.run_uri:
        store = RunStore(cfg.run_uri)
    if store is not None:
        store.pull([folder for folder in stage_folders(cfg) if stage_kind(folder) not in skipped])
    todo = [name for name in stages if name not in skipped]
    check_gpus(cfg, todo)
    for name in todo:
        _log.info(f"[{name}] ...")
        with out_of_memory_hint(name, cfg):
            folder = fns[name](cfg, force=name in force)
        if store is not None:
            store.push(folder.name)
        if name in SHARED_STAGES:
            force.discard(name)
    out: dict = {"run_dir": str(run_dir), "seconds": round(time.time() - t0, 1)}
    if "evaluate" in stages:
        path = run_dir / evaluate_stage_name(cfg) / "metrics.json"
        out |= {"metrics_path": str(path), "metrics": json.loads(path.read_text())}
        history = run_dir / train_stage_name(cfg) / "history.json"
        track_run(cfg, json.loads(history.read_text()) if history.exists() else None, out["metrics"])
    return out


# AlphaFuse's ablations (``compare --ablations``): row -> overrides of the alphafuse run. Each row
# runs in its own run directory <run_dir>/ablations/<row> (its own decompose stage), sharing the
# base run's embedding cache. "threshold" takes model.dim = d_l and model.id_dims = the d_n the rule
# derives (resolved once the row's decompose stage ran).
ABLATIONS: dict[str, tuple[str, ...]] = {
    "no-clip": ("model.id_space=full_space",),
    "no-whiten": ("decompose.whiten=false",),
    "semantic-only": ("model.id_space=semantic_only",),
    "dn16": ("model.id_dims=16",), "dn32": ("model.id_dims=32",), "dn64": ("model.id_dims=64",),
    "dn96": ("model.id_dims=96",),
    "threshold": ("decompose.null_rule=threshold", "decompose.null_threshold=0.25", "decompose.scale=40"),
    "weighted-cov": ("decompose.weighted_covariance=true",),
}


def plan_runs(cfg: RunConfig, methods: list[str], seeds: list[int], *, backbones: list[str] | None = None,
              ablations: list[str] = ()) -> list[tuple[str, RunConfig]]:
    """The (row label, config) of every run of a comparison: methods x backbones x seeds, then the
    ``ablations`` rows (``ABLATIONS``) of alphafuse x backbones x seeds. Labels: ``<method>``,
    ``<method>/<backbone>`` when ``backbones`` is given, `` [<row>]`` for an ablation row.

    Raises:
        ConfigError: an unknown ablation row, or a run whose config is invalid (naming the key).
    """
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ConfigError(f"--ablations: unknown row(s) {', '.join(unknown)} (rows: {', '.join(ABLATIONS)})")
    rows: list[tuple[str, tuple[str, ...], list[str]]] = [("", (), methods)]
    rows += [(a, ABLATIONS[a], ["alphafuse"]) for a in ablations]
    runs = []
    for row, overrides, row_methods in rows:
        for method in row_methods:
            for backbone in backbones or [cfg.model.backbone]:
                for seed in seeds:
                    extra = [f"method={method}", f"model.backbone={backbone}", f"seed={seed}"]
                    if row:
                        extra += [f"run_dir={_sub_location(cfg.run_location, 'ablations', row)}",
                                  f"embed.cache_dir={cfg.embed.cache_dir or cfg.run_path / '.embed-cache'}"]
                    try:
                        c = with_overrides(cfg, [*extra, *overrides])
                    except ConfigError as e:
                        raise ConfigError(f"--ablations {row or '(none)'}: {e}") from None
                    label = method + (f"/{backbone}" if backbones else "") + (f" [{row}]" if row else "")
                    runs.append((label, c))
    return runs


def _sub_location(location: str, *parts: str) -> str:
    """The folder ``parts`` inside a run directory or inside an object-store URI (its query kept)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    base, _, query = location.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + (f"?{query}" if query else "")


def _resolve_threshold_dims(c: RunConfig) -> None:
    """The threshold rule keeps all d_l directions: run the row's prepare, embed and decompose
    stages with model.dim = d_l, then set model.id_dims to the d_n the rule derived."""
    from .decompose.basis import recorded_id_dims

    make_run_dir(c.run_path)
    with run_dir_lock(c.run_path):
        _run_stages(c, c.run_path, ("prepare", "embed"))
        c.model.dim = int(read_manifest(c.run_path / "embed")["dim"])
        decompose_stage(c)
        if c.run_uri:
            RunStore(c.run_uri).push("decompose")
    c.model.id_dims = int(recorded_id_dims(c.run_path / "decompose"))
    c.validate()


def compare(cfg: RunConfig, methods: list[str], seeds: list[int], *, stages: tuple[str, ...] = STAGES,
            jobs: int = 1, child_logging: Callable[..., None] | None = None, force: tuple[str, ...] = (),
            backbones: list[str] | None = None, ablations: list[str] = ()) -> list[tuple[str, dict]]:
    """Run methods x backbones x seeds (and AlphaFuse's ``ablations`` rows, see :func:`plan_runs`)
    on the same prepared data and splits; return (``<label> (seed <s>)``, metrics) per run.

    ``jobs > 1`` runs the per-run stages (train, evaluate) of up to ``jobs`` runs at once in child
    processes of this machine, after the shared stages (prepare, embed, decompose) ran once per
    run directory here. It is meant for one-process training (``train.backend=torch``,
    ``train.num_workers=1``): small models leave a GPU mostly idle, and one process per run fills
    it. Ray Train runs schedule their own workers on the cluster, so they are refused. ``force``
    names stages to run even when up to date: the shared ones once, the per-run ones for every run.
    Each child calls ``child_logging(verbose=..., prefix="[<method> s<seed>] ")``
    (``cli.configure_logging``: progress on stderr, each line naming its run) before its stages,
    when given.
    """
    planned = plan_runs(cfg, methods, seeds, backbones=backbones, ablations=ablations)
    if jobs > 1 and (cfg.train.backend != "torch" or cfg.train.num_workers != 1):
        raise AlphaFuseError(f"compare --jobs {jobs}: parallel runs are for one-process training "
                             "(train.backend=torch train.num_workers=1); with Ray Train the cluster "
                             "schedules the workers, use --jobs 1")
    for _, c in planned:
        if c.decompose.null_rule == "threshold" and c.decompose.null_rule != cfg.decompose.null_rule:
            _resolve_threshold_dims(c)
    runs = [c for _, c in planned]
    labels = [f"{label} (seed {c.seed})" for label, c in planned]
    if jobs <= 1:
        # the forced shared stages leave a run directory's set once they ran there
        rows, forced_dirs = [], {}
        for label, c in zip(labels, runs):
            make_run_dir(c.run_path)
            todo = forced_dirs.setdefault(c.run_path, set(force))
            with run_dir_lock(c.run_path):
                todo |= set(force) - set(SHARED_STAGES)
                out = _run_stages(c, c.run_path, stages, force=todo)
            rows.append((label, out["metrics"]))
        return rows
    shared = tuple(s for s in stages if s in SHARED_STAGES)
    per_run = tuple(s for s in stages if s not in shared)
    for run_dir in dict.fromkeys(c.run_path for c in runs):
        make_run_dir(run_dir)
        with run_dir_lock(run_dir):
            clean_temporaries(run_dir)
            pending = set(force)
            if shared:  # one pass per method: each needs its own inputs
                for c in {c.method: c for c in runs if c.run_path == run_dir}.values():
                    _run_stages(c, run_dir, shared, force=pending)
    base = make_run_dir(cfg.run_path)
    with run_dir_lock(base):
        return _parallel_runs(runs, labels, per_run, jobs, child_logging, tuple(s for s in force if s in per_run))


def _parallel_runs(runs: list[RunConfig], labels: list[str], stages: tuple[str, ...], jobs: int,
                   child_logging: Callable[..., None] | None, force: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """``stages`` of every run in a pool of ``jobs`` spawned processes (the caller holds the base
    run directory's lock: stage folders are per (method, backbone, seed) and run directory, so the
    runs never write the same one)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             initializer=_child_init, initargs=(threads,)) as pool:
        # the terminal's level (a log file's handler takes debug lines in any case)
        logger = logging.getLogger("alphafuse_dist")
        verbose = min((h.level for h in logger.handlers if not isinstance(h, logging.FileHandler)),
                      default=logger.getEffectiveLevel()) < logging.INFO
        futures = [pool.submit(_child_run, c, stages, child_logging, verbose, force) for c in runs]
        rows = []
        for label, fut in zip(labels, futures):
            out = fut.result()  # re-raises the child's error (AlphaFuseError included)
            _log.info(f"[compare] {label} done in {out['seconds']} s")
            rows.append((label, out["metrics"]))
    return rows


def _child_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # the children share the machine's cores


def _child_run(cfg: RunConfig, stages: tuple[str, ...], child_logging: Callable[..., None] | None,
               verbose: bool, force: tuple[str, ...] = ()) -> dict:
    if child_logging is not None:  # the parent's level, each line prefixed with the run it belongs to
        child_logging(verbose=verbose, prefix=f"[{cfg.method} s{cfg.seed}] ")
    return _run_stages(cfg, cfg.run_path, stages, clean=False, force=set(force))
