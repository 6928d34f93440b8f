"""The training process group's rendezvous store (torch's TCPStore) listens on one address: rank 0's
node address under Ray Train, 127.0.0.1 when all workers share a node. Listening sockets are read
from /proc/net/tcp{,6}."""
from __future__ import annotations

import ipaddress
import json
import socket
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from ray import cloudpickle

from alphafuse_dist.train.rendezvous import BoundTorchConfig, listen_address, start_store

# the training function below runs in Ray Train workers, which cannot import this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on TCP ``port`` on this machine."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state = line.split()[1:4]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(addr)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                out.append(str(ipaddress.ip_address(raw)))
    return out


def test_listen_address_is_loopback_on_one_node_else_rank_zeros():
    assert listen_address(["10.0.0.5", "10.0.0.5", "10.0.0.5"]) == "127.0.0.1"
    assert listen_address(["10.0.0.5"]) == "127.0.0.1"
    assert listen_address(["10.0.0.6", "10.0.0.5", "10.0.0.6"]) == "10.0.0.6"


def test_store_listens_on_the_given_address_only():
    # 127.0.0.2 is a loopback address other than 127.0.0.1: reachable here, and a wildcard
    # listener would answer on 127.0.0.1 too
    port = start_store("127.0.0.2", 2, 30)
    server, rank, world = next(dist.rendezvous(f"afbound://127.0.0.2:{port}", rank=0, world_size=2))
    assert (rank, world) == (0, 2)
    assert listening(port) == ["127.0.0.2"]
    client, rank, _ = next(dist.rendezvous(f"afbound://127.0.0.2:{port}", rank=1, world_size=2))
    assert rank == 1
    server.set("key", "value")
    assert client.get("key") == b"value"
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    del client, server


def _report_store(cfg: dict) -> None:
    import os

    import ray.train
    import torch

    x = torch.tensor([ray.train.get_context().get_world_rank() + 1.0])
    dist.all_reduce(x)
    if ray.train.get_context().get_world_rank() == 0:
        port = int(os.environ["MASTER_PORT"])
        Path(cfg["out"]).write_text(json.dumps({"sum": x.item(), "listening": listening(port)}))
    ray.train.report({"done": 1})


def test_ray_train_store_listens_on_loopback_only_when_workers_share_a_node(ray_session, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "store.json"
    result = TorchTrainer(_report_store, train_loop_config={"out": str(out)},
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                          torch_config=BoundTorchConfig(backend="gloo", timeout_s=60),
                          run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    assert result.error is None
    seen = json.loads(out.read_text())
    assert seen["sum"] == 3.0
    # both workers run on this node: loopback only, no wildcard listener
    assert seen["listening"] == ["127.0.0.1"]
