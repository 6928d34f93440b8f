"""Quiet output of the ``alphafuse`` executable: the terminal gets the stage lines and results, the
run directory's alphafuse.log gets everything, including what Ray's processes write."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def alphafuse(*argv: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """The command line as a user runs it (``argv`` not passed to main(): the quiet mode)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "alphafuse_dist.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def clicks(folder: Path) -> list[str]:
    path = folder / "clicks.csv"
    rows = [f"u{u},i{(u * 7 + k) % 11},{1000 + k}" for u in range(6) for k in range(5)]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return ["data.source=interactions", f"data.path={path}", "data.text_template=null", f"run_dir={folder / 'run'}"]


def test_terminal_shows_stage_lines_and_the_log_file_gets_the_rest(tmp_path):
    done = alphafuse("run", "--stages", "prepare", *clicks(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    log = tmp_path / "run" / "alphafuse.log"
    assert done.stderr.splitlines() == [f"log: {log}", "[prepare] ...",
                                        f"[prepare] done in {done.stderr.split('done in ')[1].split('s')[0]}s -> "
                                        f"{tmp_path / 'run' / 'prepare'}"]
    text = log.read_text()
    assert " INFO alphafuse_dist.pipeline: [prepare] ..." in text
    # a bad key: one line on the terminal, exit status 2, nothing else
    bad = alphafuse("run", "--stages", "prepare", *clicks(tmp_path), "data.time_col=when", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.splitlines()[-1].startswith("alphafuse: error: file ")
    assert "Traceback" not in bad.stderr
    # -v: everything on the terminal, with levels and modules
    loud = alphafuse("-v", "run", "--stages", "prepare", *clicks(tmp_path), "--force", "prepare", cwd=tmp_path)
    assert loud.returncode == 0 and "INFO alphafuse_dist.pipeline: [prepare] ..." in loud.stderr


@pytest.mark.slow
def test_a_quickstart_size_run_prints_a_bounded_number_of_lines(tmp_path):
    from alphafuse_dist.runtime.progress import LINE_EVERY_S

    t0 = time.monotonic()
    done = alphafuse("quickstart", "train.epochs=1", f"run_dir={tmp_path / 'q'}", cwd=tmp_path, timeout=3600)
    seconds = time.monotonic() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    terminal = done.stdout.splitlines() + done.stderr.splitlines()
    # progress bars off a terminal: a line per bar (embed, train and evaluate per method) and one per LINE_EVERY_S
    bars = [line for line in terminal if "%|" in line]
    assert 5 <= len(bars) <= 5 + seconds / LINE_EVERY_S, bars
    assert len(terminal) - len(bars) <= 50 and "Traceback" not in done.stdout + done.stderr
    assert "(RayTrainWorker" in (tmp_path / "q" / "alphafuse.log").read_text()  # Ray's output went there
