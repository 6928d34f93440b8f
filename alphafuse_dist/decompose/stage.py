"""The decompose stage: embed/part-*.parquet -> basis, frozen semantic table, spectrum.

Data flow (docs/method.md section 2, steps 1-6)::

    embed/part-*.parquet (item_idx, vector[d_l])
      -> method "exact": distributed_covariance (one Ray task per node, one thread per CPU
                         taking pieces (row groups) from a queue into one fixed-point gram;
                         the tasks' integer grams add up: the same bits for any layout)
                         -> mu [d_l], C [d_l, d_l] -> covariance_eigh -> all d_l eigenpairs
                         (decompose.precision float32, the count rule, d_l >= 1,024 and d <= about
                         d_l / 4: float32 ssyevd, the top 2d pairs refined in float64)
         method "randomized": randomized_covariance_eigh (rsvd.py, 1 + power_iters passes, each
                         run as the exact path's: one Ray task per node, threads over pieces)
                         -> mu, top-d eigenpairs, trace of C
      -> null_rule: "count" (d_n = null_dims) or "threshold" (d = d_l, d_n = #S_k <= null_threshold)
      -> NullSpaceBasis.from_spectrum            -> decompose/basis.safetensors + basis.json
      -> semantic_table: one Ray generator task per node, threads over pieces: transform
         (decompose.precision), each piece streamed back    -> decompose/semantic.safetensors  float32 [N, d]
      -> decompose/spectrum.json + spectrum.png

With ``weighted_mean`` the centre is the popularity-weighted mean mu_w and C is the unweighted
scatter about it, sum_i (x_i - mu_w)(x_i - mu_w)^T / (N - 1) (docs/method.md section 2, steps 1-2).

Example::

    info = decompose(Path("runs/q/embed"), DecomposeConfig(), dim=128, num_items=9742,
                     out_dir=Path("runs/q/decompose"))
"""
from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import ray
from safetensors.numpy import save_file

from ..config import DecomposeConfig
from ..errors import ConfigError, DataError
from ..stages import atomic_write_json
from .basis import NullSpaceBasis, threshold_null_dims
from .covariance import (INDEX_COLUMN, Piece, covariance_eigh, distributed_covariance, fragment_pieces, iter_fragment,
                         piece_path, pieces_in_threads, task_layout)
from .rsvd import column_sums, randomized_covariance_eigh
from .spectrum import SPECTRUM_PLOT, plot_spectrum

PART_GLOB = "part-*.parquet"
SEMANTIC_FILE = "semantic.safetensors"
SEMANTIC_TENSOR = "semantic"
SPECTRUM_FILE = "spectrum.json"


TRANSFORM_PIECE_ROWS = 16_384  # rows per piece of semantic_table: 8 MB of float32 rows out at d = 128
_END = "end"  # _transform_pass: the pieces are all done


# no retries: a replayed generator is matched to its first run by position, and the threads yield
# pieces in whatever order they finish, so a retry could hand the driver some pieces twice and
# others never (and a false duplicate-item error); a crashed worker surfaces as itself instead
@ray.remote(max_retries=0)
def _transform_pass(pieces: list[Piece], basis: NullSpaceBasis, precision: str):
    """One task's share of :func:`semantic_table`, a Ray generator task: one thread per CPU of
    the task takes pieces from a queue (:func:`~.covariance.pieces_in_threads`, BLAS at one thread
    each) and each piece's rows go back as soon as they are done, in any order, as
    ``(path, item_idx int64 [n], float32 [n, d])``.

    At most ``3 x threads`` pieces wait here for the caller (a bounded queue of 2 per thread, and
    one more in each thread), and Ray holds at most ``_generator_backpressure_num_objects`` of
    them unread (:func:`semantic_table` sets it), so the task's memory does not grow with the
    catalogue. When the generator ends early (an error, a cancel), the threads stop at their next
    piece or wait for the queue, and the generator waits for them.
    """
    threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    done: queue.Queue = queue.Queue(maxsize=2 * threads)
    stop = threading.Event()

    def put(item) -> None:
        while not stop.is_set():
            try:
                return done.put(item, timeout=0.1)
            except queue.Full:
                continue

    def handle(_, i: int, piece: Piece) -> None:
        parts = [(idx, basis.transform(X, precision)) for idx, X in iter_fragment(piece, use_threads=False)]
        put((piece_path(piece), np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])))

    def run() -> None:
        try:
            pieces_in_threads(pieces, threads, lambda t: None, handle, stop=stop.is_set)
            put(_END)
        except BaseException as e:  # surfaces in the generator, so in the caller's ray.get
            put(e)

    producer = threading.Thread(target=run, name="transform-pass", daemon=True)
    producer.start()
    try:
        while True:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, str) and item == _END:
                return
            yield item
    finally:
        stop.set()
        producer.join(timeout=30)  # a piece in flight finishes; BLAS's thread limit is restored


