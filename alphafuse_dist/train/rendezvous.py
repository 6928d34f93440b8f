"""Ray Train's torch process group with its rendezvous store listening on one address.

Ray Train's ``TorchConfig`` hands ``MASTER_ADDR``/``MASTER_PORT`` to ``init_process_group``, whose
``TCPStore`` server listens on every interface whatever address it is given. :class:`BoundTorchConfig`
keeps everything else Ray Train does (its process-group setup function, backend, timeout, the
torch environment variables) and changes only where the store listens: rank 0 binds a socket to
its node's address (``ray.util.get_node_ip_address()``), or to 127.0.0.1 when every worker has
the same node address, and hands it to ``TCPStore`` (``master_listen_fd``); the workers reach it
through the ``afbound://`` rendezvous scheme registered here with torch. The backend reuses Ray
Train's private ``_TorchBackend`` pieces, as Ray's own ``TorchftConfig`` does (Ray pinned at 2.60).
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from urllib.parse import urlparse

import ray
import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch.config import (TorchConfig, _set_torch_distributed_env_vars, _setup_torch_process_group,
                                    _TorchBackend)
from torch.distributed.rendezvous import register_rendezvous_handler

SCHEME = "afbound"

# rank 0's store server between its start and the process group taking it over, by port
_SERVERS: dict[int, dist.TCPStore] = {}


def listen_address(node_addresses: list[str]) -> str:
    """The address the store listens on, given the workers' node addresses in rank order:
    127.0.0.1 when they are all the same (every worker reaches it through loopback), else rank 0's."""
    return "127.0.0.1" if len(set(node_addresses)) == 1 else node_addresses[0]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def start_store(host: str, world_size: int, timeout_s: float) -> int:
    """Start the store server on ``host`` at a free port, listening on that address only; return
    the port. The server stays in this process until the rendezvous on rank 0 takes it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        sock.listen()
        port = sock.getsockname()[1]
        # torch's server (libuv unless USE_LIBUV=0, as env:// picks) on this socket; it does not wait
        # for the workers to connect: the process group's first reads of the store do
        store = dist.TCPStore(host, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                              master_listen_fd=sock.fileno(), use_libuv=os.environ.get("USE_LIBUV", "1") == "1")
        sock.detach()  # the store owns the socket now and closes it
    _SERVERS[port] = store
    return port


def _rendezvous(url: str, timeout: timedelta = timedelta(minutes=30), **kwargs):
    """``afbound://host:port?rank=R&world_size=W``: rank 0 takes the server :func:`start_store`
    started at that port; the others connect to it."""
    u = urlparse(url)
    query = dict(pair.split("=") for pair in u.query.split("&") if pair)
    rank, world_size = int(query["rank"]), int(query["world_size"])
    if rank == 0:
        store = _SERVERS.pop(u.port)
    else:
        store = dist.TCPStore(u.hostname, u.port, world_size, False, timeout,
                              use_libuv=os.environ.get("USE_LIBUV", "1") == "1")
    yield store, rank, world_size
    raise RuntimeError(f"{SCHEME}:// rendezvous cannot be repeated")


register_rendezvous_handler(SCHEME, _rendezvous)


def _set_master_env(host: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = host
    os.environ["MASTER_PORT"] = str(port)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig):
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        world_size = len(worker_group)
        host = listen_address(worker_group.execute(ray.util.get_node_ip_address))
        port = worker_group.execute_single(0, start_store, host, world_size, backend_config.timeout_s)
        # as Ray Train does; running a function of this module also registers afbound:// in each worker
        worker_group.execute(_set_master_env, host, port)
        if not isinstance(worker_group, V1WorkerGroup):
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(rank, _setup_torch_process_group, backend=backend,
                                                   world_rank=rank, world_size=world_size,
                                                   init_method=f"{SCHEME}://{_url_host(host)}:{port}",
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(world_size)])


class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` (``backend``: nccl or gloo, None picks nccl when workers have GPUs; ``timeout_s``)
    whose rendezvous store listens on rank 0's node address, or 127.0.0.1 on one node, only.
    ``init_method`` is not used."""

    @property
    def backend_cls(self):
        return _BoundTorchBackend
