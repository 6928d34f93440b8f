"""The item table: AlphaFuse's frozen semantic coordinates fused with trainable null-space ID rows.

    E_item = E_lang + [0_(N x d_s), E_id]          (injection "add")
    E_item = [E_lang[:, :d_s], E_id]               (injection "cover")
    E_item = E_id (N x d, all trainable)            (method "sasrec_id", the ID-only baseline)

Two interchangeable storage back ends with identical numerics:

- ``torch``: two ``nn.Embedding``; the semantic one is a frozen buffer-like parameter.
- ``torchrec``: two ``EmbeddingCollection``s, one per table, so that the sharder never merges the
  frozen table (zero-lr fused SGD, looked up under ``no_grad``) with the trainable ID table (fused
  optimiser). Sharded by ``DistributedModelParallel`` (see ``alphafuse_dist.train.sharding``).

Shapes: ``N`` items, ``d`` model width, ``d_n`` null-space (ID) width, ``d_s = d - d_n``.
"""
from __future__ import annotations

import torch
from torch import nn

SEMANTIC_FEATURE = "item_semantic"
ID_FEATURE = "item_id"
SEMANTIC_TABLE = "semantic"
ID_TABLE = "item_id"


class FusedItemTable(nn.Module):
    """Look up fused item vectors.

    Args:
        num_items: N.
        dim: d, the model width.
        null_dims: d_n, width of the trainable ID part (ignored for ``sasrec_id``: the ID part is d wide).
        method: "alphafuse" or "sasrec_id".
        injection: "add" or "cover" (alphafuse only).
        semantic: float32 [N, d] frozen semantic table (alphafuse only). With the torchrec back end
            it must be (re)loaded after sharding: see ``load_semantic``.
        id_init: "zeros" or "normal" (std ``id_init_std``).
        backend: "torch" or "torchrec".

    Example::

        table = FusedItemTable(5, 8, 4, semantic=torch.randn(5, 8))
        table(torch.tensor([0, 3])).shape  # torch.Size([2, 8])
    """

    def __init__(self, num_items: int, dim: int, null_dims: int, *, method: str = "alphafuse",
                 injection: str = "add", semantic: torch.Tensor | None = None, id_init: str = "zeros",
                 id_init_std: float = 1.0, backend: str = "torch", device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None):
        super().__init__()
        if method not in ("alphafuse", "sasrec_id"):
            raise ValueError(f"method {method!r}: expected alphafuse or sasrec_id")
        self.num_items, self.dim, self.method, self.injection, self.backend = num_items, dim, method, injection, backend
        self.has_semantic = method == "alphafuse"
        self._device = torch.device(device)
        self.id_dim = null_dims if self.has_semantic else dim
        self.sem_dim = dim - null_dims
        if self.has_semantic:
            if semantic is None or tuple(semantic.shape) != (num_items, dim):
                raise ValueError(f"alphafuse needs a semantic table of shape ({num_items}, {dim}), "
                                 f"got {None if semantic is None else tuple(semantic.shape)}")
        init = torch.zeros(num_items, self.id_dim)
        if id_init == "normal" or not self.has_semantic:
            # the ID-only baseline cannot start from zeros: every item would be identical
            std = id_init_std if self.has_semantic else 1.0 / self.id_dim ** 0.5
            init = torch.randn(num_items, self.id_dim, generator=generator) * std
        self.initial_ids = init  # kept to re-load after TorchRec sharding (which re-initialises)
        if backend == "torch":
            self.ids = nn.Embedding(num_items, self.id_dim, _weight=init.clone().to(device))
            if self.has_semantic:
                self.semantic = nn.Embedding(num_items, dim, _weight=semantic.to(device, torch.float32).clone())
                self.semantic.weight.requires_grad_(False)
        elif backend == "torchrec":
            from torchrec import EmbeddingCollection, EmbeddingConfig

            meta = torch.device("meta")
            self.id_ec = EmbeddingCollection(tables=[EmbeddingConfig(
                name=ID_TABLE, embedding_dim=self.id_dim, num_embeddings=num_items,
                feature_names=[ID_FEATURE])], device=meta)
            if self.has_semantic:
                self.semantic_ec = EmbeddingCollection(tables=[EmbeddingConfig(
                    name=SEMANTIC_TABLE, embedding_dim=dim, num_embeddings=num_items,
                    feature_names=[SEMANTIC_FEATURE])], device=meta)
                self.initial_semantic = semantic.to(torch.float32).clone()
        else:
            raise ValueError(f"backend {backend!r}: expected torch or torchrec")

    # ------------------------------------------------------------------ lookups
    def _torchrec_lookup(self, ec: nn.Module, feature: str, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        # one "sample" holding all ids: EmbeddingCollection returns one row per id, in order
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[feature], values=ids, lengths=torch.tensor([ids.numel()], dtype=torch.int32))
        return ec(kjt)[feature].values()

    def lookup_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Trainable ID rows [M, id_dim] of ``ids`` [M]."""
        if self.backend == "torch":
            return self.ids(ids)
        return self._torchrec_lookup(self.id_ec, ID_FEATURE, ids)

    def lookup_semantic(self, ids: torch.Tensor) -> torch.Tensor:
        """Frozen semantic rows [M, d] of ``ids`` [M] (no gradient ever flows into them)."""
        with torch.no_grad():
            if self.backend == "torch":
                return self.semantic(ids)
            return self._torchrec_lookup(self.semantic_ec, SEMANTIC_FEATURE, ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Fused vectors [M, d] of item ids [M] (all in 0..N-1; the caller handles padding).

        With the torchrec back end this is a collective: every rank must call it the same number
        of times (with any number of ids, zero included).
        """
        ids = ids.reshape(-1).long()
        id_part = self.lookup_ids(ids)
        if not self.has_semantic:
            return id_part
        sem = self.lookup_semantic(ids)
        if self.injection == "add":
            return torch.cat([sem[:, : self.sem_dim], sem[:, self.sem_dim:] + id_part], dim=1)
        return torch.cat([sem[:, : self.sem_dim], id_part], dim=1)

    @torch.no_grad()
    def full_table(self, chunk: int = 65_536) -> torch.Tensor:
        """All N fused vectors [N, d] (a collective with torchrec: every rank gets the whole table)."""
        device = self.device
        parts = [self.forward(torch.arange(s, min(s + chunk, self.num_items), device=device))
                 for s in range(0, self.num_items, chunk)]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    @property
    def device(self) -> torch.device:
        return self.ids.weight.device if self.backend == "torch" else self._device
