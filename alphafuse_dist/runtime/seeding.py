"""Every random draw of a run comes from a generator seeded by ``(seed, *keys)``.

The keys name what is drawn (an epoch, a step, a worker), so a draw never depends on how many draws
came before it: a resumed run, or one split over another number of workers, draws the same values.
The derived seed of torch generators folds the keys in with a large prime (numpy generators take
the sequence ``[seed, *keys]`` as it is):

    derive_seed(seed)               = seed
    derive_seed(seed, k1, ..., kn)  = derive_seed(seed, k1, ..., k(n-1)) * 1_000_003 + kn

Example::

    g = seeded_generator(7, epoch, step)       # negatives and masks of one training step (torch)
    rng = seeded_rng(7, user)                  # numpy draws keyed the same way
    rng = seeded_rng(7, epoch)                 # the epoch's shuffle of training windows

Torch is imported only by the functions that return or seed a torch generator.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_PRIME = 1_000_003
# workers per run that the dropout seeds keep apart (rank < this)
MAX_WORKERS = 1_000


def derive_seed(seed: int, *keys: int) -> int:
    """The integer seed of ``(seed, *keys)`` (see the module docstring)."""
    out = int(seed)
    for key in keys:
        out = out * _PRIME + int(key)
    return out


def seeded_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, *keys)``."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, *keys))


def seeded_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator seeded with the sequence ``[seed, *keys]`` (numpy mixes it itself)."""
    return np.random.default_rng([seed, *keys])


def seed_torch(seed: int, *keys: int, rank: int | None = None) -> None:
    """Seed torch's global generator (module initialisation, dropout).

    With ``rank``: ``derive_seed(seed, *keys) * MAX_WORKERS + rank``, so that each worker's
    dropout draws differ and a resumed epoch draws what it drew before.
    """
    import torch

    base = derive_seed(seed, *keys)
    torch.manual_seed(base if rank is None else base * MAX_WORKERS + rank)


def deterministic_torch() -> None:
    """Make torch pick deterministic kernels in this process (training workers): ops with a
    deterministic variant use it (index_add, scatter_add and embedding backward on CUDA, cuBLAS
    with a fixed workspace); an op without one warns instead of failing. CPU float sums stay
    deterministic for a fixed thread count only: they are split by ``torch.get_num_threads()``."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
    torch.use_deterministic_algorithms(True, warn_only=True)
