"""A persistent cache of item embeddings, so that a rerun of the embed stage encodes only new texts.

Keys: one cache *namespace* (a sub-folder) per encoder setting, and one row per text inside it::

    <cache_dir>/<namespace>/part-<time ns>-<uuid>.parquet    key: binary[32], vector: fixed_size_list<float32>[d_l]

    namespace = sha256(model fingerprint, normalize, max_seq_length, precision)[:16]
    key       = sha256(utf-8 text)                      (the item template is already in the text)

The model fingerprint (:func:`model_fingerprint`) covers the model folder's configuration files
byte for byte and its weight files by name, size and their first and last MiB, so a different
checkpoint in the same folder gets a new namespace while a plain copy of the folder keeps it.

Writes are atomic and never modify a file: each run that encodes something adds ONE new file
(written under a hidden temporary name, then renamed); readers merge all ``part-*.parquet`` files
of the namespace, first occurrence wins. Two concurrent runs can therefore only add duplicate keys,
never corrupt the cache.

Example::

    cache = EmbeddingCache(Path("runs/q/.embed-cache"), namespace)
    hit = cache.contains(keys)                      # bool [n]
    for rows, vectors in cache.lookup(keys[hit]):   # positions into keys[hit], float32 [b, d_l]
        ...
    cache.add(new_keys, new_vectors)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from ..errors import DataError
from ..runtime.parquet import iter_batches, write_table

KEY_COLUMN = "key"
VECTOR_COLUMN = "vector"
KEY_BYTES = 32
CACHE_GLOB = "part-*.parquet"
BATCH_ROWS = 16384  # rows read at a time from a cache file: bounds the driver's memory
# files above this size are fingerprinted by name, size and their first and last MiB (weights);
# smaller ones (configs, tokenizer, vocabulary) by their whole content
WHOLE_FILE_LIMIT = 4 << 20
EDGE_BYTES = 1 << 20


def model_fingerprint(model_path: str | Path) -> str:
    """A short content fingerprint of a local model folder (or file), 16 hex digits.

    Hidden files and folders (e.g. ``.cache``, ``.git``) are ignored. Weight files larger than
    ``WHOLE_FILE_LIMIT`` are hashed by name, size and their first and last ``EDGE_BYTES``: reading
    a multi-GB checkpoint on every run would cost more than the cache saves, and any retrained or
    converted checkpoint differs in its header (safetensors) or its first tensors.
    """
    root = Path(model_path)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= WHOLE_FILE_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(EDGE_BYTES))
                fh.seek(size - EDGE_BYTES)
                h.update(fh.read(EDGE_BYTES))
    return h.hexdigest()[:16]


def cache_namespace(model_path: str | Path, **settings) -> str:
    """The sub-folder name for one encoder setting: the model fingerprint plus every option that
    changes the vectors (normalisation, truncation, fp16 on GPU), 16 hex digits."""
    blob = json.dumps({"model": model_fingerprint(model_path), **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def text_keys(texts: list[str]) -> np.ndarray:
    """sha256 of each text's UTF-8 bytes, as a numpy ``S32`` array [n]."""
    return np.array([hashlib.sha256(t.encode("utf-8")).digest() for t in texts], dtype=f"S{KEY_BYTES}")


