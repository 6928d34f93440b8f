"""Hyper-parameter search with Ray Tune: ``alphafuse tune``.

    alphafuse tune --config ml-1m --space space.yaml --methods alphafuse,sasrec_id [key=value ...]

The shared stages (prepare, embed, decompose) run once, through the pipeline, in the run
directory; every trial then trains one configuration on them (one process, plain torch, inside
the trial's Ray actor holding the space file's ``resources``) and reports its validation metrics
to Tune at every validation epoch (``ray.tune.report``), where an ASHA scheduler stops the trials
that trail. Only validation metrics are seen: the best trial of each method is the one with the
highest validation NDCG@k over its epochs, and it is written as a preset file that ``alphafuse
compare --config <file>`` evaluates on the test split. Every method gets the same budget (number
of trials, time, scheduler, resources); the results table states it.

Space file (YAML; every key but ``space`` optional)::

    budget: {num_samples: 16, time_budget_s: 3600, max_concurrent: 4}   # per method, the same for all
    scheduler: {grace_period: 4, reduction_factor: 2}   # ASHA, in epochs (the limit: train.epochs)
    resources: {cpu: 1, gpu: 0.25}                     # per trial
    seed: 0                                             # the random draws of the search
    space:                                              # config keys -> a Tune sampler
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.temperature: {choice: [0.05, 0.07, 0.1]}
      model.dropout: {uniform: [0.1, 0.5]}
      model.num_blocks: {randint: [1, 4]}               # 1..3 (upper bound excluded)
      train.id_lr: {grid: [0.05, 0.2]}                  # every value, in every sample

Outputs under ``<run_dir>/tune/``: ``<method>.yaml`` (the best configuration as a preset),
``results.md`` and ``results.json`` (every trial: parameters, best validation NDCG@k, epochs run,
how it ended), and Tune's own experiment folders under ``ray/``.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, config_from_dict, load_config
from ..errors import ConfigError
from ..runtime.manifest import atomic_write_bytes, atomic_write_json

_log = logging.getLogger(__name__)

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class TuneSpace:
    """A parsed space file (see the module docstring)."""

    space: dict[str, tuple[str, list]]  # config key -> (sampler, its arguments)
    num_samples: int = 8
    time_budget_s: float | None = None
    max_concurrent: int | None = None
    grace_period: int = 4
    reduction_factor: float = 2.0
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1.0})
    seed: int = 0
    source: str = ""

    def trials(self) -> int:
        """Trials per method: ``num_samples`` draws of every grid combination."""
        return self.num_samples * math.prod(len(args) for kind, args in self.space.values() if kind == "grid")

    def budget(self) -> str:
        """The budget in words, as every report states it."""
        time_part = f", at most {self.time_budget_s:g} s" if self.time_budget_s else ""
        return (f"{self.trials()} trials per method{time_part}; ASHA (grace period {self.grace_period} epochs, "
                f"reduction factor {self.reduction_factor:g}) on validation NDCG; "
                f"{', '.join(f'{v:g} {k}' for k, v in self.resources.items())} per trial")


def load_space(path: str | Path) -> TuneSpace:
    """Read and check a space file; ConfigError names the file and the entry at fault."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    unknown = set(data) - {"space", "budget", "scheduler", "resources", "seed"}
    if unknown:
        raise ConfigError(f"{path}: unknown entries {', '.join(sorted(unknown))} "
                          "(expected space, budget, scheduler, resources, seed)")
    space = {}
    for key, spec in (data.get("space") or {}).items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
            raise ConfigError(f"{path}: space.{key}: expected one of {', '.join(SAMPLERS)} with its values, "
                              f"e.g. {{choice: [0.1, 0.2]}}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args or (kind in ("uniform", "loguniform", "randint") and len(args) != 2):
            raise ConfigError(f"{path}: space.{key}.{kind}: expected a list of values "
                              f"({'[low, high]' if kind in ('uniform', 'loguniform', 'randint') else 'non-empty'})")
        space[key] = (kind, args)
    if not space:
        raise ConfigError(f"{path}: space: no parameters to search")
    budget, scheduler = data.get("budget") or {}, data.get("scheduler") or {}
    try:
        out = TuneSpace(space=space, num_samples=int(budget.get("num_samples", 8)),
                        time_budget_s=float(budget["time_budget_s"]) if budget.get("time_budget_s") else None,
                        max_concurrent=int(budget["max_concurrent"]) if budget.get("max_concurrent") else None,
                        grace_period=int(scheduler.get("grace_period", 4)),
                        reduction_factor=float(scheduler.get("reduction_factor", 2)),
                        resources={k: float(v) for k, v in (data.get("resources") or {"cpu": 1}).items()},
                        seed=int(data.get("seed", 0)), source=str(path))
    except (TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path}: budget / scheduler / resources / seed: {e}") from None
    if out.num_samples < 1 or out.grace_period < 1 or out.reduction_factor <= 1:
        raise ConfigError(f"{path}: budget.num_samples and scheduler.grace_period must be >= 1, "
                          "scheduler.reduction_factor > 1")
    if set(out.resources) - {"cpu", "gpu"} or any(v < 0 for v in out.resources.values()):
        raise ConfigError(f"{path}: resources: expected cpu and/or gpu amounts >= 0, got {out.resources}")
    return out


def _with_params(base: dict, params: dict[str, Any]) -> RunConfig:
    """``base`` (a RunConfig dict) with the dotted ``params`` set, validated."""
    data = copy.deepcopy(base)
    for key, value in params.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"space: {key}: not a config key")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"space: {key}: not a config key")
        node[leaf] = value
    return config_from_dict(data)


