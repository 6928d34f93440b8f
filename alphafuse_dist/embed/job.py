"""The embed stage: item texts -> language embeddings E, a Ray Data job over an actor pool.

Data flow::

    prepare/items.parquet (item_idx:int32, text:string), N rows
      -> read_parquet -> blocks of ~embed.batch_size rows
      -> map_batches(_EncodeBatches): one actor per embed.num_actors, model loaded once per actor
      -> write_parquet: embed/part-*.parquet (item_idx:int32, vector:fixed_size_list<float32>[d_l]),
         ~embed.rows_per_file rows per file, rows in any order
      -> embed/info.json

Each actor reserves exactly 1 CPU (plus 1 GPU on CUDA): an actor that reserves 2 CPUs on a
2-CPU node leaves nothing for Ray Data's read and write tasks and the job hangs without an error.
Ray must already be initialised by the caller (the pipeline's ``ensure_ray``).

Example::

    info = embed_items(Path("runs/q/prepare/items.parquet"), EmbedConfig(), Path("runs/q/embed"))
    info  # {"rows": {"items": 9742}, "dim": 384}
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.datasource import FilenameProvider

from ..config import EmbedConfig
from ..errors import ConfigError, DataError
from ..stages import atomic_write_json
from .encoder import load_encoder, resolve_model

INDEX_COLUMN = "item_idx"
TEXT_COLUMN = "text"
VECTOR_COLUMN = "vector"
PART_GLOB = "part-*.parquet"


class _EncodeBatches:
    """Ray Data callable class: one batch of items -> their embeddings.

    Input: a pyarrow batch with ``item_idx`` [B] and ``text`` [B]. Output: a pyarrow table with
    ``item_idx: int32 [B]`` and ``vector: fixed_size_list<float32>[d_l]`` [B] (a plain Arrow type,
    not Ray's tensor extension, so any Parquet reader understands the files).
    """

    def __init__(self, model: str, device: str, max_seq_length: int | None, normalize: bool,
                 threads: int | None, num_actors: int):
        import torch

        # Ray sets OMP_NUM_THREADS=1 from the 1-CPU reservation, but the encoder is the only heavy
        # work on the node (reads and writes are light): by default the actors share its cores
        torch.set_num_threads(threads or max(1, len(os.sched_getaffinity(0)) // num_actors))
        self.encoder = load_encoder(model, device=device, max_seq_length=max_seq_length)
        if device == "cuda":
            # inference only: fp16 halves memory traffic; outputs are cast back to float32
            self.encoder.half()
        self.normalize = normalize

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column(TEXT_COLUMN)
        vectors = self.encoder.encode(texts.to_pylist(), batch_size=len(texts), convert_to_numpy=True,
                                      normalize_embeddings=self.normalize, show_progress_bar=False)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        return pa.table({
            INDEX_COLUMN: batch.column(INDEX_COLUMN).cast(pa.int32()),
            VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        })


class _PartFilenames(FilenameProvider):
    """Names the outputs ``part-<write uuid>_<task>-<i>.parquet`` (Ray appends ``-<i>.parquet``)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Ray refuses names without the write uuid in append mode (they could overwrite each other)
        return f"part-{write_uuid}_{task_index:06d}"


def _actor_device(cfg: EmbedConfig, cluster: dict) -> str:
    """``cpu`` or ``cuda`` for the encoder actors, checked against the cluster's resources."""
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if cfg.num_actors < 1:
        raise ConfigError(f"embed.num_actors={cfg.num_actors}: must be >= 1")
    if cfg.num_actors >= cpus:
        raise ConfigError(f"embed.num_actors={cfg.num_actors}: the Ray cluster has {cpus:g} CPUs and each "
                          "actor holds one for the whole job, which would leave none for the read and "
                          f"write tasks (the job would hang); use at most {max(int(cpus) - 1, 1)}")
    if cfg.device == "cuda" and gpus < cfg.num_actors:
        raise ConfigError(f"embed.device=cuda: the Ray cluster has {gpus:g} GPUs, embed.num_actors="
                          f"{cfg.num_actors} actors need one each (or set embed.device=auto/cpu)")
    return "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus >= cfg.num_actors) else "cpu"


def _check_items(items_parquet: Path) -> int:
    """Row count of prepare's items file, after checking the columns the job reads.

    Null texts are caught here from the row-group statistics (falling back to reading the text
    column): inside an actor they would surface only as a wrapped Ray error.
    """
    try:
        meta = pq.ParquetFile(items_parquet).metadata
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"cannot read it as Parquet ({e})", file=items_parquet) from None
    names = meta.schema.to_arrow_schema().names
    for col in (INDEX_COLUMN, TEXT_COLUMN):
        if col not in names:
            raise DataError(f"missing column (has: {', '.join(names)})", file=items_parquet, column=col)
    text_pos = [meta.schema.column(i).path for i in range(meta.num_columns)].index(TEXT_COLUMN)
    stats = [meta.row_group(g).column(text_pos).statistics for g in range(meta.num_row_groups)]
    if all(s is not None and s.has_null_count for s in stats):
        nulls = sum(s.null_count for s in stats)
    else:
        nulls = pq.read_table(items_parquet, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).null_count
    if nulls:
        raise DataError(f"{nulls} items have no text; every item needs one", file=items_parquet, column=TEXT_COLUMN)
    return meta.num_rows


