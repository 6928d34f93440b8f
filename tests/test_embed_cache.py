"""The embedding cache: only new or changed texts are encoded, and the output equals a fresh run."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray import cloudpickle

from alphafuse_dist.config import EmbedConfig
from alphafuse_dist.embed.cache import EmbeddingCache, cache_namespace, model_fingerprint
from alphafuse_dist.embed.encoder import load_encoder
from alphafuse_dist.embed.job import embed_items, vector_table
from test_embed import TITLES

# the stand-in encoder below runs in Ray actors, which cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])

STAND_IN_DIM = 8


def stand_in_vector(text: str) -> np.ndarray:
    return np.frombuffer(hashlib.sha256(text.encode()).digest()[:STAND_IN_DIM], np.uint8).astype(np.float32)


class CountingEncoder:
    """Stand-in for ``_EncodeBatches``: a hash 'embedding' of each text, and every text it encodes
    appended to ``<model folder>/.calls.log`` (hidden, so the model fingerprint ignores it)."""

    def __init__(self, model, device, max_seq_length, normalize, threads, actors_per_node):
        self.log = Path(model) / ".calls.log"

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        with open(self.log, "a") as f:
            f.write("".join(json.dumps(t) + "\n" for t in texts))
        X = np.stack([stand_in_vector(t) for t in texts])
        return vector_table(batch.column("item_idx").to_numpy(), X)  # as _EncodeBatches returns it


def write_items(path: Path, texts: list[str]) -> Path:
    # stored in reverse item order, as a shuffled source would be
    order = np.arange(len(texts))[::-1]
    pq.write_table(pa.table({"item_idx": pa.array(order, pa.int32()), "text": [texts[i] for i in order]}), path)
    return path


def read_output(folder: Path) -> np.ndarray:
    """The embed output as float32 [N, d_l], row i = item i; asserts every item occurs once."""
    table = pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
    idx = table.column("item_idx").to_numpy()
    assert sorted(idx) == list(range(len(idx)))
    column = table.column("vector").combine_chunks()
    E = np.empty((len(idx), column.type.list_size), np.float32)
    E[idx] = column.flatten().to_numpy().reshape(len(idx), -1)
    return E


def calls(model_dir: Path) -> list[str]:
    log = model_dir / ".calls.log"
    texts = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return texts


def test_cache_store_merges_files_and_keeps_binary_keys(tmp_path):
    cache = EmbeddingCache(tmp_path, "ns")
    keys = np.array([b"\x01" * 31 + b"\x00", b"\x02" * 32, b"\x00" * 32], dtype="S32")  # trailing zero bytes
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.add(keys[:2], X[:2])
    # key 1 again (older copy wins), key 2 twice in one file (first row kept)
    cache.add(keys[[1, 2, 2]], np.stack([X[1] + 100, X[2], X[2] + 100]))
    assert len(cache.files()) == 2 and not list(cache.folder.glob(".*"))  # no temporaries left
    assert cache.contains(np.array([keys[0], b"\x03" * 32, keys[2], keys[0]], dtype="S32")).tolist() == \
        [True, False, True, True]
    wanted = np.array([keys[2], keys[0], keys[1], keys[0]], dtype="S32")
    got = np.full((4, 4), np.nan, np.float32)
    for rows, vectors in cache.lookup(wanted):
        assert np.isnan(got[rows]).all()  # each position exactly once
        got[rows] = vectors
    assert np.array_equal(got, X[[2, 0, 1, 0]])


def test_rerun_encodes_only_new_and_changed_texts(ray_session, tmp_path):
    model = tmp_path / "stand-in-model"
    model.mkdir()
    (model / "config.json").write_text('{"stand_in": 1}')
    cfg = EmbedConfig(model=str(model), batch_size=8, rows_per_file=7, device="cpu")
    cache_dir = tmp_path / "cache"
    texts = [f"item {i}" for i in range(30)]

    def run(name: str, texts: list[str], cache: Path | None = cache_dir) -> tuple[dict, np.ndarray]:
        out = tmp_path / name
        out.mkdir()
        info = embed_items(write_items(tmp_path / f"{name}.parquet", texts), cfg, out, cache_dir=cache,
                           batch_encoder=CountingEncoder, tokenizer=None)
        return info, read_output(out)

    info, E = run("first", texts)
    assert sorted(calls(model)) == sorted(texts)
    assert (info["encoded"], info["cached"]) == (30, 0)

    changed = list(texts)
    changed[3], changed[17] = "item 3, new title", "item 17, new title"
    changed += ["item 30", "item 0"]  # a new item, and a new item with an already cached text
    info, E2 = run("second", changed)
    assert sorted(calls(model)) == sorted(["item 3, new title", "item 17, new title", "item 30"])
    assert (info["rows"], info["encoded"], info["cached"]) == ({"items": 32}, 3, 29)
    assert np.array_equal(E2, np.stack([stand_in_vector(t) for t in changed]))
    assert np.array_equal(E2[:3], E[:3])
    _, fresh = run("fresh", changed, cache=None)
    assert np.array_equal(E2, fresh)
    assert len(calls(model)) == 32  # no cache: everything encoded

    info, _ = run("third", changed)
    assert (info["encoded"], info["cached"]) == (0, 32) and calls(model) == []  # no job at all
    meta = json.loads((tmp_path / "third" / "info.json").read_text())
    assert (meta["items"], meta["encoded"], meta["d_l"]) == (32, 0, STAND_IN_DIM)

    # other weights, or another encode setting, are another namespace: nothing is reused
    (model / "config.json").write_text('{"stand_in": 2}')
    info, _ = run("new-model", changed)
    assert info["encoded"] == 32 and len(calls(model)) == 32
    assert cache_namespace(model, normalize=True) != cache_namespace(model, normalize=False)


def test_model_fingerprint_follows_weights_not_location(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(b"\x00" * (5 << 20))  # above the whole-file limit
    before = model_fingerprint(a)
    b = tmp_path / "b"
    b.mkdir()
    for f in a.iterdir():
        (b / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(b) == before  # a copy elsewhere keeps its cache
    with open(a / "model.safetensors", "r+b") as f:
        f.seek((5 << 20) - 10)
        f.write(b"\x01")  # last tensor changed
    assert model_fingerprint(a) != before


def test_real_model_reencodes_only_changed_items(ray_session, tmp_path):
    cfg = EmbedConfig(batch_size=16, rows_per_file=15, device="cpu")
    cache_dir = tmp_path / "cache"
    first, second = TITLES[:30], list(TITLES)
    second[5] = "Heat (1995). Genres: Action|Crime|Drama|Thriller."
    second[12] = "Babe: Pig in the City (1998). Genres: Adventure|Children|Drama."

    outs = []
    for name, texts in (("first", first), ("second", second)):
        out = tmp_path / name
        out.mkdir()
        outs.append(embed_items(write_items(tmp_path / f"{name}.parquet", texts), cfg, out, cache_dir=cache_dir))
    assert (outs[0]["encoded"], outs[0]["cached"]) == (30, 0)
    # items 5 and 12 changed, 30..39 are new: 12 encoded, the other 28 reused
    assert (outs[1]["encoded"], outs[1]["cached"]) == (12, 28)

    E1, E2 = read_output(tmp_path / "first"), read_output(tmp_path / "second")
    unchanged = [i for i in range(30) if i not in (5, 12)]
    assert np.array_equal(E2[unchanged], E1[unchanged])  # bit-identical: taken from the cache
    expected = load_encoder("all-MiniLM-L6-v2").encode(second, batch_size=40)  # a from-scratch run
    assert np.abs(E2 - expected).max() < 1e-5
    assert np.abs(E2[5] - E1[5]).max() > 1e-3  # the changed text really got a new vector


def test_cache_namespace_follows_the_precision_not_the_pool():
    from alphafuse_dist.embed.encoder import resolve_model
    from alphafuse_dist.embed.job import cache_settings

    path = resolve_model("all-MiniLM-L6-v2")
    cpu = cache_namespace(path, **cache_settings(EmbedConfig(), "cpu"))
    cuda = cache_namespace(path, **cache_settings(EmbedConfig(), "cuda"))
    assert cpu != cuda  # fp16 vectors never stand in for fp32 ones, nor the other way round
    other_pool = EmbedConfig(batch_size=32, gpu_batch_size=4096, actors_per_gpu=2, num_actors=3)
    assert cache_namespace(path, **cache_settings(other_pool, "cuda")) == cuda
    assert cache_namespace(path, **cache_settings(EmbedConfig(normalize=True), "cuda")) != cuda
