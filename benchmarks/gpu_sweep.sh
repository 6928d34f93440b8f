#!/usr/bin/env bash
# Train/evaluate sweeps on a GPU machine that has torch but neither Ray nor fbgemm (the plain-torch
# backend, one process, bf16 autocast), over run folders whose prepare/embed/decompose stages were
# computed on a CPU machine with the full stack. Usage:
#   bash benchmarks/gpu_sweep.sh RUN_DIR CONFIG LABEL "overrides..." [LABEL "overrides..." ...]
# Each LABEL gets a copy of RUN_DIR (so stages never overwrite each other) and runs
# `alphafuse compare --stages train,evaluate` for alphafuse and sasrec_id.
set -euo pipefail
RUN=$1; CONFIG=$2; shift 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/sweep}
while [ $# -ge 2 ]; do
  LABEL=$1; OVR=$2; shift 2
  DIR=/tmp/sweep-runs/$LABEL
  rm -rf "$DIR"; mkdir -p "$DIR"; cp -r "$RUN"/prepare "$RUN"/decompose "$DIR"/  # train/evaluate need no embeddings
  echo "=== $LABEL: $OVR"
  # shellcheck disable=SC2086
  python3 -m alphafuse_dist.cli compare --config "$CONFIG" --stages train,evaluate "run_dir=$DIR" \
    train.backend=torch train.num_workers=1 train.device=cuda $OVR --output "$OUTDIR/$LABEL.json" \
    2>&1 | grep -E "^\[train\] (epoch [0-9]+:|early|alpha|sasrec)|^run|^---|^(alphafuse|sasrec_id) \(" || true
done
