"""Input files given as URIs (``s3://bucket/key``, ``gs://...``, ``hdfs://...``), read through
pyarrow's file systems: a local copy in the cache folder, fetched again only when the remote
file's size or modification time changed.

The cache folder is ``$ALPHAFUSE_CACHE`` or ``~/.cache/alphafuse``. S3 credentials, region and
endpoint come from the usual AWS settings (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...) or
from the URI's query (``s3://b/k?endpoint_override=127.0.0.1:9000&scheme=http``).

Example::

    path = local_copy("s3://my-bucket/logs/clicks.parquet")   # a Path to read like any file
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import cache_folder, is_uri  # noqa: F401 (is_uri: the callers' test)
from ..errors import DataError


def local_copy(uri: str) -> Path:
    """A local copy of the file ``uri`` names (kept name, so its suffix still tells the format).

    Raises:
        DataError: naming ``uri`` when it cannot be reached, does not exist or is a folder.
    """
    import pyarrow as pa
    import pyarrow.fs as pa_fs

    try:
        fs, where = pa_fs.FileSystem.from_uri(uri)
        info = fs.get_file_info(where)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot be reached: {_first_line(e)}", file=uri) from None
    if info.type == pa_fs.FileType.NotFound:
        raise DataError("does not exist", file=uri)
    if info.type != pa_fs.FileType.File:
        raise DataError("is not a file", file=uri)
    stamp = json.dumps([info.size, info.mtime_ns])
    folder = cache_folder() / "inputs" / hashlib.sha256(uri.split("?", 1)[0].encode()).hexdigest()[:16]
    target, stamp_file = folder / where.rsplit("/", 1)[-1], folder / ".stamp"
    if target.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with fs.open_input_stream(where) as src, open(partial, "wb") as out:
            while block := src.read(8 << 20):
                out.write(block)
    except (OSError, pa.ArrowException) as e:
        partial.unlink(missing_ok=True)
        raise DataError(f"cannot be read: {_first_line(e)}", file=uri) from None
    partial.replace(target)  # atomic: a killed copy leaves only the hidden .partial
    stamp_file.write_text(stamp)
    return target


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