class EmbeddingCache:
    """The cached (key, vector) rows of one namespace.

    Args:
        root: the cache folder (``embed.cache_dir``); created on the first write.
        namespace: from :func:`cache_namespace`.
    """

    def __init__(self, root: str | Path, namespace: str):
        self.folder = Path(root) / namespace

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(CACHE_GLOB)) if self.folder.is_dir() else []

    def _iter(self, columns: list[str]) -> Iterator[tuple[Path, pa.RecordBatch]]:
        for path in self.files():
            try:
                for batch in iter_batches(path, batch_size=BATCH_ROWS, columns=columns):
                    yield path, batch
            except DataError as e:
                raise DataError(f"{e}: an unreadable embedding-cache file; delete it (the cache is rebuilt "
                                "from the texts)") from None

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which of ``keys`` (``S32`` [n]) are cached: bool [n]. Reads the key column only."""
        unique, inverse = np.unique(keys, return_inverse=True)
        found = np.zeros(len(unique), dtype=bool)
        if not len(unique):
            return found
        for _, batch in self._iter([KEY_COLUMN]):
            stored = _keys_of(batch)
            pos = np.minimum(np.searchsorted(unique, stored), len(unique) - 1)
            found[pos[unique[pos] == stored]] = True
        return found[inverse]

    def lookup(self, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Vectors of cached keys, streamed one cache batch at a time.

        Args:
            keys: ``S32`` [n], each cached (see :meth:`contains`); duplicates are allowed.

        Yields:
            ``(rows, vectors)``: int64 [b] positions into ``keys`` and float32 [b, d_l]. Every
            position is yielded exactly once in all (a key cached twice is taken from its first file).

        Raises:
            DataError: naming the cache folder when some key is not cached after all.
        """
        if not len(keys):
            return
        unique, inverse = np.unique(keys, return_inverse=True)
        # positions of keys grouped by unique key: rows_of[starts[u]:starts[u + 1]] share key u
        rows_of = np.argsort(inverse, kind="stable")
        starts = np.searchsorted(inverse[rows_of], np.arange(len(unique) + 1))
        done = np.zeros(len(unique), dtype=bool)
        for _, batch in self._iter([KEY_COLUMN, VECTOR_COLUMN]):
            stored = _keys_of(batch)
            pos = np.minimum(np.searchsorted(unique, stored), len(unique) - 1)
            take = (unique[pos] == stored) & ~done[pos]
            # a key twice in one batch: keep its first row
            u, first = np.unique(pos[take], return_index=True)
            if not len(u):
                continue
            done[u] = True
            source = np.flatnonzero(take)[first]
            counts = starts[u + 1] - starts[u]
            # fan each cached row out to every position holding its key
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            rows = rows_of[np.repeat(starts[u], counts) + offsets]
            vectors = batch.column(VECTOR_COLUMN)
            X = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), vectors.type.list_size)
            yield rows, X[np.repeat(source, counts)].astype(np.float32, copy=False)
        if not done.all():
            raise DataError(f"{int((~done).sum())} keys vanished from the embedding cache while reading it",
                            file=self.folder)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> Path | None:
        """Store new rows atomically as one new file (duplicate keys are stored once).

        Args:
            keys: ``S32`` [n].
            vectors: float32 [n, d_l].

        Returns:
            The new file, or None when there was nothing to add.
        """
        if not len(keys):
            return None
        keys, first = np.unique(keys, return_index=True)
        vectors = np.ascontiguousarray(vectors[first], dtype=np.float32)
        table = pa.table({
            # from the raw buffer: converting S32 items to Python bytes would strip trailing zero bytes
            KEY_COLUMN: pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), len(keys),
                                                             [None, pa.py_buffer(keys.tobytes())]),
            VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        })
        self.folder.mkdir(parents=True, exist_ok=True)
        # nanosecond time first: name order is write order, so "first file wins" means "oldest wins"
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.folder / f".{name}.tmp"
        try:
            write_table(table, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            # readers glob part-*.parquet only: the file appears whole or not at all
            os.replace(tmp, self.folder / name)
        finally:
            tmp.unlink(missing_ok=True)
        return self.folder / name


def _keys_of(batch: pa.RecordBatch) -> np.ndarray:
    """The key column of a cache batch as ``S32`` [b]."""
    column = batch.column(KEY_COLUMN)
    if column.null_count or column.type != pa.binary(KEY_BYTES):
        raise DataError(f"expected non-null binary[{KEY_BYTES}] keys, got {column.type}", column=KEY_COLUMN)
    return np.frombuffer(column.buffers()[1], dtype=f"S{KEY_BYTES}",
                         count=len(column) + column.offset)[column.offset:]
