"""Parquet files with page checksums: every page is written with its CRC32 and verified when read,
so a flipped byte inside a page (a text column included) is a :class:`DataError` naming the file,
never a wrong value read on; a damaged footer or a file that is not Parquet is named the same way.

Files written elsewhere without checksums (a user's data) are read as they are: there is nothing to
verify, but a failure to decode them is still the same one-line error.

Example::

    write_table(table, out / "items.parquet", compression="zstd")
    items = read_table(out / "items.parquet", columns=["item_idx", "text"])
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import DataError, one_line

WRITE_OPTIONS = {"write_page_checksum": True}


def write_table(table: pa.Table, path, **options) -> None:
    """``pq.write_table`` with page checksums."""
    pq.write_table(table, path, **{**WRITE_OPTIONS, **options})


def read_table(source, columns: list[str] | None = None, *, name=None) -> pa.Table:
    """The ``columns`` (default all) of a Parquet file or file-like ``source``, page checksums
    verified; ``name`` names a file-like source in errors."""
    try:
        return pq.read_table(source, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise _corrupt(name or source, e) from None


def open_file(source, *, name=None) -> pq.ParquetFile:
    """``pq.ParquetFile`` verifying page checksums, its footer read (a damaged one reported);
    ``name`` names a file-like ``source`` in errors."""
    try:
        return pq.ParquetFile(source, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as e:
        raise _corrupt(name or source, e) from None


def iter_batches(path, **options) -> Iterator[pa.RecordBatch]:
    """``ParquetFile.iter_batches(**options)``, page checksums verified; a damaged page is reported
    when it is reached."""
    batches = open_file(path).iter_batches(**options)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise _corrupt(path, e) from None
        yield batch


def _corrupt(source, error: Exception) -> DataError:
    if isinstance(error, FileNotFoundError) or (isinstance(source, (str, Path)) and not Path(source).exists()):
        return DataError("does not exist", file=source)
    reason = one_line(str(error)) or type(error).__name__
    return DataError(f"cannot be read as Parquet: corrupt or not Parquet ({reason[:200]})", file=source)
