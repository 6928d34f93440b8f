"""The embed stage: item texts -> language embeddings E, a Ray Data job over an actor pool.

Data flow::

    prepare/items.parquet (item_idx:int32, text:string), N rows
      -> sha256(text) looked up in the embedding cache (cache.py): cached rows are copied to
         embed/part-cached-*.parquet, only the other texts go on
      -> sorted by length (characters), cut into blocks of embed.batch_size rows (CUDA:
         embed.gpu_batch_size), one encode call each
      -> map_batches(_tokenize_batch): CPU tasks, the encoder's preprocessing from its tokenizer
         files (no weights), unpadded tokens
      -> map_batches(_EncodeBatches): an actor pool (embed.num_actors, default: one per node, or
         embed.actors_per_gpu per GPU) that only runs the model (fp16 on CUDA), counting the
         encoded rows on the terminal's bar (_Counted, runtime.progress)
      -> write_parquet: embed/part-*.parquet (item_idx:int32, vector:fixed_size_list<float32>[d_l]),
         ~embed.rows_per_file rows per file (at least that many, but the last) in row groups of
         ROW_GROUP_ROWS, rows in any order; both columns and the list's elements are required
         (non-nullable) and the pages uncompressed (see ``vector_table``)
      -> the new vectors are added to the cache as one new file
      -> embed/info.json

Each actor reserves exactly 1 CPU (plus 1 / embed.actors_per_gpu of a GPU on CUDA): an actor that reserves 2 CPUs on a
2-CPU node leaves nothing for Ray Data's read and write tasks and the job hangs without an error.
Ray must already be initialised by the caller (``runtime.ray.ensure_ray``).

Example::

    info = embed_items(Path("runs/q/prepare/items.parquet"), EmbedConfig(), Path("runs/q/embed"),
                       cache_dir=Path("runs/q/.embed-cache"))
    info  # {"rows": {"items": 9742}, "dim": 384, "encoded": 9742, "cached": 0}
"""
from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.datasource import FilenameProvider

from ..config import EmbedConfig
from ..errors import ConfigError, DataError
from ..runtime.manifest import atomic_write_json, source_fingerprint
from ..runtime.parquet import WRITE_OPTIONS, open_file, read_table, write_table
from ..runtime.progress import Progress, Reporter
from .cache import EmbeddingCache, cache_namespace, text_keys
from .encoder import encode_tokens, load_encoder, load_tokenizer, resolve_model, tokenize

_log = logging.getLogger(__name__)

INDEX_COLUMN = "item_idx"
TEXT_COLUMN = "text"
VECTOR_COLUMN = "vector"
PART_GLOB = "part-*.parquet"
TOKENS_PREFIX = "tokens."


@functools.lru_cache(maxsize=2)
def _cpu_tokenizer(model: str, max_seq_length: int | None):
    """The encoder's tokenizing (:func:`encoder.load_tokenizer`: its tokenizer files, no weights, for
    text Transformer models), loaded once per Ray worker process (workers are reused across tasks)."""
    return load_tokenizer(model, max_seq_length=max_seq_length)


def _tokenize_batch(batch: pa.Table, model: str, max_seq_length: int | None) -> pa.Table:
    """Ray Data task: a batch of ``item_idx``, ``text`` -> the same columns plus the encoder's
    unpadded token features as ``tokens.*`` columns (:func:`encoder.tokenize`).

    Tokenizing is the host-side half of encoding, and on short titles the slower half: as Ray
    Data tasks it spreads over every free CPU of the cluster while the actors only run the model.
    Tasks, not actors: a task gives its CPU back, so the write tasks always find one.
    """
    # one tokenizer thread per task: Ray runs as many tasks as there are free CPUs
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = _cpu_tokenizer(model, max_seq_length)
    for name, column in tokenize(tokenizer, batch.column(TEXT_COLUMN).to_pylist()).items():
        batch = batch.append_column(TOKENS_PREFIX + name, column)
    return batch


