"""TorchRec sharding of the item module's tables: plans, fused optimisers, weight loading.

Every table lives in its own ``EmbeddingCollection``, so the sharder never merges them; the item
module lists them (``torchrec_tables()``, see ``alphafuse_dist.model.item_table.TableSpec``):

- frozen tables (alphafuse's ``items.semantic_ec``, the baselines' ``items.features_ec``): fused
  SGD with lr 0, and every lookup runs under ``no_grad``, so their rows stay bit-identical
  (checked by tests).
- trainable ID tables (``items.id_ec``): the fused ID optimiser, applied in backward.

Dense parameters inside the item module (the baselines' adapters) are not sharded: DMP wraps them
with the encoder in DDP, so their gradients are synchronised like the encoder's.

Only the FUSED compute kernel works for EmbeddingCollection on CPU with fbgemm-gpu-cpu 1.8 (the
dense kernel and data-parallel corrupt the heap there), so every plan asks for it explicitly.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError


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


SHARDINGS = ("row_wise", "table_wise", "column_wise", "data_parallel", "planner")


def _generator(kind: str, world: int, table_rank: int):
    from torchrec.distributed.sharding_plan import column_wise, data_parallel, row_wise, table_wise

    if kind == "row_wise":
        return row_wise(compute_kernel="fused")
    if kind == "table_wise":
        return table_wise(rank=table_rank % world, compute_kernel="fused")
    if kind == "column_wise":
        return column_wise(ranks=list(range(world)), compute_kernel="fused")
    if kind == "data_parallel":
        return data_parallel()
    raise ConfigError(f"train.sharding={kind!r}: expected one of {', '.join(SHARDINGS)}")


def check_sharding(kind: str, device: torch.device) -> None:
    """Refuse sharding choices this stack cannot run, before any process group work."""
    if kind not in SHARDINGS:
        raise ConfigError(f"train.sharding={kind!r}: expected one of {', '.join(SHARDINGS)}")
    if kind == "data_parallel" and device.type == "cpu":
        raise ConfigError("train.sharding=data_parallel: TorchRec's data-parallel (dense) kernel corrupts the heap "
                          "with fbgemm-gpu-cpu 1.8; on CPU use row_wise, table_wise, column_wise "
                          "or planner (which is limited to those)")


def _planner_plan(items: nn.Module, specs, model: nn.Module, sharder, world: int, device: torch.device,
                  batch_size: int):
    """TorchRec's EmbeddingShardingPlanner over the item module's tables, constrained to the
    FUSED kernel and, on CPU, to the sharding types that work there; one plan for all ranks
    (``collective_plan``: rank 0 plans and broadcasts)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    allowed = [ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]
    if device.type == "cuda":
        allowed.append(ShardingType.DATA_PARALLEL.value)
    constraints = {spec.table: ParameterConstraints(sharding_types=allowed, compute_kernels=["fused"])
                   for spec in specs}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type, local_world_size=world),
        batch_size=batch_size, constraints=constraints, debug=False)
    return planner.collective_plan(model, [sharder], dist.group.WORLD)


def shard_model(model: nn.Module, *, sharding: str, id_optimizer_name: str, id_lr: float,
                device: torch.device, log=print, batch_size: int = 128) -> nn.Module:
    """Wrap ``model`` (a SequentialRecommender with a torchrec item module) in
    DistributedModelParallel over the default process group, then load the tables' weights.

    Each table of ``model.items.torchrec_tables()`` gets its plan (with ``table_wise``, the k-th
    table goes to rank k mod world; with ``planner``, TorchRec's planner chooses under explicit
    constraints) and its optimiser: the fused ID optimiser, or zero-lr SGD. The plan is logged.

    Returns the DMP module; call it like the model (the dense part is wrapped in DDP).
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    world = dist.get_world_size()
    items = model.items
    check_sharding(sharding, device)
    if id_optimizer_name == "adam" and device.type == "cpu":
        raise ConfigError("train.id_optimizer=adam: TorchRec has no fused Adam on CPU; "
                          "use adagrad, rowwise_adagrad or sgd (or train.backend=torch)")
    cls, kwargs = id_optimizer(id_optimizer_name, id_lr)
    specs = items.torchrec_tables()
    sharder = EmbeddingCollectionSharder()
    plans = {}
    for k, spec in enumerate(specs):
        ec = getattr(items, spec.module)
        if spec.frozen:
            _apply_optimizer_in_backward(torch.optim.SGD, ec.parameters(), {"lr": 0.0})
        else:
            _apply_optimizer_in_backward(cls, ec.parameters(), kwargs)
        if sharding != "planner":
            plans[f"items.{spec.module}"] = construct_module_sharding_plan(
                ec, {spec.table: _generator(sharding, world, k)}, sharder=sharder,
                local_size=world, world_size=world, device_type=device.type)
    plan = (_planner_plan(items, specs, model, sharder, world, device, batch_size) if sharding == "planner"
            else ShardingPlan(plans))
    if dist.get_rank() == 0:
        log(f"[train] TorchRec plan ({sharding}, {world} workers):\n{plan}")
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   plan=plan, sharders=[sharder], device=device)
    # sharding re-initialises (EBC) or may copy (EC) table weights: always load them afterwards
    for spec in specs:
        load_table(dmp, f"items.{spec.module}.embeddings.{spec.table}.weight", spec.initial)
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
