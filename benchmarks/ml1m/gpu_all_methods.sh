#!/usr/bin/env bash
# Every method x 3 seeds on MovieLens-1M, on one GPU machine that has torch but neither Ray nor
# fbgemm (plain-torch backend, one process per run, bf16 autocast), `--jobs` runs at once.
# RUN_DIR holds prepare/embed/decompose computed on a CPU machine with the full stack
# (`alphafuse run --config ml-1m --stages prepare,embed,decompose run_dir=RUN_DIR [data.split=...]`).
#   bash benchmarks/ml1m/gpu_all_methods.sh RUN_DIR LABEL [key=value ...]
# The work folder .device/gpu/LABEL persists on a warm machine: a rerun skips finished runs
# (LIMIT=seconds stops the compare in time to pack what is done).
# Outputs under $OUT (default /tmp/out): LABEL.json (the table's numbers), LABEL.tar.gz (report/,
# every run's history.json and metrics.json), LABEL.log.gz (the whole log).
set -euo pipefail
RUN=$1; LABEL=$2; shift 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
DIR=.device/gpu/$LABEL
mkdir -p "$DIR"
for s in prepare embed decompose; do [ -d "$DIR/$s" ] || cp -r "$RUN/$s" "$DIR/"; done
METHODS=${METHODS:-alphafuse,sasrec_id,llminit,morec,whitenrec,unisrec,rlmrec}
set +e
timeout "${LIMIT:-0}" python3 -m alphafuse_dist.cli compare --config ml-1m --stages train,evaluate --methods "$METHODS" \
  --seeds "${SEEDS:-22,23,24}" --jobs "${JOBS:-7}" --output "$OUT/$LABEL.json" \
  --title "MovieLens-1M ($LABEL): every method, seeds ${SEEDS:-22,23,24}" \
  "run_dir=$DIR" train.backend=torch train.num_workers=1 train.device=cuda "$@" > "$DIR.log" 2>&1
rc=$?
set -e
grep -E "^\[compare\]|Error|error" "$DIR.log" | tail -40 || true
ls -d "$DIR"/evaluate-* 2>/dev/null | wc -l
tail -30 "$DIR.log"
gzip -c "$DIR.log" > "$OUT/$LABEL.log.gz"
(cd "$DIR" && tar czf "$OUT/$LABEL.tar.gz" --ignore-failed-read report comparison.json train-*/history.json evaluate-*/metrics.json 2>/dev/null) || true
exit $rc
