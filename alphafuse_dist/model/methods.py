"""The paper's baselines behind the one ``method`` switch (docs/method.md section 5), same encoder;
``model.items.ITEM_METHODS`` builds them.

Each method is an item module with the interface of
:class:`~alphafuse_dist.model.item_table.FusedItemTable` (``forward(ids [M]) -> [M, d]``,
``full_table() -> [N, d]``, ``num_items``, ``dim``, ``device``, ``id_modules``,
``frozen_modules``, ``torchrec_tables()``), with the torch or torchrec storage back end:

====================  =====================================================================
method                item vector of item i (``E`` [N, d_l] frozen language embeddings)
====================  =====================================================================
alphafuse             frozen whitened PCA coordinates + trainable null-space ID part
sasrec_id             trainable ID row [d]
llminit               trainable ID row [d], initialised to the whitened PCA coordinates / sqrt(d)
morec                 GELU(E_i W + c), W [d_l, d] trainable (MoRec: frozen LM + dense adapter)
whitenrec             Z_i W + c, Z = whitened E over all non-degenerate principal directions
unisrec               sum_k softmax(E_i W_g)_k (E_i - b_k) W_k  (+ ID row with unisrec_with_ids)
rlmrec                trainable ID row [d]; an MLP maps it to the whitened PCA coordinates and
                      ``rlmrec_weight * (1 - cos)`` is added to the loss (``extra_loss``)
llmesr                [ID row (d/2, initialised from the whitened PCA coordinates), A(E_i) (d/2)],
                      A two linear layers (LLM-ESR's dual view); its retrieval-augmented
                      self-distillation is added to the loss (``user_loss``)
====================  =====================================================================

Frozen tables are ``nn.Embedding`` without gradient (torch, and torchrec with
``train.frozen_tables`` replicated) or ``EmbeddingCollection``s trained by a zero-lr fused SGD and
looked up under ``no_grad`` (torchrec, sharded), never saved in checkpoints (they are rebuilt from
the embed / decompose stage outputs). A method whose only table is frozen (morec, whitenrec) has no
TorchRec table when it is replicated: DMP then wraps a dense model. Adapters are dense parameters (the dense
Adam of ``train.optim``; DDP / DMP synchronise their gradients); ID tables get the ID optimiser.

Shapes: ``N`` items, ``d`` model width, ``d_l`` language-model width, ``M`` looked-up ids.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .item_table import (ID_FEATURE, ID_TABLE, FusedItemTable, TableSpec, chunked_table, frozen_storage,
                         meta_collection, torchrec_lookup)

FEATURES_TABLE = "features"
FEATURES_FEATURE = "item_features"


def _linear(in_dim: int, out_dim: int, generator: torch.Generator) -> nn.Linear:
    """``nn.Linear`` with torch's default init drawn from ``generator`` (identical on every worker)."""
    layer = nn.Linear(in_dim, out_dim)
    bound = 1.0 / math.sqrt(in_dim)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def id_rows(num_items: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Initial ID rows float32 [N, d] ~ N(0, 1/d), the init of sasrec_id (row RMS norm ~1)."""
    return torch.randn(num_items, dim, generator=generator) / dim ** 0.5


class AdapterItems(nn.Module):
    """Base of the adapter item modules: a frozen per-item feature table [N, d_x] and an optional
    trainable ID table [N, d]; subclasses define ``forward`` from the two lookups.

    Args:
        features: float [N, d_x], frozen.
        dim: d, the width of the item vectors.
        id_init: float [N, d_id] initial ID rows (d_id = d unless a subclass says otherwise), or
            None for no ID table.
        backend: "torch" or "torchrec" (tables loaded after sharding: see ``torchrec_tables``).
        frozen: torchrec only: "sharded" (the feature table is a TorchRec table) or "replicated"
            (a frozen ``nn.Embedding`` on every worker, looked up locally).
    """

    def __init__(self, features: torch.Tensor, dim: int, *, id_init: torch.Tensor | None, backend: str,
                 frozen: str = "sharded", device: torch.device | str = "cpu"):
        super().__init__()
        features = features.to(torch.float32)
        self.num_items, self.feature_dim = features.shape
        self.dim, self.backend, self._device = dim, backend, torch.device(device)
        self.has_ids = id_init is not None
        self.id_dim = id_init.shape[1] if self.has_ids else 0
        if self.has_ids and id_init.shape[0] != self.num_items:
            raise ValueError(f"id_init: expected {self.num_items} rows, got {tuple(id_init.shape)}")
        if backend not in ("torch", "torchrec"):
            raise ValueError(f"backend {backend!r}: expected torch or torchrec")
        self.frozen_backend = frozen_storage(backend, frozen)
        if self.frozen_backend == "torch":
            self.features = nn.Embedding(self.num_items, self.feature_dim, _weight=features.to(device).clone())
            self.features.weight.requires_grad_(False)
        else:
            self.initial_features = features.clone()
            self.features_ec = meta_collection(FEATURES_TABLE, FEATURES_FEATURE, self.num_items, self.feature_dim)
        if self.has_ids and backend == "torch":
            self.ids = nn.Embedding(self.num_items, self.id_dim, _weight=id_init.to(device, torch.float32).clone())
        elif self.has_ids:
            self.initial_ids = id_init.to(torch.float32).clone()
            self.id_ec = meta_collection(ID_TABLE, ID_FEATURE, self.num_items, self.id_dim)
        self.frozen_modules = ("features",) if self.frozen_backend == "torch" else ("features_ec",)
        self.id_modules = (("ids",) if backend == "torch" else ("id_ec",)) if self.has_ids else ()

    def torchrec_tables(self) -> list[TableSpec]:
        """The TorchRec tables to shard: the ID table (if any), then the frozen feature table (when sharded)."""
        specs = [TableSpec("id_ec", ID_TABLE, self.initial_ids, frozen=False)] if self.has_ids else []
        if self.frozen_backend == "torchrec":
            specs.append(TableSpec("features_ec", FEATURES_TABLE, self.initial_features, frozen=True))
        return specs

    def lookup_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Frozen feature rows [M, d_x] of ``ids`` [M] (no gradient ever flows into them)."""
        with torch.no_grad():
            if self.frozen_backend == "torch":
                return self.features(ids)
            return torchrec_lookup(self.features_ec, FEATURES_FEATURE, ids, self.feature_dim)

    def lookup_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Trainable ID rows [M, d_id] of ``ids`` [M]."""
        if self.backend == "torch":
            return self.ids(ids)
        return torchrec_lookup(self.id_ec, ID_FEATURE, ids, self.id_dim)

    def full_table(self, chunk: int = 65_536) -> torch.Tensor:
        """All N item vectors [N, d] (a collective with torchrec: every rank gets the whole table)."""
        return chunked_table(self.forward, self.num_items, self.dim, self.device, chunk)

    @property
    def device(self) -> torch.device:
        return self.features.weight.device if self.frozen_backend == "torch" else self._device


class MoRecItems(AdapterItems):
    """MoRec with a frozen language model: ``GELU(E_i W + c)``, W [d_l, d], c [d] trainable.

    Example::

        items = MoRecItems(torch.randn(5, 12), 8, generator=torch.Generator().manual_seed(0))
        items(torch.tensor([0, 3])).shape  # torch.Size([2, 8])
    """

    def __init__(self, language: torch.Tensor, dim: int, *, generator: torch.Generator, backend: str = "torch",
                 frozen: str = "sharded", device: torch.device | str = "cpu"):
        super().__init__(language, dim, id_init=None, backend=backend, frozen=frozen, device=device)
        self.adapter = _linear(self.feature_dim, dim, generator).to(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] of ids [M] in 0..N-1 (a collective with torchrec)."""
        return F.gelu(self.adapter(self.lookup_features(ids.reshape(-1).long())))


class WhitenRecItems(AdapterItems):
    """WhitenRec: whitened language embeddings Z [N, k] (``decompose.basis.whitened_features``),
    then a trainable linear projection ``Z_i W + c``, W [k, d]. No ID table."""

    def __init__(self, whitened: torch.Tensor, dim: int, *, generator: torch.Generator, backend: str = "torch",
                 frozen: str = "sharded", device: torch.device | str = "cpu"):
        super().__init__(whitened, dim, id_init=None, backend=backend, frozen=frozen, device=device)
        self.adapter = _linear(self.feature_dim, dim, generator).to(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] of ids [M] in 0..N-1 (a collective with torchrec)."""
        return self.adapter(self.lookup_features(ids.reshape(-1).long()))


class UniSRecItems(AdapterItems):
    """UniSRec's MoE whitening adaptor over frozen E, optionally plus a trainable ID row.

        expert_k(E_i) = (E_i - b_k) W_k            b_k [d_l], W_k [d_l, d]
        gate(E_i)     = softmax(E_i W_g)           W_g [d_l, n]
        v_i           = sum_k gate_k(E_i) expert_k(E_i)  (+ ID row, ``with_ids``: transductive)

    Init as in UniSRec: W_k ~ N(0, 0.02^2), b_k = 0, W_g = 0 (uniform gates at the start). UniSRec's
    input dropout and noisy gating are not used (deterministic adaptor, like the other methods).
    """

    def __init__(self, language: torch.Tensor, dim: int, *, experts: int, generator: torch.Generator,
                 id_init: torch.Tensor | None = None, backend: str = "torch", frozen: str = "sharded",
                 device: torch.device | str = "cpu"):
        super().__init__(language, dim, id_init=id_init, backend=backend, frozen=frozen, device=device)
        if experts < 1:
            raise ValueError(f"experts={experts}: must be >= 1")
        d_l = self.feature_dim
        self.expert_bias = nn.Parameter(torch.zeros(experts, d_l, device=device))
        self.expert_weight = nn.Parameter((torch.randn(experts, d_l, dim, generator=generator) * 0.02).to(device))
        self.gate_weight = nn.Parameter(torch.zeros(d_l, experts, device=device))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights [M, n] of language rows [M, d_l]; each row sums to 1."""
        return torch.softmax(x @ self.gate_weight, dim=-1)

    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE adaptor [M, d] of language rows x [M, d_l]."""
        # (x - b_k) W_k = x W_k - b_k W_k, without materialising the [M, n, d_l] differences
        experts = torch.einsum("ml,kld->mkd", x, self.expert_weight) \
            - torch.einsum("kl,kld->kd", self.expert_bias, self.expert_weight)
        return (self.gates(x).unsqueeze(-1) * experts).sum(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] of ids [M] in 0..N-1 (a collective with torchrec)."""
        ids = ids.reshape(-1).long()
        out = self.mixture(self.lookup_features(ids))
        return out + self.lookup_ids(ids) if self.has_ids else out


class RLMRecItems(AdapterItems):
    """RLMRec-Gen: trainable ID rows [N, d] (the item vectors, as sasrec_id) aligned generatively
    with the language side: an MLP maps each item's ID vector to its frozen whitened PCA
    coordinates T_i [d_t] (the decompose stage's table), and ``extra_loss`` adds

        weight * sum_i (1 - cos(MLP(v_i), T_i))      over the distinct items of the step

    The cosine form is RLMRec-Gen's (scale-free: ID vectors and unit-variance targets live at
    different scales); its node masking is not used (every item of the step is reconstructed).
    With several workers each sums over the distinct items of its own share of the step, so an
    item in k workers' shares is reconstructed with weight k (one process: weight 1); the
    InfoNCE part keeps exact parity with one process.
    MLP: Linear(d, (d + d_t) // 2) -> LeakyReLU -> Linear(., d_t), as in the RLMRec code.
    """

    def __init__(self, targets: torch.Tensor, dim: int, *, weight: float, id_init: torch.Tensor,
                 generator: torch.Generator, backend: str = "torch", frozen: str = "sharded",
                 device: torch.device | str = "cpu"):
        super().__init__(targets, dim, id_init=id_init, backend=backend, frozen=frozen, device=device)
        hidden = (dim + self.feature_dim) // 2
        self.weight = weight
        self.decoder = nn.Sequential(_linear(dim, hidden, generator), nn.LeakyReLU(),
                                     _linear(hidden, self.feature_dim, generator)).to(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] (the ID rows) of ids [M] in 0..N-1 (a collective with torchrec)."""
        return self.lookup_ids(ids.reshape(-1).long())

    def extra_loss(self, ids: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        """The weighted reconstruction loss, summed over the rows: a scalar.

        Args:
            ids: [M] distinct item ids of the step (a collective with torchrec: the targets' lookup).
            vecs: [M, d] their item vectors (``self(ids)``, with gradient).
        """
        recon = self.decoder(vecs)
        target = self.lookup_features(ids.reshape(-1).long()).to(recon.dtype)
        return self.weight * (1.0 - F.cosine_similarity(recon, target, dim=-1)).sum()


class LLMESRItems(AdapterItems):
    """LLM-ESR (Liu et al., NeurIPS 2024): a collaborative view and a frozen-language view of each
    item, fused by concatenation (both d/2 wide; the shared encoder reads the fused vector):

        v_i = [e_i, A(E_i)]        e_i [d/2] trainable ID row, initialised to the first d/2 whitened
                                   PCA coordinates / sqrt(d/2) (LLM-ESR's dimension-reduced init)
        A(x) = (x W_1 + b_1) W_2 + b_2,  W_1 [d_l, (d_l + d/2) // 2], W_2 [., d/2]  (its adapter)

    and ``user_loss``, the retrieval-augmented self-distillation (see there). LLM-ESR's
    cross-attention between the two views' sequences is not used: one encoder over the fused vectors.
    """

    def __init__(self, language: torch.Tensor, semantic: torch.Tensor, dim: int, *, weight: float, neighbours: int,
                 generator: torch.Generator, backend: str = "torch", frozen: str = "sharded",
                 device: torch.device | str = "cpu"):
        half = dim // 2
        super().__init__(language, dim, id_init=semantic[:, :half].to(torch.float32) / half ** 0.5, backend=backend,
                         frozen=frozen, device=device)
        self.weight, self.neighbours = weight, neighbours
        hidden = (self.feature_dim + half) // 2
        self.adapter = nn.Sequential(_linear(self.feature_dim, hidden, generator),
                                     _linear(hidden, half, generator)).to(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] of ids [M] in 0..N-1 (a collective with torchrec)."""
        ids = ids.reshape(-1).long()
        return torch.cat([self.lookup_ids(ids), self.adapter(self.lookup_features(ids))], dim=1)

    def user_loss(self, seqs: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Retrieval-augmented self-distillation, summed over the step's sequences: a scalar.

            u_b     = mean of the frozen language vectors E_i of sequence b's items (its language view)
            R(b)    = the ``neighbours`` other sequences of the step with the highest cos(u_b, u_r)
            loss    = weight * sum_b mean_d (h_b - mean_{r in R(b)} sg(h_r))^2

        (LLM-ESR's "kd" alignment; sg = no gradient: the retrieved users are teachers). The pool is
        the GLOBAL step: with several workers (u, sg(h)) are all-gathered in global row order, so
        each sequence retrieves what it retrieves in one process. LLM-ESR retrieves among all users
        by LLM user embeddings; here the pool is the step's batch and u_b is built from the items.

        Args:
            seqs: [B, L] left-padded item ids (pad = N); states: [B, d] each sequence's user state.
        """
        pad = self.num_items
        valid = seqs != pad
        lang = self.lookup_features(seqs[valid])
        u = torch.zeros(*seqs.shape, self.feature_dim, dtype=lang.dtype, device=lang.device)
        u[valid] = lang
        u = F.normalize(u.sum(1) / valid.sum(1, keepdim=True).clamp(min=1), dim=1)
        pool_u, pool_h, offset, step = u, states.detach(), 0, 1
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            pool_u, pool_h = (_gather_rows(x, world) for x in (u, states.detach().float()))
            offset, step = rank, world
        B = seqs.shape[0]
        own = torch.arange(B, device=u.device) * step + offset  # global row of each local sequence
        sim = u @ pool_u.T
        sim[torch.arange(B, device=u.device), own] = float("-inf")
        k = min(self.neighbours, pool_u.shape[0] - 1)
        if k < 1:
            return states.sum() * 0.0
        teacher = pool_h[sim.topk(k, dim=1).indices].mean(1).to(states.dtype)
        return self.weight * ((states - teacher) ** 2).mean(1).sum()


def _gather_rows(x: torch.Tensor, world: int) -> torch.Tensor:
    """[B * world, ...]: every worker's rows of x [B, ...] in global row order (worker w holds rows
    w, w + world, ...), all-gathered without gradient."""
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.stack(parts, dim=1).reshape(-1, *x.shape[1:])
