"""The capacity model of docs/scaling.md (benchmarks/scaling/capacity.py): formula values by hand."""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling" / "capacity.py"
spec = importlib.util.spec_from_file_location("capacity", SCRIPT)
cap = importlib.util.module_from_spec(spec)
sys.modules["capacity"] = cap  # dataclasses look their module up there
spec.loader.exec_module(cap)


def test_bytes_per_row_follow_the_optimiser_state():
    # semantic 128 + ID 64 float32 = 768 B; Adagrad keeps one value per ID element, row-wise one per row
    assert cap.bytes_per_row("sgd") == 768
    assert cap.bytes_per_row("adagrad") == 768 + 64 * 4 == 1024
    assert cap.bytes_per_row("rowwise_adagrad") == 772


def test_memory_per_gpu_of_one_scenario():
    # 100M items row-wise over 16 GPUs: 100e6 * 1024 / 16 = 6.4 GB of tables, + 2.74 GB workspace
    assert cap.table_gb_per_gpu(100_000_000, 16) == pytest.approx(6.4)
    r = cap.plan(100_000_000, 1_000_000_000, 16, ids_per_step=40_000)
    assert r.train_gb == pytest.approx(6.4 + 2.74)
    assert r.eval_gb == pytest.approx(100e6 * 512 / 1e9)  # replicated [N, 128] float32
    assert cap.max_items(8)[1] == int(70e9 / 512)


def test_expected_unique_and_all_to_all_bytes():
    # two equally likely items (exponent 0), two draws: 2 * (1 - e^-1) distinct on average
    assert cap.expected_unique(2, 2, exponent=0.0) == pytest.approx(2 * (1 - math.exp(-1)))
    assert cap.expected_unique(1000, 10**6) == pytest.approx(1000, rel=1e-3)  # every item is drawn
    assert cap.a2a_bytes_per_id() == 2 * 8 + 4 * (128 + 64) + 4 * 64 == 1040
    # one node of 8: only NVLink, 7/8 of the bytes leave the GPU, 6 collectives of 30 us
    ids = 40_000
    want = (ids * 1040 * 7 / 8 / 450e9 + 2 * 7 / 8 * 106_240 * 4 / 450e9 + 6 * 30e-6)
    assert cap.comm_seconds_per_step(ids, 8) == pytest.approx(want)


def test_epoch_time_scales_with_gpus_at_fixed_step_cost():
    r8 = cap.plan(10_000_000, 1_000_000_000, 8, ids_per_step=0)
    steps = 1e9 * 542_733 / 1e7 / (1024 * 8)
    assert r8.epoch_s == pytest.approx(steps * (1024 / 32_900 + cap.comm_seconds_per_step(0, 8)))


def test_script_prints_every_scenario():
    out = subprocess.run([sys.executable, str(SCRIPT), "--gpus", "8", "64"], capture_output=True, text=True, check=True).stdout
    assert "### 10M items, 1B interactions" in out and "### 100M items, 1B interactions" in out
    assert out.count("\n| 8 |") == 2 and out.count("\n| 64 |") == 2


def test_docs_show_the_scripts_current_output():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True).stdout
    doc = (SCRIPT.parents[2] / "docs" / "scaling.md").read_text()
    stale = [line for line in out.splitlines() if line and line not in doc]
    assert not stale, f"docs/scaling.md is stale (python benchmarks/scaling/capacity.py): {stale[:2]}"
