"""The pipeline as a Ray job on a real two-node cluster: cluster/local_cluster.sh start, the
`ray job submit` CLI with jobs/run_pipeline.py, metrics.json checked, the cluster stopped even when
the test fails. Everything listens on 127.0.0.1 and uses the cluster's own auth token."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "cluster" / "local_cluster.sh"
RAY = Path(sys.executable).with_name("ray")
JOB_TIMEOUT_S = 600
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def cluster_env(env_file: Path) -> dict[str, str]:
    """The variables that cluster.env exports (its `export KEY=VALUE` lines)."""
    pairs = (line[len("export "):].split("=", 1) for line in env_file.read_text().splitlines()
             if line.startswith("export "))
    return dict(pairs)


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head and one worker node; yields the environment that reaches them."""
    state = tmp_path_factory.mktemp("cluster")
    # the cluster's own settings only: none inherited from other Ray use in this process
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"ALPHAFUSE_CLUSTER_DIR": str(state), "RAY_BIN": str(RAY)}
    try:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", "--workers", "1"], env=env, check=True, timeout=300)
        yield env | cluster_env(state / "cluster.env")
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], env=env, timeout=120)


def ray_cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    done = subprocess.run([str(RAY), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"ray {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def wait_for_job(env: dict[str, str], job_id: str, timeout_s: float) -> str:
    """Poll the job's status until it is terminal; return it (or the last one on timeout)."""
    deadline, status = time.monotonic() + timeout_s, "UNKNOWN"
    while time.monotonic() < deadline:
        out = ray_cli(env, "list", "jobs", "--address", env["RAY_API_SERVER_ADDRESS"], "--format", "json",
                      "-f", f"submission_id={job_id}")
        status = json.loads(out)[0]["status"]
        if status in TERMINAL:
            break
        time.sleep(5)
    return status


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:  # ended meanwhile
        return None


def listening_hosts(session_ids: set[int]) -> set[str]:
    """The local addresses that processes of these sessions listen on (TCP), as `ss` prints them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()
            if any(session_of(int(pid)) in session_ids for pid in re.findall(r"pid=(\d+)", line))}


def test_local_cluster_has_two_nodes_with_token_auth(local_cluster):
    status = ray_cli(local_cluster, "status", "--address", local_cluster["RAY_ADDRESS"])
    assert status.count(" node_") == 2
    assert local_cluster["RAY_ADDRESS"].startswith("127.0.0.1:")
    assert local_cluster["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:")
    # token auth is on: a client without the cluster's token is refused
    anonymous = {k: v for k, v in local_cluster.items() if not k.startswith("RAY_AUTH")}
    anonymous["RAY_AUTH_MODE"] = "disabled"
    refused = subprocess.run([str(RAY), "job", "list", "--address", local_cluster["RAY_API_SERVER_ADDRESS"]],
                             env=anonymous, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` (iproute2) to list listening sockets")
def test_local_cluster_listens_on_loopback_only(local_cluster):
    nodes = (Path(local_cluster["ALPHAFUSE_CLUSTER_DIR"]) / "nodes").read_text().splitlines()
    hosts = listening_hosts({int(line.split()[0]) for line in nodes})
    assert hosts and hosts <= {"127.0.0.1", "[::ffff:127.0.0.1]"}, hosts


def test_pipeline_job_writes_finite_metrics(local_cluster, tmp_path: Path):
    from test_pipeline_e2e import _write_dataset  # a small learnable data set: every stage, quickly

    _write_dataset(tmp_path)
    run_dir = tmp_path / "run"
    job_id = f"alphafuse-test-{uuid.uuid4().hex[:8]}"
    ray_cli(local_cluster, "job", "submit", "--address", local_cluster["RAY_API_SERVER_ADDRESS"],
            "--submission-id", job_id, "--runtime-env", "cluster/runtime_env.yaml", "--no-wait", "--",
            "python", "jobs/run_pipeline.py", "--config", "quickstart",
            "data.source=interactions", f"data.path={tmp_path / 'inter.csv'}",
            f"data.items_path={tmp_path / 'items.csv'}", "data.text_template={title}. Genres: {genres}.",
            "model.dim=32", "model.id_dims=16", "model.max_len=8", "train.batch_size=32",
            "train.epochs=2", "train.num_workers=2", f"run_dir={run_dir}")

    status = wait_for_job(local_cluster, job_id, JOB_TIMEOUT_S)
    logs = ray_cli(local_cluster, "job", "logs", "--address", local_cluster["RAY_API_SERVER_ADDRESS"], job_id)
    assert status == "SUCCEEDED", f"job {job_id} ended {status}; last log lines:\n{logs[-6000:]}"

    metrics_path = run_dir / "evaluate-alphafuse-s22" / "metrics.json"
    assert f"metrics: {metrics_path.resolve()}" in logs.splitlines()
    overall = json.loads(metrics_path.read_text())["metrics"]["overall"]
    for key in ("HR@10", "NDCG@10"):
        assert math.isfinite(overall[key]) and 0.0 <= overall[key] <= 1.0, (key, overall[key])
    assert overall["NDCG@10"] <= overall["HR@10"]
    assert overall["users"] > 0


def test_shipped_dashboards_are_loopback_or_token_protected():
    """The Jobs API runs code: every shipped cluster config binds the dashboard to loopback or
    turns Ray's token authentication on."""
    import pathlib
    import re

    import yaml

    root = pathlib.Path(__file__).resolve().parents[1]
    spec = yaml.safe_load((root / "cluster" / "retrain-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    host = spec["headGroupSpec"]["rayStartParams"].get("dashboard-host", "127.0.0.1")
    assert host == "127.0.0.1" or spec.get("authOptions", {}).get("mode") == "token"
    for script in [*root.glob("cluster/*.sh"), *root.glob("cluster/*.py"), *root.glob("jobs/*"), root / "cluster" / "README.md"]:
        for value in re.findall(r"dashboard[-_]host[=\s\"']+([\w.:]+)", script.read_text()):
            assert value == "127.0.0.1", f"{script.name}: dashboard host {value}"


def test_shipped_network_policy_keeps_the_job_pods_private():
    """The training rendezvous store, the collectives and Ray's ports listen on the pods' addresses:
    the shipped NetworkPolicy selects the RayJob's head and worker pods by their label and admits
    traffic from those pods only."""
    import pathlib

    import yaml

    root = pathlib.Path(__file__).resolve().parents[1]
    policy = yaml.safe_load((root / "cluster" / "network-policy.yaml").read_text())
    spec = yaml.safe_load((root / "cluster" / "retrain-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    assert all(pod["metadata"]["labels"].items() >= selector.items() for pod in pods)
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": selector}}]}]