def _param_space(space: TuneSpace) -> dict:
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "grid": lambda a: tune.grid_search(a),
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](args) for key, (kind, args) in space.space.items()}


def check_space(base: dict, space: TuneSpace) -> None:
    """Every key is a config key and every end of its range a valid value (before any trial)."""
    for key, (kind, args) in space.space.items():
        values = args if kind in ("choice", "grid") else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        for value in values:
            try:
                _with_params(base, {key: value})
            except ConfigError as e:
                raise ConfigError(f"{space.source}: space.{key}: {e}") from None


def metric_name(cfg: RunConfig) -> str:
    """The validation metric trials are ranked by: NDCG@10, or NDCG at the first cut-off without 10
    (what the training recipe selects its epoch by)."""
    return "val_NDCG@10" if 10 in cfg.eval.ks else f"val_NDCG@{cfg.eval.ks[0]}"


def _trial(params: dict, *, base: dict, user: dict, inputs: dict, metric: str, threads: int) -> None:
    """One Tune trial: train ``base`` + ``params`` and report every validation to Tune. The
    parameters must also make a valid config of the ``user``'s own (its back end, whose rules
    may be stricter than the trials' plain torch), else the trial fails: the best one becomes
    a preset of that config."""
    import torch
    from ray import tune

    from ..train.inputs import TrainInputs
    from ..train.launch import quiet_libraries
    from ..train.recipe import train_model

    quiet_libraries()
    torch.set_num_threads(threads)
    _with_params(user, params)
    cfg = _with_params(base, params)

    def report(row: dict, _write_checkpoint) -> None:
        if metric in row:  # validation epochs only: the metric ASHA compares
            tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    result = train_model(cfg, TrainInputs(**inputs), report=report, log=lambda line: None)
    # ended by itself (early stopping or the epoch limit), not by the scheduler
    last = result.history[-1]["epoch"] if result.history else 0
    tune.report({"epoch": last, metric: result.best_metric, "finished": 1})


def tune_method(cfg: RunConfig, method: str, space: TuneSpace, out_dir: Path) -> dict:
    """Search ``space`` (checked by :func:`check_space`) for ``method`` on the finished shared
    stages of ``cfg``'s run directory. Trials train on a GPU when ``resources`` give them one,
    else on the CPU. Returns ``{"method", "metric", "seconds", "trials", "best", "preset"}``."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ..pipeline import train_inputs

    c = copy.deepcopy(cfg)
    c.method = method
    c.validate()
    inputs, _ = train_inputs(c)
    base = c.to_dict()
    # trials train in one process each, on the device their resources hold; no progress lines within an epoch
    base["train"] |= {"backend": "torch", "num_workers": 1, "log_every": 0,
                      "device": "cuda" if space.resources.get("gpu", 0) > 0 else "cpu"}
    metric = metric_name(c)
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=base, user=c.to_dict(), inputs=vars(inputs), metric=metric,
                             threads=max(1, int(space.resources.get("cpu", 1)))),
        dict(space.resources))
    tuner = tune.Tuner(
        trainable, param_space=_param_space(space),
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=space.num_samples, time_budget_s=space.time_budget_s,
            max_concurrent_trials=space.max_concurrent,
            # max_t past the epoch limit: a trial that runs its course ends itself (and says so)
            scheduler=ASHAScheduler(time_attr="epoch", max_t=c.train.epochs + 1, grace_period=space.grace_period,
                                    reduction_factor=space.reduction_factor),
            search_alg=BasicVariantGenerator(random_state=space.seed)),
        run_config=tune.RunConfig(name=f"tune-{method}", storage_path=str((out_dir / "ray").resolve()), verbose=0))
    t0 = time.time()
    grid = tuner.fit()
    trials = [_trial_row(r, metric) for r in grid]
    trials.sort(key=lambda t: -t["best"] if t["best"] is not None else math.inf)
    scored = [t for t in trials if t["best"] is not None]
    if not scored:
        errors = [str(r.error).splitlines()[0] for r in grid if r.error]
        raise ConfigError(f"tune {method}: no trial reported a validation metric"
                          + (f" (first error: {errors[0]})" if errors else ""))
    best = scored[0]
    preset = out_dir / f"{method}.yaml"
    write_preset(cfg, method, best["params"], preset, space, best["best"], metric)
    return {"method": method, "metric": metric, "seconds": round(time.time() - t0, 1), "trials": trials,
            "best": best, "preset": str(preset)}


def _trial_row(result, metric: str) -> dict:
    """One trial's line of the results: parameters, best validation metric, epochs, how it ended."""
    frame = result.metrics_dataframe
    has = frame is not None and metric in frame and frame[metric].notna().any()
    finished = has and "finished" in frame and (frame["finished"] == 1).any()
    epochs_run = frame[frame["finished"] != 1] if finished else frame  # the final line repeats the last epoch
    epochs = int(epochs_run["epoch"].max()) if has and len(epochs_run) else 0
    ended = ("error" if result.error else "finished (early stopping or epoch limit)" if finished
             else "stopped by ASHA or the time budget")
    return {"trial": (result.metrics or {}).get("trial_id", ""), "params": result.config,
            "best": float(frame[metric].max()) if has else None, "epochs": epochs, "ended": ended,
            "error": str(result.error).splitlines()[0] if result.error else None}


