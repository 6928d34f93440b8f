"""Shared test fixtures."""
from __future__ import annotations

import os

import pytest

# before any test module imports ray (Ray reads it at import): keeps in-process Ray on loopback
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A fresh in-process Ray instance (2 CPUs, no dashboard, loopback only) for the whole session.

    ``address="local"`` starts a new instance even when RAY_ADDRESS points at another cluster.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def write_cycle_data():
    """A writer of the cycle data set several tests share: ``write(root, n_users, n_items, lengths, rng)``
    writes ``root/inter.csv`` (user u walks items m<start>, m<start+1>, ... mod n_items for a length
    drawn from ``lengths`` = (low, high), timestamps 1000, 1010, ...) and ``root/items.csv``
    (``item_id,title``: ``m<i>,Item <i>``), drawing start and length per user from ``rng``."""

    def write(root, n_users: int, n_items: int, lengths: tuple[int, int], rng) -> None:
        rows = ["user_id,item_id,timestamp"]
        for u in range(n_users):
            start, length = rng.integers(n_items), rng.integers(*lengths)
            rows += [f"u{u},m{(start + t) % n_items},{1000 + 10 * t}" for t in range(length)]
        (root / "inter.csv").write_text("\n".join(rows) + "\n")
        (root / "items.csv").write_text("item_id,title\n" + "".join(f"m{i},Item {i}\n" for i in range(n_items)))

    return write
