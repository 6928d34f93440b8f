"""Full-ranking evaluation on the CPU or on GPUs, with ranks identical on every device.

Shapes: ``U`` users, ``B`` users per batch (``eval.user_batch``), ``N`` items, ``C`` items per
chunk (``eval.item_chunk``), ``d`` width.

Why a GPU gives the CPU's ranks: scores are the exact ones of :mod:`.metrics` (each row rounded to
fixed point with a power-of-two scale by :func:`.metrics.exact_rows`, integer dot products below
2**53). Every step is exact or correctly rounded under IEEE 754 on either device: the rounding of
the rows (the same elementwise operations in the same order), the float64 matrix product of
integers (exact in any summation order, so cuBLAS and a CPU BLAS give the same bits), the products
by powers of two and the final rounding to float32. The count of items ahead of the target (a
higher score, or an equal score and a smaller id) is then the same integer.

Scales folded into the rows: when every scale of both sides lies in ``[FOLD_MIN, FOLD_MAX]``, each
row is multiplied by its scale before the product (exact: an integer times a power of two), so
``(q_u s_u) @ (q_i s_i)^T`` already holds ``s_u s_i (q_u . q_i)``, every partial sum an integer
below 2**53 times a power of two that stays in float64's normal range, hence exact; this saves two
passes over the ``[B, C]`` scores. Rows outside the range take the unfolded product of
:func:`.metrics.exact_scores`.

Where it runs (:func:`rank_users`):

- ``cpu``: this process, item chunks recomputed per user batch (memory ``O(B x C)``).
- ``cuda`` with Ray initialised: the users split into one contiguous shard per GPU of the Ray
  cluster, one task each (``num_gpus=1``); ranks concatenated in user order.
- ``cuda`` without Ray: one thread per local GPU (torch releases the GIL in its kernels).

On a GPU the fixed-point item rows are computed once and kept there (8 bytes per value: 1 GiB
for 1M x 128). The user states themselves come from the sequence encoder on the same device; its
float32 kernels may differ from the CPU's in the last bits, so ranks equal the CPU's for the same
user states.

Example::

    job = RankJob(targets=targets, similarity="dot", user_batch=1024, item_chunk=65_536, states=states)
    out, info = rank_users(job, item_table, "auto")   # out["ranks"]: int64 [U]; info: {"device": "cuda", ...}
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..runtime.progress import Progress
from .metrics import (ItemLists, Similarity, TargetColumns, _Pairs, _pairs_by_item, _row_scores, _topk_in_id_order,
                      blocked_ahead, count_ahead, exact_rows, exact_scores, sampled_ranks)

_log = logging.getLogger(__name__)

# scales (powers of two) that may be folded into their rows: s_u * s_i >= 2**-1022 (normal) and
# 2**53 * s_u * s_i < 2**1023 (no overflow) for any two of them
FOLD_MIN, FOLD_MAX = 2.0 ** -511, 2.0 ** 460
PROGRESS_S = 30.0  # seconds between progress lines of one shard


def _foldable(scale: Tensor) -> bool:
    return bool(((scale >= FOLD_MIN) & (scale <= FOLD_MAX)).all())


class ExactItems:
    """The item table in the exact fixed-point form, chunk by chunk, on one device.

    Args:
        item_table: ``[N, d]`` float item vectors (any device); row ``i`` is item ``i``.
        similarity: ``"dot"`` or ``"cosine"``.
        device: where the scores are computed.
        item_chunk: items per chunk.
        resident: keep every chunk's fixed-point rows on ``device`` (computed once: the GPU
            default, ``8 N d`` bytes), or recompute each chunk for every user batch (memory
            ``O(C d)``: the CPU default).
    """

    def __init__(self, item_table: Tensor, similarity: Similarity, device: torch.device | str, item_chunk: int,
                 resident: bool):
        if item_table.dim() != 2 or not item_table.is_floating_point() or item_table.shape[0] == 0:
            raise ValueError(f"item_table: expected a non-empty 2-D float tensor, got {item_table.dtype} "
                             f"of shape {list(item_table.shape)}")
        if item_chunk < 1:
            raise ValueError(f"item_chunk={item_chunk}: must be >= 1")
        self.table, self.similarity, self.device = item_table, similarity, torch.device(device)
        self.num_items, self.dim = item_table.shape
        self.bounds = [(s, min(s + item_chunk, self.num_items)) for s in range(0, self.num_items, item_chunk)]
        self._resident = [self._exact(s, e) for s, e in self.bounds] if resident else None
        self._buffers: tuple[Tensor, Tensor, Tensor] | None = None

    def _exact(self, start: int, end: int) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """``(folded, q, scale)`` of items ``start..end-1``: ``folded = q * scale`` when the scales
        allow it (then ``q`` is None), else ``q`` (then ``folded`` is None)."""
        chunk = self.table[start:end].to(self.device)
        if not torch.isfinite(chunk).all():
            raise ValueError(f"item_table rows {start}..{end - 1}: contain NaN or infinite values")
        q, scale = exact_rows(chunk, self.similarity)
        if _foldable(scale):
            return q.mul_(scale.unsqueeze(1)), None, scale
        return None, q, scale

    def chunks(self) -> Iterator[tuple[int, int, Tensor | None, Tensor | None, Tensor]]:
        """``(start, end, folded, q, scale)`` per chunk, in item order."""
        for i, (start, end) in enumerate(self.bounds):
            yield (start, end, *(self._resident[i] if self._resident is not None else self._exact(start, end)))

    def buffers(self, num_users: int) -> tuple[Tensor, Tensor, Tensor]:
        """Flat float64, float32, float32 buffers of ``num_users`` x the widest chunk for a chunk's
        products, scores and comparisons, kept for the next batch: on the CPU, writing them into
        fresh tensors took 3-10x longer (a page fault per 4 KiB on first touch)."""
        size = num_users * max(end - start for start, end in self.bounds)
        if self._buffers is None or self._buffers[0].numel() < size:
            self._buffers = None  # the old ones go before the new ones come
            self._buffers = (torch.empty(size, dtype=torch.float64, device=self.device),
                             torch.empty(size, device=self.device), torch.empty(size, device=self.device))
        return self._buffers

    def rows(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """:func:`.metrics.exact_rows` of the given items (``[R]`` long), on the device."""
        return exact_rows(self.table[items.to(self.table.device)].to(self.device), self.similarity)


def exact_target_ranks(user_states: Tensor, items: ExactItems, targets: Tensor,
                       exclude: Sequence[Tensor] | ItemLists | None = None) -> Tensor:
    """:func:`.metrics.target_ranks` over :class:`ExactItems`, on its device: the same ranks.

    Args:
        user_states: ``[B, d]`` float.
        items: the item table.
        targets: ``[B]`` long item ids.
        exclude: ``B`` 1-D long tensors (or one :class:`.metrics.ItemLists`), items that do not
            compete for each user (see :func:`.metrics.target_ranks`).

    Returns:
        ``[B]`` long ranks on the items' device.
    """
    return scan_items(user_states, items, targets, exclude)["ranks"]


@torch.no_grad()  # ranks have no gradient, and the chunk loop writes into buffers (out=)
def scan_items(user_states: Tensor, items: ExactItems, targets: Tensor,
               exclude: Sequence[Tensor] | ItemLists | None = None, *, unfiltered: bool = False,
               top_k: int = 0) -> dict[str, Tensor]:
    """One pass over the item chunks: each user's target rank and, on request, the rank without
    ``exclude`` and the ``top_k`` best items, all from the same exact scores.

    Args:
        user_states, items, targets, exclude: as :func:`exact_target_ranks`.
        unfiltered: with ``exclude``, also the ranks among all items (``ranks_unfiltered``).
        top_k: also each user's ``top_k`` best items, best first, in the order
            :func:`.metrics.full_ranking_topk` gives (``top``: without the excluded items;
            ``top_unfiltered`` too when ``unfiltered``).

    Returns:
        ``{"ranks": [B], "ranks_unfiltered": [B], "top": [B, top_k], "top_unfiltered": [B, top_k]}``
        (the keys asked for), long tensors on the items' device.
    """
    num_users, device = user_states.shape[0], items.device
    if user_states.dim() != 2 or not user_states.is_floating_point() or user_states.shape[1] != items.dim:
        raise ValueError(f"user_states: expected a float tensor of shape [B, {items.dim}], got "
                         f"{user_states.dtype} of shape {list(user_states.shape)}")
    if targets.shape != (num_users,) or targets.dtype != torch.long:
        raise ValueError(f"targets: expected a long tensor of shape [{num_users}], "
                         f"got {targets.dtype} of shape {list(targets.shape)}")
    if not 0 <= top_k <= items.num_items:
        raise ValueError(f"top_k={top_k}: must lie in 0..{items.num_items} (the number of items)")
    unfiltered = unfiltered and exclude is not None
    keys = ["ranks"] + ["ranks_unfiltered"] * unfiltered + (["top"] + ["top_unfiltered"] * unfiltered) * bool(top_k)
    if not num_users:
        return {k: torch.zeros((0, top_k) if k.startswith("top") else 0, dtype=torch.long, device=device)
                for k in keys}
    if not (0 <= int(targets.min()) and int(targets.max()) < items.num_items):
        raise ValueError(f"targets: item ids must lie in 0..{items.num_items - 1}")
    states = user_states.to(device)
    if not torch.isfinite(states).all():
        raise ValueError("user_states: contains NaN or infinite values")
    users = exact_rows(states, items.similarity)
    target_scores = _row_scores(users, items.rows(targets.to(device)))
    users_folded = users[0] * users[1].unsqueeze(1) if _foldable(users[1]) else None
    blocked = _pairs_by_item(exclude, num_users, items.num_items, device) if exclude is not None else None
    columns = TargetColumns(targets.cpu().numpy(), device)

    ranks = {k: torch.zeros(num_users, dtype=torch.long, device=device) for k in keys if k.startswith("ranks")}
    tops = {k: _TopK(num_users, top_k, device) for k in keys if k.startswith("top")}
    products, score_buffer, work = items.buffers(num_users)
    for start, end, folded, q, scale in items.chunks():
        shape = (num_users, end - start)
        if users_folded is not None and folded is not None:
            exact = torch.matmul(users_folded, folded.T, out=products[:shape[0] * shape[1]].view(shape))
            scores = score_buffer[:shape[0] * shape[1]].view(shape).copy_(exact)
        else:
            scores = exact_scores(users, (q if q is not None else folded / scale.unsqueeze(1), scale))
        everything = count_ahead(scores, target_scores, columns, start, work=work)
        if "ranks_unfiltered" in ranks:
            ranks["ranks_unfiltered"] += everything
        if blocked is not None:
            everything = everything - blocked_ahead(scores, target_scores, columns, start, blocked)
        ranks["ranks"] += everything
        if tops:
            _add_chunk_tops(tops, scores, start, blocked)
    return ranks | {k: t.ids for k, t in tops.items()}


def _add_chunk_tops(tops: dict[str, "_TopK"], scores: Tensor, start: int, blocked: _Pairs | None) -> None:
    """Merge one chunk into the running top lists from ONE top-k over the chunk: a user's ``k``
    best unblocked items lie among the chunk's ``k + m`` best items, ``m`` being the most blocked
    items one user of the batch has in the chunk; blocked candidates then score ``-inf``."""
    width = scores.shape[1]
    k = next(iter(tops.values())).k
    lo, hi = blocked.span(start, start + width) if blocked is not None else (0, 0)
    extra = blocked.most_per_user(lo, hi) if "top" in tops and hi > lo else 0
    cand_scores, cand_cols = _topk_in_id_order(scores, min(k + extra, width))
    if "top_unfiltered" in tops:
        tops["top_unfiltered"].add(cand_scores, cand_cols + start)
    if "top" in tops:
        if extra:
            rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1)
            hit = torch.isin(rows * width + cand_cols, blocked.positions(lo, hi, start, width))
            cand_scores = cand_scores.masked_fill(hit, -math.inf)
        tops["top"].add(cand_scores, cand_cols + start)


class _TopK:
    """The running ``k`` best items of each user over item chunks: higher score first, then the
    smaller id (the tie rule of :func:`.metrics.full_ranking_topk`)."""

    def __init__(self, num_users: int, k: int, device: torch.device):
        self.k = k
        self.scores = torch.empty(num_users, 0, device=device)
        self.ids = torch.empty(num_users, 0, dtype=torch.long, device=device)

    def add(self, scores: Tensor, ids: Tensor) -> None:
        """Merge candidates ``[B, n]`` (scores, item ids) whose ids are ascending and above every id
        merged before."""
        # equal scores sit in id order (the running best, all of smaller ids, then the new ones),
        # so a stable sort keeps the tie rule
        candidates = torch.cat([self.scores, scores], dim=1)
        candidate_ids = torch.cat([self.ids, ids], dim=1)
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :self.k]
        self.scores, self.ids = candidates.gather(1, order), candidate_ids.gather(1, order)


@dataclasses.dataclass
class RankJob:
    """What one process needs to rank a set of users (picklable: a shard travels to a Ray task).
    The item table travels separately (:func:`rank_job`), once per process.

    User states are given (``states``) or computed per batch by the sequence encoder from the
    histories (``hist`` and ``encoder``).
    """

    targets: np.ndarray  # [U] int64 item ids
    similarity: Similarity
    user_batch: int
    item_chunk: int
    states: np.ndarray | None = None  # [U, d] float32
    hist: np.ndarray | None = None  # [U, L] int64, left-padded with the pad id N
    encoder: torch.nn.Module | None = None  # the sequence encoder (model.backbones), eval mode
    exclude: ItemLists | None = None  # per user, items that do not compete (full protocol; a list
    # of one array per user is taken too)
    negatives: np.ndarray | None = None  # [U, S] int64: the sampled protocol's candidates
    unfiltered: bool = False  # with exclude: also the ranks among all items ("ranks_unfiltered")
    top_k: int = 0  # full protocol: also each user's top_k items ("top", "top_unfiltered")

    def __post_init__(self):
        if self.exclude is not None:
            self.exclude = ItemLists.of(self.exclude)

    def __len__(self) -> int:
        return len(self.targets)

    def shard(self, lo: int, hi: int) -> "RankJob":
        """Users ``lo..hi-1``."""
        cut = {f.name: getattr(self, f.name)[lo:hi] for f in dataclasses.fields(self)
               if f.name in ("targets", "states", "hist", "negatives") and getattr(self, f.name) is not None}
        if self.exclude is not None:
            cut["exclude"] = self.exclude.slice(lo, hi)
        return dataclasses.replace(self, **cut)


def rank_job(job: RankJob, item_table: Tensor | np.ndarray, device: str, label: str = "",
             log: Callable[[str], None] = _log.info, progress: Callable[[int], None] | None = None
             ) -> tuple[dict[str, np.ndarray], dict]:
    """Ranks of ``job``'s users on one device, ``job.user_batch`` users at a time; ``progress(n)``
    after each batch of ``n`` users (a bar, ``runtime.progress``), else a line every ``PROGRESS_S``.

    Returns:
        ``(out, info)``: ``out["ranks"]`` int64 ``[U]`` (with ``job.unfiltered`` also
        ``ranks_unfiltered``, with ``job.top_k`` also ``top`` / ``top_unfiltered`` int64
        ``[U, top_k]``, see :func:`scan_items`), and ``{"device", "users", "seconds", "peak_gpu_bytes"}``.
    """
    t0 = time.time()
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:  # "cuda" (a Ray task's one GPU): the current device, by its index
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    if isinstance(item_table, np.ndarray):
        with warnings.catch_warnings():  # a read-only array (Ray's object store): only read here
            warnings.simplefilter("ignore", UserWarning)
            item_table = torch.from_numpy(item_table)
    table = item_table.to(dev)
    # a copy per call: Module.to moves in place, and threads on several GPUs share the job's encoder
    encoder = copy.deepcopy(job.encoder).to(dev).eval() if job.encoder is not None else None
    items = None if job.negatives is not None else ExactItems(table, job.similarity, dev, job.item_chunk,
                                                              resident=dev.type == "cuda")
    out, last = [], time.time()
    for s in range(0, len(job), job.user_batch):
        e = min(s + job.user_batch, len(job))
        targets = torch.as_tensor(job.targets[s:e], dtype=torch.long).to(dev)
        with torch.no_grad():
            if encoder is not None:
                from ..model.sasrec import user_states_from_table

                states = user_states_from_table(encoder, table, torch.as_tensor(job.hist[s:e]).to(dev))
            else:
                states = torch.as_tensor(job.states[s:e]).to(dev)
            if job.negatives is not None:
                batch = {"ranks": sampled_ranks(states, table, targets, torch.as_tensor(job.negatives[s:e]),
                                                similarity=job.similarity)}
            else:
                exclude = job.exclude.slice(s, e) if job.exclude is not None else None
                batch = scan_items(states, items, targets, exclude, unfiltered=job.unfiltered, top_k=job.top_k)
        out.append(batch)
        if progress is not None:
            progress(e - s)
        elif time.time() - last > PROGRESS_S:
            last = time.time()
            log(f"[eval]{label} {device}: {e:,} / {len(job):,} users, {e / (last - t0):,.0f} users/s")
    if not out:  # no users: the arrays of an empty batch
        out = [{"ranks": torch.zeros(0, dtype=torch.long)}] if job.negatives is not None else \
            [scan_items(torch.zeros(0, table.shape[1]), items, torch.zeros(0, dtype=torch.long),
                        job.exclude, unfiltered=job.unfiltered, top_k=job.top_k)]
    arrays = {k: torch.cat([b[k] for b in out]).cpu().numpy().astype(np.int64) for k in out[0]}
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    return arrays, {"device": device, "users": len(job), "seconds": round(time.time() - t0, 3),
                    "peak_gpu_bytes": peak}


def eval_device(setting: str) -> tuple[str, int, bool]:
    """``(device, gpus, via_ray)`` for ``eval.device``: GPUs of the Ray cluster when Ray is
    initialised, else of this process.

    Raises:
        ConfigError: naming ``eval.device`` for an unknown value, or ``cuda`` without a GPU.
    """
    if setting == "cpu":
        return "cpu", 0, False
    if setting not in ("auto", "cuda"):
        raise ConfigError(f"eval.device={setting!r}: expected auto, cpu or cuda")
    import sys

    ray = sys.modules.get("ray")  # not imported: no Ray instance, this process's GPUs
    if ray is not None and ray.is_initialized():
        gpus, where = int(ray.cluster_resources().get("GPU", 0)), "the Ray cluster has"
    else:
        gpus, where = (torch.cuda.device_count() if torch.cuda.is_available() else 0), "torch sees"
    if gpus:
        return "cuda", gpus, ray is not None and ray.is_initialized()
    if setting == "cuda":
        raise ConfigError(f"eval.device=cuda: {where} no GPU (set eval.device=auto or cpu)")
    return "cpu", 0, False


def _shard_task(job: RankJob, item_table: np.ndarray, device: str, label: str,
                progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """One Ray task's shard (Ray makes its GPU ``cuda:0``); its progress goes to ``progress`` (a
    ``runtime.progress.Reporter``), else it is printed: a Ray worker's output reaches the driver
    (its log file in a quiet command), its loggers are not configured."""
    out = rank_job(job, item_table, device, label, print, progress)
    if progress is not None:
        progress.flush(wait=True)
    return out


def run_shards(job: RankJob, item_table: Tensor, devices: list[str], via_ray: bool,
               log: Callable[[str], None] = _log.info, progress: Progress | None = None
               ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Users split into ``len(devices)`` contiguous shards, shard ``i`` ranked on ``devices[i]``
    (a Ray task holding one GPU per ``cuda`` entry when ``via_ray``, else a thread of this
    process); every array of :func:`rank_job` concatenated in user order. ``progress``: a bar
    that counts the users ranked."""
    update = progress.update if progress is not None else None
    bounds = np.linspace(0, len(job), len(devices) + 1).round().astype(int)
    shards = [(job.shard(lo, hi), dev, f" shard {i + 1}/{len(devices)}")
              for i, (lo, hi, dev) in enumerate(zip(bounds[:-1], bounds[1:], devices))]
    if via_ray:
        import ray

        table_ref = ray.put(item_table.cpu().numpy())
        reporter = progress.remote() if progress is not None else None
        refs = [ray.remote(num_cpus=1, num_gpus=1 if dev.startswith("cuda") else 0)(_shard_task)
                .remote(shard, table_ref, "cuda" if dev.startswith("cuda") else dev, label, reporter)
                for shard, dev, label in shards]
        results = ray.get(refs)
    elif len(shards) == 1:
        results = [rank_job(shards[0][0], item_table, shards[0][1], log=log, progress=update)]
    else:
        with ThreadPoolExecutor(len(shards)) as pool:
            futures = [pool.submit(rank_job, shard, item_table, dev, label, log, update)
                       for shard, dev, label in shards]
            results = [f.result() for f in futures]
    arrays = {k: np.concatenate([r[k] for r, _ in results]) for k in results[0][0]}
    return arrays, [info for _, info in results]


