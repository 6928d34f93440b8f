"""Asking for a GPU where there is none, and CUDA running out of memory, end in one-line errors that
name the key or the stage, the sizes and the settings to lower (no traceback)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from alphafuse_dist.config import load_config
from alphafuse_dist.runtime.gpu import ResourceError, out_of_memory_hint


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("key", ["train.device", "eval.device", "embed.device"])
def test_cuda_without_a_gpu_is_refused_before_any_stage(tmp_path, key):
    done = subprocess.run([sys.executable, "-m", "alphafuse_dist.cli", "run", "--config", "quickstart",
                           f"run_dir={tmp_path / 'run'}", f"{key}=cuda"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (f"alphafuse: error: {key}=cuda: no GPU is visible here (torch sees no CUDA "
                                   "device and the Ray cluster has none); set it to auto or cpu, or run on a GPU machine")
    assert not any((tmp_path / "run").glob("*/manifest.json"))  # no stage ran


def test_out_of_memory_names_the_stage_the_sizes_and_the_settings_to_lower():
    cfg = load_config("quickstart", ["train.batch_size=4096"])
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                 "of 79.19 GiB of which 3.12 GiB is free.\nIncluding non-PyTorch memory ...")
    with pytest.raises(ResourceError) as raised:
        with out_of_memory_hint("train", cfg):
            try:
                raise oom
            except RuntimeError as e:  # as a Ray worker's failure arrives: the OOM behind another error
                raise RuntimeError("worker failed") from e
    assert str(raised.value) == (
        "train: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
        "which 3.12 GiB is free. (with train.batch_size=4096, model.max_len=50, train.num_negatives=256, "
        "model.dim=128); lower train.batch_size or model.max_len or train.num_negatives or model.dim")
    with pytest.raises(ValueError):  # anything else passes through
        with out_of_memory_hint("train", cfg):
            raise ValueError("not memory")