class _EncodeBatches:
    """Ray Data callable class (the actor pool): a tokenized batch -> its embeddings.

    Input: a pyarrow batch with ``item_idx`` [B], ``text`` [B] and the ``tokens.*`` columns of
    :func:`_tokenize_batch`. Output: a pyarrow table with ``item_idx: int32 [B]`` and
    ``vector: fixed_size_list<float32>[d_l]`` [B] (a plain Arrow type, not Ray's tensor extension,
    so any Parquet reader understands the files).
    """

    def __init__(self, model: str, device: str, max_seq_length: int | None, normalize: bool,
                 threads: int | None, actors_per_node: int):
        # Ray sets OMP_NUM_THREADS=1 from the 1-CPU reservation; on CPU the encoder is the only
        # heavy work on the node, so by default the actors share its cores.
        share = threads or max(1, len(os.sched_getaffinity(0)) // actors_per_node)
        import torch

        torch.set_num_threads(share)
        self.encoder = load_encoder(model, device=device, max_seq_length=max_seq_length)
        if device == "cuda":
            # inference only: fp16 halves memory traffic; outputs are cast back to float32
            self.encoder.half()
        # the preprocessing output's non-tensor entries (e.g. the modality) are the same for every batch
        self.static = {k: v for k, v in self.encoder.preprocess([""]).items() if not isinstance(v, torch.Tensor)}
        self.normalize = normalize

    def __call__(self, batch: pa.Table) -> pa.Table:
        features = {name[len(TOKENS_PREFIX):]: batch.column(name).combine_chunks()
                    for name in batch.column_names if name.startswith(TOKENS_PREFIX)}
        vectors = encode_tokens(self.encoder, features, self.static, self.normalize)
        return vector_table(batch.column(INDEX_COLUMN).to_numpy(), vectors)


class _Counted:
    """The actor pool's callable class: ``encoder(**kwargs)``'s batches, their rows counted on the
    driver's bar. In the actors, not in a step of its own: the write step gathers
    ``embed.rows_per_file`` rows before it runs, so a count there would come all at the end."""

    def __init__(self, encoder: type, progress: Reporter, **kwargs):
        self.encoder, self.progress = encoder(**kwargs), progress

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.encoder(batch)
        self.progress.update(out.num_rows)
        self.progress.flush(wait=True)  # the count arrives before the job ends (a millisecond per batch)
        return out


class _PartFilenames(FilenameProvider):
    """Names the outputs ``part-<write uuid>_<task>-<i>.parquet`` (Ray appends ``-<i>.parquet``)."""

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        # Ray refuses names without the write uuid in append mode (they could overwrite each other)
        return f"part-{write_uuid}_{task_index:06d}"


def actor_pool(cfg: EmbedConfig, cluster: dict, nodes: int = 1) -> tuple[str, int]:
    """``(device, actors)`` of the encoder pool, checked against the cluster's resources.

    On CUDA each actor reserves ``1 / embed.actors_per_gpu`` of a GPU, so that several actors
    share one: an actor alternates between moving a batch to and from the GPU and running the
    model, and the GPU idles unless other actors' batches fill those gaps.

    ``embed.num_actors`` unset sizes the pool to the cluster: ``embed.actors_per_gpu`` actors per
    GPU when GPUs are used (at most CPUs - 1), otherwise one actor per node (each then runs torch
    on all of its node's cores: one model instance per node encodes faster than several that split
    the cores), never so many that no CPU is left for Ray Data's read and write tasks.

    Args:
        cluster: ``ray.cluster_resources()``.
        nodes: alive nodes with CPUs.
    """
    gpus, cpus = cluster.get("GPU", 0), cluster.get("CPU", 0)
    if cfg.actors_per_gpu < 1:
        raise ConfigError(f"embed.actors_per_gpu={cfg.actors_per_gpu}: must be >= 1")
    slots = int(gpus) * cfg.actors_per_gpu  # GPU actors the cluster holds
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus >= 1 and slots >= max(cfg.num_actors or 1, 1))
    if cfg.num_actors is None:
        actors = max(1, min(slots, int(cpus) - 1)) if use_gpu else max(1, min(nodes, int(cpus) - 1))
    else:
        actors = cfg.num_actors
    if cfg.device == "cuda" and (gpus < 1 or slots < max(actors, 1)):
        raise ConfigError(f"embed.device=cuda: the Ray cluster has {gpus:g} GPUs, embed.num_actors="
                          f"{max(actors, 1)} actors need {-(-max(actors, 1) // cfg.actors_per_gpu)} at "
                          f"embed.actors_per_gpu={cfg.actors_per_gpu} (or set embed.device=auto/cpu)")
    if actors < 1:
        raise ConfigError(f"embed.num_actors={cfg.num_actors}: must be >= 1")
    if actors >= cpus:
        raise ConfigError(f"embed.num_actors={actors}: the Ray cluster has {cpus:g} CPUs and each "
                          "actor holds one for the whole job, which would leave none for the read and "
                          f"write tasks (the job would hang); use at most {max(int(cpus) - 1, 1)}")
    return ("cuda" if use_gpu else "cpu"), actors