def _first_repeat(idx: np.ndarray) -> int:
    """An item_idx that occurs twice in ``idx`` (which has one)."""
    ordered = np.sort(idx)
    return int(ordered[np.argmax(ordered[1:] == ordered[:-1])])


def semantic_table(files: list[str], basis: NullSpaceBasis, num_items: int, precision: str = "float64",
                   task_cpus: int | None = None) -> np.ndarray:
    """Transform every row of the fragments and place row i at item_idx i (``precision``:
    :meth:`NullSpaceBasis.transform`'s).

    Runs as the covariance does: one Ray task per node (:func:`~.covariance.task_layout`,
    ``task_cpus`` as ``decompose.task_cpus``), its threads taking pieces of about
    ``TRANSFORM_PIECE_ROWS`` rows from a queue. Each task is a Ray generator that sends every
    piece back as soon as it is done, so the driver holds the float32 [N, d] table plus a few
    pieces, whatever N. It used to run one Ray task per piece (each a worker of its own, each
    paying a fresh worker's first task) and check every piece with a bincount over all N items.
    For 1M x 384 rows to d = 128 on 16 cores, alternating: first call 0.79-0.82 s against
    1.07-1.23 s, later calls 0.52-0.65 s against 0.57-0.70 s; on 2 cores the two were even
    (benchmarks/decompose/RESULTS.md, seventh session). The rows do not depend on the layout: a
    piece's batches are the same for any number of tasks and threads.

    Raises:
        DataError: naming the file when an item_idx is outside 0..N-1 or appears twice, or naming
            the embed folder when items are missing; from a task, as :func:`iter_fragment`.
    """
    table = np.zeros((num_items, basis.dim), dtype=np.float32)
    seen, placed = np.zeros(num_items, dtype=bool), 0
    pieces = fragment_pieces(files, rows_per_piece=TRANSFORM_PIECE_ROWS)
    tasks, cpus = task_layout(task_cpus)
    tasks = min(tasks, len(pieces))
    basis_ref = ray.put(basis)
    pending = [_transform_pass.options(num_cpus=cpus, _generator_backpressure_num_objects=2 * cpus).remote(
        pieces[t::tasks], basis_ref, precision) for t in range(tasks)]
    try:
        while pending:
            (gen,), _ = ray.wait(pending, num_returns=1)
            try:
                ref = next(gen)
            except StopIteration:
                pending.remove(gen)
                continue
            path, idx, coords = ray.get(ref)
            outside = idx[(idx < 0) | (idx >= num_items)]
            if len(outside):
                raise DataError(f"item_idx {outside[0]} is outside 0..{num_items - 1} (prepare has {num_items} items)",
                                file=path, column=INDEX_COLUMN)
            # per piece: indexing of its rows and a count over N bools (microseconds), where a
            # bincount over all N items took 1 s of the driver's time for 1M items in 80 pieces
            before = seen[idx]
            seen[idx] = True
            total = np.count_nonzero(seen)
            if before.any() or total - placed != len(idx):
                twice = idx[before][0] if before.any() else _first_repeat(idx)
                raise DataError(f"item_idx {twice} occurs more than once in the embeddings; each item needs "
                                "exactly one row", file=path, column=INDEX_COLUMN)
            placed = total
            table[idx] = coords
    finally:
        for gen in pending:  # an error stops the other tasks' threads at their next piece
            ray.cancel(gen)
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise DataError(f"{len(missing)} items have no embedding (first item_idx {missing[0]}); rerun the embed "
                        "stage", file=Path(files[0]).parent)
    return table


