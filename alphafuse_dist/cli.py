"""The ``alphafuse`` command.

    alphafuse quickstart [key=value ...]                 AlphaFuse vs ID-only SASRec on the embedded data
    alphafuse run --config NAME|FILE [key=value ...]     the whole pipeline (or --stages a,b) for one method
                                                         (--force a,b: rerun those stages even if up to date)
    alphafuse compare --config NAME|FILE --methods alphafuse,sasrec_id --seeds 22,23 [--jobs N] [key=value ...]
                      [--backbones sasrec,dreamrec] [--ablations [ROWS]]   rows: method x backbone (+ ablations)
    alphafuse export --run DIR [--method M] [--seed S] [--to DIR] [--force]   export for serving (DIR: a run or a registry)
    alphafuse recommend --run DIR --item ID [--item ID ...] [--k 10] [--exclude-history] [--json]
                        [--new-item ID --new-item-text TEXT ...] [--new-items FILE]   text-only items too
    alphafuse serve --export DIR [--host 127.0.0.1] [--port 8000] [--device cpu|cuda]   Ray Serve HTTP endpoint
    alphafuse retrain --previous REGISTRY|RUN [--interactions F [--new-rows]] [--items F] [--tolerance X] [k=v ...]
                                                         next period, promoted only if not worse
    alphafuse presets                                    list the shipped presets
    alphafuse inspect-data PATH [--items PATH]           columns, types and the data.* keys for your own files
    alphafuse download URL --sha256 HEX --to PATH        fetch a data file (resumable, checksum-verified)
    alphafuse download NAME --to DIR [--from DIR|URL]    fetch a named data set (alphafuse download --list)
    alphafuse tune --config NAME|FILE --space FILE --methods a,b [key=value ...]
                                                         Ray Tune search, ASHA on validation NDCG, best preset

Progress goes to stderr: one line per stage and a bar with count, rate and ETA for embed, train
and evaluate (plain lines every 30 s where stderr is no terminal); ``run``, ``compare`` and
``quickstart`` write the full log (debug lines, Ray's output) to ``<run_dir>/alphafuse.log`` and
show its last lines only when something failed (``-v`` / ``--verbose``: everything on the
terminal, debug lines with the module that wrote them). Errors caused by input (config, data)
print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .config import METHODS, load_config, preset_names
from .errors import AlphaFuseError, ConfigError, one_line, user_error
from .runtime.console import LOG_FILE, log_tail, log_to_file, redirect_to_log, terminal
from .runtime.manifest import make_run_dir
from .runtime.progress import clear_bars


def _byte_size(text: str) -> int:
    """``"500M"`` -> 524288000: bytes, or a count with a K/M/G/T (binary) suffix."""
    units = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
    number, unit = text[:-1] if text[-1:].isalpha() else text, text[-1:].upper() if text[-1:].isalpha() else ""
    if unit not in units or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: expected bytes or a number with K, M, G or T")
    return int(number) << units[unit]


class _StderrHandler(logging.StreamHandler):
    """Writes to the terminal's stderr of the moment (a test's capture; after
    :func:`console.redirect_to_log`, the terminal the process started on)."""

    def __init__(self):
        super().__init__(terminal().err)

    @property
    def stream(self):
        return terminal().err

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        with clear_bars(self.stream):  # a progress bar on the terminal is drawn again below the line
            super().emit(record)


def configure_logging(verbose: bool | int = False, prefix: str = "") -> None:
    """Progress lines of every ``alphafuse_dist`` module (``logging.getLogger(__name__)``) to
    stderr: INFO and above as bare lines, or with ``verbose`` DEBUG and above with their level and
    module. Calling it again replaces the handler it installed (``prefix`` starts every line)."""
    logger = logging.getLogger("alphafuse_dist")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    fmt = "%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s"
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + fmt))
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


# set by main(): whether this command line sends the process's output to the run's log file
_quiet = False


def _start_log(cfg) -> None:
    """``<run_dir>/alphafuse.log`` gets every log line; in a quiet command (the default of the
    ``alphafuse`` executable, not ``-v``) also all other output of this process and of Ray."""
    path = make_run_dir(cfg.run_path) / LOG_FILE  # a run_dir that is a file: one line naming it
    try:
        if _quiet and terminal().log is None:
            redirect_to_log(path)
            print(f"log: {path}", file=terminal().err)
        else:
            log_to_file(path)
    except OSError:
        return  # a run_dir that cannot be written: the run's lock reports it, naming the file



def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alphafuse", description="Distributed AlphaFuse training (Ray + TorchRec).")
    # -v before or after the command: "alphafuse -v run ..." and "alphafuse run -v ..."
    p.add_argument("-v", "--verbose", action="count", default=0, help="debug lines too")
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="debug lines too")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", parents=[verbose],
                       help="all stages on the embedded MovieLens set, AlphaFuse vs SASRec-ID")
    q.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5")
    r = sub.add_parser("run", parents=[verbose], help="run the pipeline for one method")
    r.add_argument("--config", default="quickstart", help="preset name or YAML file")
    r.add_argument("--stages", default="prepare,embed,decompose,train,evaluate",
                   help="comma-separated stages to run (up-to-date ones are skipped anyway)")
    r.add_argument("--force", default="", metavar="STAGES",
                   help="comma-separated stages to run even if up to date (later stages rerun when its output changes)")
    r.add_argument("overrides", nargs="*")
    c = sub.add_parser("compare", parents=[verbose],
                       help="several methods x seeds on the same prepared data, one table")
    c.add_argument("--config", default="quickstart")
    c.add_argument("--methods", default="alphafuse,sasrec_id",
                   help=f"comma-separated methods, any of {','.join(METHODS)}")
    c.add_argument("--backbones", default=None,
                   help="comma-separated backbones, e.g. sasrec,dreamrec: rows become method x backbone "
                        "(default: the config's model.backbone)")
    c.add_argument("--ablations", nargs="?", const="all", default=None, metavar="ROWS",
                   help="also AlphaFuse's ablation rows (comma-separated, or all: "
                        "no-clip,no-whiten,semantic-only,dn16,dn32,dn64,dn96,threshold,weighted-cov)")
    c.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's seed)")
    c.add_argument("--output", default=None, help="also write the table as JSON here")
    c.add_argument("--title", default=None, help="title of <run_dir>/report/report.md")
    c.add_argument("--stages", default="prepare,embed,decompose,train,evaluate",
                   help="stages to run per method (e.g. train,evaluate on a machine holding the earlier ones)")
    c.add_argument("--jobs", type=int, default=1,
                   help="train/evaluate this many (method, seed) runs at once in child processes "
                        "(one-process training only: train.backend=torch train.num_workers=1)")
    c.add_argument("--force", default="", metavar="STAGES",
                   help="comma-separated stages to run even if up to date (the shared ones once, the others per run)")
    c.add_argument("overrides", nargs="*")
    sub.add_parser("presets", parents=[verbose], help="list the shipped presets")
    i = sub.add_parser("inspect-data", parents=[verbose],
                       help="a data file's columns and types, and the data.* keys to read it")
    i.add_argument("path", help="interactions file (CSV, TSV, Parquet, JSON lines; .gz/.zst; a path or URI)")
    i.add_argument("--items", default=None, metavar="PATH", help="the items file, if there is one")
    d = sub.add_parser("download", parents=[verbose],
                       help="download a data file or a named data set, resuming a partial one, and verify sha256s")
    d.add_argument("url", nargs="?", help="an https:// address (with --sha256) or a named data set")
    d.add_argument("--sha256", help="the expected sha256 digest of URL (64 hex digits)")
    d.add_argument("--to", help="destination file, or folder for a named data set (downloads go to *.partial first)")
    d.add_argument("--from", dest="mirror", default=None, metavar="DIR|URL",
                   help="named data set: take its files from this folder or https address instead")
    d.add_argument("--list", action="store_true", help="list the named data sets")
    d.add_argument("--max-size", type=_byte_size, default=None, metavar="SIZE",
                   help="refuse a larger download, e.g. 500M or 2G (default 64G)")
    from .serve import add_export_arguments, add_recommend_arguments, add_serve_arguments

    add_export_arguments(sub.add_parser("export", parents=[verbose],
                                        help="export a trained model for serving: item vectors, torch.export user "
                                             "encoder, text-item basis, model card"))
    add_recommend_arguments(sub.add_parser("recommend", parents=[verbose],
                                           help="top-k items with titles for a history of item ids"))
    from .tune import add_tune_arguments

    add_tune_arguments(sub.add_parser("tune", parents=[verbose],
                                      help="hyper-parameter search with Ray Tune (ASHA on validation NDCG), the "
                                           "same budget per method; the best configuration as a preset file"))
    add_serve_arguments(sub.add_parser("serve", parents=[verbose],
                                       help="serve an export over HTTP (Ray Serve, dynamic batching)"))
    from .retrain.job import add_retrain_arguments

    add_retrain_arguments(sub.add_parser("retrain", parents=[verbose],
                                         help="the next period's model from the previous run: warm start, compared "
                                              "with the previous model on the newest period (bootstrap interval), "
                                              "the winner refit on all the period's data, registered and served"))
    return p


def _stages(text: str, option: str = "--stages") -> tuple[str, ...]:
    from .pipeline import STAGES

    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise AlphaFuseError(f"{option}: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    return stages


def _forced(text: str, stages: tuple[str, ...]) -> tuple[str, ...]:
    """The ``--force`` stages: known ones, each among the stages that run."""
    force = _stages(text, "--force")
    outside = [s for s in force if s not in stages]
    if outside:
        raise AlphaFuseError(f"--force: stage(s) {', '.join(outside)} not among the stages that run "
                             f"({', '.join(stages)})")
    return force


def _compare(config: str, overrides: list[str], methods: str, seeds: str | None, output: str | None,
             stages: str = "prepare,embed,decompose,train,evaluate", title: str | None = None,
             jobs: int = 1, force: str = "", backbones: str | None = None, ablations: str | None = None) -> None:
    from .evaluate.stage import format_table
    from .pipeline import ABLATIONS, compare, plan_runs

    stage_list = _stages(stages)
    force_list = _forced(force, stage_list)

    cfg = load_config(config, overrides)
    title = title or f"{cfg.name}: {methods}"
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        load_config(config, overrides + [f"method={m}"])  # validates the method name up front
    seed_list = [cfg.seed]
    if seeds:
        try:
            seed_list = [int(s) for s in seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds {seeds}: expected comma-separated integers, e.g. 22,23") from None
    backbone_list = [b.strip() for b in backbones.split(",") if b.strip()] if backbones else None
    ablation_list = (list(ABLATIONS) if ablations == "all" else
                     [a.strip() for a in ablations.split(",") if a.strip()] if ablations else [])
    if jobs < 1:
        raise AlphaFuseError(f"--jobs {jobs}: must be >= 1")
    _start_log(cfg)
    extra = {"backbones": backbone_list, "ablations": ablation_list} if backbone_list or ablation_list else {}
    rows = compare(cfg, method_list, seed_list, stages=stage_list, jobs=jobs, child_logging=configure_logging,
                   force=force_list, **extra)
    out = terminal().out
    table = format_table(rows, ks=tuple(cfg.eval.ks))
    print("\n" + table, file=out)
    path = cfg.run_path / "comparison.json"
    body = json.dumps([{"run": label, **res} for label, res in rows], indent=2)
    from .runtime.manifest import atomic_write_bytes

    atomic_write_bytes(path, body.encode())
    if output:
        atomic_write_bytes(Path(output), body.encode())
    print(f"\nresults: {path}", file=out)
    if "evaluate" in stages:
        planned = plan_runs(cfg, method_list, seed_list, backbones=backbone_list, ablations=ablation_list)
        report_dir = _write_report(cfg, planned, rows, title)
        print(f"report: {report_dir / 'report.md'} (+ report.json, metrics_by_group.png, training_curves.png)",
              file=out)
    if cfg.run_uri:  # the stages are on the store already; the results and report join them
        from .runtime.store import RunStore

        store = RunStore(cfg.run_uri)
        places = [store.put(rel) for rel in ("comparison.json", "report") if (cfg.run_path / rel).exists()]
        print(f"uploaded: {', '.join(places)}", file=out)


def _write_report(cfg, planned: list, rows: list[tuple[str, dict]], title: str) -> Path:
    """The report of the runs (one row per label: mean ± std over seeds, improvement row, plots)
    in <run_dir>/report/, its plots logged to ``tracking.backend``; ``planned``:
    ``pipeline.plan_runs``'s (label, config) of the runs."""
    from .config import train_stage_name
    from .evaluate.report import build_report, write_report
    from .runtime.tracking import track_report

    runs = []
    for (label, c), (_, metrics) in zip(planned, rows):
        history = c.run_path / train_stage_name(c) / "history.json"
        runs.append(({**metrics, "method": label}, json.loads(history.read_text()) if history.exists() else None))
    labels = [label for label, _ in planned]
    proposed = next((label for label in labels if label.split("/")[0] == "alphafuse" and "[" not in label), labels[0])
    folder = cfg.run_path / "report"
    written = write_report(build_report(runs, proposed=proposed), folder, title=title, k=cfg.eval.ks[0])
    track_report(cfg, [p for p in written if p.suffix == ".png"])
    return folder


