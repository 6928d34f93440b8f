#!/usr/bin/env bash
# Every method x 3 seeds on one data set (SET: a preset such as ml-1m or amazon-scientific), on one
# GPU machine, plain-torch backend (one process per run, bf16 autocast), `--jobs` runs at once.
# RUN holds prepare/embed/decompose computed on a CPU machine with the full stack
# (`alphafuse run --config SET --stages prepare,embed,decompose run_dir=RUN [data.split=...]`), or is
# the .tgz of those folders (paths runs/<name>/{prepare,embed,decompose}), unpacked into .device/.
#   bash benchmarks/gpu_all_methods.sh SET RUN LABEL [key=value ...]
# The overrides must repeat the split keys the shared stages were computed with (the cold-start
# run: data.split=cold_start_users data.min_user_interactions=2): train and evaluate read the
# prepared split as it is, so the script stops when RUN's split and the overrides disagree.
# The work folder .device/gpu/LABEL persists on a warm machine: a rerun skips finished runs
# (LIMIT=seconds stops the compare in time to pack what is done).
# Environment: METHODS, SEEDS (22,23,24), JOBS (8), LIMIT (0: none), PYTHON (python3), OUT.
# Outputs under $OUT (default /tmp/out): LABEL.json (the table's numbers), LABEL.tar.gz (report/,
# every run's history.json and metrics.json), LABEL.log.gz (the whole log).
set -euo pipefail
SET=$1; RUN=$2; LABEL=$3; shift 3
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -f "$RUN" ]; then
  name=$(tar tzf "$RUN" | awk -F/ 'NR == 1 {print $2}')
  mkdir -p .device && tar xzf "$RUN" -C .device
  RUN=.device/runs/$name
fi
for s in prepare embed decompose; do
  [ -d "$RUN/$s" ] || { echo "$RUN/$s: missing (compute the shared stages first)" >&2; exit 2; }
done
kind=$("${PYTHON:-python3}" -c 'import json, sys; print(json.load(open(sys.argv[1]))["split"]["kind"])' \
  "$RUN/prepare/stats.json")
asked=leave_one_out
for a in "$@"; do case $a in data.split=*) asked=${a#data.split=};; esac; done
if [ "$kind" != "$asked" ]; then
  echo "$RUN/prepare holds the split $kind but the overrides ask for $asked: pass data.split=$kind" \
    "(and its other data.* keys)" >&2
  exit 2
fi
DIR=.device/gpu/$LABEL
mkdir -p "$DIR"
for s in prepare embed decompose; do [ -d "$DIR/$s" ] || cp -r "$RUN/$s" "$DIR/"; done
METHODS=${METHODS:-alphafuse,sasrec_id,llminit,morec,whitenrec,unisrec,rlmrec,llmesr}
SEEDS=${SEEDS:-22,23,24}
set +e
timeout "${LIMIT:-0}" "${PYTHON:-python3}" -m alphafuse_dist.cli compare --config "$SET" --stages train,evaluate \
  --methods "$METHODS" --seeds "$SEEDS" --jobs "${JOBS:-8}" --output "$OUT/$LABEL.json" \
  --title "$SET ($LABEL): every method, seeds $SEEDS" \
  "run_dir=$DIR" train.backend=torch train.num_workers=1 train.device=cuda "$@" > "$DIR.log" 2>&1
rc=$?
set -e
grep -E "^\[compare\]|Error|error" "$DIR.log" | tail -40 || true
echo "finished runs: $(ls -d "$DIR"/evaluate-* 2>/dev/null | wc -l)"
tail -30 "$DIR.log"
gzip -c "$DIR.log" > "$OUT/$LABEL.log.gz"
(cd "$DIR" && tar czf "$OUT/$LABEL.tar.gz" --ignore-failed-read report comparison.json train-*/history.json \
  evaluate-*/metrics.json 2>/dev/null) || true
exit $rc
