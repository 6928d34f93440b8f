"""Interaction and item tables from every supported data source, in one canonical shape.

``data.source`` picks the reader:

- ``ml-latest-small``: the MovieLens copy shipped in the package (:mod:`.embedded`).
- ``movielens``: a folder in an original GroupLens layout: ``ratings.csv`` + ``movies.csv``
  (+ optional ``tags.csv``) as in ml-latest, ml-latest-small, ml-20m and later; ``ratings.dat`` +
  ``movies.dat`` (+ optional ``tags.dat``) as in ml-1m and ml-10m (``::``-separated, no header,
  latin-1 in ml-1m); or ``u.data`` + ``u.item`` (+ optional ``u.genre``) as in ml-100k.
- ``recbole``: RecBole atomic files ``<name>.inter`` (+ optional ``<name>.item``) in a folder: TSV
  with typed headers such as ``user_id:token  item_id:token  rating:float  timestamp:float``.
- ``unisrec``: UniSRec's downstream layout in a folder: ``<name>.test.inter`` (per user the
  history as item indices and the last item), ``<name>.item2index`` (raw item id, index) and
  ``<name>.text`` (raw item id, item text); see :func:`_unisrec`.
- ``interactions``: one Parquet / CSV / TSV / JSON-lines file of interactions (``data.path``) and optionally one
  of items (``data.items_path``), with the column names ``data.user_col``, ``data.item_col``,
  ``data.time_col`` and, when the file has it, ``data.rating_col``; the items file's id column is
  ``data.items_id_col`` (default: ``data.item_col``). ``alphafuse inspect-data`` suggests them.
  Either path may be a URI (``s3://bucket/key``): read through pyarrow's file systems from a
  local copy (:mod:`..runtime.uri`).
- ``amazon2014`` / ``amazon2018`` / ``amazon2023``: the Amazon review releases of McAuley's group
  (JSON lines, one review or one product per line). ``data.path`` is the reviews file, or a folder
  holding one reviews file and at most one ``meta_*`` file; ``data.items_path`` names the meta file
  explicitly. 2014 meta files are Python literals (``{'asin': '...'}``), not JSON; 2023 reviews
  have millisecond timestamps (converted to seconds) and products are keyed by ``parent_asin``.

Any file may be compressed: a ``.gz`` (gzip) or ``.zst`` (Zstandard) suffix is decompressed on the
fly, so ``ratings.csv.gz`` stands for ``ratings.csv`` and a truncated or corrupt archive is a
:class:`DataError` naming it.

Every reader checks its input and raises :class:`DataError` naming the file, the column and the
0-based data row (header not counted) at fault; a JSON-lines line that cannot be parsed at all is
named by its 1-based line number instead. Ids are compared as strings (``"31"`` in a CSV
and ``31`` in a Parquet file are the same movie).

Example::

    src = load_source(DataConfig(source="movielens", path="data/ml-1m"))
    src.interactions.columns  # ['order', 'user_id', 'item_id', 'timestamp', 'rating']
    src.items.columns         # ['item_id', 'title', 'genres', 'tags']
"""
from __future__ import annotations

import ast
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..runtime.manifest import fingerprint_path
from ..runtime.uri import is_uri, local_copy
from ..runtime.parquet import open_file, read_table
from .embedded import embedded_path

# MovieLens marks a movie without genres with this placeholder; it is a missing value, not a genre
_NO_GENRES = "(no genres listed)"
# ``::`` is two characters and polars splits on one byte: the .dat readers swap it for this control
# character, which cannot occur in MovieLens text
_DAT_SEPARATOR = "\x1f"
_DAT_COLUMNS = {
    "ratings.dat": ["UserID", "MovieID", "Rating", "Timestamp"],
    "movies.dat": ["MovieID", "Title", "Genres"],
    "tags.dat": ["UserID", "MovieID", "Tag", "Timestamp"],
}
_TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": ",", ".tsv": "\t", ".tab": "\t",
                   ".jsonl": "json", ".ndjson": "json", ".json": "json"}
# file suffix -> pyarrow codec; the suffix is dropped to find the format of what is inside
_COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
# how many leading bytes of a text file are checked for binary content, and the magic numbers of the
# binary formats a data file most often turns out to be: (prefix, what it is, what to do)
_SNIFF_BYTES = 1 << 16
_MAGIC = ((b"PAR1", "a Parquet file", "give it a .parquet suffix"),
          (b"\x1f\x8b", "gzip-compressed", "add .gz to its name"),
          (b"\x28\xb5\x2f\xfd", "Zstandard-compressed", "add .zst to its name"))
# ml-100k's 19 genre flag columns, in file order, for a copy without ``u.genre``
_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")
# ml-100k's u.item fields before the genre flags (names from the ml-100k README)
_ML100K_ITEM_FIELDS = ["movie id", "movie title", "release date", "video release date", "IMDb URL"]


@dataclass(frozen=True)
class Source:
    """The tables of one data source, checked and in canonical form.

    Attributes:
        interactions: one row per input interaction, in input order, ``M`` rows:
            ``order:int64`` (0-based data row in ``files["interactions"]``), ``user_id:str``,
            ``item_id:str`` (both non-empty), ``timestamp:int64`` (>= 0; epoch seconds for every
            shipped layout), ``rating:float64`` (null where the source has no rating).
            Every ``item_id`` is in ``items``.
        items: one row per catalogue item: ``item_id:str`` (unique, non-empty) followed by the
            text columns (all ``str``, null where missing). MovieLens: ``title``, ``genres``
            (comma-separated), ``tags`` (distinct user tags, comma-separated, ``""`` if none).
            Amazon: ``title``, ``brand``, ``categories``, ``description`` and per release
            ``price`` / ``features`` / ``main_category`` (see :func:`_amazon`).
        files: every file read, by role: ``interactions``, and ``items`` / ``tags`` / ``genres``
            (ml-100k's ``u.genre``) when read.
        columns: canonical interaction column -> its name in ``files["interactions"]``, for error
            messages; ``rating`` is present only when the source has ratings.
        description: one line saying what was read.
    """

    interactions: pl.DataFrame
    items: pl.DataFrame
    files: dict[str, Path]
    columns: dict[str, str]
    description: str


