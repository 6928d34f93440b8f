"""Fault tolerance: a Ray Train worker SIGKILLed mid-run restarts from its last sharded checkpoint
(torch.distributed.checkpoint inside Ray Train checkpoints) and the run ends with the metrics of
an uninterrupted run.

Why equality is expected, not just closeness: a checkpoint holds the ID table shards, the encoder,
both optimisers' states and the progress counters; shuffling and negatives are seeded by
(seed, epoch, step) and dropout's RNG is reseeded at every epoch start, so the epochs after the
restart draw exactly what they drew in the uninterrupted run. The tolerance left (1e-6) covers
float reduction order only.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pipeline_e2e import _write_dataset

EPOCHS = 25


def _command(data: Path, run_dir: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "alphafuse_dist.cli", "run", "--config", "quickstart", "method=sasrec_id",
            "data.source=interactions", f"data.path={data / 'inter.csv'}", f"data.items_path={data / 'items.csv'}",
            "data.text_template={title}", f"run_dir={run_dir}", "model.dim=32", "model.id_dims=16",
            "model.max_len=8", "train.batch_size=32", f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}",
            "train.num_negatives=16", "train.lr=0.005", "train.log_every=0", "train.max_failures=1", *extra]


def _env() -> dict:
    # a fresh in-process Ray for each run, not the test session's
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {"PYTHONUNBUFFERED": "1"}


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return kids


def _descendants(pid: int) -> list[int]:
    """Processes started (transitively) by ``pid``: the run's raylet and its Ray workers."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "evaluate-sasrec_id-s22" / "metrics.json").read_text())["metrics"]["overall"]


def straight_and_killed_runs(tmp_path: Path, extra: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Test metrics of an uninterrupted run and of a run whose Ray Train worker is SIGKILLed after
    its second checkpoint (``extra``: config overrides for both), after checking that the killed run
    resumed from a checkpoint and completed every epoch."""
    data = tmp_path / "data"
    data.mkdir()
    _write_dataset(data)

    straight = subprocess.run(_command(data, tmp_path / "straight", extra), env=_env(), capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "killed"
    log_path = tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(_command(data, run_dir, extra), env=_env(), stdout=log_file, stderr=subprocess.STDOUT)
        killed = None
        try:
            # two epochs' checkpoints in the run's storage, then one poll of Ray Train's controller
            # (every 2 s: reports still queued in a killed worker are lost) -> kill a worker
            deadline, seen = time.time() + 600, None
            while killed is None and proc.poll() is None and time.time() < deadline:
                if seen is None and len(list(run_dir.glob(".ray-train/*/checkpoint_*"))) >= 2:
                    seen = time.time()
                if seen is not None and time.time() > seen + 3:
                    workers = [p for p in _descendants(proc.pid) if "RayTrainWorker" in _cmdline(p)]
                    if workers:
                        killed = workers[0]
                        os.kill(killed, signal.SIGKILL)
                time.sleep(0.05)
            proc.wait(timeout=600)
        finally:
            proc.kill()
    # the terminal shows stage lines; the workers' lines (the resume among them) are in the run's log
    text = log_path.read_text() + (run_dir / "alphafuse.log").read_text()
    assert killed is not None, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
    resumed = re.findall(r"resumed from checkpoint .* after epoch (\d+)", text)
    assert resumed and 1 <= int(resumed[0]) < EPOCHS, text[-3000:]
    history = json.loads((tmp_path / "killed" / "train-sasrec_id-s22" / "history.json").read_text())
    assert [row["epoch"] for row in history["epochs"]] == list(range(1, EPOCHS + 1))
    return _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")


@pytest.mark.slow  # ~4 min on 2 cores; resume semantics are also covered by test_train_reshard in the default run
def test_killed_worker_resumes_from_checkpoint(tmp_path):
    a, b = straight_and_killed_runs(tmp_path)
    for k in ("HR@10", "NDCG@10", "MRR@10"):
        assert abs(a[k] - b[k]) <= 1e-6, (k, a, b)
