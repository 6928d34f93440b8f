"""GPU settings checked before any work, and CUDA out-of-memory turned into a one-line error.

    check_gpus(cfg)                      # ConfigError naming the key that asks for a missing GPU
    with out_of_memory_hint("train", cfg):
        train_stage(cfg)                 # CUDA OOM -> ResourceError: stage, sizes, settings to lower
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from ..config import RunConfig, _get
from ..errors import AlphaFuseError, ConfigError, wrapped_errors

# the settings that bound each stage's GPU memory, in the order to try lowering them
MEMORY_KEYS = {
    "embed": ("embed.gpu_batch_size", "embed.actors_per_gpu", "embed.max_seq_length"),
    "train": ("train.batch_size", "model.max_len", "train.num_negatives", "model.dim"),
    "evaluate": ("eval.user_batch", "eval.item_chunk"),
}
# the keys that can ask for CUDA, in the order the stages use them
DEVICE_KEYS = ("embed.device", "train.device", "eval.device")


class ResourceError(AlphaFuseError):
    """The run needs more of a resource (GPU memory, GPUs) than the machine has; the message names
    the setting to change."""


def _gpus_visible(cfg: RunConfig) -> int:
    """GPUs of the configured Ray cluster (the workers' view; the driver may have none), else of
    this machine (the in-process Ray instance gets the same)."""
    import sys

    # a process that has not imported Ray has no Ray instance: plain-torch runs need no Ray at all
    if cfg.ray.address or ("ray" in sys.modules and sys.modules["ray"].is_initialized()):
        import ray

        from .ray import ensure_ray

        ensure_ray(cfg)
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count()


def check_gpus(cfg: RunConfig, stages: list[str]) -> None:
    """A key set to ``cuda`` for a stage that will run, on a machine without GPUs: one-line error."""
    asked = [key for key in DEVICE_KEYS if key.split(".")[0].replace("eval", "evaluate") in stages
             and _get(cfg, key) == "cuda"]
    if asked and _gpus_visible(cfg) == 0:
        raise ConfigError(f"{asked[0]}=cuda: no GPU is visible here (torch sees no CUDA device and the Ray "
                          "cluster has none); set it to auto or cpu, or run on a GPU machine")


@contextlib.contextmanager
def out_of_memory_hint(stage: str, cfg: RunConfig) -> Iterator[None]:
    """Turn a CUDA out-of-memory error raised by ``stage`` (here or in a Ray worker) into a
    one-line :class:`ResourceError` naming the stage, the sizes and the settings to lower."""
    try:
        yield
    except Exception as e:
        oom = next((x for x in wrapped_errors(e) if type(x).__name__ == "OutOfMemoryError"), None)
        if oom is None:
            raise
        first = str(oom).strip().splitlines()[0] if str(oom).strip() else "CUDA out of memory"
        keys = MEMORY_KEYS.get(stage.split("-")[0], ())
        settings = f" (with {', '.join(f'{k}={_get(cfg, k)}' for k in keys)}); lower {' or '.join(keys)}" if keys else ""
        raise ResourceError(f"{stage}: {' '.join(first.split())[:200]}{settings}") from None