def _check_config(cfg: DecomposeConfig, weights: np.ndarray | None) -> None:
    if cfg.null_rule == "threshold":
        if cfg.null_threshold is None:
            raise ConfigError("decompose.null_rule=threshold needs decompose.null_threshold (DreamRec: 0.25 "
                              "with decompose.scale=40)")
        if cfg.method != "exact":
            raise ConfigError(f"decompose.null_rule=threshold counts small eigenvalues, which "
                              f"decompose.method={cfg.method} does not compute; use decompose.method=exact")
    if cfg.weighted_mean and (weights is None or not np.sum(weights) > 0):
        raise ConfigError("decompose.weighted_mean=true needs item popularities (prepare's items.parquet) with a "
                          "positive sum; every item has popularity 0 here")


def _precision(cfg: DecomposeConfig) -> str:
    """``decompose.precision`` resolved: auto is float64 for the threshold rule, float32 otherwise."""
    if cfg.precision != "auto":
        return cfg.precision
    return "float64" if cfg.null_rule == "threshold" else "float32"


def _spectrum(files: list[str], cfg: DecomposeConfig, dim: int, weights: np.ndarray | None):
    """``(n, mean, eigenvalues, eigenvectors, total_variance or None)`` of ``scale * E`` by
    ``decompose.method``; eigenpairs in any order."""
    precision = _precision(cfg)
    if cfg.method == "randomized":
        return randomized_covariance_eigh(files, k=dim, oversample=cfg.oversample, power_iters=cfg.power_iters,
                                          scale=cfg.scale, weights=weights if cfg.weighted_mean else None,
                                          precision=precision, task_cpus=cfg.task_cpus)
    n, mean, cov = distributed_covariance(files, scale=cfg.scale, precision=precision, task_cpus=cfg.task_cpus)
    if cfg.weighted_mean:
        # scatter about mu_w = scatter about mu + n (mu - mu_w)(mu - mu_w)^T
        shift = mean - cfg.scale * column_sums(files, weights, task_cpus=cfg.task_cpus).mean(weighted=True)
        mean, cov = mean - shift, cov + n / (n - 1) * np.outer(shift, shift)
    # the count rule's basis uses the top d pairs: under float32 those are refined in float64 and
    # the rest stay float32-accurate (covariance_eigh); the threshold rule counts small eigenvalues
    # (min: a model.dim above d_l is the basis's ConfigError to report, below)
    values, vectors = covariance_eigh(cov, precision, top=min(dim, len(cov)) if cfg.null_rule == "count" else None)
    return n, mean, values, vectors, None


