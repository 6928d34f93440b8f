#!/usr/bin/env bash
# Run the AlphaFuse reference code (a checkout at $REF, default .device/reference, git-ignored) on
# one GPU over one of our run folders (prepare/ + embed/), one or more of its models in sequence.
# Usage:
#   bash benchmarks/reference/gpu_reference.sh RUN_DIR EPOCHS MODEL[,MODEL...] [run_reference.py args...]
#   MODEL: AlphaFuse (ID init zeros, README's Movies setting) or SASRec (ID only, init normal)
# Writes $OUT/reference-<MODEL>.json (final summary) and $OUT/reference-<MODEL>.log (full log);
# prints each summary as the last line of its run. Mind the device tool's 600 s per command.
set -euo pipefail
RUN=$1; EPOCHS=$2; MODELS=$3; shift 3
REF=${REF:-.device/reference}
OUTDIR=${OUT:-/tmp/reference-out}
INPUTS=${INPUTS:-/tmp/alphafuse-reference-inputs}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu only for smoke tests
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
${PY:-python3} -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
if ! grep -qs "\"run_dir\": \"$RUN\"" "$INPUTS/reference_inputs.json"; then  # (re)convert unless made from RUN
  ${PY:-python3} benchmarks/reference/make_reference_inputs.py --run-dir "$RUN" --out "$INPUTS" --max-len 50
fi
for M in ${MODELS//,/ }; do
  case $M in
    AlphaFuse) INIT=zeros ;;
    *) INIT=normal ;;  # a zero ID table cannot train under cosine (normalising zero vectors)
  esac
  echo "=== reference $M: $EPOCHS epochs"
  ${PY:-python3} benchmarks/reference/run_reference.py --reference "$REF" --inputs "$INPUTS" \
    --workdir "/tmp/alphafuse-reference-$M" --device "$DEVICE" --epochs "$EPOCHS" --model-type "$M" \
    --id-init "$INIT" --output "$OUTDIR/reference-$M.json" "$@" > "$OUTDIR/reference-$M.log" 2>&1 || true
  grep -E '^\[ref-bench\]|^Total|^Trainable' "$OUTDIR/reference-$M.log" || true
  tail -n 1 "$OUTDIR/reference-$M.log"
done
