"""Data files on S3: moto's S3 server on loopback, read by inspect-data and the interactions source."""
from __future__ import annotations

import json
import os
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
    """The keys under ``prefix`` now, with their ETags."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def test_run_dir_on_s3_end_to_end(s3, tmp_path, write_cycle_data, monkeypatch):
    """``alphafuse run`` with run_dir=s3://...: the stage folders and their manifests land in the
    bucket, Ray Train writes its checkpoints there, and a rerun from an empty mirror (another
    machine) fetches the stages and skips them all. The endpoint comes from the URI's query only."""
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    write_cycle_data(data, 60, 20, (5, 9), np.random.default_rng(0))
    s3.put_bucket_versioning(Bucket="data", VersioningConfiguration={"Status": "Enabled"})
    endpoint = s3.meta.endpoint_url.split("://", 1)[1]
    uri = f"s3://data/runs/quick?endpoint_override={endpoint}&scheme=http"
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ENDPOINT_URL", "RAY_ADDRESS")}
    command = [sys.executable, "-m", "alphafuse_dist.cli", "-v", "run", "--config", "quickstart", "method=sasrec_id",
               "data.source=interactions", f"data.path={data / 'inter.csv'}", f"data.items_path={data / 'items.csv'}",
               "data.text_template={title}", f"run_dir={uri}", "model.dim=16", "model.id_dims=8", "model.max_len=6",
               "train.batch_size=32", "train.epochs=2", "train.patience=2", "train.num_negatives=4",
               "train.num_workers=1", "train.log_every=0", "ray.num_cpus=2"]
    first = subprocess.run(command, env=env | {"ALPHAFUSE_CACHE": str(tmp_path / "cache-a")}, capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = ["prepare", "train-sasrec_id-s22", "evaluate-sasrec_id-s22"]
    keys = _keys(s3, "data", "runs/quick/")
    for stage in stages:
        assert f"runs/quick/{stage}/manifest.json" in keys, sorted(keys)
    assert {"runs/quick/prepare/items.parquet", "runs/quick/train-sasrec_id-s22/model.safetensors",
            "runs/quick/evaluate-sasrec_id-s22/metrics.json"} <= set(keys)
    # Ray Train's checkpoints were written to the bucket, then removed once the model was in its stage
    written = _versioned_keys(s3, "data", "runs/quick/.ray-train/")
    assert any("/checkpoint_" in k and k.endswith("model.safetensors") for k in written), sorted(written)
    assert not [k for k in keys if "/checkpoint_" in k]
    metrics = json.loads(s3.get_object(Bucket="data", Key="runs/quick/evaluate-sasrec_id-s22/metrics.json")["Body"].read())
    assert metrics["metrics"]["overall"]["users"] == 60

    again = subprocess.run(command, env=env | {"ALPHAFUSE_CACHE": str(tmp_path / "cache-b")}, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in stages:
        assert f"[{stage}] fetched from s3://data/runs/quick/{stage}" in again.stderr, again.stderr[-3000:]
        assert f"[{stage}] up to date" in again.stderr, again.stderr[-3000:]
    assert "uploaded" not in again.stderr
    assert _keys(s3, "data", "runs/quick/") == keys  # nothing written again
    assert again.stdout == first.stdout  # the same metrics table


def test_run_dir_bad_bucket_is_one_line(s3, tmp_path, capsys):
    endpoint = s3.meta.endpoint_url.split("://", 1)[1]
    code = main(["run", "--config", "quickstart", f"run_dir=s3://nope/run?endpoint_override={endpoint}&scheme=http"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "alphafuse: error: run_dir=s3://nope/run: bucket 'nope' does not exist; create it or choose another run_dir"
