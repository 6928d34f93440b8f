"""This worker's training batches of an epoch, streamed from train.parquet.

Every worker reads train.parquet a few thousand sequences at a time (``data.sequences.stream_windows``)
and builds the windows in the stream; a worker holds one read and about one chunk of
``train.shuffle_windows`` windows, whatever the file's size. The epoch's order is a function of
(file, seed, epoch, batch size, chunk) only, the same for any number of workers:

- the window stream (file order) is cut into chunks of ``train.shuffle_windows`` windows; the first
  chunk's length is drawn per epoch (``seeded_rng(seed, epoch, 0)``) so that chunk boundaries move
  from epoch to epoch; when every window fits one chunk, the chunk is the whole epoch;
- each chunk is permuted by the epoch's generator ``seeded_rng(seed, epoch)``, chunk after chunk
  (one chunk: a full shuffle of the epoch, ``seeded_rng(seed, epoch).permutation(W)``);
- step ``s`` takes the windows at positions ``[s B, (s+1) B)`` of the shuffled stream, and this
  worker keeps those at positions ``s B + rank + j world``; the ``W mod B`` last windows are left
  out (``W // B`` steps per epoch).

Each worker therefore reads the whole file but keeps only its rows: memory stays flat as the data
grows, and a run resumed (at an epoch boundary, where checkpoints are written) on another number
of workers trains on the same batches. Hand-written over pyarrow rather than Ray Data
(``TorchTrainer(datasets=...)`` + ``get_dataset_shard``), whose ``streaming_split`` hands blocks
to workers in shares that depend on the number of workers and on timing.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from ..data.sequences import count_windows, stream_windows
from ..runtime.seeding import seeded_rng


class EpochBatches:
    """``steps`` batches per epoch of ``batch_size // world`` windows for worker ``rank``.

    Example::

        batches = EpochBatches(prep / "train.parquet", max_len=50, pad_id=N, batch_size=128,
                               chunk=65_536, seed=22, rank=0, world=2)
        for inputs, targets in batches.epoch(0):  # int64 [64, 50] each, batches.steps times
            ...
    """

    def __init__(self, train_parquet: Path, *, max_len: int, pad_id: int, batch_size: int, chunk: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.path, self.max_len, self.pad_id = Path(train_parquet), max_len, pad_id
        self.batch_size, self.chunk, self.seed, self.rank, self.world = batch_size, chunk, seed, rank, world
        self.num_windows = count_windows(self.path, max_len)
        self.steps = self.num_windows // batch_size

    def chunk_sizes(self, epoch: int) -> list[int]:
        """Lengths of the epoch's chunks (they sum to ``num_windows``)."""
        n, c = self.num_windows, self.chunk
        if n <= c:
            return [n]
        first = int(seeded_rng(self.seed, epoch, 0).integers(1, c + 1))
        rest = n - first
        return [first] + [c] * (rest // c) + ([rest % c] if rest % c else [])

    def epoch(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """This worker's (inputs, targets) int64 [batch_size // world, L] of each step of ``epoch``."""
        rng = seeded_rng(self.seed, epoch)
        local = self.batch_size // self.world
        used = self.steps * self.batch_size  # stream positions that make whole steps
        # this worker's shuffled windows not yet yielded: buf[cursor:]; steps are views into it, a
        # chunk's windows are appended once per chunk (copying the rest at every step was quadratic)
        buf_in = buf_tgt = None
        cursor, start = 0, 0
        chunks = self._chunks(self.chunk_sizes(epoch))
        for step in range(self.steps):
            while buf_in is None or len(buf_in) - cursor < local:
                inputs, targets = next(chunks)
                pos = start + np.arange(len(inputs))  # positions in the epoch's shuffled stream
                keep = rng.permutation(len(inputs))[(pos < used) & ((pos % self.batch_size) % self.world == self.rank)]
                if buf_in is None:
                    buf_in, buf_tgt = inputs[keep], targets[keep]
                else:
                    buf_in = np.concatenate([buf_in[cursor:], inputs[keep]])
                    buf_tgt = np.concatenate([buf_tgt[cursor:], targets[keep]])
                cursor, start = 0, start + len(inputs)
            yield buf_in[cursor:cursor + local], buf_tgt[cursor:cursor + local]
            cursor += local

    def _chunks(self, sizes: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The window stream regrouped into chunks of ``sizes`` windows (inputs, targets)."""
        parts_in, parts_tgt, have = [], [], 0
        stream = stream_windows(self.path, self.max_len, self.pad_id)
        for size in sizes:
            while have < size:
                inputs, targets = next(stream)
                parts_in.append(inputs)
                parts_tgt.append(targets)
                have += len(inputs)
            inputs, targets = np.concatenate(parts_in), np.concatenate(parts_tgt)
            yield inputs[:size], targets[:size]
            parts_in, parts_tgt, have = [inputs[size:].copy()], [targets[size:].copy()], have - size


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """``items`` produced by a background thread, at most ``depth`` + 1 ahead of the consumer, so the
    next batches are read and built while the device trains on this one. A thread rather than
    ``torch.utils.data.DataLoader`` workers: a worker process per epoch pays its start-up every
    epoch, and the reading (pyarrow) and copying (numpy) release the GIL."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(end)
        except BaseException as error:  # raised in the consumer
            put(error)

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
