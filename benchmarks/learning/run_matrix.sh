#!/usr/bin/env bash
# Every backbone x method on the shipped MovieLens ml-latest-small set: does each one learn?
# Needs a run folder with prepare/, embed/ and decompose/ of the quickstart preset (made on a
# machine with the full stack: `alphafuse run --config quickstart --stages prepare,embed,decompose
# run_dir=RUN`), then trains and evaluates with the plain-torch backend in one process (runs on a
# GPU machine without Ray/TorchRec, or on CPU with DEVICE=cpu).
# Usage: bash benchmarks/learning/run_matrix.sh RUN_DIR [extra overrides...]
# Writes $OUT/<backbone>/report/{report.md,report.json,*.png} and $OUT/<backbone>.log.
set -euo pipefail
RUN=$1; shift
OUTDIR=${OUT:-/tmp/learning}
DEVICE=${DEVICE:-cuda}
METHODS=alphafuse,sasrec_id,llminit,morec,whitenrec,unisrec,rlmrec
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
for BACKBONE in sasrec gru4rec bert4rec; do
  DIR=/tmp/learning-runs/$BACKBONE
  rm -rf "$DIR"; mkdir -p "$DIR" "$OUTDIR"
  cp -r "$RUN"/prepare "$RUN"/embed "$RUN"/decompose "$DIR"/
  echo "=== $BACKBONE"
  # shellcheck disable=SC2068
  python3 -m alphafuse_dist.cli compare --config quickstart --methods $METHODS --stages train,evaluate \
    --title "ml-latest-small, backbone $BACKBONE: every method (test split, full ranking)" \
    "run_dir=$DIR" model.backbone=$BACKBONE train.backend=torch train.num_workers=1 train.device=$DEVICE $@ \
    > "$OUTDIR/$BACKBONE.log" 2>&1 || { tail -30 "$OUTDIR/$BACKBONE.log"; exit 1; }
  grep -E "^\[train\] (epoch 1:|early)|^run|^---|^[a-z_]+ \(seed" "$OUTDIR/$BACKBONE.log" || true
  mkdir -p "$OUTDIR/$BACKBONE"; cp -r "$DIR"/report "$OUTDIR/$BACKBONE"/
  for M in ${METHODS//,/ }; do cp "$DIR/train-$M-s22/history.json" "$OUTDIR/$BACKBONE/history-$M.json"; done
done
