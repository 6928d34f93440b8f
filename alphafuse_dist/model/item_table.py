"""The item table: AlphaFuse's frozen semantic coordinates fused with trainable null-space ID rows.

    E_item = E_lang + [0_(N x d_s), E_id]          (injection "add")
    E_item = [E_lang[:, :d_s], E_id]               (injection "cover")
    E_item = E_id (N x d, all trainable)            (method "sasrec_id", the ID-only baseline)
    E_item = E_id, E_id initialised to E_lang / sqrt(d)   (method "llminit", LLMInit baseline)

Ablations of alphafuse (``model.id_space``): "full_space" adds a d-wide E_id into every
coordinate (``E_lang + E_id``, no clip to the null space); "semantic_only" has no ID table
(``E_item = E_lang``).

Two interchangeable storage back ends with identical numerics:

- ``torch``: two ``nn.Embedding``; the semantic one is a frozen buffer-like parameter.
- ``torchrec``: the trainable ID table is an ``EmbeddingCollection`` sharded by
  ``DistributedModelParallel`` (see ``alphafuse_dist.train.sharding``). The frozen semantic table
  is either replicated (``frozen="replicated"``: a frozen ``nn.Embedding`` on every worker, looked
  up locally, as with ``torch``) or a second ``EmbeddingCollection`` (``frozen="sharded"``: its own
  collection, so that the sharder never merges it, zero-lr fused SGD, looked up under ``no_grad``).

Shapes: ``N`` items, ``d`` model width, ``d_n`` null-space (ID) width, ``d_s = d - d_n``.

Every item module (this one and those of ``alphafuse_dist.model.methods``) has the same interface:
``forward(ids [M]) -> [M, d]``, ``full_table() -> [N, d]``, ``num_items``, ``dim``, ``device``,
``id_modules`` / ``frozen_modules`` (names of the child modules holding trainable ID tables /
frozen tables: the training optimiser gives the former the ID optimiser, checkpoints skip the latter) and,
with the torchrec back end, ``torchrec_tables()`` (what ``train.sharding.shard_model`` plans).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

SEMANTIC_FEATURE = "item_semantic"
ID_FEATURE = "item_id"
SEMANTIC_TABLE = "semantic"
ID_TABLE = "item_id"


@dataclass
class TableSpec:
    """One TorchRec table of an item module, as the sharder needs it.

    Attributes:
        module: name of the item module's child ``EmbeddingCollection`` holding the table.
        table: the table's name inside it.
        initial: float32 [N, D], the weights loaded after sharding (which re-initialises them;
            ``train.sharding.shard_model`` zero-pads them to the stored width, see ``padded``).
        frozen: True: zero-lr fused SGD and lookups under ``no_grad`` (rows never change);
            False: trained by the fused ID optimiser.
    """

    module: str
    table: str
    initial: torch.Tensor
    frozen: bool


# TorchRec's fused kernels need table widths that are multiples of this: a narrower table is stored
# zero-padded (the pad columns get zero gradients, so adagrad, sgd and adam leave them at zero; the
# row-wise Adagrad's per-row mean would count them: config refuses that pairing) and its lookups
# return the first columns
TORCHREC_WIDTH_MULTIPLE = 4


def stored_width(width: int) -> int:
    """The width TorchRec stores a ``width``-wide table at: ``width`` rounded up to TORCHREC_WIDTH_MULTIPLE."""
    return width + -width % TORCHREC_WIDTH_MULTIPLE


def padded(table: torch.Tensor) -> torch.Tensor:
    """``table`` [N, D] zero-padded to [N, stored_width(D)], as TorchRec stores it (``table`` itself
    when D is a multiple already: no copy of a million-row table)."""
    pad = stored_width(table.shape[1]) - table.shape[1]
    return torch.nn.functional.pad(table, (0, pad)) if pad else table


# samples the ids of one lookup are cut into: FBGEMM's bucketize and lookup kernels parallelise
# over samples, so one sample of every id ran serially on the GPU (65 vs 21 ms per training step
# on an H100 at 1M items, benchmarks/train); a fixed count keeps the batch size equal on every rank
LOOKUP_SAMPLES = 1024


def torchrec_lookup(ec: nn.Module, feature: str, ids: torch.Tensor, width: int) -> torch.Tensor:
    """Rows [M, width] of ``ids`` [M] in an ``EmbeddingCollection`` made by :func:`meta_collection`
    (the table's first ``width`` columns; a collective once sharded)."""
    from torchrec import KeyedJaggedTensor

    # ids in order, cut into LOOKUP_SAMPLES consecutive samples: EmbeddingCollection returns one
    # row per id, sample after sample, so the rows come back in the order of ids
    m = ids.numel()
    lengths = torch.full((LOOKUP_SAMPLES,), m // LOOKUP_SAMPLES, dtype=torch.int32, device=ids.device)
    lengths[: m % LOOKUP_SAMPLES] += 1
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=[feature], values=ids, lengths=lengths)
    rows = ec(kjt)[feature].values()
    return rows if rows.shape[1] == width else rows[:, :width]


def frozen_storage(backend: str, frozen: str) -> str:
    """Where an item module looks up its frozen table: "torchrec" (a sharded TorchRec table: the
    torchrec back end with ``frozen="sharded"``) or "torch" (a local frozen ``nn.Embedding``)."""
    if frozen not in ("sharded", "replicated"):
        raise ValueError(f"frozen {frozen!r}: expected sharded or replicated")
    return "torchrec" if backend == "torchrec" and frozen == "sharded" else "torch"


def meta_collection(table: str, feature: str, num_items: int, width: int) -> nn.Module:
    """An unmaterialised one-table ``EmbeddingCollection`` [num_items, stored_width(width)] (weights
    loaded after sharding, zero-padded by :func:`padded`)."""
    from torchrec import EmbeddingCollection, EmbeddingConfig

    config = EmbeddingConfig(name=table, embedding_dim=stored_width(width), num_embeddings=num_items,
                             feature_names=[feature])
    return EmbeddingCollection(tables=[config], device=torch.device("meta"))


@torch.no_grad()
def chunked_table(forward: Callable[[torch.Tensor], torch.Tensor], num_items: int, dim: int,
                  device: torch.device, chunk: int) -> torch.Tensor:
    """``forward`` over all ids 0..N-1 in chunks: [N, dim] (every rank must call it with torchrec)."""
    parts = [forward(torch.arange(s, min(s + chunk, num_items), device=device)) for s in range(0, num_items, chunk)]
    return torch.cat(parts) if parts else torch.empty(0, dim)


class FusedItemTable(nn.Module):
    """Look up fused item vectors.

    Args:
        num_items: N.
        dim: d, the model width.
        null_dims: d_n, width of the trainable ID part (ignored for ``sasrec_id`` / ``llminit``:
            the ID part is d wide).
        method: "alphafuse", "sasrec_id" or "llminit".
        injection: "add" or "cover" (alphafuse only).
        semantic: float32 [N, d] whitened PCA coordinates of the language embeddings (the decompose
            stage's table): frozen part of alphafuse; initial ID rows of llminit, scaled by
            1/sqrt(d) (whitened coordinates have unit variance, so rows have norm ~sqrt(d); the
            scaled rows have the RMS norm ~1 of sasrec_id's N(0, 1/d) init, so the same
            ``train.id_lr`` moves them at the same relative rate and the two baselines differ
            only in the init's direction; with cosine similarity the scale changes no score).
            With the torchrec back end tables are (re)loaded after sharding: see ``torchrec_tables``.
        id_init: "zeros" or "normal" (std ``id_init_std``); alphafuse only.
        id_space: "null_space" (the ID part in the last d_n coordinates); alphafuse only: "full_space"
            (d wide, added into every coordinate) or "semantic_only" (no ID part).
        backend: "torch" or "torchrec".
        frozen: torchrec only: "sharded" (the semantic table is a TorchRec table) or "replicated"
            (a frozen ``nn.Embedding`` on every worker).

    Example::

        table = FusedItemTable(5, 8, 4, semantic=torch.randn(5, 8))
        table(torch.tensor([0, 3])).shape  # torch.Size([2, 8])
    """

    def __init__(self, num_items: int, dim: int, null_dims: int, *, method: str = "alphafuse",
                 injection: str = "add", semantic: torch.Tensor | None = None, id_init: str = "zeros",
                 id_init_std: float = 1.0, id_space: str = "null_space", backend: str = "torch",
                 frozen: str = "sharded", device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__()
        if method not in ("alphafuse", "sasrec_id", "llminit"):
            raise ValueError(f"method {method!r}: expected alphafuse, sasrec_id or llminit")
        self.num_items, self.dim, self.method, self.injection, self.backend = num_items, dim, method, injection, backend
        self.frozen_backend = frozen_storage(backend, frozen)
        if id_space not in ("null_space", "full_space", "semantic_only") or (
                id_space != "null_space" and method != "alphafuse"):
            raise ValueError(f"id_space {id_space!r}: expected null_space, full_space or semantic_only (the latter "
                             "two: alphafuse only)")
        self.has_semantic = method == "alphafuse"
        self.has_ids = id_space != "semantic_only"
        self._device = torch.device(device)
        self.id_dim = {"null_space": null_dims, "full_space": dim, "semantic_only": 0}[id_space] if self.has_semantic else dim
        self.sem_dim = dim - self.id_dim
        if method != "sasrec_id":
            if semantic is None or tuple(semantic.shape) != (num_items, dim):
                raise ValueError(f"{method} needs a semantic table of shape ({num_items}, {dim}), "
                                 f"got {None if semantic is None else tuple(semantic.shape)}")
        init = torch.zeros(num_items, self.id_dim)
        if method == "llminit":
            init = semantic.to(torch.float32) / dim ** 0.5
        elif id_init == "normal" or not self.has_semantic:
            # the ID-only baseline cannot start from zeros: every item would be identical
            std = id_init_std if self.has_semantic else 1.0 / self.id_dim ** 0.5
            init = torch.randn(num_items, self.id_dim, generator=generator) * std
        self.initial_ids = init  # kept to re-load after TorchRec sharding (which re-initialises)
        if backend not in ("torch", "torchrec"):
            raise ValueError(f"backend {backend!r}: expected torch or torchrec")
        if self.has_ids and backend == "torch":
            self.ids = nn.Embedding(num_items, self.id_dim, _weight=init.clone().to(device))
        elif self.has_ids:
            self.id_ec = meta_collection(ID_TABLE, ID_FEATURE, num_items, self.id_dim)
        if self.has_semantic and self.frozen_backend == "torch":
            self.semantic = nn.Embedding(num_items, dim, _weight=semantic.to(device, torch.float32).clone())
            self.semantic.weight.requires_grad_(False)
        elif self.has_semantic:
            self.semantic_ec = meta_collection(SEMANTIC_TABLE, SEMANTIC_FEATURE, num_items, dim)
            self.initial_semantic = semantic.to(torch.float32).clone()
        self.id_modules = (("id_ec",) if backend == "torchrec" else ("ids",)) if self.has_ids else ()
        self.frozen_modules = ((("semantic_ec",) if self.frozen_backend == "torchrec" else ("semantic",))
                               if self.has_semantic else ())

    def torchrec_tables(self) -> list[TableSpec]:
        """The TorchRec tables to shard: the ID table (if any), then the frozen semantic table
        (alphafuse, when sharded)."""
        specs = [TableSpec("id_ec", ID_TABLE, self.initial_ids, frozen=False)] if self.has_ids else []
        if self.has_semantic and self.frozen_backend == "torchrec":
            specs.append(TableSpec("semantic_ec", SEMANTIC_TABLE, self.initial_semantic, frozen=True))
        return specs

    # ------------------------------------------------------------------ lookups
    def lookup_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Trainable ID rows [M, id_dim] of ``ids`` [M]."""
        if self.backend == "torch":
            return self.ids(ids)
        return torchrec_lookup(self.id_ec, ID_FEATURE, ids, self.id_dim)

    def lookup_semantic(self, ids: torch.Tensor) -> torch.Tensor:
        """Frozen semantic rows [M, d] of ``ids`` [M] (no gradient ever flows into them)."""
        with torch.no_grad():
            if self.frozen_backend == "torch":
                return self.semantic(ids)
            return torchrec_lookup(self.semantic_ec, SEMANTIC_FEATURE, ids, self.dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Fused vectors [M, d] of item ids [M] (all in 0..N-1; the caller handles padding).

        With the torchrec back end and an ID table (or a sharded semantic table) this is a
        collective: every rank must call it the same number of times (with any number of ids,
        zero included).
        """
        ids = ids.reshape(-1).long()
        if not self.has_semantic:
            return self.lookup_ids(ids)
        sem = self.lookup_semantic(ids)
        if not self.has_ids:
            return sem
        id_part = self.lookup_ids(ids)
        if self.injection == "add":
            return torch.cat([sem[:, : self.sem_dim], sem[:, self.sem_dim:] + id_part], dim=1)
        return torch.cat([sem[:, : self.sem_dim], id_part], dim=1)

    def full_table(self, chunk: int = 65_536) -> torch.Tensor:
        """All N fused vectors [N, d] (a collective with torchrec: every rank gets the whole table)."""
        return chunked_table(self.forward, self.num_items, self.dim, self.device, chunk)

    @property
    def device(self) -> torch.device:
        if self.backend == "torch":
            return (self.ids if self.has_ids else self.semantic).weight.device
        return self._device
