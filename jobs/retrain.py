"""Ray job entry point: one period of periodic retraining (``alphafuse retrain``) on the cluster the job
was submitted to.

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python jobs/retrain.py --previous /shared/alphafuse/registry \\
            --interactions /shared/alphafuse/data/interactions.parquet --items /shared/alphafuse/data/items.parquet \\
            --tolerance 0.002

Same arguments as ``alphafuse retrain`` (see ``alphafuse_dist/retrain/job.py``); ``ray.address=auto``
(join the job's cluster rather than start Ray inside the driver) is added unless an override sets
``ray.address``. Prints the decision (``promoted: ...`` or ``not promoted: ...``) and, last,
``registry: <absolute path of the registry folder>``. Input errors (config, data, a previous run
that is incomplete or of another version, a time window that goes backwards) print one line and
exit with status 2, leaving the promoted model and ``LATEST`` as they were.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alphafuse_dist.cli import configure_logging, exit_code
from alphafuse_dist.pipeline import run_pipeline
from alphafuse_dist.retrain.job import add_retrain_arguments, format_result, run_from_args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = add_retrain_arguments(argparse.ArgumentParser(description="Retrain the next period as a Ray job."))
    args = parser.parse_args(argv)
    configure_logging()
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "ray.address" for o in overrides):
        overrides.append("ray.address=auto")
    # A job's working directory is a temporary copy on one node: results there are lost.
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        for flag, value in (("--previous", args.previous), ("--registry", args.registry),
                            ("--interactions", args.interactions), ("--items", args.items)):
            if value is not None and not Path(value).is_absolute():
                print(f"warning: {flag} {value} is relative to this job's temporary working directory; pass an "
                      "absolute path that every node can read (and, for the registry, write)", file=sys.stderr)
    return exit_code(lambda: print(format_result(run_from_args(args, run_pipeline, overrides)), flush=True),
                     prefix="error: ")


if __name__ == "__main__":
    sys.exit(main())