def embed_items(items_parquet: Path, cfg: EmbedConfig, out_dir: Path) -> dict:
    """Encode every item's text with the frozen language model (Ray Data, actor pool).

    Args:
        items_parquet: prepare's ``items.parquet`` (``item_idx:int32``, ``text:string``), N rows.
        cfg: the ``embed`` config section.
        out_dir: an existing, empty folder; receives ``part-*.parquet`` (``item_idx:int32``,
            ``vector: fixed_size_list<float32>[d_l]``, N rows in all, any order) and ``info.json``.

    Returns:
        ``{"rows": {"items": N}, "dim": d_l}`` for the stage manifest.
    """
    items_parquet, out_dir = Path(items_parquet), Path(out_dir)
    if any(out_dir.glob(PART_GLOB)):
        raise DataError(f"already holds {PART_GLOB} files; the embed stage writes into an empty folder",
                        file=out_dir)
    for key, value in (("embed.batch_size", cfg.batch_size), ("embed.rows_per_file", cfg.rows_per_file),
                       ("embed.threads_per_actor", cfg.threads_per_actor),
                       ("embed.max_seq_length", cfg.max_seq_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    num_items = _check_items(items_parquet)
    if num_items == 0:
        raise DataError("has no items to embed", file=items_parquet)
    device = _actor_device(cfg, ray.cluster_resources())
    model_path = resolve_model(cfg.model)
    print(f"[embed] {num_items} items, model {cfg.model} ({model_path}), {cfg.num_actors} actor(s) on {device}",
          flush=True)

    t0 = time.time()
    ds = (ray.data.read_parquet(str(items_parquet))
          .select_columns([INDEX_COLUMN, TEXT_COLUMN])
          # prepare writes one row group; without splitting it a single actor would get every item
          .repartition(target_num_rows_per_block=cfg.batch_size)
          .map_batches(_EncodeBatches, batch_format="pyarrow", batch_size=cfg.batch_size,
                       fn_constructor_kwargs={"model": cfg.model, "device": device,
                                              "max_seq_length": cfg.max_seq_length,
                                              "normalize": cfg.normalize, "threads": cfg.threads_per_actor,
                                              "num_actors": cfg.num_actors},
                       compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                       num_cpus=1, num_gpus=1 if device == "cuda" else 0))
    ds.write_parquet(str(out_dir), filename_provider=_PartFilenames(),
                     min_rows_per_file=cfg.rows_per_file, max_rows_per_file=cfg.rows_per_file)
    seconds = time.time() - t0

    parts = sorted(out_dir.glob(PART_GLOB))
    written = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    if written != num_items:
        raise DataError(f"the embed job wrote {written} rows for {num_items} items", file=out_dir)
    dim = pq.read_schema(parts[0]).field(VECTOR_COLUMN).type.list_size
    rate = num_items / seconds
    atomic_write_json(out_dir / "info.json", {
        "encoder": cfg.model, "path": model_path, "d_l": dim, "normalize": cfg.normalize,
        "max_seq_length": cfg.max_seq_length, "device": device, "num_actors": cfg.num_actors,
        "threads_per_actor": cfg.threads_per_actor or "node cores // num_actors",
        "items": num_items, "files": len(parts), "seconds": round(seconds, 3), "items_per_s": round(rate, 1),
    })
    print(f"[embed] {num_items} items -> {len(parts)} files, d_l={dim}, {seconds:.1f}s ({rate:.0f} items/s, "
          "actor start and model load included)", flush=True)
    return {"rows": {"items": num_items}, "dim": dim}
