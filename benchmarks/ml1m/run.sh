#!/usr/bin/env bash
# MovieLens-1M, leave-one-out, full ranking: AlphaFuse vs ID-only SASRec from one run.
#   bash benchmarks/ml1m/run.sh [key=value ...]        everything on this machine (Ray + TorchRec)
# The train/evaluate stages can run elsewhere (e.g. a GPU box with torch only) on the same run
# folder:  python -m alphafuse_dist.cli compare --config ml-1m --stages train,evaluate \
#            run_dir=<same> train.backend=torch train.num_workers=1 train.device=cuda
set -euo pipefail
cd "$(dirname "$0")/../.."
bash .ci/setup
bash benchmarks/ml1m/setup.sh
RUN=${RUN_DIR:-benchmarks/.data/runs/ml-1m}
.venv/bin/alphafuse run --config ml-1m --stages prepare,embed,decompose "run_dir=$RUN" "$@"
.venv/bin/alphafuse compare --config ml-1m --stages train,evaluate "run_dir=$RUN" "$@"