def decompose(embed_dir: Path, cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path,
              weights: np.ndarray | None = None) -> dict:
    """Fit the null-space basis on all item embeddings and write the frozen semantic table.

    Args:
        embed_dir: the embed stage folder (``part-*.parquet`` with ``item_idx``, ``vector[d_l]``).
        cfg: the ``decompose`` config section.
        dim: d, the model width (``model.dim``).
        num_items: N, from prepare's manifest; every item_idx 0..N-1 must be embedded once.
        out_dir: receives ``basis.safetensors``, ``basis.json``, ``semantic.safetensors``
            (``semantic: float32 [N, d]``), ``spectrum.json`` and ``spectrum.png``.
        weights: item popularity, float [N] indexed by item_idx; used with ``decompose.weighted_mean``.

    Returns:
        ``{"rows": {"items": N}, "d_l": d_l, "d": d, "d_null": d_n, "explained_variance_semantic":
        share of the total variance in the d kept directions, ...}`` for the stage manifest.

    Raises:
        ConfigError: under ``null_rule=threshold`` when the resulting d / d_n differ from
            ``model.dim`` / ``decompose.null_dims`` (the message gives the values to set).
    """
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    _check_config(cfg, weights)
    files = sorted(str(p) for p in embed_dir.glob(PART_GLOB))
    if not files:
        raise DataError(f"no {PART_GLOB} embedding fragments; run the embed stage first", file=embed_dir)
    t0 = time.time()
    if cfg.reuse_basis:
        if _reuse_basis(files, cfg, dim, num_items, out_dir) is None:
            return refit_or_reuse_info(out_dir, num_items)
    n, mean, values, vectors, total_variance = _spectrum(files, cfg, dim, weights)
    if n != num_items:
        raise DataError(f"the embeddings have {n} rows but prepare has {num_items} items; rerun the embed stage",
                        file=embed_dir)
    t_spectrum = time.time() - t0
    null_dims = cfg.null_dims
    if cfg.null_rule == "threshold":
        d_l, null_dims = len(values), threshold_null_dims(values, cfg.null_threshold)
        # the model's width is fixed before this stage runs (TorchRec tables, presets): the rule
        # may not silently change it, so the config must already state what the rule yields
        if (dim, cfg.null_dims) != (d_l, null_dims):
            raise ConfigError(
                f"decompose.null_rule=threshold (decompose.null_threshold={cfg.null_threshold:g}, "
                f"decompose.scale={cfg.scale:g}) keeps all d_l={d_l} directions with {null_dims} eigenvalues "
                f"<= the threshold: set model.dim={d_l} and decompose.null_dims={null_dims} (now model.dim={dim}, "
                f"decompose.null_dims={cfg.null_dims})")
    basis = NullSpaceBasis.from_spectrum(mean, values, vectors, dim=dim, null_dims=null_dims, whiten=cfg.whiten,
                                         scale=cfg.scale, total_variance=total_variance)
    basis.save(out_dir)
    table = semantic_table(files, basis, num_items, _precision(cfg), cfg.task_cpus)
    save_file({SEMANTIC_TENSOR: table}, str(out_dir / SEMANTIC_FILE))

    explained = basis.explained_variance()
    info = {
        "d_l": basis.d_l, "d": dim, "d_null": null_dims,
        "explained_variance_semantic": float(explained[dim - 1]),
        "explained_variance_row_space": float(explained[basis.semantic_dims - 1]),
    }
    atomic_write_json(out_dir / SPECTRUM_FILE, {
        "d_semantic": basis.semantic_dims, "method": cfg.method, "null_rule": cfg.null_rule,
        "null_threshold": cfg.null_threshold, "weighted_mean": cfg.weighted_mean,
        "whiten": cfg.whiten, "scale": cfg.scale, "items": num_items, "total_variance": basis.total_variance,
        "eigenvalues": basis.eigenvalues.tolist(), "cumulative_explained_variance": explained.tolist(), **info,
    })
    plot_spectrum(basis, out_dir / SPECTRUM_PLOT)
    print(f"[decompose] {num_items} items x d_l={basis.d_l} from {len(files)} fragments: {cfg.method} spectrum "
          f"{t_spectrum:.1f}s, total {time.time() - t0:.1f}s; the d={dim} kept directions explain "
          f"{info['explained_variance_semantic']:.1%} of the variance ({info['explained_variance_row_space']:.1%} "
          f"in the first d_s={basis.semantic_dims})", flush=True)
    if cfg.reuse_basis:  # reached only when the drift rule asked for a refit
        info |= {"reused_basis": None, "refit": True}
    return {"rows": {"items": num_items}, **info}


DRIFT_FILE = "drift.json"
PREVIOUS_BASIS_DIR = "previous_basis"


