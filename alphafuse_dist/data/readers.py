"""Reading the files of a data source into polars frames (text fields as strings, typed later by :mod:`.columns`).

Tables are chosen by suffix (Parquet / CSV / TSV / JSON lines) after any ``.gz`` / ``.zst``, which is
decompressed on the fly; the GroupLens formats (``::``- and ``|``-separated, no header, UTF-8 or
latin-1), RecBole atomic files and JSON lines (Python literal dicts included) have their own readers.
A file that is not what its name says (binary where text is expected, compressed without the suffix,
not UTF-8) is a :class:`DataError` saying what it is and how to fix it.
"""
from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import polars as pl
import pyarrow as pa

from ..errors import DataError
from ..runtime.parquet import open_file, read_table
from .columns import _require_columns

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


def _read_recbole(path: Path, what: str = "a RecBole atomic file") -> pl.DataFrame:
    """A RecBole atomic file (or another headed TSV file: ``what`` names it in errors), all fields
    as strings, typed headers (``item_id:token``) kept.

    RecBole files are unquoted TSV: a '"' inside a title is text, not a quote (the ML-1M copy has
    titles that begin with one). Copies written by pandas quote fields that hold a tab, a newline
    or a '"' CSV-style (``"a ""b"" c"``, e.g. the RecBole Amazon_Beauty.item); a file whose
    unquoted read finds rows wider than the header is read again with '"' as the quote.
    """
    source = _readable(path)
    _require_text(path, source, what)
    try:
        try:
            return pl.read_csv(source, separator="\t", quote_char=None, infer_schema=False,
                               empty_string_is_null=False)
        except pl.exceptions.ComputeError as unquoted:
            if isinstance(source, io.BytesIO):
                source.seek(0)  # a decompressed file: read its bytes again
            try:
                return pl.read_csv(source, separator="\t", quote_char='"', infer_schema=False,
                                   empty_string_is_null=False)
            except pl.exceptions.PolarsError:
                raise unquoted from None
    except pl.exceptions.NoDataError:
        raise DataError("is empty: expected a typed header such as user_id:token", file=path) from None
    except pl.exceptions.PolarsError as e:
        raise DataError(f"cannot be read as {what} (TSV): {_first_line(e)}", file=path) from None


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