def write_preset(cfg: RunConfig, method: str, params: dict, path: Path, space: TuneSpace, value: float,
                 metric: str) -> None:
    """The user's configuration with ``method`` and the best ``params`` as a preset file."""
    tuned = _with_params(cfg.to_dict(), params)
    tuned.method = method
    tuned.name = f"{cfg.name}-{method}-tuned"
    header = (f"# alphafuse tune: the best of {method}'s trials by {metric} = {value:.4f} (validation split only)\n"
              f"# space: {space.source}; budget: {space.budget()}\n"
              f"# parameters: {json.dumps(params, sort_keys=True)}\n")
    body = yaml.safe_dump(tuned.to_dict(), sort_keys=False)
    atomic_write_bytes(path, (header + body).encode())


def results_markdown(title: str, space: TuneSpace, results: list[dict]) -> str:
    """Every method's trials, best first, with the budget they shared."""
    lines = [f"# {title}", "", f"Budget (the same for every method): {space.budget()}.",
             "Trials are ranked by their best validation metric over their epochs; the test split is not used.", ""]
    for res in results:
        keys = list(space.space)
        lines += [f"## {res['method']}: best {res['metric']} {res['best']['best']:.4f} -> {res['preset']}", "",
                  f"{len(res['trials'])} trials in {res['seconds']:.0f} s.", "",
                  "| trial | " + " | ".join(keys) + f" | {res['metric']} | epochs | ended |",
                  "|---|" + "---|" * (len(keys) + 3)]
        for t in res["trials"]:
            values = " | ".join(_fmt(t["params"].get(k)) for k in keys)
            best = f"{t['best']:.4f}" if t["best"] is not None else "n/a"
            ended = t["ended"] + (f": {t['error']}" if t["error"] else "")
            lines.append(f"| {t['trial']} | {values} | {best} | {t['epochs']} | {ended} |")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def tune_methods(cfg: RunConfig, methods: list[str], space: TuneSpace) -> tuple[list[dict], Path]:
    """The shared stages once, then :func:`tune_method` for each method with the same budget; the
    results written to ``<run_dir>/tune/``. Returns the results and that folder."""
    from ..pipeline import run_pipeline
    from ..runtime.ray import ensure_ray

    out_dir = cfg.run_path / "tune"
    for method in methods:  # a bad space fails before any stage runs
        check_space(cfg.to_dict() | {"method": method}, space)
    for method in methods:  # each method's inputs (the ID-only baseline needs prepare alone)
        c = copy.deepcopy(cfg)
        c.method = method
        run_pipeline(c.validate(), stages=("prepare", "embed", "decompose"))
    ensure_ray(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for method in methods:
        _log.info(f"[tune] {method}: {space.budget()}")
        results.append(tune_method(cfg, method, space, out_dir))
        _log.info(f"[tune] {method}: best {results[-1]['metric']} {results[-1]['best']['best']:.4f} "
                  f"-> {results[-1]['preset']}")
    atomic_write_json(out_dir / "results.json", {"budget": space.budget(), "space": space.source,
                                                 "results": results})
    title = f"Tuning {cfg.name}: {', '.join(methods)}"
    atomic_write_bytes(out_dir / "results.md", results_markdown(title, space, results).encode())
    return results, out_dir


def add_tune_arguments(p) -> None:
    p.add_argument("--config", default="quickstart", help="preset name or YAML file")
    p.add_argument("--space", required=True, help="the search space YAML file (see alphafuse_dist.tune)")
    p.add_argument("--methods", default="alphafuse,sasrec_id", help="comma-separated methods, each tuned alike")
    p.add_argument("overrides", nargs="*")


def tune_command(args) -> None:
    cfg = load_config(args.config, args.overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        load_config(args.config, args.overrides + [f"method={m}"])  # an unknown method fails before any work
    results, out_dir = tune_methods(cfg, methods, load_space(args.space))
    print((out_dir / "results.md").read_text())
    print(f"results: {out_dir / 'results.md'}; best presets: {', '.join(r['preset'] for r in results)}")
