"""Ray job entry point: the whole AlphaFuse pipeline on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml --no-wait -- \\
        python jobs/run_pipeline.py --config quickstart train.epochs=1 run_dir=/shared/runs/{name}

Same presets and ``key=value`` overrides as ``alphafuse run``; ``ray.address=auto`` (join the
job's cluster rather than start Ray inside the driver) is added unless an override sets
``ray.address``. The last line printed is ``metrics: <absolute path of metrics.json>``.
Input errors (config, data) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from alphafuse_dist.config import load_config
from alphafuse_dist.cli import configure_logging, exit_code
from alphafuse_dist.pipeline import run_pipeline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the AlphaFuse pipeline as a Ray job.")
    parser.add_argument("--config", default="quickstart", help="preset name or YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=1")
    args = parser.parse_args(argv)
    configure_logging()
    overrides = list(args.overrides)
    if not any(o.split("=", 1)[0].strip() == "ray.address" for o in overrides):
        overrides.append("ray.address=auto")

    def run() -> None:
        cfg = load_config(args.config, overrides)
        # A job's working directory is a temporary copy on one node: results there are lost.
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not Path(cfg.run_dir).is_absolute():
            print(f"warning: run_dir={cfg.run_dir} is relative to this job's temporary working directory; "
                  "pass an absolute run_dir that every node can read and write", file=sys.stderr)
        result = run_pipeline(cfg)
        print(f"metrics: {Path(result['metrics_path']).resolve()}")

    return exit_code(run, prefix="error: ")


if __name__ == "__main__":
    sys.exit(main())