def load_source(cfg: DataConfig) -> Source:
    """Read and check the source that ``cfg`` names; see the module docstring for the layouts."""
    layout, files = _locate(cfg)
    src = _READERS[layout](cfg, files, layout)
    _check_items_known(src)
    return src


def source_inputs(cfg: DataConfig) -> dict[str, str]:
    """``{role: fingerprint}`` of every file :func:`load_source` reads for ``cfg`` (for manifests)."""
    _, files = _locate(cfg)
    return {role: fingerprint_path(path) for role, path in files.items()}


# ----------------------------------------------------------------------------- locating files

def _locate(cfg: DataConfig) -> tuple[str, dict[str, Path]]:
    """The layout name and the files to read, by role; raises if a required one is missing."""
    if cfg.source == "ml-latest-small":
        folder = embedded_path()
        return "embedded", {"interactions": _file(folder / "ratings.parquet"),
                            "items": _file(folder / "movies.parquet"), "tags": _file(folder / "tags.parquet")}
    if cfg.source == "movielens":
        folder = _folder(cfg, "a MovieLens folder (ratings.csv + movies.csv, ratings.dat + movies.dat, "
                              "or u.data + u.item)")
        for ext in ("csv", "dat"):
            ratings = _find(folder, f"ratings.{ext}")
            if ratings is not None:
                files = {"interactions": ratings, "items": _required(folder, f"movies.{ext}")}
                if (tags := _find(folder, f"tags.{ext}")) is not None:
                    files["tags"] = tags
                return f"movielens-{ext}", files
        if (data := _find(folder, "u.data")) is not None:
            files = {"interactions": data, "items": _required(folder, "u.item")}
            if (genres := _find(folder, "u.genre")) is not None:
                files["genres"] = genres
            return "movielens-100k", files
        raise DataError("no MovieLens ratings: expected ratings.csv + movies.csv (ml-latest, ml-20m), "
                        f"ratings.dat + movies.dat (ml-1m) or u.data + u.item (ml-100k); found: "
                        f"{_listing(folder)}", file=folder)
    if cfg.source == "recbole":
        folder = _folder(cfg, "a folder of RecBole atomic files (<name>.inter, <name>.item)")
        named = _find(folder, f"{folder.name}.inter")
        found = [p for p in _visible_files(folder) if _plain_name(p).endswith(".inter")]
        if named is not None:
            inter = named
        elif len(found) == 1:
            inter = found[0]
        else:
            raise DataError(f"expected one <name>.inter file (or {folder.name}.inter); found: {_listing(folder)}",
                            file=folder)
        files = {"interactions": inter}
        if (item := _find(folder, _plain_name(inter)[:-len(".inter")] + ".item")) is not None:
            files["items"] = item
        return "recbole", files
    if cfg.source == "unisrec":
        folder = _folder(cfg, "a folder of UniSRec files (<name>.test.inter, <name>.item2index, <name>.text)")
        found = [p for p in _visible_files(folder) if _plain_name(p).endswith(".test.inter")]
        if len(found) != 1:
            raise DataError(f"expected one <name>.test.inter file; found: {_listing(folder)}", file=folder)
        stem = _plain_name(found[0])[:-len(".test.inter")]
        return "unisrec", {"interactions": found[0], "item_index": _required(folder, f"{stem}.item2index"),
                           "items": _required(folder, f"{stem}.text")}
    if cfg.source == "interactions":
        if cfg.path is None:
            raise ConfigError("data.path: required for data.source=interactions (a Parquet or CSV file)")
        files = {"interactions": _input_file(cfg.path)}
        if cfg.items_path is not None:
            files["items"] = _input_file(cfg.items_path)
        return "interactions", files
    if cfg.source in _AMAZON:
        return cfg.source, _amazon_files(cfg)
    raise ConfigError(f"data.source: unknown source {cfg.source!r}")


def _folder(cfg: DataConfig, what: str) -> Path:
    if cfg.path is None:
        raise ConfigError(f"data.path: required for data.source={cfg.source} ({what})")
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise DataError(f"{'is not a folder' if folder.exists() else 'does not exist'}: expected {what}",
                        file=folder)
    return folder


def _input_file(path: str) -> Path:
    """A local file, or the local copy of a URI's file (``s3://...``, see :mod:`..runtime.uri`)."""
    return local_copy(path) if is_uri(path) else _file(Path(path))


