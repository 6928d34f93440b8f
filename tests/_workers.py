"""Helpers for tests that compare training on several gloo workers with one process.

``on_workers(fn, world, *args)`` runs ``fn(*args)`` on ``world`` spawned processes joined in a
gloo process group (torch.multiprocessing, one FileStore) and returns rank 0's result;
``recipe_steps(cfg, inputs)`` drives the product's :class:`TrainRecipe` through the first epoch's
steps, in a process group or in one process without one.
"""
from __future__ import annotations

import itertools
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alphafuse_dist.runtime.seeding import seed_torch
from alphafuse_dist.train.inputs import TrainInputs
from alphafuse_dist.train.recipe import TrainRecipe


def _entry(rank: int, world: int, store: str, out: str, fn, args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def on_workers(fn, world: int, *args):
    """``fn(*args)`` on ``world`` gloo workers (``fn`` a module-level function, every worker
    calls it: it may run collectives); returns what rank 0's call returned."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.pt")
        mp.start_processes(_entry, args=(world, os.path.join(d, "store"), out, fn, args), nprocs=world, join=True,
                           start_method="spawn")
        return torch.load(out, weights_only=False)


def recipe_steps(cfg, inputs: TrainInputs, epoch: int = 0, steps: int | None = None
                 ) -> tuple[TrainRecipe, list[float], list[str]]:
    """``TrainRecipe(cfg, inputs)`` set up, then one ``train_step`` per batch of ``epoch`` on this
    worker's windows (the first ``steps`` batches only, when given). Returns the recipe, the steps'
    losses (global means) and the lines it logged."""
    logged: list[str] = []
    recipe = TrainRecipe(cfg, inputs, log=logged.append)
    recipe.setup()
    seed_torch(cfg.seed, epoch, rank=recipe.rank)  # dropout's generator and train mode, as train_epoch sets them
    recipe.net.train()
    batches = itertools.islice(recipe.batches.epoch(epoch), steps)
    losses = [float(recipe.train_step(epoch, step, inputs_, targets)) for step, (inputs_, targets) in enumerate(batches)]
    return recipe, losses, logged
