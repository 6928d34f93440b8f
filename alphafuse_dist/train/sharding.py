"""TorchRec sharding of the item module's tables: plans, fused optimisers, weight loading.

Every table lives in its own ``EmbeddingCollection``, so the sharder never merges them; the item
module lists them (``torchrec_tables()``, see ``alphafuse_dist.model.item_table.TableSpec``):

- trainable ID tables (``items.id_ec``): the fused ID optimiser, applied in backward.
- frozen tables when sharded (``train.frozen_tables``; alphafuse's ``items.semantic_ec``, the
  baselines' ``items.features_ec``): fused SGD with lr 0, and every lookup runs under ``no_grad``,
  so their rows stay bit-identical (checked by tests). A replicated frozen table is a plain frozen
  ``nn.Embedding`` on every worker and is not TorchRec's.

Dense parameters inside the item module (the baselines' adapters) are not sharded: DMP wraps them
with the encoder in DDP (with several workers), so their gradients are synchronised like the encoder's.

Only the FUSED compute kernel works for EmbeddingCollection on CPU with fbgemm-gpu-cpu 1.8 (the
dense kernel and data-parallel corrupt the heap there), so every sharded plan asks for it explicitly.
The data-parallel plan (CUDA only) keeps a full copy of each table per worker with TorchRec's dense
kernel and no in-backward optimiser: its ID table gets the ID optimiser in ``optim.build_optimizer``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import DATA_PARALLEL_NEEDS_CUDA
from ..errors import ConfigError, choose
from ..model.item_table import padded
from .optim import id_optimizer


def _fixed(generator):
    """A plan builder giving every table the per-table plan ``generator(world, k)`` (k: the table's
    position in ``torchrec_tables()``)."""
    def build(p: PlanInputs):
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan
        from torchrec.distributed.types import ShardingPlan

        return ShardingPlan({f"items.{spec.module}": construct_module_sharding_plan(
            getattr(p.model.items, spec.module), {spec.table: generator(p.world, k)}, sharder=p.sharder,
            local_size=p.world, world_size=p.world, device_type=p.device.type) for k, spec in enumerate(p.specs)})
    return build


def _row_wise(world: int, k: int):
    from torchrec.distributed.sharding_plan import row_wise

    return row_wise(compute_kernel="fused")


def _table_wise(world: int, k: int):
    from torchrec.distributed.sharding_plan import table_wise

    return table_wise(rank=k % world, compute_kernel="fused")


def _column_wise(world: int, k: int):
    from torchrec.distributed.sharding_plan import column_wise

    return column_wise(ranks=list(range(world)), compute_kernel="fused")


def _data_parallel(world: int, k: int):
    from torchrec.distributed.sharding_plan import data_parallel

    return data_parallel()


@dataclass
class PlanInputs:
    """What a plan builder reads: the model to shard, its tables, the sharder and the process group."""

    model: nn.Module
    specs: list
    sharder: object
    world: int
    device: torch.device
    batch_size: int


def check_sharding(kind: str, device: torch.device) -> None:
    """Refuse sharding choices this stack cannot run, before any process group work."""
    choose(SHARDING_PLANS, kind, "train.sharding")
    if kind == "data_parallel" and device.type == "cpu":
        raise ConfigError(DATA_PARALLEL_NEEDS_CUDA)


def _planner_plan(p: PlanInputs):
    """TorchRec's EmbeddingShardingPlanner over the item module's tables, constrained to the
    FUSED kernel and to row-, table- or column-wise sharding; one plan for all ranks
    (``collective_plan``: rank 0 plans and broadcasts)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    # never data-parallel: it has no fused optimiser and has not run with several workers
    allowed = [ShardingType.ROW_WISE.value, ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]
    constraints = {spec.table: ParameterConstraints(sharding_types=allowed, compute_kernels=["fused"])
                   for spec in p.specs}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=p.world, compute_device=p.device.type, local_world_size=p.world),
        batch_size=p.batch_size, constraints=constraints, debug=False)
    return planner.collective_plan(p.model, [p.sharder], dist.group.WORLD)


# train.sharding -> builder of the TorchRec plan of every table
SHARDING_PLANS = {
    "row_wise": _fixed(_row_wise),
    "table_wise": _fixed(_table_wise),
    "column_wise": _fixed(_column_wise),
    "data_parallel": _fixed(_data_parallel),
    "planner": _planner_plan,
}


def shard_model(model: nn.Module, *, sharding: str, id_optimizer_name: str, id_lr: float,
                device: torch.device, log=print, batch_size: int = 128) -> nn.Module:
    """Wrap ``model`` (a SequentialRecommender with a torchrec item module) in
    DistributedModelParallel over the default process group, then load the tables' weights.

    Each table of ``model.items.torchrec_tables()`` gets its plan (with ``table_wise``, the k-th
    table goes to rank k mod world; with ``planner``, TorchRec's planner chooses under explicit
    constraints) and its optimiser: the fused ID optimiser, or zero-lr SGD (with ``data_parallel``,
    TorchRec's dense kernel ignores both: ``optim.build_optimizer`` gives its ID table the ID
    optimiser). The plan is logged.

    Returns the DMP module; call it like the model (the dense part is wrapped in DDP when there
    are several workers: one worker has no gradients to synchronise, and DDP's per-step hooks and
    bucket all-reduce would only cost host time).
    """
    from torch.distributed.optim import _apply_optimizer_in_backward
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    world = dist.get_world_size()
    items = model.items
    check_sharding(sharding, device)
    if id_optimizer_name == "adam" and device.type == "cpu":
        raise ConfigError("train.id_optimizer=adam: TorchRec has no fused Adam on CPU; "
                          "use adagrad, rowwise_adagrad or sgd (or train.backend=torch)")
    cls, kwargs = id_optimizer(id_optimizer_name, id_lr)
    specs = items.torchrec_tables()
    for spec in specs:
        ec = getattr(items, spec.module)
        if spec.frozen:
            _apply_optimizer_in_backward(torch.optim.SGD, ec.parameters(), {"lr": 0.0})
        else:
            _apply_optimizer_in_backward(cls, ec.parameters(), kwargs)
    sharder = EmbeddingCollectionSharder()
    plan = SHARDING_PLANS[sharding](PlanInputs(model, specs, sharder, world, device, batch_size))
    if dist.get_rank() == 0:
        log(f"[train] TorchRec plan ({sharding}, {world} workers):\n{plan}")
    # replicated frozen tables are built identically on every worker: DDP neither broadcasts them at
    # start-up (up to 2 GiB each) nor tracks them
    local_frozen = [f"items.{m}.weight" for m in items.frozen_modules if isinstance(getattr(items, m), nn.Embedding)]
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   plan=plan, sharders=[sharder], device=device, init_data_parallel=world > 1,
                                   data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=local_frozen))
    # sharding re-initialises (EBC) or may copy (EC) table weights: always load them afterwards
    for spec in specs:
        load_table(dmp, f"items.{spec.module}.embeddings.{spec.table}.weight", padded(spec.initial))
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