def cache_settings(cfg: EmbedConfig, device: str) -> dict:
    """The encode settings that change the vectors, hashed into the cache namespace: the
    normalisation, the token limit, the precision (fp16 on CUDA, fp32 on CPU) and the source of
    the encoder module that computes them (vectors of other encoding code are never reused).
    Batch sizes and pool sizes are left out: they change no more than the last bits, and a rerun
    with another pool still finds its vectors."""
    return {"normalize": cfg.normalize, "max_seq_length": cfg.max_seq_length,
            "precision": "fp16" if device == "cuda" else "fp32", "code": source_fingerprint("embed/encoder.py")}


def _check_items(items_parquet: Path) -> int:
    """Row count of prepare's items file, after checking the columns the job reads.

    Null texts are caught here from the row-group statistics (falling back to reading the text
    column): inside an actor they would surface only as a wrapped Ray error.
    """
    meta = open_file(items_parquet).metadata  # a damaged file: a DataError naming it
    names = meta.schema.to_arrow_schema().names
    for col in (INDEX_COLUMN, TEXT_COLUMN):
        if col not in names:
            raise DataError(f"missing column (has: {', '.join(names)})", file=items_parquet, column=col)
    text_pos = [meta.schema.column(i).path for i in range(meta.num_columns)].index(TEXT_COLUMN)
    stats = [meta.row_group(g).column(text_pos).statistics for g in range(meta.num_row_groups)]
    if all(s is not None and s.has_null_count for s in stats):
        nulls = sum(s.null_count for s in stats)
    else:
        nulls = read_table(items_parquet, columns=[TEXT_COLUMN]).column(TEXT_COLUMN).null_count
    if nulls:
        raise DataError(f"{nulls} items have no text; every item needs one", file=items_parquet, column=TEXT_COLUMN)
    return meta.num_rows


# Parquet options of the embedding files. Uncompressed: snappy made float32 vectors larger, not
# smaller (6.34 MB for 5.69 MB of ML-1M vectors), and costs decode time. Row groups of 4,096 rows
# (6 MB at d_l=384, 50 MB at 3,072): the decompose stage runs one task per run of whole row groups
# (decompose.covariance.pieces), so a large file is read by several tasks.
ROW_GROUP_ROWS = 4096
PARQUET_OPTIONS = {"compression": "none", "row_group_size": ROW_GROUP_ROWS, **WRITE_OPTIONS}


def vector_schema(d_l: int) -> pa.Schema:
    """``item_idx: int32 not null, vector: fixed_size_list<element: float not null>[d_l] not null``.

    Required fields: the Parquet reader then skips the definition levels of 384-3072 values per
    row, which decodes the vector column faster; readers of the older nullable files are unaffected.
    """
    vector = pa.list_(pa.field("element", pa.float32(), nullable=False), d_l)
    return pa.schema([pa.field(INDEX_COLUMN, pa.int32(), nullable=False), pa.field(VECTOR_COLUMN, vector, nullable=False)])


