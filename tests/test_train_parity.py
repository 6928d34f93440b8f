"""TorchRec-sharded training on 2 (or 4) gloo workers vs one plain-torch process: same losses, same rows.

Both drive the product's :class:`TrainRecipe` (``setup``, then ``train_step`` on each batch of
``batches.epoch(0)``) on the same prepared folder: each worker builds the same seeded model,
shards it with DistributedModelParallel (the plan of ``train.sharding``) and trains on its rows of
each step's batch with the step's shared negatives; the single process trains on the whole
batches. Dropout is off so the two are the same function.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _workers import on_workers, recipe_steps
from safetensors.torch import save_file

from alphafuse_dist.config import load_config
from alphafuse_dist.model.recommender import build_model
from alphafuse_dist.train.inputs import TrainInputs

N, STEPS, B, L, D_S = 200, 4, 8, 6, 8
CPU = torch.device("cpu")


def _cfg(backend: str, sharding: str = "row_wise", frozen: str = "sharded"):
    return load_config(None, [f"train.backend={backend}", f"train.sharding={sharding}", "method=alphafuse",
                              f"train.frozen_tables={frozen}",
                              "model.dim=16", f"model.id_dims={16 - D_S}", "model.dropout=0.0", f"model.max_len={L}",
                              "train.id_optimizer=adagrad", "train.id_lr=0.1", "train.lr=0.01",
                              "model.id_init=normal", "model.id_init_std=0.1", f"train.batch_size={B}",
                              "train.num_negatives=16", "train.log_every=0"])


def _semantic():
    return torch.randn(N, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> TrainInputs:
    """A prepared folder of STEPS * B users, one training window each (L + 1 items, some shorter:
    left padding), walking i -> i+1 from a random start; and the semantic table."""
    folder = tmp_path_factory.mktemp("parity")
    rng = np.random.default_rng(0)
    users = STEPS * B
    seqs = [[(s + t) % N for t in range(n)] for s, n in zip(rng.integers(0, N, users), rng.integers(L - 1, L + 2, users))]
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(users), pa.int32()),
                             "items": pa.array(seqs, pa.list_(pa.int32()))}), folder / "train.parquet")
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(users), pa.int32()),
                             "history": pa.array([s[:-1] for s in seqs], pa.list_(pa.int32())),
                             "target": pa.array([s[-1] for s in seqs], pa.int32())}), folder / "valid.parquet")
    save_file({"semantic": _semantic()}, str(folder / "semantic.safetensors"))
    return TrainInputs(prepare_dir=str(folder), semantic_path=str(folder / "semantic.safetensors"), num_items=N)


def _train(cfg, inputs: TrainInputs) -> dict:
    """The recipe's first-epoch steps on this worker; the trained tables (collectives with torchrec)."""
    recipe, losses, logged = recipe_steps(cfg, inputs)
    return {"losses": losses, "table": recipe.net.items.full_table(),
            "encoder": {k: v.detach().clone() for k, v in recipe.net.encoder.state_dict().items()},
            "semantic": recipe.net.items.lookup_semantic(torch.arange(N)), "plan": "\n".join(logged),
            "ids": recipe.net.items.ids.weight.detach().clone() if cfg.train.backend == "torch" else None}


@pytest.fixture(scope="module")
def single(inputs) -> dict:
    return _train(_cfg("torch"), inputs)


def _sharded(inputs: TrainInputs, sharding: str, world: int = 2, frozen: str = "sharded") -> dict:
    return on_workers(_train, world, _cfg("torchrec", sharding, frozen), inputs)


def _untouched() -> torch.nn.Module:
    """The model as built before any step (the same seeded initialisation as the recipe's)."""
    return build_model(_cfg("torch"), N, _semantic(), CPU).items


@pytest.mark.parametrize("sharding, world, frozen", [
    ("row_wise", 2, "sharded"), ("table_wise", 2, "sharded"), ("column_wise", 2, "sharded"), ("row_wise", 4, "sharded"),
    ("planner", 2, "sharded"), ("row_wise", 2, "replicated")])
