"""``alphafuse inspect-data``: a data file's columns and types, and the ``data.*`` keys to read it.

Reads the first rows of a CSV / TSV / Parquet / JSON-lines file (``.gz`` / ``.zst`` too), local or
any URI pyarrow opens (``s3://``, ``gs://``, ``hdfs://``, ``file://``), guesses which columns hold
the user, item, time and rating of an interactions file and the id and text of an items file, and
prints the keys for ``data.source=interactions``.

Example::

    print(describe("clicks.csv", items="products.parquet"))
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.fs as pa_fs
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from ..errors import DataError
from .text import default_template

_FORMATS = {".parquet": "Parquet", ".pq": "Parquet", ".csv": "CSV", ".tsv": "TSV", ".tab": "TSV",
            ".json": "JSON lines", ".jsonl": "JSON lines", ".ndjson": "JSON lines"}
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
# column names (lower case, letters and digits only) that usually hold each role, most likely first
_ROLES = {
    "user_col": ("userid", "user", "reviewerid", "customerid", "customer", "uid", "visitorid", "sessionid",
                 "memberid", "accountid"),
    "item_col": ("itemid", "item", "movieid", "parentasin", "asin", "productid", "product", "sku", "iid",
                 "articleid", "trackid", "bookid", "isbn", "contentid"),
    "time_col": ("timestamp", "time", "ts", "unixreviewtime", "datetime", "eventtime", "date", "when", "createdat",
                 "occurredat"),
    "rating_col": ("rating", "score", "stars", "overall", "grade"),
}


@dataclass(frozen=True)
class Sample:
    """The first rows of a file: ``frame`` (polars, types as inferred), ``fmt``, ``rows`` (the total
    when the format stores it, else None)."""

    path: str
    fmt: str
    frame: pl.DataFrame
    rows: int | None


def read_sample(path: str, rows: int = 1000) -> Sample:
    """The first ``rows`` rows of ``path`` (a local path or a URI), types inferred by pyarrow."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    suffix = Path(name).suffix.lower()
    codec = _COMPRESSIONS.get(suffix)
    fmt = _FORMATS.get(Path(name[:-len(suffix)] if codec else name).suffix.lower())
    if fmt is None:
        raise DataError(f"unknown file type: expected {', '.join(_FORMATS)}, optionally followed by "
                        f"{' or '.join(_COMPRESSIONS)}", file=path)
    try:
        fs, where = pa_fs.FileSystem.from_uri(path if "://" in path else str(Path(path).absolute()))
        if fmt == "Parquet":
            if codec:
                raise DataError("a compressed Parquet file: Parquet compresses inside the file", file=path)
            with fs.open_input_file(where) as f:
                parquet = pq.ParquetFile(f)
                batch = next(parquet.iter_batches(batch_size=rows), None)
                table = (pa.Table.from_batches([batch]) if batch is not None
                         else parquet.schema_arrow.empty_table())
                return Sample(path, fmt, pl.from_arrow(table), parquet.metadata.num_rows)
        with fs.open_input_stream(where, compression=codec) as f:
            if fmt == "JSON lines":
                reader = pa_json.open_json(f)
            else:
                reader = pa_csv.open_csv(f, parse_options=pa_csv.ParseOptions(delimiter="," if fmt == "CSV" else "\t"))
            batches, count = [], 0
            for batch in reader:
                batches.append(batch)
                count += batch.num_rows
                if count >= rows:
                    break
            table = pa.Table.from_batches(batches, schema=reader.schema).slice(0, rows)
    except (OSError, pa.ArrowException, StopIteration) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot be read as {fmt}: {text}", file=path) from None
    return Sample(path, fmt, pl.from_arrow(table), None)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def guess(columns: list[str], role: str, dtypes: dict[str, pl.DataType] | None = None) -> str | None:
    """The column of ``columns`` that most likely holds ``role`` (a key of ``_ROLES``), or None;
    ``dtypes`` lets a date/time-typed column stand for the time when no name matches."""
    keys = {_key(c): c for c in reversed(columns)}
    for name in _ROLES[role]:
        if name in keys:
            return keys[name]
    if role == "time_col" and dtypes:
        return next((c for c, t in dtypes.items() if t.is_temporal()), None)
    return None


def suggested_keys(interactions: Sample, items: Sample | None) -> list[tuple[str, str | None, str]]:
    """``(key, value or None when no column fits, why)`` for ``data.source=interactions``."""
    frame = interactions.frame
    keys: list[tuple[str, str | None, str]] = [("data.source", "interactions", ""),
                                              ("data.path", interactions.path, "")]
    found = {}
    for role in ("user_col", "item_col", "time_col", "rating_col"):
        found[role] = guess(frame.columns, role, dict(frame.schema))
        if found[role] is not None:
            keys.append((f"data.{role}", found[role], f"column '{found[role]}'"))
        elif role != "rating_col":
            keys.append((f"data.{role}", None, f"no column looks like it: pick one of {', '.join(frame.columns)}"))
    if items is None:
        keys.append(("data.text_template", "item {item_id}", "no items file: items are known by id only"))
        return keys
    cols = items.frame.columns
    id_col = found["item_col"] if found["item_col"] in cols else guess(cols, "item_col")
    keys.append(("data.items_path", items.path, ""))
    if id_col is None:
        keys.append(("data.items_id_col", None, f"no column looks like an item id: pick one of {', '.join(cols)}"))
        return keys
    if id_col != found["item_col"]:
        keys.append(("data.items_id_col", id_col, f"the items file's id column '{id_col}'"))
    text = [c for c in cols if c != id_col and items.frame.schema[c] in (pl.String, pl.Categorical)]
    keys.append(("data.text_template", default_template([id_col, *text]),
                 f"text columns {', '.join(text)}; edit freely" if text else "no text column"))
    return keys


def _schema(sample: Sample) -> str:
    frame = sample.frame
    rows = f"{sample.rows:,} rows" if sample.rows is not None else f"first {frame.height:,} rows read"
    lines = [f"{sample.path}: {sample.fmt}, {len(frame.columns)} columns, {rows}"]
    width = max((len(c) for c in frame.columns), default=0)
    for name, dtype in frame.schema.items():
        values = frame[name].drop_nulls().head(3).cast(pl.String, strict=False).to_list()
        example = ", ".join(repr(v if v is None or len(v) <= 30 else v[:27] + "...") for v in values)
        lines.append(f"  {name:<{width}}  {dtype._string_repr():<10}  {example[:70]}")
    return "\n".join(lines)


def describe(path: str, items: str | None = None) -> str:
    """What ``alphafuse inspect-data`` prints: each file's columns, types and example values, then
    the ``data.*`` keys (as ``key=value`` overrides) for ``data.source=interactions``."""
    inter = read_sample(path)
    item_sample = read_sample(items) if items is not None else None
    parts = [_schema(inter)] + ([_schema(item_sample)] if item_sample is not None else [])
    keys = suggested_keys(inter, item_sample)
    lines = ["", "data.* keys for these files:"]
    missing = []
    for key, value, why in keys:
        if value is None:
            missing.append(key)
            lines.append(f"  {key}=?  # {why}")
        else:
            lines.append(f"  {shlex.quote(f'{key}={value}')}" + (f"  # {why}" if why else ""))
    overrides = " ".join(shlex.quote(f"{k}={v}") for k, v, _ in keys if v is not None)
    lines += ["", "run:", f"  alphafuse run --config quickstart {overrides}"
              + (f" {' '.join(f'{k}=...' for k in missing)}" if missing else "")]
    return "\n\n".join(parts) + "\n" + "\n".join(lines)
