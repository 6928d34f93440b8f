"""The built wheel holds a working package: presets, the embedded data set, the console script."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_and_imports_outside_the_checkout(tmp_path):
    # built from a copy of the sources: setuptools writes its build/ folder next to them
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "benchmarks",
                                                                "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("alphafuse_dist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "alphafuse_dist/presets/quickstart.yaml" in names
    assert "alphafuse_dist/datasets/ml-latest-small/ratings.parquet" in names
    assert "Requires-Python: <3.14,>=3.11" in metadata
    assert "Provides-Extra: cpu" in metadata and "Provides-Extra: gpu" in metadata
    assert "alphafuse = alphafuse_dist.cli:main" in entry_points
    # installed alone into a folder and imported from there (not from this checkout): the
    # shipped preset loads and the embedded data set reads
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import alphafuse_dist, sys; from alphafuse_dist.config import load_config; "
            "from alphafuse_dist.data.sources import load_source; "
            "print(alphafuse_dist.__file__); print(load_source(load_config('quickstart').data).interactions.height)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == "100004"