def test_sharded_workers_match_one_process(inputs, single, sharding, world, frozen):
    got = _sharded(inputs, sharding, world, frozen)
    assert len(got["losses"]) == len(single["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5)
    # the updated fused rows (hence the ID rows) agree after several steps
    torch.testing.assert_close(got["table"], single["table"], rtol=1e-5, atol=1e-5)
    # and so does every encoder tensor (the attention's key bias, whose gradient is rounding noise
    # alone, is held at zero: otherwise Adam walks it apart between the two summation orders)
    for key, ref in single["encoder"].items():
        torch.testing.assert_close(got["encoder"][key], ref, rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
    # the plan is logged; the planner was held to the fused kernel and the CPU sharding types
    assert f"TorchRec plan ({sharding}, {world} workers)" in got["plan"]
    if sharding == "planner":
        assert "fused" in got["plan"] and "data_parallel" not in got["plan"]
    # and training moved them: the test is not comparing two untouched tables
    assert (single["table"] - _untouched().full_table()).abs().max() > 1e-3


@pytest.mark.parametrize("frozen", ["sharded", "replicated"])
def test_semantic_part_frozen_only_null_space_moves(inputs, frozen):
    sem = _semantic()
    got = _sharded(inputs, "row_wise", frozen=frozen)
    # the frozen table is bit-identical after training, and so are the fused semantic coordinates
    assert torch.equal(got["semantic"], sem)
    assert torch.equal(got["table"][:, :D_S], sem[:, :D_S])
    # the null-space coordinates moved for the items that were trained
    moved = (got["table"][:, D_S:] - (sem[:, D_S:] + _untouched().ids.weight)).abs().amax(1)
    assert (moved > 1e-4).sum() > N // 4


def test_plain_torch_semantic_frozen(single):
    sem = _semantic()
    assert single["losses"][-1] < single["losses"][0]
    bias = single["encoder"]["blocks.0.attn.in_proj_bias"]
    d = bias.numel() // 3
    assert torch.equal(bias[d:2 * d], torch.zeros(d)) and bias[:d].abs().max() > 0  # the key bias stays zero
    assert torch.equal(single["semantic"], sem)
    assert torch.equal(single["table"][:, :D_S], sem[:, :D_S])
    torch.testing.assert_close(single["table"][:, D_S:], sem[:, D_S:] + single["ids"], rtol=0, atol=1e-6)
    # the ID rows moved away from their initialisation
    assert (single["ids"] - _untouched().ids.weight).abs().max() > 1e-3


# neither the fused width nor the ID width (ODD - D_S = 10) is a multiple of 4, the width TorchRec's
# fused kernels need: it stores such tables zero-padded (the threshold rule derives widths like these)
ODD = 18


def _odd_train(method: str, backend: str, inputs: TrainInputs) -> dict:
    cfg = load_config(None, [f"train.backend={backend}", f"method={method}", f"model.dim={ODD}",
                             f"model.id_dims={ODD - D_S}", "model.num_heads=1", "model.dropout=0.0",
                             f"model.max_len={L}", "train.id_optimizer=adagrad", "train.id_lr=0.1", "train.lr=0.01",
                             "model.id_init=normal", "model.id_init_std=0.1", f"train.batch_size={B}",
                             "train.num_negatives=16", "train.log_every=0"])
    recipe, losses, _ = recipe_steps(cfg, inputs)
    return {"losses": losses, "table": recipe.net.items.full_table()}


@pytest.mark.parametrize("method", ["alphafuse", "sasrec_id"])
def test_tables_narrower_than_torchrecs_width_multiple_train_as_in_one_process(inputs, tmp_path, method):
    semantic = torch.randn(N, ODD, generator=torch.Generator().manual_seed(2))
    save_file({"semantic": semantic}, str(tmp_path / "semantic.safetensors"))
    odd = dataclasses.replace(inputs, semantic_path=str(tmp_path / "semantic.safetensors"))
    single = _odd_train(method, "torch", odd)
    got = on_workers(_odd_train, 2, method, "torchrec", odd)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5)
    assert got["table"].shape == (N, ODD)
    torch.testing.assert_close(got["table"], single["table"], rtol=1e-5, atol=1e-5)
    if method == "alphafuse":  # the semantic coordinates stay as they were, the ID ones moved
        assert torch.equal(got["table"][:, :D_S], semantic[:, :D_S])
        assert (got["table"][:, D_S:] - semantic[:, D_S:]).abs().max() > 1e-3


def test_data_parallel_is_refused_on_cpu_with_the_reason():
    from alphafuse_dist.errors import ConfigError
    from alphafuse_dist.train.sharding import check_sharding

    with pytest.raises(ConfigError, match=r"train\.sharding=data_parallel: needs train\.device=cuda .*corrupts the heap"):
        check_sharding("data_parallel", torch.device("cpu"))
    check_sharding("data_parallel", torch.device("cuda"))  # CUDA takes it (tests/test_gpu_train.py)
    with pytest.raises(ConfigError, match=r"train\.sharding='diagonal'"):
        check_sharding("diagonal", torch.device("cpu"))