def vector_table(item_idx: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """The embedding files' table of ``item_idx`` [n] and float32 ``vectors`` [n, d_l]."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    schema = vector_schema(vectors.shape[1])
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), type=schema.field(VECTOR_COLUMN).type)
    return pa.Table.from_arrays([pa.array(np.asarray(item_idx, dtype=np.int32)), column], schema=schema)


def _write_cached_parts(out_dir: Path, cache: EmbeddingCache, keys: np.ndarray, item_idx: np.ndarray,
                        rows_per_file: int) -> int:
    """Copy the cached vectors of ``keys`` (``S32`` [m], item ``item_idx`` int32 [m]) into
    ``part-cached-*.parquet`` files of at most ``rows_per_file`` rows; returns the number of files."""
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    held, files = 0, 0

    def flush(rows: int) -> None:
        nonlocal pending, held, files
        idx = np.concatenate([p[0] for p in pending])
        X = np.concatenate([p[1] for p in pending])
        write_table(vector_table(idx[:rows], X[:rows]), out_dir / f"part-cached-{files:06d}.parquet",
                       **PARQUET_OPTIONS)
        files += 1
        pending, held = ([(idx[rows:], X[rows:])], len(idx) - rows) if rows < len(idx) else ([], 0)

    for rows, vectors in cache.lookup(keys):
        pending.append((item_idx[rows], vectors))
        held += len(rows)
        while held >= rows_per_file:
            flush(rows_per_file)
    if held:
        flush(held)
    return files


def _cache_new_vectors(cache: EmbeddingCache, parts: list[Path], keys_by_item: dict[int, bytes]) -> None:
    """Add the vectors the encode job wrote (``parts``) to the cache as one new file."""
    keys, vectors = [], []
    for path in parts:
        table = read_table(path, columns=[INDEX_COLUMN, VECTOR_COLUMN])
        keys.append(np.array([keys_by_item[i] for i in table.column(INDEX_COLUMN).to_pylist()], dtype="S32"))
        column = table.column(VECTOR_COLUMN).combine_chunks()
        vectors.append(column.flatten().to_numpy().reshape(len(column), column.type.list_size))
    if keys:
        cache.add(np.concatenate(keys), np.concatenate(vectors))


def embed_items(items_parquet: Path, cfg: EmbedConfig, out_dir: Path, cache_dir: Path | None = None,
                batch_encoder: type = _EncodeBatches, tokenizer=_tokenize_batch) -> dict:
    """Encode every item's text with the frozen language model (Ray Data, actor pool), reusing cached
    vectors of texts already encoded with the same model and settings.

    Args:
        items_parquet: prepare's ``items.parquet`` (``item_idx:int32``, ``text:string``), N rows.
        cfg: the ``embed`` config section.
        out_dir: an existing, empty folder; receives ``part-*.parquet`` (``item_idx:int32``,
            ``vector: fixed_size_list<float32>[d_l]``, N rows in all, any order) and ``info.json``.
            Cached items go to ``part-cached-*.parquet``, newly encoded ones to the job's files.
        cache_dir: the embedding cache (see ``cache.py``); None encodes everything and caches nothing.
        batch_encoder: the Ray Data callable class that encodes a batch (a pyarrow batch of
            ``item_idx``, ``text`` and the ``tokens.*`` columns of ``tokenizer`` -> ``item_idx``,
            ``vector``), constructed with the keyword
            arguments of :class:`_EncodeBatches`; tests pass a stand-in that counts its texts.
        tokenizer: the Ray Data task that adds the token columns ``batch_encoder`` reads
            (:func:`_tokenize_batch`); None for a ``batch_encoder`` that reads the texts.

    Returns:
        ``{"rows": {"items": N}, "dim": d_l, "encoded": texts encoded now, "cached": items taken
        from the cache}`` for the stage manifest.
    """
    items_parquet, out_dir = Path(items_parquet), Path(out_dir)
    if any(out_dir.glob(PART_GLOB)):
        raise DataError(f"already holds {PART_GLOB} files; the embed stage writes into an empty folder",
                        file=out_dir)
    for key, value in (("embed.batch_size", cfg.batch_size), ("embed.gpu_batch_size", cfg.gpu_batch_size),
                       ("embed.rows_per_file", cfg.rows_per_file),
                       ("embed.threads_per_actor", cfg.threads_per_actor),
                       ("embed.max_seq_length", cfg.max_seq_length)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    num_items = _check_items(items_parquet)
    if num_items == 0:
        raise DataError("has no items to embed", file=items_parquet)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    device, num_actors = actor_pool(cfg, ray.cluster_resources(), max(nodes, 1))
    model_path = resolve_model(cfg.model)

    t0 = time.time()
    items = read_table(items_parquet, columns=[INDEX_COLUMN, TEXT_COLUMN])
    item_idx = items.column(INDEX_COLUMN).to_numpy().astype(np.int32)
    keys = text_keys(items.column(TEXT_COLUMN).to_pylist())
    cache = None
    if cache_dir is not None:
        namespace = cache_namespace(model_path, **cache_settings(cfg, device))
        cache = EmbeddingCache(cache_dir, namespace)
    hit = cache.contains(keys) if cache else np.zeros(num_items, dtype=bool)
    num_cached = int(hit.sum())
    on = f"cuda ({cfg.actors_per_gpu} per GPU, fp16, batches of {cfg.gpu_batch_size})" if device == "cuda" else device
    _log.info(f"[embed] {num_items} items ({num_cached} cached), model {cfg.model} ({model_path}), "
              f"{num_actors} actor(s) on {on}")
    if num_cached:
        _write_cached_parts(out_dir, cache, keys[hit], item_idx[hit], cfg.rows_per_file)

    todo = items.filter(pa.array(~hit))
    # Texts of similar length share a batch, as SentenceTransformer.encode arranges within one
    # call: a batch is padded to its longest text, so mixed lengths waste most of the compute.
    # The character count orders them (the token count follows it closely on titles).
    todo = todo.take(pc.array_sort_indices(pc.utf8_length(todo.column(TEXT_COLUMN))))
    batch_size = cfg.gpu_batch_size if device == "cuda" else cfg.batch_size
    if len(todo):
        # Blocks of one batch each, cut here (zero-copy slices): one block would give a single
        # actor every item, and Ray Data's repartition task (one task over all rows) took ~15 s
        # for 20,000 texts in a benchmark here, while the actors waited for its output.
        blocks = [todo.slice(s, batch_size) for s in range(0, len(todo), batch_size)]
        ds = ray.data.from_arrow(blocks)
        if tokenizer is not None:
            # On CUDA not fused with the actors (other resources), so it runs on the other CPUs;
            # on CPU Ray fuses it into the actors (same resources): each then tokenizes its own
            # batches, on one thread, with its own copy of the tokenizer
            ds = ds.map_batches(tokenizer, batch_format="pyarrow", batch_size=batch_size, num_cpus=1,
                                fn_kwargs={"model": cfg.model, "max_seq_length": cfg.max_seq_length})
        with Progress("[embed] encoding", total=len(todo), unit="item") as bar:
            ds = (ds.map_batches(_Counted, batch_format="pyarrow", batch_size=batch_size,
                                 fn_constructor_kwargs={"encoder": batch_encoder, "progress": bar.remote(),
                                                        "model": cfg.model, "device": device,
                                                        "max_seq_length": cfg.max_seq_length,
                                                        "normalize": cfg.normalize, "threads": cfg.threads_per_actor,
                                                        "actors_per_node": -(-num_actors // max(nodes, 1))},
                                 compute=ray.data.ActorPoolStrategy(size=num_actors),
                                 # several actors share a GPU (embed.actors_per_gpu); see actor_pool
                                 num_cpus=1, num_gpus=1 / cfg.actors_per_gpu if device == "cuda" else 0))
            ds.write_parquet(str(out_dir), filename_provider=_PartFilenames(),
                             # no max_rows_per_file: with min == max Ray Data makes each file one row group
                             min_rows_per_file=cfg.rows_per_file, **PARQUET_OPTIONS)
        if cache:
            new_parts = sorted(p for p in out_dir.glob(PART_GLOB) if not p.name.startswith("part-cached-"))
            _cache_new_vectors(cache, new_parts, dict(zip(item_idx[~hit].tolist(), keys[~hit])))
    seconds = time.time() - t0

    parts = sorted(out_dir.glob(PART_GLOB))
    written = sum(open_file(p).metadata.num_rows for p in parts)
    if written != num_items:
        raise DataError(f"the embed job wrote {written} rows for {num_items} items", file=out_dir)
    dims = {open_file(p).schema_arrow.field(VECTOR_COLUMN).type.list_size for p in parts}
    if len(dims) > 1:
        raise DataError(f"cached and new vectors differ in d_l ({sorted(dims)}); delete the cache folder "
                        f"{cache.folder if cache else ''}", file=out_dir)
    dim = dims.pop()
    num_encoded = num_items - num_cached
    rate = num_encoded / max(seconds, 1e-9)
    atomic_write_json(out_dir / "info.json", {
        "encoder": cfg.model, "path": model_path, "d_l": dim, "normalize": cfg.normalize,
        "max_seq_length": cfg.max_seq_length, "device": device, "num_actors": num_actors,
        "precision": "fp16" if device == "cuda" else "fp32", "batch_size": batch_size,
        "actors_per_gpu": cfg.actors_per_gpu if device == "cuda" else None,
        "sorted_by": "characters",
        "threads_per_actor": cfg.threads_per_actor or "node cores // actors per node",
        "items": num_items, "encoded": num_encoded, "cached": num_cached,
        "cache": str(cache.folder) if cache else None,
        "files": len(parts), "seconds": round(seconds, 3), "items_per_s": round(rate, 1),
    })
    speed = f" ({rate:.0f} encoded items/s, actor start and model load included)" if num_encoded else ""
    _log.info(f"[embed] {num_items} items ({num_encoded} encoded, {num_cached} from the cache) -> {len(parts)} files, "
              f"d_l={dim}, {seconds:.1f}s{speed}")
    return {"rows": {"items": num_items}, "dim": dim, "encoded": num_encoded, "cached": num_cached}
