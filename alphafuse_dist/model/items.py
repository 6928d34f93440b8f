"""The item-module registry: one builder per ``method``, and what each method reads.

``METHOD_INPUTS[method]`` names the stage outputs the item module reads: "semantic"
(decompose/semantic.safetensors, whitened PCA coordinates [N, d]), "language" (the embed stage's
vectors [N, d_l]), "basis" (decompose's NullSpaceBasis); the pipeline runs the embed / decompose
stages only for methods that need them. ``ITEM_METHODS[method](cfg, num_items, inputs, device,
generator)`` builds the item module (``item_table.FusedItemTable`` or a ``methods`` class).

This module imports torch only inside the builders, so the pipeline can read ``METHOD_INPUTS``
without loading it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..errors import choose

if TYPE_CHECKING:
    import torch

    from ..config import RunConfig

METHOD_INPUTS: dict[str, frozenset[str]] = {
    "alphafuse": frozenset({"semantic"}), "sasrec_id": frozenset(), "llminit": frozenset({"semantic"}),
    "morec": frozenset({"language"}), "whitenrec": frozenset({"language", "basis"}),
    "unisrec": frozenset({"language"}), "rlmrec": frozenset({"semantic"}),
    "llmesr": frozenset({"language", "semantic"}),
}


# train.frozen_tables=auto: a frozen table of at most this many float32 bytes is replicated on every
# worker (1M items x 128 dims is 512 MiB); a larger one is sharded by TorchRec like the ID table
REPLICATE_FROZEN_BYTES = 2 * 2**30


def frozen_placement(cfg: RunConfig, table) -> str:
    """Where the torchrec back end keeps the frozen ``table`` [N, width]: "replicated" or "sharded"
    (``train.frozen_tables``; with the torch back end every table is local anyway)."""
    choice = cfg.train.frozen_tables
    if choice != "auto":
        return choice
    rows, width = table.shape
    return "replicated" if rows * width * 4 <= REPLICATE_FROZEN_BYTES else "sharded"


def _fused(cfg: RunConfig, n: int, given: dict, device, generator):
    from .item_table import FusedItemTable

    m = cfg.model
    return FusedItemTable(n, m.dim, cfg.model.id_dims, method=cfg.method, injection=m.injection,
                          semantic=given["semantic"], id_init=m.id_init, id_init_std=m.id_init_std,
                          id_space=m.id_space, backend=cfg.train.backend, device=device, generator=generator,
                          frozen="sharded" if given["semantic"] is None else frozen_placement(cfg, given["semantic"]))


def _morec(cfg: RunConfig, n: int, given: dict, device, generator):
    from .methods import MoRecItems

    return MoRecItems(given["language"], cfg.model.dim, generator=generator, backend=cfg.train.backend,
                      frozen=frozen_placement(cfg, given["language"]), device=device)


def _whitenrec(cfg: RunConfig, n: int, given: dict, device, generator):
    import torch

    from ..decompose.basis import whitened_features
    from .methods import WhitenRecItems

    whitened = torch.from_numpy(whitened_features(given["language"].numpy(), given["basis"]))
    return WhitenRecItems(whitened, cfg.model.dim, generator=generator, backend=cfg.train.backend,
                          frozen=frozen_placement(cfg, whitened), device=device)


def _unisrec(cfg: RunConfig, n: int, given: dict, device, generator):
    from .methods import UniSRecItems, id_rows

    m = cfg.model
    ids = id_rows(n, m.dim, generator) if m.unisrec_with_ids else None
    return UniSRecItems(given["language"], m.dim, experts=m.unisrec_experts, generator=generator, id_init=ids,
                        backend=cfg.train.backend, frozen=frozen_placement(cfg, given["language"]), device=device)


def _rlmrec(cfg: RunConfig, n: int, given: dict, device, generator):
    from .methods import RLMRecItems, id_rows

    m = cfg.model
    return RLMRecItems(given["semantic"], m.dim, weight=m.rlmrec_weight, id_init=id_rows(n, m.dim, generator),
                       generator=generator, backend=cfg.train.backend, frozen=frozen_placement(cfg, given["semantic"]),
                       device=device)


def _llmesr(cfg: RunConfig, n: int, given: dict, device, generator):
    from .methods import LLMESRItems

    m = cfg.model
    return LLMESRItems(given["language"], given["semantic"], m.dim, weight=m.llmesr_weight,
                       neighbours=m.llmesr_neighbours, generator=generator, backend=cfg.train.backend,
                       frozen=frozen_placement(cfg, given["language"]), device=device)


ITEM_METHODS: dict[str, Callable] = {
    "alphafuse": _fused, "sasrec_id": _fused, "llminit": _fused, "morec": _morec,
    "whitenrec": _whitenrec, "unisrec": _unisrec, "rlmrec": _rlmrec, "llmesr": _llmesr,
}


def build_item_module(cfg: RunConfig, num_items: int, semantic: torch.Tensor | None, language: torch.Tensor | None,
                      device: torch.device, generator: torch.Generator, basis=None):
    """The item module of ``cfg.method`` (identical on every worker given the same seeded generator).

    Args:
        semantic: float32 [N, d], the decompose stage's whitened PCA table (alphafuse, llminit, rlmrec, llmesr).
        language: float32 [N, d_l], the embed stage's vectors in item_idx order (morec, whitenrec, unisrec,
            llmesr).
        basis: the decompose stage's NullSpaceBasis (whitenrec).

    Raises:
        ConfigError: for an unknown method.
        ValueError: when an input the method needs (``METHOD_INPUTS``) is missing or has the wrong
            number of rows.
    """
    build = choose(ITEM_METHODS, cfg.method, "method")
    given = {"semantic": semantic, "language": language, "basis": basis}
    for name in sorted(METHOD_INPUTS[cfg.method]):
        if given[name] is None:
            raise ValueError(f"method={cfg.method} needs the {name} input")
        if name != "basis" and given[name].shape[0] != num_items:
            raise ValueError(f"method={cfg.method}: the {name} table has {given[name].shape[0]} rows, "
                             f"expected {num_items}")
    return build(cfg, num_items, given, device, generator)