def rank_users(job: RankJob, item_table: Tensor, setting: str = "auto",
               log: Callable[[str], None] = _log.info, progress: Progress | None = None
               ) -> tuple[dict[str, np.ndarray], dict]:
    """Ranks of every user of ``job`` under ``eval.device`` = ``setting`` (see the module notes);
    ``progress``: a bar (``runtime.progress``) that counts the users ranked.

    Returns:
        ``(out, info)``: the arrays of :func:`rank_job` in user order (``out["ranks"]``: int64
        ``[U]``), and ``{"device", "gpus", "shards": [per shard: device, users, seconds,
        peak_gpu_bytes], "seconds"}``.
    """
    t0 = time.time()
    device, gpus, via_ray = eval_device(setting)
    if device == "cpu":
        arrays, info = rank_job(job, item_table, "cpu", log=log,
                                progress=progress.update if progress is not None else None)
        shards = [info]
    else:
        # at most one shard per user batch: a GPU without users would only load the table
        used = max(1, min(gpus, -(-len(job) // job.user_batch)))
        devices = ["cuda"] * used if via_ray else [f"cuda:{i}" for i in range(used)]
        log(f"[eval] {len(job):,} users on {used} GPU(s){' (Ray tasks)' if via_ray else ''}")
        arrays, shards = run_shards(job, item_table, devices, via_ray, log, progress)
    return arrays, {"device": device, "gpus": gpus if device == "cuda" else 0, "shards": shards,
                   "seconds": round(time.time() - t0, 3)}
