"""Streamed training windows (train.batches.EpochBatches) against the load-all reference
(data.sequences.training_windows, all windows shuffled at once by seeded_rng(seed, epoch)): the
same windows each epoch, the same number of steps, the same order when the epoch is one shuffle
chunk, and the same global batches for 1 and 2 workers."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alphafuse_dist.data.sequences import count_windows, item_counts, stream_windows, training_windows
from alphafuse_dist.runtime.seeding import seeded_rng
from alphafuse_dist.train.batches import EpochBatches, prefetch

N, L = 500, 6


@pytest.fixture(scope="module")
def train_parquet(tmp_path_factory):
    """300 users with 0..40 items (some longer than L, some with no transition), in small row groups."""
    rng = np.random.default_rng(4)  # 1,100 windows of L=6
    seqs = [rng.integers(0, N, rng.integers(0, 41)).tolist() for _ in range(300)]
    path = tmp_path_factory.mktemp("stream") / "train.parquet"
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(300), pa.int32()),
                             "items": pa.array(seqs, pa.list_(pa.int32()))}), path, row_group_size=64)
    return path


def _rows(a: np.ndarray) -> Counter:
    return Counter(map(bytes, np.ascontiguousarray(a)))


def _epoch(path, epoch, *, batch, chunk, world):
    """[step][rank] -> (inputs, targets) of every worker."""
    workers = [EpochBatches(path, max_len=L, pad_id=N, batch_size=batch, chunk=chunk, seed=5, rank=r, world=world)
               for r in range(world)]
    return list(zip(*(list(w.epoch(epoch)) for w in workers))), workers[0]


def test_stream_is_the_load_all_windows_in_order(train_parquet):
    ref_in, ref_tgt = training_windows(train_parquet, L, N)
    parts = list(stream_windows(train_parquet, L, N, rows=17))
    assert len(parts) == -(-300 // 17)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), ref_in)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), ref_tgt)
    assert count_windows(train_parquet, L, rows=29) == len(ref_in) > 300
    values = np.concatenate(pq.read_table(train_parquet).column("items").to_pylist()).astype(np.int64)
    np.testing.assert_array_equal(item_counts(train_parquet, N, rows=29), np.bincount(values, minlength=N))


@pytest.mark.parametrize("world", [1, 2])
def test_one_chunk_epoch_matches_the_load_all_loader(train_parquet, world):
    ref_in, ref_tgt = training_windows(train_parquet, L, N)
    batch = 32
    for epoch in (0, 3):
        steps, first = _epoch(train_parquet, epoch, batch=batch, chunk=10_000, world=world)
        assert first.steps == len(steps) == len(ref_in) // batch
        order = seeded_rng(5, epoch).permutation(len(ref_in))
        for step, per_rank in enumerate(steps):
            for rank, (inputs, targets) in enumerate(per_rank):
                rows = order[step * batch + rank:(step + 1) * batch:world]
                np.testing.assert_array_equal(inputs, ref_in[rows])
                np.testing.assert_array_equal(targets, ref_tgt[rows])


@pytest.mark.parametrize("chunk", [50, 128, 10_000])
def test_every_window_once_per_epoch_same_batches_for_any_worker_count(train_parquet, chunk):
    ref_in, ref_tgt = training_windows(train_parquet, L, N)
    W = len(ref_in)
    batch = 44  # W = 1,100: every window makes a whole step
    assert W % batch == 0
    orders = []
    for epoch in (0, 1):
        one, _ = _epoch(train_parquet, epoch, batch=batch, chunk=chunk, world=1)
        two, _ = _epoch(train_parquet, epoch, batch=batch, chunk=chunk, world=2)
        assert len(one) == len(two) == W // batch
        # the epoch is the multiset of all windows (input and target together)
        both = np.concatenate([ref_in, ref_tgt], axis=1)
        got = np.concatenate([np.concatenate(s[0], axis=1) for s in one])
        assert _rows(got) == _rows(both)
        # 2 workers: worker r holds rows r::2 of the 1-worker step
        for (single,), (r0, r1) in zip(one, two):
            for rank, (inputs, targets) in enumerate((r0, r1)):
                np.testing.assert_array_equal(inputs, single[0][rank::2])
                np.testing.assert_array_equal(targets, single[1][rank::2])
        orders.append(got)
    assert not np.array_equal(orders[0], orders[1])  # epochs are shuffled differently


def test_steps_drop_the_remainder_like_the_load_all_loader(train_parquet):
    W = len(training_windows(train_parquet, L, N)[0])
    for batch in (16, 24, 42):
        assert W % batch
        for world in (1, 2):
            steps, first = _epoch(train_parquet, 0, batch=batch, chunk=64, world=world)
            assert first.steps == len(steps) == W // batch
            assert all(len(x) == batch // world for per_rank in steps for x, _ in per_rank)
            windows = np.concatenate([x for per_rank in steps for x, _ in per_rank])
            assert len(windows) == (W // batch) * batch and not _rows(windows) - _rows(training_windows(train_parquet, L, N)[0])


def test_chunks_bound_what_a_worker_shuffles_and_move_each_epoch(train_parquet):
    b = EpochBatches(train_parquet, max_len=L, pad_id=N, batch_size=16, chunk=64, seed=5)
    sizes = [b.chunk_sizes(e) for e in range(4)]
    assert all(sum(s) == b.num_windows and max(s) <= 64 for s in sizes)
    assert len({s[0] for s in sizes}) > 1
    # within one epoch a window never leaves its chunk: each step's windows come from at most two chunks
    both = np.concatenate(training_windows(train_parquet, L, N), axis=1)
    index = {bytes(row): i for i, row in enumerate(both)}
    assert len(index) == len(both)  # windows are told apart by their items
    bounds = np.cumsum(sizes[0])
    for inputs, targets in b.epoch(0):
        rows = np.concatenate([inputs, targets], axis=1)
        chunks = {int(np.searchsorted(bounds, index[bytes(row)], side="right")) for row in rows}
        assert len(chunks) <= 2 and max(chunks) - min(chunks) <= 1


def test_prefetch_yields_the_same_batches_and_passes_errors(train_parquet):
    batches = EpochBatches(train_parquet, max_len=5, pad_id=10_000, batch_size=8, chunk=16, seed=3)
    direct = [(a.copy(), b.copy()) for a, b in batches.epoch(1)]
    ahead = list(prefetch(batches.epoch(1), depth=2))
    assert len(ahead) == len(direct) == batches.steps
    assert all((a == c).all() and (b == d).all() for (a, b), (c, d) in zip(direct, ahead))

    def failing():
        yield 1
        raise ValueError("bad row")
    with pytest.raises(ValueError, match="bad row"):
        list(prefetch(failing()))
    early = prefetch(iter(range(1000)), depth=1)
    assert next(early) == 0
    early.close()  # the producer thread stops and is joined
