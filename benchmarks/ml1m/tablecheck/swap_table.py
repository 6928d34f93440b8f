"""A run folder for the current code that trains on another run's frozen semantic table.

Usage: python benchmarks/ml1m/tablecheck/swap_table.py BASE_RUN TABLE_RUN OUT_RUN

OUT_RUN = a copy of BASE_RUN (a run folder of this package's prepare, embed and decompose stages)
whose decompose/semantic.safetensors and basis.safetensors are TABLE_RUN's (any folder holding
those two files, whatever wrote its manifests), so that the train stage reads TABLE_RUN's frozen
table on BASE_RUN's prepared data. decompose/manifest.json is rewritten as run_stage writes it
(file records, stage digest, manifest digest), with "table_from" naming where the two files came
from; the rest of the manifest, basis.json and the spectrum files are BASE_RUN's.
"""
import hashlib
import json
import shutil
import sys
from pathlib import Path

from alphafuse_dist.runtime.manifest import MANIFEST, _body_digest, _file_records, atomic_write_json


def main(base: str, table: str, out: str) -> None:
    base, table, out = Path(base), Path(table), Path(out)
    if out.exists():
        sys.exit(f"{out}: exists")
    shutil.copytree(base, out, ignore=shutil.ignore_patterns(".lock", ".*.tmp-*", "alphafuse.log"),
                    copy_function=shutil.copy2)
    dec = out / "decompose"
    for name in ("semantic.safetensors", "basis.safetensors"):
        shutil.copy2(table / "decompose" / name, dec / name)
    body = json.loads((dec / MANIFEST).read_text())
    body["files"] = _file_records(dec)
    body["table_from"] = str(table.resolve() / "decompose")
    outputs = {rel: [rec["bytes"], rec["blake2b"]] for rel, rec in body["files"].items()}
    body["digest"] = hashlib.sha256(json.dumps({k: body[k] for k in ("config_hash", "inputs", "stage")}
                                               | {"outputs": outputs}, sort_keys=True).encode()).hexdigest()[:16]
    body.pop("manifest_digest", None)
    body["manifest_digest"] = _body_digest(body)
    atomic_write_json(dec / MANIFEST, body)
    print(f"{out}: decompose digest {body['digest']} (semantic + basis from {table / 'decompose'})")


if __name__ == "__main__":
    main(*sys.argv[1:])