def _download(args: argparse.Namespace) -> None:
    from .data.download import DATASETS, download, download_dataset

    if args.list:
        for name, ds in DATASETS.items():
            print(f"{name} (data.source={ds.source}): {ds.about}")
        return
    if not args.url or not args.to:
        raise AlphaFuseError("download: give a URL or data set name and --to (or --list)")
    # the progress line redraws itself with '\r': only a terminal shows that as intended
    progress = sys.stderr.isatty()
    if args.sha256 is None:
        for path in download_dataset(args.url, Path(args.to), mirror=args.mirror, progress=progress):
            print(path)
        return
    limit = {} if args.max_size is None else {"max_bytes": args.max_size}
    print(download(args.url, Path(args.to), args.sha256, progress=progress, **limit))


def exit_code(run: Callable[[], object], prefix: str = "alphafuse: error: ") -> int:
    """Call ``run``; 0, or 2 with the error in one line on stderr when input (config, data) is at
    fault, also when a Ray task or Ray Train worker raised it, or the file system refused a write
    (:func:`errors.user_error`). Other exceptions propagate with their traceback."""
    try:
        run()
    except Exception as e:
        err = user_error(e)
        if err is None:
            raise
        print(f"{prefix}{one_line(str(err))}", file=terminal().err)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``alphafuse`` executable (``argv`` None: the command line; output quiet unless ``-v``)
    or a call with ``argv`` (a test, a notebook: nothing redirected)."""
    global _quiet
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    _quiet = argv is None and not args.verbose
    configure_logging(args.verbose)
    try:
        return exit_code(lambda: _command(args))
    except Exception:
        log = terminal().log
        if log is None:
            raise
        import traceback

        traceback.print_exc()  # into the log, after Ray's lines about the failure
        print(f"alphafuse: failed; the last lines of {log}:\n{log_tail()}", file=terminal().err)
        return 1


def _served_run(path: str, flag: str = "--run") -> str:
    """``--run`` (``flag``) as given, or, for a retraining registry, the model its ``LATEST`` run deployed."""
    from .retrain.registry import Registry

    if not Registry.is_registry(path):
        return path
    entry = Registry(path).latest()
    if entry is None:
        raise AlphaFuseError(f"{flag} {path}: a registry with no promoted run yet (no LATEST); "
                             "run alphafuse retrain first or pass a run directory")
    return str(entry.serving_dir)


def _set_umask() -> None:
    """Files and folders this process and the Ray workers it starts write are owner-only (run
    directories hold user ids and histories) unless ``ALPHAFUSE_UMASK`` (octal, e.g. 022) says otherwise."""
    value = os.environ.get("ALPHAFUSE_UMASK", "077")
    try:
        mask = int(value, 8)
    except ValueError:
        mask = -1
    if not 0 <= mask <= 0o777:
        raise ConfigError(f"ALPHAFUSE_UMASK={value!r}: expected an octal umask such as 077 or 022")
    os.umask(mask)


def _command(args: argparse.Namespace) -> None:
    """Run the parsed command (input errors propagate to :func:`exit_code`)."""
    _set_umask()
    if args.command == "presets":
        print("\n".join(preset_names()))
    elif args.command == "inspect-data":
        from .data.inspect import describe

        print(describe(args.path, args.items))
    elif args.command == "download":
        _download(args)
    elif args.command == "tune":
        from .tune import tune_command

        tune_command(args)
    elif args.command == "quickstart":
        _compare("quickstart", args.overrides, "alphafuse,sasrec_id", None, None,
                 title="Quickstart: AlphaFuse vs SASRec-ID on MovieLens ml-latest-small")
    elif args.command == "compare":
        _compare(args.config, args.overrides, args.methods, args.seeds, args.output, args.stages, args.title,
                 args.jobs, args.force, args.backbones, args.ablations)
    elif args.command == "export":
        from .serve import export_command

        args.run = _served_run(args.run)
        export_command(args)
    elif args.command == "recommend":
        from .serve import recommend_command

        args.run = _served_run(args.run)
        recommend_command(args)
    elif args.command == "serve":
        from .serve import serve_command

        args.export = _served_run(args.export, "--export")
        serve_command(args)
    elif args.command == "retrain":
        from .pipeline import run_pipeline
        from .retrain.job import retrain_command

        retrain_command(args, pipeline=run_pipeline)
    elif args.command == "run":
        from .evaluate.stage import format_table
        from .pipeline import run_pipeline

        stages = _stages(args.stages)
        force = _forced(args.force, stages)
        cfg = load_config(args.config, args.overrides)
        _start_log(cfg)
        out = run_pipeline(cfg, stages=stages, force=force)
        if "metrics" in out:
            print("\n" + format_table([(cfg.method, out["metrics"])], ks=tuple(cfg.eval.ks)), file=terminal().out)
            print(f"\nmetrics: {out['metrics_path']}", file=terminal().out)


if __name__ == "__main__":
    sys.exit(main())
