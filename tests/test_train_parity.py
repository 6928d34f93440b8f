"""TorchRec-sharded training on 2 gloo workers vs one plain-torch process: same losses, same rows.

Each worker builds the same seeded model, shards it with DistributedModelParallel and runs a few
steps on its half of fixed batches with shared negatives; the single process runs the whole
batches. Dropout is off so the two are the same function.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alphafuse_dist.config import load_config
from alphafuse_dist.model.recommender import build_model
from alphafuse_dist.train.optim import build_optimizer

N, STEPS, B, L = 200, 4, 8, 6


def _cfg(backend: str, sharding: str = "row_wise", method: str = "alphafuse"):
    return load_config(None, [f"train.backend={backend}", f"train.sharding={sharding}", f"method={method}",
                              "model.dim=16", "model.id_dims=8", "model.dropout=0.0", f"model.max_len={L}",
                              "train.id_optimizer=adagrad", "train.id_lr=0.1", "train.lr=0.01",
                              "model.id_init=normal", "model.id_init_std=0.1", f"train.batch_size={B}"])


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        seqs = torch.randint(0, N, (B, L), generator=g)
        seqs[:, :2] = N  # some left padding
        tgts = torch.randint(0, N, (B, L), generator=g)
        tgts[:, :2] = N
        negs = torch.randint(0, N, (16,), generator=g)
        out.append((seqs, tgts, negs))
    return out


def _semantic():
    return torch.randn(N, 16, generator=torch.Generator().manual_seed(1))


def _run_steps(model, net, optimizer, rank, world):
    losses = []
    for seqs, tgts, negs in _batches():
        mine = slice(rank * B // world, (rank + 1) * B // world)
        lsum, lcnt = model(seqs[mine], tgts[mine], negs)
        total = lcnt.clone()
        lsum_all = lsum.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            dist.all_reduce(lsum_all)
        loss = lsum * (world / total)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append((lsum_all / total).item())
    return losses


def _single(method):
    cfg = _cfg("torch", method=method)
    net = build_model(cfg, N, _semantic() if method == "alphafuse" else None, torch.device("cpu"))
    losses = _run_steps(net, net, build_optimizer(cfg, net, net), 0, 1)
    return losses, net.items.full_table(), net.items.ids.weight.detach().clone()


def _worker(rank, world, store_path, sharding, method, out_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    try:
        from alphafuse_dist.train.sharding import shard_model

        cfg = _cfg("torchrec", sharding, method)
        net = build_model(cfg, N, _semantic() if method == "alphafuse" else None, torch.device("cpu"))
        logged = []
        model = shard_model(net, sharding=sharding, id_optimizer_name="adagrad", id_lr=0.1,
                            device=torch.device("cpu"), log=logged.append)
        losses = _run_steps(model, net, build_optimizer(cfg, model, net), rank, world)
        table = net.items.full_table()
        sem = net.items.lookup_semantic(torch.arange(N)) if method == "alphafuse" else None
        if rank == 0:
            torch.save({"losses": losses, "table": table, "semantic": sem, "plan": "\n".join(logged)}, out_path)
    finally:
        dist.destroy_process_group()


def _sharded(sharding, method, world=2):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        mp.start_processes(_worker, args=(world, os.path.join(d, "store"), sharding, method, out), nprocs=world,
                           join=True, start_method="spawn")
        return torch.load(out)


@pytest.mark.parametrize("sharding, world", [("row_wise", 2), ("table_wise", 2), ("column_wise", 2), ("row_wise", 4),
                                             ("planner", 2)])
def test_sharded_workers_match_one_process(sharding, world):
    ref_losses, ref_table, _ = _single("alphafuse")
    got = _sharded(sharding, "alphafuse", world)
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-5)
    # the updated fused rows (hence the ID rows) agree after several steps
    torch.testing.assert_close(got["table"], ref_table, rtol=1e-5, atol=1e-5)
    # the plan is logged; the planner was held to the fused kernel and the CPU sharding types
    assert f"TorchRec plan ({sharding}, {world} workers)" in got["plan"]
    if sharding == "planner":
        assert "fused" in got["plan"] and "data_parallel" not in got["plan"]
    # and training moved them: the test is not comparing two untouched tables
    assert (ref_table - build_model(_cfg("torch"), N, _semantic(), torch.device("cpu")).items.full_table()).abs().max() > 1e-3


def test_semantic_part_frozen_only_null_space_moves():
    sem = _semantic()
    got = _sharded("row_wise", "alphafuse")
    d_s = 8
    # the frozen table is bit-identical after training, and so are the fused semantic coordinates
    assert torch.equal(got["semantic"], sem)
    assert torch.equal(got["table"][:, :d_s], sem[:, :d_s])
    # the null-space coordinates moved for the items that were trained
    moved = (got["table"][:, d_s:] - (sem[:, d_s:] + build_model(_cfg("torch"), N, sem, torch.device("cpu")).items.ids.weight)).abs().amax(1)
    assert (moved > 1e-4).sum() > N // 4


def test_plain_torch_semantic_frozen():
    losses, table, ids = _single("alphafuse")
    sem = _semantic()
    assert losses[-1] < losses[0]
    assert torch.equal(table[:, :8], sem[:, :8])
    torch.testing.assert_close(table[:, 8:], sem[:, 8:] + ids, rtol=0, atol=1e-6)


def test_data_parallel_is_refused_with_the_reason():
    from alphafuse_dist.errors import ConfigError
    from alphafuse_dist.train.sharding import check_sharding

    with pytest.raises(ConfigError, match=r"train\.sharding=data_parallel: .*corrupts the heap"):
        check_sharding("data_parallel", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train\.sharding=data_parallel: on CUDA it trains a different function"):
        check_sharding("data_parallel", torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"train\.sharding='diagonal'"):
        check_sharding("diagonal", torch.device("cpu"))
