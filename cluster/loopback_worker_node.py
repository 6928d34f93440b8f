"""Add a worker node, bound to 127.0.0.1 only, to a running Ray head on this machine.

Used by ``local_cluster.sh``; not needed on a real cluster, where ``ray start --address=HEAD:PORT``
adds nodes. On one machine that command cannot keep a node on loopback in Ray 2.60: it rewrites
``--node-ip-address=127.0.0.1`` to the machine's network address (and then listens on every
interface) unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and with that setting it refuses to
start any non-head node. This script does what ``ray start --address`` does after those checks
(``ray/scripts/scripts.py``): it starts the node's processes with ``ray._private.node.Node``.
That is a private API, hence the exact Ray pin below.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python loopback_worker_node.py --address 127.0.0.1:PORT \
        --num-cpus 1 --object-store-memory BYTES --temp-dir /tmp/afray.XXXX --agent-port PORT2
"""
from __future__ import annotations

import argparse
import os
import sys

RAY_VERSION = "2.60.0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the head's GCS address, 127.0.0.1:PORT")
    p.add_argument("--num-cpus", type=int, required=True)
    p.add_argument("--object-store-memory", type=int, required=True, help="bytes")
    p.add_argument("--temp-dir", required=True,
                   help="this node's own temp dir: nodes that share one delete each other's job working dirs")
    p.add_argument("--agent-port", type=int, required=True,
                   help="dashboard agent HTTP port (the default 52365 is taken by the head's agent)")
    args = p.parse_args()
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        sys.exit("loopback_worker_node.py: set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, "
                 "or Ray moves the node off 127.0.0.1")

    import ray
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    if ray.__version__ != RAY_VERSION:
        sys.exit(f"loopback_worker_node.py: written against the private node API of ray=={RAY_VERSION}, "
                 f"found ray=={ray.__version__}; check ray/scripts/scripts.py `start` and update")
    ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    params = RayParams(
        node_ip_address="127.0.0.1", node_name="127.0.0.1", gcs_address=args.address,
        num_cpus=args.num_cpus, object_store_memory=args.object_store_memory, temp_dir=args.temp_dir,
        dashboard_agent_listen_port=args.agent_port,
    )
    # like `ray start` without --block: the node's processes outlive this one
    Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False, connect_only=False)


if __name__ == "__main__":
    main()