def _reuse_basis(files: list[str], cfg: DecomposeConfig, dim: int, num_items: int, out_dir: Path) -> dict | None:
    """``decompose.reuse_basis``: project every item with the previous run's basis (old items keep
    their coordinates, new ones get ``project``'s), measure drift on the items added since, and
    refit when ``decompose.refit_threshold`` says so.

    Writes ``drift.json`` either way. Without a refit it also writes the basis (a copy of the old
    one), the semantic table and ``spectrum.json``, and returns None; with a refit it keeps the
    old basis under ``previous_basis/`` (the train stage's warm start carries ID vectors from it)
    and returns the drift facts, and the caller fits a new basis as usual.
    """
    from ..retrain.drift import basis_drift, should_refit
    from ..stages import read_manifest

    prev = Path(cfg.reuse_basis).expanduser()
    old = NullSpaceBasis.load(prev)
    if (old.dim, old.null_dims) != (dim, cfg.null_dims):
        raise ConfigError(f"decompose.reuse_basis={prev}: that basis has d={old.dim}, d_n={old.null_dims}; this "
                          f"run has model.dim={dim}, decompose.null_dims={cfg.null_dims}")
    try:
        old_items = int(read_manifest(prev)["rows"]["items"])
    except (KeyError, TypeError, ValueError, OSError):
        raise DataError("decompose.reuse_basis: not a finished decompose stage (no manifest with rows.items)",
                        file=prev / "manifest.json") from None
    if old_items > num_items:
        raise DataError(f"decompose.reuse_basis: the previous run has {old_items} items, this one {num_items}; ids "
                        "must be stable (data.id_map = the previous run's prepare folder)", file=prev)
    # the items added since the previous run (stable ids append them after the old ones)
    new_rows = [X[idx >= old_items] for f in files for idx, X in iter_fragment(f)]
    added = np.concatenate(new_rows) if new_rows else np.zeros((0, old.d_l), np.float32)
    facts: dict = {"previous": str(prev), "previous_items": old_items, "items": num_items,
                   "new_items": int(len(added)), "refit_threshold": cfg.refit_threshold}
    if len(added) >= 2:
        report = basis_drift(old, added)
        facts["drift"] = report.to_dict()
        if cfg.refit_threshold is not None:
            refit, reason = should_refit(report, cfg.refit_threshold)
        else:
            refit, reason = False, "decompose.refit_threshold is not set: the basis is always reused"
    else:
        refit, reason = False, f"{len(added)} new items: too few to measure drift"
    facts |= {"refit": bool(refit), "reason": reason}
    atomic_write_json(out_dir / DRIFT_FILE, facts)
    print(f"[decompose] reuse basis of {prev}: {facts['new_items']} new items, "
          + (f"old basis explains {facts['drift']['explained_ratio_old_mean']:.1%} of their best d-dim share; "
             if "drift" in facts else "") + ("REFIT: " if refit else "kept: ") + reason, flush=True)
    if refit:
        old.save(out_dir / PREVIOUS_BASIS_DIR)
        return facts
    old.save(out_dir)
    save_file({SEMANTIC_TENSOR: semantic_table(files, old, num_items, _precision(cfg), cfg.task_cpus)}, str(out_dir / SEMANTIC_FILE))
    explained = old.explained_variance()
    atomic_write_json(out_dir / SPECTRUM_FILE, {
        "d_semantic": old.semantic_dims, "reused_from": str(prev), "whiten": old.whiten, "scale": old.scale,
        "items": num_items, "total_variance": old.total_variance, "eigenvalues": old.eigenvalues.tolist(),
        "cumulative_explained_variance": explained.tolist(), "d_l": old.d_l, "d": dim, "d_null": old.null_dims,
        "explained_variance_semantic": float(explained[dim - 1]),
        "explained_variance_row_space": float(explained[old.semantic_dims - 1]),
    })
    plot_spectrum(old, out_dir / SPECTRUM_PLOT)
    return None


def refit_or_reuse_info(out_dir: Path, num_items: int) -> dict:
    """The stage manifest facts of a run that reused the previous basis."""
    import json

    drift = json.loads((Path(out_dir) / DRIFT_FILE).read_text())
    return {"rows": {"items": num_items}, "reused_basis": drift["previous"], "refit": False,
            "new_items": drift["new_items"]}
