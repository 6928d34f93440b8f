"""Shared test fixtures."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A fresh in-process Ray instance (2 CPUs, no dashboard, loopback only) for the whole session.

    ``address="local"`` starts a new instance even when RAY_ADDRESS points at another cluster.
    """
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()
