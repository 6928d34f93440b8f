"""Data files on S3: moto's S3 server on loopback, read by inspect-data and the interactions source."""
from __future__ import annotations

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
