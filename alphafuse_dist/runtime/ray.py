"""The Ray bootstrap: join the configured cluster or start Ray in this process, then check that
every node's workers import this alphafuse_dist before any stage runs.

Example::

    ensure_ray(cfg)   # once per process; later calls return at once
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from ..config import RunConfig
from ..errors import ConfigError

_log = logging.getLogger(__name__)


def ensure_ray(cfg: RunConfig) -> None:
    """Join the configured cluster, or start Ray in this process (the embedded default)."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        _log.info(f"[ray] connecting to {cfg.ray.address}")
        ray.init(address=cfg.ray.address, log_to_driver=True)
    else:
        _start_local(cfg.ray.num_cpus)
    # later ray.init() calls in this process tree (library helpers, actors) must find THIS
    # instance even when other Ray instances run on the machine
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        seconds = check_workers(cfg.ray.ready_timeout_s)
    except BaseException:
        # not left half-connected: a later ensure_ray in this process (a notebook, a retry after
        # fixing the runtime_env) must connect and check again, not find Ray up and skip the check
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        raise
    _log.debug(f"[ray] resources: {ray.cluster_resources()}; every node's worker ran a first task within {seconds:.2f}s")


def _start_local(num_cpus: int | None) -> None:
    """Start Ray in this process so that Ray's own helpers find it when other Ray instances run.

    Ray Train's placement-group cleaner actor asks the State API for the controller's state with
    no address, which resolves ``RAY_ADDRESS`` in the actor's own process and otherwise fails
    ("Found multiple active Ray instances") as soon as a second Ray instance runs on the machine.
    So the GCS port is chosen here (``RAY_GCS_SERVER_PORT``, read when Ray starts the GCS) and
    every worker of the job gets ``RAY_ADDRESS`` through the job's runtime_env. The State API is
    served by the dashboard process, hence ``include_dashboard=True`` (its HTTP port is picked
    from 8265 upwards when that one is taken).
    """
    import socket

    import ray

    with socket.socket() as probe:  # a free port; another process could take it before the GCS does (rare)
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    address = f"{ray.util.get_node_ip_address()}:{port}"
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # the dashboard (and its Jobs API, which runs code) listens on loopback only
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 configure_logging=True,
                 logging_level="WARNING", runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    finally:
        os.environ.pop("RAY_GCS_SERVER_PORT", None)


def _worker_version() -> str:
    """Run in a Ray worker by :func:`check_workers`: the alphafuse_dist version it imports."""
    from .. import __version__

    return __version__


def check_workers(timeout_s: float, probe: Callable[[], str] = _worker_version) -> float:
    """Run one task on every alive node (pinned there, no CPUs asked, so actors holding CPUs do not
    block it) and check that each node's worker imports the driver's alphafuse_dist version;
    returns the seconds until all had answered.

    A job fails here, before any stage, when a node's workers cannot start or import the package
    (a node without it, a failed runtime_env upload) or import another version of it: otherwise a
    Ray stage would fail midway on that node. (A version string cannot tell apart two different
    checkouts of one version.) It also pays a fresh job's first-task cost (Ray sets up
    serialization in the driver and the worker, however small the task) once, up front.

    Raises:
        ConfigError: naming ``ray.ready_timeout_s`` and the nodes that did not answer in time, or
            the node, what its worker could not import or which version it found.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .. import __version__

    if not timeout_s > 0:
        raise ConfigError(f"ray.ready_timeout_s={timeout_s!r}: must be a positive number of seconds")
    start = time.perf_counter()
    remote = ray.remote(num_cpus=0, max_retries=0)(probe)
    nodes = {remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote():
             node.get("NodeManagerAddress", node["NodeID"]) for node in ray.nodes() if node.get("Alive")}
    ready, late = ray.wait(list(nodes), num_returns=len(nodes), timeout=timeout_s)
    if late:
        for ref in late:
            ray.cancel(ref, force=True)
        raise ConfigError(f"no Ray worker on node(s) {', '.join(sorted(nodes[r] for r in late))} ran a task within "
                          f"ray.ready_timeout_s={timeout_s:g} s (cluster {ray.get_runtime_context().gcs_address}): "
                          "check that the nodes are up and the job's runtime_env (cluster/runtime_env.yaml) installs")
    for ref in ready:
        try:
            found = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            last = str(cause).strip().splitlines()[-1] if str(cause).strip() else ""
            raise ConfigError(f"a Ray worker on node {nodes[ref]} could not run alphafuse_dist's first task: "
                              f"{type(cause).__name__}: {last} (is the package installed on every node, or the "
                              "job's runtime_env working_dir set?)") from None
        if found != __version__:
            raise ConfigError(f"a Ray worker on node {nodes[ref]} imports alphafuse_dist {found}, this driver "
                              f"{__version__}: install the same version on every node (or ship it with the job's "
                              "runtime_env)")
    return time.perf_counter() - start
