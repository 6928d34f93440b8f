"""On one CUDA device, the product path (Ray Train + TorchRec) trains the function the plain-torch
path trains: for row-wise, table-wise and data-parallel plans (the frozen semantic table replicated,
or a TorchRec table too), the same losses, validation metrics and saved tensors after two epochs of
the embedded data (dropout off), and the semantic columns of the fused table stay bit-identical to
the decompose stage's frozen table. The last runs on a GPU are recorded in benchmarks/million
(RESULTS.md, "GPU tests"), the data-parallel plan's with its differences.

A Ray Train worker killed on the GPU resumes from its checkpoint and ends where an uninterrupted
run ends. Marked ``gpu``: skipped without CUDA; the runs on the GPU machine are recorded in
benchmarks/million.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

COMMON = ["method=alphafuse", "train.device=cuda", "train.num_workers=1", "train.epochs=2", "model.dropout=0.0",
          "train.patience=5"]


def _train(run_dir: Path, *overrides: str) -> tuple[dict, dict[str, torch.Tensor]]:
    cmd = [sys.executable, "-m", "alphafuse_dist.cli", "run", "--config", "quickstart", f"run_dir={run_dir}",
           *COMMON, *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    train = next(run_dir.glob("train-alphafuse-s*"))
    return json.loads((train / "history.json").read_text()), load_file(str(train / "model.safetensors"))


# the TorchRec runs compared with plain torch: plan name -> overrides
PLANS = {"row_wise": ["train.sharding=row_wise", "train.frozen_tables=replicated"],
         "table_wise": ["train.sharding=table_wise", "train.frozen_tables=replicated"],
         "row_wise-frozen-sharded": ["train.sharding=row_wise", "train.frozen_tables=sharded"],
         "data_parallel": ["train.sharding=data_parallel", "train.frozen_tables=replicated"],
         "data_parallel-frozen-sharded": ["train.sharding=data_parallel", "train.frozen_tables=sharded"]}


class Runs:
    """Each plan's run, trained when a test first asks for it (``-k data_parallel`` trains only
    plain torch and the data-parallel plans), all on one run folder's shared upstream stages."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.done = run_dir, {}

    def __getitem__(self, plan: str) -> tuple[dict, dict[str, torch.Tensor]]:
        if plan not in self.done:
            backend = ["train.backend=torch"] if plan == "torch" else ["train.backend=torchrec", *PLANS[plan]]
            self.done[plan] = _train(self.run_dir, *backend)
        return self.done[plan]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gpu") / "run"
    out = Runs(run_dir)
    _ = out["torch"]  # the reference run, which also writes the upstream stages the plans share
    semantic = load_file(str(run_dir / "decompose" / "semantic.safetensors"))
    return out, next(iter(semantic.values()))


@pytest.mark.parametrize("plan", list(PLANS))
def test_torchrec_on_cuda_matches_plain_torch(runs, plan):
    out, _ = runs
    (h_ref, m_ref), (h, m) = out["torch"], out[plan]
    for ref, got in zip(h_ref["epochs"], h["epochs"], strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-5)
        assert got["val_NDCG@10"] == pytest.approx(ref["val_NDCG@10"], abs=1e-5)
    assert m.keys() == m_ref.keys()
    apart = {key: float((m[key].float() - m_ref[key].float()).abs().max()) for key in m_ref
             if not torch.allclose(m[key], m_ref[key], atol=1e-5, rtol=0)}
    assert not apart, f"saved tensors more than 1e-5 apart (largest difference each): {apart}"


@pytest.mark.parametrize("plan", ["torch", *PLANS])
def test_semantic_columns_stay_bit_identical(runs, plan):
    out, semantic = runs
    table = out[plan][1]["item_table"]
    d_s = semantic.shape[1] - 64  # the quickstart's ID width
    assert torch.equal(table[:, :d_s], semantic[:, :d_s])


def test_checkpoint_resumed_on_the_gpu_ends_where_an_uninterrupted_run_ends(tmp_path):
    """A Ray Train + TorchRec worker on the GPU SIGKILLed after its second checkpoint: the run resumes
    and ends with the uninterrupted run's test metrics (bf16 autocast; CUDA's atomics may reorder
    float sums, hence 1e-4 rather than the CPU test's 1e-6)."""
    from test_train_resume import straight_and_killed_runs

    a, b = straight_and_killed_runs(tmp_path, ("train.device=cuda", "train.backend=torchrec"))
    for k in ("HR@10", "NDCG@10", "MRR@10"):
        assert abs(a[k] - b[k]) <= 1e-4, (k, a, b)
