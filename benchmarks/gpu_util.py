"""GPU utilisation sampled in the background, shared by the GPU benchmarks (not part of the package)."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import numpy as np


class GpuSampler:
    """GPU utilisation (%) every ``period`` seconds from ``nvidia-smi`` (torch.cuda.utilization as a
    fallback), in a daemon thread; :meth:`window` summarises the samples between two times."""

    def __init__(self, enabled: bool = True, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.source = None
        if not enabled:
            pass
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
        else:
            try:
                import torch

                if torch.cuda.is_available():
                    torch.cuda.utilization()
                    self.source = "torch.cuda.utilization"
            except Exception:  # no NVML: no samples
                self.source = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> float | None:
        if self.source == "nvidia-smi":
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout.split()
            values = [float(v) for v in out if v.replace(".", "", 1).isdigit()]
            return sum(values) / len(values) if values else None  # mean over the GPUs
        import torch

        return float(torch.cuda.utilization())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self._read()
            except Exception:
                value = None
            if value is not None:
                self.samples.append((time.time(), value))
            self._stop.wait(self.period)

    def start(self) -> "GpuSampler":
        if self.source:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def window(self, start: float, end: float) -> dict:
        values = [v for t, v in self.samples if start <= t <= end]
        if not values:
            return {"gpu_util_mean": None, "gpu_util_max": None, "gpu_util_samples": 0}
        return {"gpu_util_mean": round(float(np.mean(values)), 1), "gpu_util_max": float(max(values)),
                "gpu_util_samples": len(values)}