def _file(path: Path) -> Path:
    if not path.is_file():
        raise DataError("is not a file" if path.exists() else "does not exist", file=path)
    return path


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name``, or its ``.gz`` / ``.zst`` copy, whichever is a file first; None if none is."""
    for candidate in (name, *(name + suffix for suffix in _COMPRESSIONS)):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _required(folder: Path, name: str) -> Path:
    """Like :func:`_find`, but a missing file is an error naming the uncompressed path."""
    found = _find(folder, name)
    return found if found is not None else _file(folder / name)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _amazon_files(cfg: DataConfig) -> dict[str, Path]:
    """``interactions`` (the reviews file) and, when there is one, ``items`` (the meta file)."""
    if cfg.path is None:
        raise ConfigError(f"data.path: required for data.source={cfg.source} (a reviews file, or a folder "
                          "holding a reviews file and a meta_* file)")
    path = Path(cfg.path)
    meta = []
    if path.is_dir():
        found = [p for p in _visible_files(path) if Path(_plain_name(p)).suffix in (".json", ".jsonl")]
        meta = [p for p in found if p.name.startswith("meta")]
        reviews = [p for p in found if not p.name.startswith("meta")]
        if len(reviews) != 1 or len(meta) > 1:
            raise DataError("expected one reviews file (*.json, *.jsonl, optionally .gz / .zst) and at most "
                            f"one meta_* file; found: {_listing(path)}", file=path)
        files = {"interactions": reviews[0]}
    else:
        files = {"interactions": _file(path)}
    if cfg.items_path is not None:
        files["items"] = _file(Path(cfg.items_path))
    elif meta:
        files["items"] = meta[0]
    return files


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    return ", ".join(names[:20]) + (" ..." if len(names) > 20 else "") if names else "nothing"


# ----------------------------------------------------------------------------- reading files

def _plain_name(path: Path) -> str:
    """The file name without a compression suffix: ``ratings.csv.gz`` -> ``ratings.csv``."""
    suffix = path.suffix.lower()
    return path.name[:-len(suffix)] if suffix in _COMPRESSIONS else path.name


def _read_bytes(path: Path) -> bytes:
    """The whole content of a file, decompressed when its suffix is ``.gz`` or ``.zst``.

    Compressed files are inflated in memory: polars reads from the buffer as it would from the
    file. A truncated or corrupt archive fails here, before any parsing.
    """
    codec = _COMPRESSIONS.get(path.suffix.lower())
    if codec is None:
        return path.read_bytes()
    try:
        with pa.input_stream(str(path), compression=codec) as stream:
            return stream.read()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot be decompressed as {codec} (truncated or corrupt?): {_first_line(e)}",
                        file=path) from None


def _readable(path: Path) -> Path | io.BytesIO:
    """What polars should read: the file itself (memory-mapped, lazily) or its decompressed bytes."""
    return path if path.suffix.lower() not in _COMPRESSIONS else io.BytesIO(_read_bytes(path))


def _read_table(path: Path, required: list[str], optional: list[str] = (), everything: bool = False
                ) -> pl.DataFrame:
    """The ``required`` and present ``optional`` columns (or, with ``everything``, all columns) of a
    Parquet / CSV / TSV / JSON-lines file, chosen by suffix (after any ``.gz`` / ``.zst``).

    CSV fields are read as strings and typed later, so that ids keep their exact text ("007").
    """
    kind = _TABLE_SUFFIXES.get(Path(_plain_name(path)).suffix.lower())
    if kind is None:
        raise DataError(f"unknown file type {path.suffix!r}: expected {', '.join(_TABLE_SUFFIXES)}, "
                        f"optionally followed by {' or '.join(_COMPRESSIONS)}", file=path)
    source = _readable(path)

    def kept(names: list[str]) -> list[str]:
        _require_columns(names, required, path)
        return names if everything else [*required, *(c for c in optional if c in names and c not in required)]

    if kind == "parquet":
        _require_parquet(path, source)
        # pyarrow rather than polars: it verifies page checksums, and polars panics on some damaged pages
        names = open_file(source, name=path).schema_arrow.names
        return pl.from_arrow(read_table(source, columns=kept(names), name=path))
    fmt = {",": "CSV", "\t": "TSV", "json": "JSON lines"}[kind]
    _require_text(path, source, {"CSV": "a CSV file", "TSV": "a TSV file"}.get(fmt, "a JSON-lines file"))
    try:
        if kind == "json":
            frame = pl.scan_ndjson(source)
        else:
            # empty fields stay "" here: a missing id is reported as such, text renders it as ""
            frame = pl.scan_csv(source, separator=kind, infer_schema=False, empty_string_is_null=False)
        # projection pushdown: a wide interactions file costs only the columns used
        return frame.select(kept(frame.collect_schema().names())).collect()
    except pl.exceptions.NoDataError:
        raise DataError("is empty: expected a header and data rows", file=path) from None
    except (pl.exceptions.PolarsError, OSError) as e:
        fmt = "CSV" if fmt == "TSV" else fmt
        raise DataError(f"cannot be read as {fmt}: {_not_utf8(path) or _first_line(e)}", file=path) from None


def _head(source: Path | io.BytesIO | bytes) -> bytes:
    """The first bytes of a file, of its decompressed bytes or of a buffer of them."""
    if isinstance(source, Path):
        with open(source, "rb") as f:
            return f.read(_SNIFF_BYTES)
    return (source.getvalue() if isinstance(source, io.BytesIO) else source)[:_SNIFF_BYTES]


def _require_parquet(path: Path, source: Path | io.BytesIO) -> None:
    """A DataError when a file named .parquet does not start as Parquet does, saying what it is."""
    head = _head(source)
    if head.startswith(b"PAR1"):
        return
    for magic, kind, advice in _MAGIC[1:]:
        if head.startswith(magic):
            raise DataError(f"not a Parquet file: it is {kind} ({advice})", file=path)
    if b"\0" not in head:
        raise DataError("not a Parquet file: it is text (a CSV file? give it a .csv suffix)", file=path)
    raise DataError("not a Parquet file: it does not start with PAR1", file=path)


def _require_text(path: Path, source: Path | io.BytesIO | bytes, what: str) -> None:
    """A DataError when a file read as text is binary: what its first bytes say it is (Parquet,
    gzip, Zstandard), or where its first NUL byte is. ``source``: the file, its decompressed bytes
    or a buffer of them."""
    head = _head(source)
    for magic, kind, advice in _MAGIC:
        if head.startswith(magic):
            raise DataError(f"not {what}: it is {kind} ({advice})", file=path)
    nul = head.find(b"\0")
    if nul >= 0:
        raise DataError(f"not {what}: binary content (a NUL byte at byte {nul})", file=path)


def append_interactions(log: Path, new_rows: Path, out: Path) -> int:
    """Write ``log`` followed by ``new_rows`` (Parquet / CSV / TSV, the log's columns at least;
    every column as text, typed when read) to ``out`` (Parquet, atomically); returns the row count.

    Raises:
        DataError: a file unreadable, or ``new_rows`` without one of the log's columns.
    """
    from ..runtime.manifest import atomic_write_bytes

    old = _read_table(Path(log), [], everything=True)
    new = _read_table(Path(new_rows), old.columns, everything=True).select(old.columns)
    both = pl.concat([frame.cast(pl.String) for frame in (old, new)])
    buffer = io.BytesIO()
    both.write_parquet(buffer)
    atomic_write_bytes(Path(out), buffer.getvalue())
    return both.height


def _not_utf8(path: Path) -> str | None:
    """Where a text file stops being UTF-8 (``line 3 is not UTF-8 ...``), or None if it is UTF-8.

    Called only after a reader failed, to turn polars' message into a line number.
    """
    data = _read_bytes(path)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return (f"line {line} is not UTF-8 (byte 0x{data[e.start]:02x}): expected UTF-8 text; "
                "re-encode the file, e.g. iconv -f latin1 -t utf-8")
    return None


def _read_headerless(path: Path, separator: str, names: list[str], what: str) -> pl.DataFrame:
    """A delimited text file without header or quoting (the GroupLens formats), all fields as str.

    UTF-8 is tried first, then latin-1 (ml-1m and ml-100k titles such as "Misérables, Les").
    """
    raw = _read_bytes(path)
    _require_text(path, raw, what)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.rstrip("\r\n")  # ml-100k's u.genre ends in a blank line, which is not a record
    if len(separator) > 1:
        if _DAT_SEPARATOR in text:
            row = text.count("\n", 0, text.index(_DAT_SEPARATOR))
            raise DataError(f"contains the control character \\x1f: not {what}", file=path, row=row)
        text, separator = text.replace(separator, _DAT_SEPARATOR), _DAT_SEPARATOR
    try:
        return pl.read_csv(io.BytesIO(text.encode()), has_header=False, separator=separator, quote_char=None,
                           schema={n: pl.String for n in names}, empty_string_is_null=False)
    except pl.exceptions.NoDataError:
        raise DataError(f"is empty: expected {what}", file=path) from None
    except pl.exceptions.PolarsError as e:
        raise DataError(f"is not {what} with fields {' | '.join(names)}: {_first_line(e)}", file=path) from None


def _read_dat(path: Path) -> pl.DataFrame:
    """A MovieLens ``.dat`` file (``::``-separated, no header) with the GroupLens column names."""
    names = _DAT_COLUMNS[_plain_name(path)]
    return _read_headerless(path, "::", names, "a MovieLens .dat file ('::'-separated records)")


def _read_recbole(path: Path) -> pl.DataFrame:
    """A RecBole atomic file, all fields as strings, typed headers (``item_id:token``) kept."""
    source = _readable(path)
    _require_text(path, source, "a RecBole atomic file")
    try:
        # RecBole files are unquoted TSV: a '"' inside a title is text, not a quote
        return pl.read_csv(source, separator="\t", quote_char=None, infer_schema=False,
                           empty_string_is_null=False)
    except pl.exceptions.NoDataError:
        raise DataError("is empty: expected a typed header such as user_id:token", file=path) from None
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot be read as a RecBole atomic file (TSV): {_first_line(e)}", file=path) from None


def _read_json_lines(path: Path, schema: dict[str, pl.DataType], literal_dicts: bool = False) -> pl.DataFrame:
    """The fields ``schema`` names of a JSON-lines file: one row per non-blank line, in file order.

    Other fields are not parsed into columns; an absent field is null. Lists, objects and numbers
    read into a ``String`` field keep their JSON text (``5``, ``["a", "b"]``). With
    ``literal_dicts``, lines may also be Python literal dicts (Amazon 2014 meta files); polars has no
    vectorised reader for those, so such a file is re-encoded line by line with
    :func:`ast.literal_eval` (never ``eval``) and then read as JSON.
    """
    source = _readable(path)
    _require_text(path, source, "a JSON-lines file")
    try:
        frame = pl.read_ndjson(source, schema=schema)
    except pl.exceptions.PolarsError as e:
        error = e
    else:
        if frame.height == 0:
            raise DataError("is empty: expected one JSON object per line", file=path)
        return frame
    # the slow paths below need the lines themselves
    data = source.getvalue() if isinstance(source, io.BytesIO) else path.read_bytes()
    if literal_dicts:
        data = _literal_dicts_as_json(data, list(schema), path)
        try:
            return pl.read_ndjson(data, schema=schema)
        except pl.exceptions.PolarsError as e:
            error = e
    where = _first_non_json_line(data)
    if where is not None:
        raise DataError(f"{where}: expected one JSON object per line", file=path)
    types = ", ".join(f"{name}: {dtype}" for name, dtype in schema.items())
    raise DataError(f"cannot be read as JSON lines with fields {types}: {_first_line(error)}", file=path)


def _first_non_json_line(data: bytes) -> str | None:
    """``line N is not a JSON object (why)`` for the first such non-blank line, or None."""
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # UnicodeDecodeError included: JSON text is UTF-8
            return f"line {number} is not a JSON object ({_first_line(e)})"
        if not isinstance(record, dict):
            return f"line {number} is not a JSON object (a JSON {type(record).__name__})"
    return None


def _literal_dicts_as_json(data: bytes, fields: list[str], path: Path) -> bytes:
    """JSON lines holding the ``fields`` of each line of ``data``, a JSON object or a Python literal dict."""
    out = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            try:
                record = ast.literal_eval(line.decode("utf-8"))
            except (ValueError, SyntaxError, RecursionError) as e:
                raise DataError(f"line {number} is neither a JSON object nor a Python literal dict "
                                f"({type(e).__name__}: {_first_line(e)})", file=path) from None
        if not isinstance(record, dict):
            raise DataError(f"line {number} is neither a JSON object nor a Python literal dict "
                            f"(a {type(record).__name__})", file=path)
        try:
            out.append(json.dumps({k: record[k] for k in fields if k in record}).encode())
        except TypeError as e:  # a literal JSON cannot hold: a set, bytes, a complex number
            raise DataError(f"line {number}: {_first_line(e)}: expected strings, numbers and lists",
                            file=path) from None
    return b"\n".join(out)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _require_columns(names: list[str], required: list[str], path: Path) -> None:
    for col in required:
        if col not in names:
            shown = ", ".join(n if len(n) <= 60 else n[:57] + "..." for n in names[:50])
            shown += " ..." if len(names) > 50 else ""
            raise DataError(f"missing required column; columns found: {shown or 'none'}",
                            file=path, column=col)


# ----------------------------------------------------------------------------- canonical tables

def _interactions(df: pl.DataFrame, path: Path, columns: dict[str, str]) -> pl.DataFrame:
    """Canonical interactions (see :class:`Source`) from ``df`` whose columns ``columns`` names."""
    _require_columns(df.columns, list(columns.values()), path)
    if df.height == 0:
        raise DataError("has no data rows: expected one interaction per row", file=path)
    rating = (_ratings(df[columns["rating"]], path) if "rating" in columns
              else pl.repeat(None, df.height, dtype=pl.Float64, eager=True))
    return pl.DataFrame([
        pl.int_range(0, df.height, dtype=pl.Int64, eager=True).alias("order"),
        _ids(df[columns["user_id"]], path).alias("user_id"),
        _ids(df[columns["item_id"]], path).alias("item_id"),
        _timestamps(df[columns["timestamp"]], path).alias("timestamp"),
        rating.alias("rating"),
    ])


def _items(df: pl.DataFrame, path: Path, id_col: str) -> pl.DataFrame:
    """Canonical items: ``item_id`` first, every other column as text; ids checked unique."""
    _require_columns(df.columns, [id_col], path)
    if df.height == 0:
        raise DataError("has no data rows: expected one item per row", file=path)
    ids = _ids(df[id_col], path)
    repeated = ~ids.is_first_distinct()
    if repeated.any():
        row = repeated.arg_true()[0]
        first = (ids == ids[row]).arg_true()[0]
        raise DataError(f"item id {ids[row]!r} repeats the item of row {first}: item ids must be unique",
                        file=path, column=id_col, row=row)
    text = [_text(df[c], path).alias(c) for c in df.columns if c != id_col]
    if "item_id" in (s.name for s in text):
        raise DataError(f"a text column is named 'item_id' but the id column is '{id_col}': rename one",
                        file=path, column="item_id")
    return pl.DataFrame([ids.alias("item_id"), *text])


def _ids(values: pl.Series, path: Path) -> pl.Series:
    """Ids as stripped strings; whole-number floats (pandas' nullable ints) lose their '.0'."""
    dtype = values.dtype
    if dtype.is_float():
        whole = values.is_null() | (values.is_finite() & (values == values.floor()))
        if not whole.all():
            row = (~whole).arg_true()[0]
            raise DataError(f"id {values[row]} is not a whole number: expected strings or integers",
                            file=path, column=values.name, row=row)
        values = values.cast(pl.Int64)
    elif not (dtype == pl.String or dtype.is_integer() or isinstance(dtype, (pl.Categorical, pl.Enum))):
        raise DataError(f"ids of type {dtype} are not supported: expected strings or integers",
                        file=path, column=values.name)
    ids = values.cast(pl.String).str.strip_chars()
    missing = ids.is_null() | (ids == "")
    if missing.any():
        raise DataError("missing id (null or empty)", file=path, column=values.name, row=missing.arg_true()[0])
    return ids


def _timestamps(values: pl.Series, path: Path) -> pl.Series:
    """Timestamps as int64 >= 0: integers as they are, floats floored, dates as epoch seconds.

    Strings are read as integers, else as decimals (RecBole writes ``978300760.0``), else as
    ISO-8601 dates / date-times.
    """
    dtype = values.dtype
    if dtype.is_integer():
        ts = values.cast(pl.Int64)
    elif dtype.is_float():
        ts = values.floor().cast(pl.Int64, strict=False)  # NaN and inf become null: reported below
    elif dtype == pl.Datetime or dtype == pl.Date:
        ts = values.dt.epoch("s")
    elif dtype == pl.String:
        text = values.str.strip_chars()
        ts = text.cast(pl.Int64, strict=False).fill_null(
            text.cast(pl.Float64, strict=False).floor().cast(pl.Int64, strict=False))
        if (ts.is_null() & (text != "")).any():
            try:
                ts = ts.fill_null(text.str.to_datetime(strict=False).dt.epoch("s"))
            except pl.exceptions.PolarsError:
                pass  # no date format fits: the rows stay null and the first one is reported
    else:
        raise DataError(f"timestamps of type {dtype} are not supported: expected integers or dates",
                        file=path, column=values.name)
    bad = ts.is_null()
    if bad.any():
        row = bad.arg_true()[0]
        value = values[row]
        what = ("missing timestamp (null or empty)" if value is None or str(value).strip() == ""
                else f"cannot read {value!r} as a timestamp")
        raise DataError(f"{what}: expected integer epoch seconds or an ISO-8601 date", file=path,
                        column=values.name, row=row)
    negative = ts < 0
    if negative.any():
        row = negative.arg_true()[0]
        raise DataError(f"negative timestamp {ts[row]}: expected epoch seconds >= 0", file=path,
                        column=values.name, row=row)
    return ts


def _ratings(values: pl.Series, path: Path) -> pl.Series:
    """Ratings as float64; empty or null stays null (no rating), anything else must be a number."""
    if values.dtype == pl.String:
        text = values.str.strip_chars()
        ratings = text.cast(pl.Float64, strict=False)
        bad = ratings.is_null() & (text != "")
        if bad.any():
            row = bad.arg_true()[0]
            raise DataError(f"cannot read {values[row]!r} as a rating: expected a number", file=path,
                            column=values.name, row=row)
        return ratings
    if not (values.dtype.is_numeric() or values.dtype == pl.Null):
        raise DataError(f"ratings of type {values.dtype} are not supported: expected numbers",
                        file=path, column=values.name)
    return values.cast(pl.Float64)


def _text(values: pl.Series, path: Path) -> pl.Series:
    """An item column as text: lists joined with ', ', whole floats without '.0'."""
    dtype = values.dtype
    if dtype == pl.String:
        return values
    if isinstance(dtype, pl.List) and (dtype.inner == pl.String or dtype.inner.is_numeric()):
        return values.cast(pl.List(pl.String)).list.join(", ")
    if dtype.is_float():
        whole = values.is_finite() & (values == values.floor())
        return (pl.select(pl.when(whole).then(values.cast(pl.Int64, strict=False).cast(pl.String))
                          .otherwise(values.cast(pl.String))).to_series())
    try:
        return values.cast(pl.String)
    except pl.exceptions.PolarsError:
        raise DataError(f"columns of type {dtype} cannot be item text: expected strings, numbers or "
                        "lists of them", file=path, column=values.name) from None


def _check_items_known(src: Source) -> None:
    """Every interaction's item must be in the item table; reports the first row that is not."""
    if "items" not in src.files:
        return  # the item table was made from the interactions
    unknown = src.interactions.filter(~pl.col("item_id").is_in(src.items["item_id"].implode()))
    if unknown.height:
        first = unknown.row(0, named=True)
        raise DataError(f"item id {first['item_id']!r} is not in the item table {src.files['items']} "
                        f"({unknown.height} interactions, {unknown['item_id'].n_unique()} distinct ids "
                        "missing)", file=src.files["interactions"], column=src.columns["item_id"],
                        row=first["order"])


# ----------------------------------------------------------------------------- the readers

def _movielens(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """MovieLens ratings, movies (title, genres) and the movies' distinct user tags."""
    dat = layout == "movielens-dat"
    user, movie, rating, time, title, genres, tag = (
        ("UserID", "MovieID", "Rating", "Timestamp", "Title", "Genres", "Tag") if dat
        else ("userId", "movieId", "rating", "timestamp", "title", "genres", "tag"))  # CSV, embedded Parquet

    def read(role: str, columns: list[str]) -> pl.DataFrame:
        return _read_dat(files[role]).select(columns) if dat else _read_table(files[role], columns)

    cols = {"user_id": user, "item_id": movie, "timestamp": time, "rating": rating}
    interactions = _interactions(read("interactions", list(cols.values())), files["interactions"], cols)
    items = (_items(read("items", [movie, title, genres]), files["items"], movie)
             .rename({title: "title", genres: "genres"})
             .with_columns(pl.when(pl.col("genres") == _NO_GENRES).then(pl.lit(""))
                           .otherwise(pl.col("genres").str.split("|").list.join(", ")).alias("genres")))
    if "tags" in files:
        tags = _tag_lists(read("tags", [movie, tag]), files["tags"], movie, tag)
    else:
        tags = pl.DataFrame(schema={"item_id": pl.String, "tags": pl.String})
    # tags of movies missing from the movie table have no item to describe and are left out
    items = (items.join(tags, on="item_id", how="left", maintain_order="left")
             .with_columns(pl.col("tags").fill_null("")))
    where = ("MovieLens ml-latest-small (embedded in alphafuse_dist)" if layout == "embedded"
             else f"MovieLens {'.dat' if dat else 'CSV'} files in {files['interactions'].parent}")
    return Source(interactions, items, files, cols, where)


def _movielens_100k(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """ml-100k: ``u.data`` ratings and ``u.item`` movies with their genre flags, as MovieLens items.

    ``u.data``: tab-separated user id, item id, rating, timestamp; no header. ``u.item``:
    '|'-separated, latin-1: movie id, title, release date, video release date, IMDb URL, then one
    0/1 flag per genre, named by ``u.genre`` (``name|index`` lines) or else the standard 19. Items
    get the columns of the other MovieLens layouts: ``title``, ``genres`` (the flagged genres,
    ', '-joined; "unknown" is a missing value) and ``tags`` (``""``: ml-100k has none).
    """
    cols = {"user_id": "user id", "item_id": "item id", "rating": "rating", "timestamp": "timestamp"}
    ratings = _read_headerless(files["interactions"], "\t", list(cols.values()), "an ml-100k u.data file")
    interactions = _interactions(ratings, files["interactions"], cols)
    genres = _ml100k_genres(files["genres"]) if "genres" in files else list(_ML100K_GENRES)
    path = files["items"]
    raw = _read_headerless(path, "|", _ML100K_ITEM_FIELDS + genres, "an ml-100k u.item file")
    for genre in genres:
        bad = ~raw[genre].is_in(["0", "1"])
        if bad.any():
            row = bad.arg_true()[0]
            raise DataError(f"genre flag {raw[genre][row]!r} is not 0 or 1", file=path, column=genre, row=row)
    flagged = pl.concat_list(pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in genres if g != "unknown")
    items = (_items(raw.select("movie id", "movie title"), path, "movie id")
             .rename({"movie title": "title"})
             .with_columns(raw.select(flagged.list.drop_nulls().list.join(", ").alias("genres")).to_series(),
                           pl.lit("").alias("tags")))
    return Source(interactions, items, files, cols, f"MovieLens ml-100k files in {files['interactions'].parent}")


def _ml100k_genres(path: Path) -> list[str]:
    """Genre names in flag order from ``u.genre`` (``Action|1`` lines, indices 0, 1, ... in any order)."""
    table = _read_headerless(path, "|", ["genre", "index"], "an ml-100k u.genre file (name|index lines)")
    index = table["index"].str.strip_chars().cast(pl.Int64, strict=False)
    if index.is_null().any() or sorted(index) != list(range(table.height)):
        row = index.is_null().arg_true()[0] if index.is_null().any() else None
        raise DataError(f"genre indices must be 0..{table.height - 1}, each once", file=path, column="index", row=row)
    return table["genre"].str.strip_chars().gather(index.arg_sort()).to_list()


def _tag_lists(tags: pl.DataFrame, path: Path, id_col: str, tag_col: str) -> pl.DataFrame:
    """``item_id:str``, ``tags:str``: each item's distinct non-empty tags, first-seen order, ', '-joined."""
    return (pl.DataFrame([_ids(tags[id_col], path).alias("item_id"),
                          tags[tag_col].cast(pl.String).str.strip_chars().alias("tag")])
            .filter(pl.col("tag").is_not_null() & (pl.col("tag") != ""))
            .group_by("item_id", maintain_order=True)
            .agg(pl.col("tag").unique(maintain_order=True).str.join(", ").alias("tags")))


def _recbole(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """RecBole ``.inter`` (+ ``.item``); ``data.user_col`` etc. name the fields (RecBole's defaults).

    Item fields become text: list fields (``genre``, ``genres``, ``categories``, ``tags``: space-
    separated, in the ML-1M copy even where typed ``token``) are ', '-joined; other ``*_seq`` fields
    (e.g. a title typed ``token_seq``) keep their words, single-spaced; ``movie_title`` +
    ``release_year`` become ``title`` = "Title (Year)" as in MovieLens, plus ``year``.
    """
    inter = _read_recbole(files["interactions"])
    typed = {c.split(":", 1)[0]: c for c in inter.columns}
    cols = {"user_id": cfg.user_col, "item_id": cfg.item_col, "timestamp": cfg.time_col}
    if "rating" in typed:
        cols["rating"] = "rating"
    cols = {k: typed.get(v, v) for k, v in cols.items()}  # "user_id" -> "user_id:token"
    interactions = _interactions(inter, files["interactions"], cols)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, cols,
                      f"RecBole atomic file {files['interactions']} (no .item file)")
    raw = _read_recbole(files["items"])
    typed_items = {c.split(":", 1)[0]: c for c in raw.columns}
    items = _items(raw, files["items"], typed_items.get(cfg.item_col, cfg.item_col))
    bare = {c: c.split(":", 1)[0] for c in items.columns[1:]}
    lists = ("genre", "genres", "categories", "tags")
    items = items.rename(bare).with_columns(
        pl.col(name).str.extract_all(r"\S+").list.join(", " if name in lists else " ")
        for header, name in bare.items() if header.endswith("_seq") or name in lists)
    if "movie_title" in items.columns and "release_year" in items.columns:
        year = pl.col("release_year").str.strip_chars().str.replace(r"\.0+$", "")
        items = items.with_columns(
            pl.when(year != "").then(pl.format("{} ({})", pl.col("movie_title"), year))
            .otherwise(pl.col("movie_title")).alias("movie_title"),
            year.alias("release_year"))
    names = {"movie_title": "title", "release_year": "year", "genre": "genres"}
    items = items.rename({k: v for k, v in names.items() if k in items.columns and v not in items.columns})
    return Source(interactions, items, files, cols,
                  f"RecBole atomic files {files['interactions']} + {files['items'].name}")


def _unisrec(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """UniSRec's downstream files (Amazon 2018 categories such as Scientific, Office, Pantry).

    ``<name>.test.inter`` has one row per user: ``user_id:token``, ``item_id_list:token_seq`` (the
    history, space-separated item indices, at most its last 50 items in UniSRec's preprocessing)
    and ``item_id:token`` (the last item). ``<name>.item2index`` maps raw item ids to those indices
    (``<id><TAB><index>``, no header); ``<name>.text`` holds ``item_id:token`` (raw id) and
    ``text:token_seq`` (title, categories and brand in one string), which becomes the ``text``
    column. A user's sequence is its history then its last item; there are no times, so the
    timestamps are the positions 0, 1, ... (they keep the order, which is all a split needs).
    """
    path, index_path = files["interactions"], files["item_index"]
    fields = ["user_id:token", "item_id_list:token_seq", "item_id:token"]
    rows = _read_recbole(path)
    _require_columns(rows.columns, fields, path)
    if rows.height == 0:
        raise DataError("has no data rows: expected one user per row", file=path)
    index = _read_headerless(index_path, "\t", ["item_id", "index"], "a UniSRec item2index file (item id, index)")
    index = index.with_columns(pl.col("index").str.strip_chars())
    if index["index"].is_duplicated().any():
        row = index["index"].is_duplicated().arg_true()[0]
        raise DataError(f"index {index['index'][row]!r} is given to two items", file=index_path, column="index",
                        row=row)
    long = (rows.select(pl.int_range(0, rows.height).alias("row"), pl.col(fields[0]).alias("user_id"),
                        pl.concat_list(pl.col(fields[1]).fill_null("").str.extract_all(r"\S+"),
                                       pl.col(fields[2]).str.strip_chars()).alias("index"))
            .with_columns(pl.col("index").list.eval(pl.int_range(pl.len())).alias("timestamp"))
            .explode(["index", "timestamp"])
            .join(index, on="index", how="left", maintain_order="left"))
    unknown = long.filter(pl.col("item_id").is_null())
    if unknown.height:
        raise DataError(f"item index {unknown['index'][0]!r} is not in {index_path.name}", file=path,
                        column=f"{fields[1]} / {fields[2]}", row=int(unknown["row"][0]))
    cols = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"}
    interactions = _interactions(long.select("user_id", "item_id", "timestamp"), path, cols)
    raw = _read_recbole(files["items"])
    items = _items(raw, files["items"], "item_id:token")
    items = items.rename({c: c.split(":", 1)[0] for c in items.columns[1:]})
    named = {"user_id": fields[0], "item_id": fields[1], "timestamp": fields[1]}  # for error messages
    return Source(interactions, items, files, named,
                  f"UniSRec files {path} + {index_path.name} + {files['items'].name}")


def _generic(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """An interactions table with configurable column names and an optional item table."""
    path = files["interactions"]
    cols = {"user_id": cfg.user_col, "item_id": cfg.item_col, "timestamp": cfg.time_col}
    df = _read_table(path, list(cols.values()), optional=[cfg.rating_col])
    if cfg.rating_col in df.columns and cfg.rating_col not in cols.values():
        cols["rating"] = cfg.rating_col
    interactions = _interactions(df, path, cols)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, cols, f"interactions {path} (no item file)")
    id_col = cfg.items_id_col or cfg.item_col
    items = _items(_read_table(files["items"], [id_col], everything=True), files["items"], id_col)
    return Source(interactions, items, files, cols, f"interactions {path}, items {files['items']}")


def _ids_only(interactions: pl.DataFrame) -> pl.DataFrame:
    """The item table of a source without one: its distinct item ids, no text columns."""
    return interactions.select(pl.col("item_id").unique(maintain_order=True))


@dataclass(frozen=True)
class _AmazonRelease:
    """Where one Amazon reviews release keeps what :class:`Source` needs.

    Attributes:
        reviews: canonical interaction column -> review field.
        units_per_second: review timestamps count seconds (1) or milliseconds (1000).
        meta_id: the meta field holding the item id that ``reviews["item_id"]`` refers to.
        meta: meta field -> its polars type as read; lists become text below.
        text: item text column -> ``(meta field, separator joining a list, or None)``.
        literal_meta: meta lines may be Python literal dicts instead of JSON.
    """

    reviews: dict[str, str]
    units_per_second: int
    meta_id: str
    meta: dict[str, pl.DataType]
    text: dict[str, tuple[str, str | None]]
    literal_meta: bool = False


_OLD_REVIEWS = {"user_id": "reviewerID", "item_id": "asin", "timestamp": "unixReviewTime", "rating": "overall"}
_AMAZON = {
    "amazon2014": _AmazonRelease(
        _OLD_REVIEWS, 1, "asin",
        {"asin": pl.String, "title": pl.String, "brand": pl.String,
         "categories": pl.List(pl.List(pl.String)), "description": pl.String, "price": pl.Float64},
        {"title": ("title", None), "brand": ("brand", None), "categories": ("categories", ", "),
         "description": ("description", None), "price": ("price", None)},
        literal_meta=True),
    # 2018 descriptions are a list of paragraphs on most lines and a plain string on some: read as
    # text, the lists are decoded below
    "amazon2018": _AmazonRelease(
        _OLD_REVIEWS, 1, "asin",
        {"asin": pl.String, "title": pl.String, "brand": pl.String, "category": pl.List(pl.String),
         "description": pl.String, "feature": pl.List(pl.String)},
        {"title": ("title", None), "brand": ("brand", None), "categories": ("category", ", "),
         "description": ("description", " "), "features": ("feature", ", ")}),
    # 2023: ratings of variants (asin) count for their product (parent_asin), the unit meta files
    # describe; ``details`` (a free-form dict of specifications) is not item text and is skipped
    "amazon2023": _AmazonRelease(
        {"user_id": "user_id", "item_id": "parent_asin", "timestamp": "timestamp", "rating": "rating"},
        1000, "parent_asin",
        {"parent_asin": pl.String, "title": pl.String, "store": pl.String, "main_category": pl.String,
         "categories": pl.List(pl.String), "description": pl.List(pl.String), "features": pl.List(pl.String)},
        {"title": ("title", None), "brand": ("store", None), "categories": ("categories", ", "),
         "description": ("description", " "), "features": ("features", ", "),
         "main_category": ("main_category", None)}),
}


def _amazon(cfg: DataConfig, files: dict[str, Path], layout: str) -> Source:
    """Amazon reviews (one JSON object per line) and, when given, the products' meta file.

    Items: ``item_id`` then ``title``, ``brand`` (2023: the store), ``categories`` (', '-joined;
    2014's list of category paths flattened, each name once), ``description`` (paragraphs
    space-joined), and ``price`` (2014) or ``features`` (2018, 2023; ', '-joined) and
    ``main_category`` (2023). A product listed twice in the meta file (the 2018 files repeat some)
    keeps its first line; a reviewed product missing from it gets null text. Row numbers in errors
    count non-blank lines from 0.
    """
    release = _AMAZON[layout]
    path = files["interactions"]
    reviews = _read_json_lines(path, {field: pl.String for field in release.reviews.values()})
    interactions = _interactions(reviews, path, release.reviews)
    if release.units_per_second != 1:
        interactions = interactions.with_columns(pl.col("timestamp") // release.units_per_second)
    if "items" not in files:
        return Source(interactions, _ids_only(interactions), files, release.reviews,
                      f"Amazon reviews {path} (no meta file)")
    meta_path = files["items"]
    meta = _read_json_lines(meta_path, release.meta, literal_dicts=release.literal_meta)
    text = [_amazon_text(meta[field], sep, meta_path).alias(name) for name, (field, sep) in release.text.items()]
    first = _ids(meta[release.meta_id], meta_path).is_first_distinct()
    items = _items(pl.DataFrame([meta[release.meta_id], *text]).filter(first), meta_path, release.meta_id)
    # every item_id must be in the item table: reviewed products without meta get null text
    unlisted = interactions.select(pl.col("item_id").unique(maintain_order=True)).filter(
        ~pl.col("item_id").is_in(items["item_id"].implode()))
    items = pl.concat([items, unlisted], how="diagonal")
    return Source(interactions, items, files, release.reviews, f"Amazon reviews {path}, meta {meta_path}")


def _amazon_text(values: pl.Series, separator: str | None, path: Path) -> pl.Series:
    """An Amazon meta field as item text: lists (of lists) joined by ``separator``, each entry once
    for nested lists; a ``String`` field holding JSON lists (2018 descriptions) decoded first."""
    if separator is None:
        return _text(values, path)
    if values.dtype == pl.String:
        # polars writes a JSON list read into a String field as '["a", "b"]'
        listed = values.str.contains(r'^\[\s*(".*")?\s*\]$')
        if not listed.any():
            return values
        try:
            joined = values.filter(listed).str.json_decode(pl.List(pl.String)).list.join(separator)
        except pl.exceptions.PolarsError:
            return values  # a plain description that only looks like a JSON list stays as written
        return values.clone().scatter(listed.arg_true(), joined)
    if isinstance(values.dtype.inner, pl.List):
        values = values.list.eval(pl.element().list.explode(keep_nulls=False, empty_as_null=False)
                                  ).list.unique(maintain_order=True)
    return values.list.join(separator)


_READERS = {"embedded": _movielens, "movielens-csv": _movielens, "movielens-dat": _movielens,
            "movielens-100k": _movielens_100k, "recbole": _recbole, "unisrec": _unisrec, "interactions": _generic,
            **{name: _amazon for name in _AMAZON}}
