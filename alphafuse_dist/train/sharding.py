"""TorchRec sharding of the fused item table: plans, fused optimisers, weight loading.

The two tables live in separate ``EmbeddingCollection``s, so the sharder never merges them:

- ``items.semantic_ec`` (frozen): fused SGD with lr 0, and every lookup runs under ``no_grad``, so
  its rows stay bit-identical (checked by tests).
- ``items.id_ec`` (trainable null-space ID rows): a fused optimiser applied in backward.

Only the FUSED compute kernel works for EmbeddingCollection on CPU with fbgemm-gpu-cpu 1.8 (the
dense kernel and data-parallel corrupt the heap there), so every plan asks for it explicitly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..model.item_table import ID_TABLE, SEMANTIC_TABLE


def id_optimizer(name: str, lr: float, weight_decay: float = 0.0) -> tuple[type, dict]:
    """The torch optimiser class + kwargs for the ID rows (TorchRec maps them to fused kernels)."""
    table = {
        "sgd": (torch.optim.SGD, {"lr": lr}),
        "adagrad": (torch.optim.Adagrad, {"lr": lr, "eps": 1e-8}),
        "adam": (torch.optim.Adam, {"lr": lr, "weight_decay": weight_decay}),
    }
    if name == "rowwise_adagrad":
        from torchrec.optim import RowWiseAdagrad

        return RowWiseAdagrad, {"lr": lr, "eps": 1e-8}
    if name not in table:
        raise ConfigError(f"train.id_optimizer={name!r}: expected sgd, adagrad, rowwise_adagrad or adam")
    return table[name]


def _generator(kind: str, world: int, table_rank: int):
    from torchrec.distributed.sharding_plan import column_wise, row_wise, table_wise

    if kind == "row_wise":
        return row_wise(compute_kernel="fused")
    if kind == "table_wise":
        return table_wise(rank=table_rank % world, compute_kernel="fused")
    if kind == "column_wise":
        return column_wise(ranks=list(range(world)), compute_kernel="fused")
    raise ConfigError(f"train.sharding={kind!r}: expected row_wise, table_wise or column_wise")


def shard_model(model: nn.Module, *, sharding: str, id_optimizer_name: str, id_lr: float,
                device: torch.device, log=print) -> nn.Module:
    """Wrap ``model`` (a SequentialRecommender with a torchrec item table) in
    DistributedModelParallel over the default process group, then load the tables' weights.

    Returns the DMP module; call it like the model (the dense part is wrapped in DDP).
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    world = dist.get_world_size()
    items = model.items
    if id_optimizer_name == "adam" and device.type == "cpu":
        raise ConfigError("train.id_optimizer=adam: TorchRec has no fused Adam on CPU; "
                          "use adagrad, rowwise_adagrad or sgd (or train.backend=torch)")
    cls, kwargs = id_optimizer(id_optimizer_name, id_lr)
    _apply_optimizer_in_backward(cls, items.id_ec.parameters(), kwargs)
    sharder = EmbeddingCollectionSharder()
    plans = {"items.id_ec": construct_module_sharding_plan(
        items.id_ec, {ID_TABLE: _generator(sharding, world, 0)}, sharder=sharder,
        local_size=world, world_size=world, device_type=device.type)}
    if items.has_semantic:
        _apply_optimizer_in_backward(torch.optim.SGD, items.semantic_ec.parameters(), {"lr": 0.0})
        plans["items.semantic_ec"] = construct_module_sharding_plan(
            items.semantic_ec, {SEMANTIC_TABLE: _generator(sharding, world, 1)}, sharder=sharder,
            local_size=world, world_size=world, device_type=device.type)
    plan = ShardingPlan(plans)
    if dist.get_rank() == 0:
        log(f"[train] TorchRec plan ({sharding}, {world} workers):\n{plan}")
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   plan=plan, sharders=[sharder], device=device)
    # sharding re-initialises (EBC) or may copy (EC) table weights: always load them afterwards
    load_table(dmp, "items.id_ec.embeddings.item_id.weight", items.initial_ids)
    if items.has_semantic:
        load_table(dmp, "items.semantic_ec.embeddings.semantic.weight", items.initial_semantic)
    return dmp


def _find_key(state: dict, suffix: str) -> str:
    matches = [k for k in state if k.endswith(suffix)]
    if len(matches) != 1:
        raise KeyError(f"state dict key ending in {suffix!r}: found {matches}")
    return matches[0]


@torch.no_grad()
def load_table(dmp: nn.Module, key_suffix: str, full: torch.Tensor) -> None:
    """Copy the rows/columns of ``full`` [N, D] that this rank holds into its local shards."""
    state = dmp.state_dict()
    tensor = state[_find_key(state, key_suffix)]
    shards = tensor.local_shards() if hasattr(tensor, "local_shards") else None
    if shards is None:
        tensor.copy_(full.to(tensor.device, tensor.dtype))
        return
    for shard in shards:
        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        shard.tensor.copy_(full[r0:r0 + nr, c0:c0 + nc].to(shard.tensor.device, shard.tensor.dtype))
