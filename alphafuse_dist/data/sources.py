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
  ``<name>.text`` (raw item id, item text); see :func:`.formats._unisrec`.
- ``rechorus``: ReChorus' layout in a folder: ``train.csv``, ``dev.csv``, ``test.csv`` (tab-separated
  ``user_id  item_id  time``; dev and test hold each user's last two items), with item text from
  ``<name>.item2index`` + ``<name>.text`` when present; see :func:`.formats._rechorus`.
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

import io
from pathlib import Path

import polars as pl

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..runtime.manifest import fingerprint_path
from ..runtime.uri import is_uri, local_copy
from .columns import Source, _check_items_known
from .embedded import embedded_path
from .formats import _AMAZON, _amazon, _generic, _movielens, _movielens_100k, _rechorus, _recbole, _unisrec
from .readers import _COMPRESSIONS, _plain_name, _read_table


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
    if cfg.source == "rechorus":
        folder = _folder(cfg, "a folder of ReChorus files (train.csv, dev.csv, test.csv)")
        files = {"interactions": _required(folder, "train.csv"), "valid": _required(folder, "dev.csv"),
                 "test": _required(folder, "test.csv")}
        index = [p for p in _visible_files(folder) if _plain_name(p).endswith(".item2index")]
        if len(index) > 1:
            raise DataError(f"expected at most one <name>.item2index file; found: {_listing(folder)}", file=folder)
        if index:
            stem = _plain_name(index[0])[:-len(".item2index")]
            files |= {"item_index": index[0], "items": _required(folder, f"{stem}.text")}
        return "rechorus", files
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


_READERS = {"embedded": _movielens, "movielens-csv": _movielens, "movielens-dat": _movielens,
            "movielens-100k": _movielens_100k, "recbole": _recbole, "unisrec": _unisrec, "rechorus": _rechorus,
            "interactions": _generic,
            **{name: _amazon for name in _AMAZON}}
