"""Dense, stable id maps: source ids -> ``item_idx`` / ``user_idx``.

Without a previous map the ids sorted as strings get 0..n-1, so the same input always gives the
same indices. With ``data.id_map`` (a previous run's ``prepare/`` folder) every id of that run keeps
its index, new ids are appended after the old maximum in sorted order, and old ids that no longer
occur keep their index and are marked retired: a model trained on the old indices stays valid
for every item it knows.

Example::

    previous = read_id_map(Path("runs/january/prepare"))
    items = assign_ids(current_item_ids, previous.items, "item_idx", "item_id")
    # item_idx, item_id, retired: old rows first, then the new ids
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ..errors import DataError
from ..runtime.parquet import read_table


@dataclass(frozen=True)
class IdMap:
    """A previous run's id maps.

    Attributes:
        items: ``item_idx:int32`` (0..N-1), ``item_id:str``, ``text:str`` (the text it had then).
        users: ``user_idx:int32`` (0..U-1), ``user_id:str``.
    """

    items: pl.DataFrame
    users: pl.DataFrame


def read_id_map(folder: Path) -> IdMap:
    """The id maps of a previous run's prepare folder (``items.parquet``, ``users.parquet``).

    Raises:
        DataError: a file or column is missing, or the indices are not 0..n-1 with unique ids
            (the file and column are named).
    """
    folder = Path(folder)
    tables = {}
    for name, columns in (("items", ["item_idx", "item_id", "text"]), ("users", ["user_idx", "user_id"])):
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise DataError(f"data.id_map: expected a previous run's prepare folder with {name}.parquet",
                            file=path)
        try:
            frame = pl.from_arrow(read_table(path))
        except DataError as e:
            raise DataError(f"data.id_map: {e}") from None
        for col in columns:
            if col not in frame.columns:
                raise DataError(f"data.id_map: missing column; columns found: {', '.join(frame.columns)}",
                                file=path, column=col)
        frame = frame.select(pl.col(columns[0]).cast(pl.Int32), pl.col(columns[1]).cast(pl.String),
                             *(pl.col(c) for c in columns[2:])).sort(columns[0])
        dense = frame[columns[0]] == pl.int_range(0, frame.height, dtype=pl.Int32, eager=True)
        if not dense.all():
            row = (~dense).arg_true()[0]
            raise DataError(f"data.id_map: indices must be 0..{frame.height - 1}, each once; found "
                            f"{frame[columns[0]][row]} at sorted position {row}", file=path, column=columns[0])
        repeated = frame[columns[1]].is_duplicated() | frame[columns[1]].is_null()
        if repeated.any():
            row = repeated.arg_true()[0]
            raise DataError(f"data.id_map: ids must be unique and not null; {frame[columns[1]][row]!r} "
                            f"is not", file=path, column=columns[1], row=row)
        tables[name] = frame
    return IdMap(tables["items"], tables["users"])


def assign_ids(current: pl.Series, previous: pl.DataFrame | None, idx: str, key: str) -> pl.DataFrame:
    """Indices for the distinct ids in ``current``, extending the ``previous`` map (``idx``, ``key``).

    Returns:
        ``idx:int32`` (sorted, 0..n-1), ``key:str``, ``retired:bool`` (in ``previous`` but not in
        ``current``), one row per id of either.
    """
    ids = current.unique().sort().to_frame(key)
    if previous is None or previous.height == 0:
        return ids.with_row_index(idx).with_columns(pl.col(idx).cast(pl.Int32), pl.lit(False).alias("retired"))
    old = previous.select(idx, key).with_columns(
        (~pl.col(key).is_in(ids[key].implode())).alias("retired"))
    new = (ids.join(old, on=key, how="anti", maintain_order="left")
           .with_row_index(idx, offset=previous.height)
           .with_columns(pl.col(idx).cast(pl.Int32), pl.lit(False).alias("retired")))
    return pl.concat([old, new.select(idx, key, "retired")])
