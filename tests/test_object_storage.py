"""Data files on S3: moto's S3 server on loopback, read by inspect-data and the interactions source."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import polars as pl
import pytest

from alphafuse_dist.cli import main
from alphafuse_dist.config import load_config
from alphafuse_dist.data.sources import load_source, source_inputs
from alphafuse_dist.errors import DataError

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server on 127.0.0.1 with bucket ``data``; the AWS settings point at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "ALPHAFUSE_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint)
    try:
        for _ in range(100):
            try:
                client.create_bucket(Bucket="data")
                break
            except Exception:  # the server is still starting
                time.sleep(0.2)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_interactions_and_items_read_from_s3(s3, tmp_path, capsys):
    clicks = pl.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["x", "y", "x"], "timestamp": [1, 2, 3]})
    s3.put_object(Bucket="data", Key="logs/clicks.csv", Body=clicks.write_csv().encode())
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": ["x", "y"], "title": ["Red mug", "Blue cup"]}).write_parquet(items)
    s3.put_object(Bucket="data", Key="items.parquet", Body=items.read_bytes())
    assert main(["inspect-data", "s3://data/logs/clicks.csv", "--items", "s3://data/items.parquet"]) == 0
    out = capsys.readouterr().out
    assert "s3://data/logs/clicks.csv: CSV, 3 columns" in out and "data.text_template={title}." in out
    cfg = load_config("quickstart", ["data.source=interactions", "data.path=s3://data/logs/clicks.csv",
                                     "data.items_path=s3://data/items.parquet", "data.text_template={title}"])
    src = load_source(cfg.data)
    assert src.interactions.select("user_id", "item_id", "timestamp").rows() == [("a", "x", 1), ("a", "y", 2),
                                                                                    ("b", "x", 3)]
    assert src.items["title"].to_list() == ["Red mug", "Blue cup"]
    before = source_inputs(cfg.data)["interactions"]
    s3.put_object(Bucket="data", Key="logs/clicks.csv", Body=clicks.head(2).write_csv().encode())
    assert source_inputs(cfg.data)["interactions"] != before  # a changed remote file is fetched again
    assert load_source(cfg.data).interactions.height == 2
    missing = load_config("quickstart", ["data.source=interactions", "data.path=s3://data/nope.csv"])
    with pytest.raises(DataError, match=r"^file s3://data/nope.csv: does not exist$"):
        load_source(missing.data)


def _versioned_keys(client, bucket: str, prefix: str) -> set[str]:
    """Every key ever written under ``prefix`` (the bucket is versioned: deleted ones included)."""
    pages = client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
    return {v["Key"] for page in pages for v in page.get("Versions", [])}


def _keys(client, bucket: str, prefix: str) -> dict[str, str]:
    """The keys under ``prefix`` now, with their ETags (pyarrow's folder markers, ``.../``, left out)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")}


def _run_command(data, uri: str, epochs: int) -> list[str]:
    """``alphafuse -v run`` of a tiny sasrec_id run (Ray Train, one TorchRec worker) in ``uri``."""
    return [sys.executable, "-m", "alphafuse_dist.cli", "-v", "run", "--config", "quickstart", "method=sasrec_id",
            "data.source=interactions", f"data.path={data / 'inter.csv'}", f"data.items_path={data / 'items.csv'}",
            "data.text_template={title}", f"run_dir={uri}", "model.dim=16", "model.id_dims=8", "model.max_len=6",
            "train.batch_size=32", f"train.epochs={epochs}", f"train.patience={epochs}", "train.num_negatives=4",
            "train.num_workers=1", "train.log_every=0", "ray.num_cpus=2"]


def _s3_run(s3, tmp_path, write_cycle_data) -> tuple:
    """The cycle data in ``tmp_path/data``, the bucket versioned (deleted objects stay listed), the
    run's URI naming the endpoint in its query, and the environment of a run on another machine:
    no AWS_ENDPOINT_URL, its own mirror."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    write_cycle_data(data, 60, 20, (5, 9), np.random.default_rng(0))
    s3.put_bucket_versioning(Bucket="data", VersioningConfiguration={"Status": "Enabled"})
    uri = f"s3://data/runs/quick?endpoint_override={s3.meta.endpoint_url.split('://', 1)[1]}&scheme=http"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "RAY_ADDRESS")}
    return data, uri, lambda machine: env | {"ALPHAFUSE_CACHE": str(tmp_path / f"cache-{machine}")}


def _checkpoints(keys) -> list[str]:
    return [k for k in keys if "/.ray-train/" in k and "/checkpoint_" in k]


STAGES = ["prepare", "train-sasrec_id-s22", "evaluate-sasrec_id-s22"]


def test_run_dir_on_s3_end_to_end(s3, tmp_path, write_cycle_data, caplog, capsys):
    """``alphafuse run`` with run_dir=s3://... (the endpoint from the URI's query only): every stage
    folder and manifest lands in the bucket and Ray Train writes its checkpoints there; a rerun
    from an empty mirror (another machine) fetches every stage and skips it; ``alphafuse export
    --run s3://...`` exports the model into the run."""
    import logging

    data, uri, env = _s3_run(s3, tmp_path, write_cycle_data)
    first = subprocess.run(_run_command(data, uri, 2), env=env("a"), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    keys = _keys(s3, "data", "runs/quick/")
    for stage in STAGES:
        assert f"runs/quick/{stage}/manifest.json" in keys, sorted(keys)
    assert {"runs/quick/prepare/items.parquet", "runs/quick/train-sasrec_id-s22/model.safetensors",
            "runs/quick/evaluate-sasrec_id-s22/metrics.json"} <= set(keys)
    # Ray Train wrote its checkpoints to the bucket and they went once the model was in its stage
    written = _versioned_keys(s3, "data", "runs/quick/.ray-train/")
    assert any(k.endswith("model.safetensors") for k in _checkpoints(written)), sorted(written)
    assert not _checkpoints(keys)
    metrics = json.loads(s3.get_object(Bucket="data", Key="runs/quick/evaluate-sasrec_id-s22/metrics.json")["Body"].read())
    assert metrics["metrics"]["overall"]["users"] == 60

    caplog.set_level(logging.INFO, logger="alphafuse_dist")
    assert main(_run_command(data, uri, 2)[4:]) == 0  # this process: another mirror, no Ray needed
    for stage in STAGES:
        assert f"[{stage}] fetched from s3://data/runs/quick/{stage}" in caplog.text, caplog.text
        assert f"[{stage}] up to date" in caplog.text, caplog.text
    assert "uploaded" not in caplog.text
    assert _keys(s3, "data", "runs/quick/") == keys  # nothing written again
    table = capsys.readouterr().out.strip().split("\n\nmetrics: ")[0]  # the trained run's metrics table
    assert "HR@10" in table and table in first.stdout

    assert main(["export", "--run", uri, "--method", "sasrec_id"]) == 0
    assert "runs/quick/export-sasrec_id-s22/manifest.json" in _keys(s3, "data", "runs/quick/export-sasrec_id-s22/")


@pytest.mark.slow
def test_run_dir_on_s3_resumes_from_bucket_checkpoint(s3, tmp_path, write_cycle_data):
    """A run killed once Ray Train registered a checkpoint in the bucket is resumed from it by a
    rerun on another machine (an empty mirror), which fetches the prepare stage first."""
    data, uri, env = _s3_run(s3, tmp_path, write_cycle_data)
    command = _run_command(data, uri, 6)
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen(command, env=env("a"), stdout=log, stderr=subprocess.STDOUT)
        try:  # the controller's snapshot lists the checkpoints a rerun restores
            deadline = time.time() + 300
            while killed.poll() is None and time.time() < deadline and not any(
                    k.endswith("/checkpoint_manager_snapshot.json") for k in _keys(s3, "data", "runs/quick/.ray-train/")):
                time.sleep(0.2)
        finally:
            killed.kill()  # the driver; the Ray processes it started share its fate
            killed.wait(timeout=60)
    assert killed.returncode == -9, (tmp_path / "killed.log").read_text()[-3000:]
    assert _checkpoints(_keys(s3, "data", "runs/quick/.ray-train/"))

    resumed = subprocess.run(command, env=env("b"), capture_output=True, text=True, timeout=300)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "[prepare] fetched from s3://data/runs/quick/prepare" in output
    assert re.search(r"resumed from checkpoint .* after epoch \d+ ", output), output[-3000:]
    history = json.loads(s3.get_object(Bucket="data", Key="runs/quick/train-sasrec_id-s22/history.json")["Body"].read())
    assert [row["epoch"] for row in history["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert not _checkpoints(_keys(s3, "data", "runs/quick/"))


def test_run_dir_bad_bucket_is_one_line(s3, tmp_path, capsys):
    endpoint = s3.meta.endpoint_url.split("://", 1)[1]
    code = main(["run", "--config", "quickstart", f"run_dir=s3://nope/run?endpoint_override={endpoint}&scheme=http"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "alphafuse: error: run_dir=s3://nope/run: bucket 'nope' does not exist; create it or choose another run_dir"


def test_store_fetches_only_complete_stage_folders(s3, caplog):
    """A stage folder is fetched only with its manifest and files that match it; an upload replaces
    the whole folder; stale Ray Train runs are removed from the bucket."""
    import logging
    import shutil

    from alphafuse_dist.runtime.manifest import run_stage
    from alphafuse_dist.runtime.store import RunStore
    from alphafuse_dist.train.launch import remove_stale_runs

    store = RunStore("s3://data/run")

    def build(files: dict[str, str]):
        def write(tmp):
            for name, text in files.items():
                (tmp / name).write_text(text)
        return write

    run_stage(store.local, "prepare", config_hash="a", inputs={}, build=build({"a.txt": "one", "b.txt": "old"}))
    store.push("prepare")
    run_stage(store.local, "prepare", config_hash="b", inputs={}, build=build({"a.txt": "two"}))
    store.push("prepare")
    assert set(_keys(s3, "data", "run/")) == {"run/prepare/a.txt", "run/prepare/manifest.json"}
    s3.put_object(Bucket="data", Key="run/embed/vectors.bin", Body=b"an upload cut short: no manifest")

    shutil.rmtree(store.local)
    store.pull(["prepare", "embed"])
    assert (store.local / "prepare" / "a.txt").read_text() == "two"
    assert not (store.local / "embed").exists()

    s3.put_object(Bucket="data", Key="run/prepare/a.txt", Body=b"six")  # same size, other bytes
    shutil.rmtree(store.local)
    caplog.set_level(logging.WARNING, logger="alphafuse_dist")
    store.pull()
    assert not (store.local / "prepare").exists()
    assert "s3://data/run/prepare/a.txt was changed (its blake2b differs from the manifest's)" in caplog.text

    cfg = load_config("quickstart", ["method=sasrec_id"])
    for run in ("train-sasrec_id-s22-aaaa", "train-sasrec_id-s22-bbbb", "train-alphafuse-s22-cccc"):
        s3.put_object(Bucket="data", Key=f"run/.ray-train/{run}/checkpoint_000000/x", Body=b"x")
    path, fs = store.ray_storage()
    remove_stale_runs(path, cfg, "train-sasrec_id-s22-bbbb", fs)
    assert {k.split("/")[2] for k in _keys(s3, "data", "run/.ray-train/") if k.endswith("/x")} == {
        "train-sasrec_id-s22-bbbb", "train-alphafuse-s22-cccc"}
