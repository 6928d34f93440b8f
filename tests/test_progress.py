"""Progress bars of the long stages: count, rate and ETA on the terminal; plain bounded lines where
stderr is no terminal; updates from Ray workers through a Reporter; and the quiet command line
shows the training bar while the log file keeps the detail."""
from __future__ import annotations

import io
import logging
import re
import sys

import pytest

from alphafuse_dist.runtime import progress as progress_module
from alphafuse_dist.runtime.progress import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_bar_shows_count_rate_eta_and_postfix(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])  # tqdm's clock: 10 items a second
    stream = _Tty()
    with Progress("[evaluate] test users", total=100, unit="user", stream=stream) as bar:
        for _ in range(4):
            clock[0] += 1.0
            bar.update(10, loss=0.25)
        bar.update(0, desc="[evaluate] still")
    text = stream.getvalue()
    last = text.split("\r")[-1]
    assert "[evaluate] still" in last and "40/100" in last and "loss=0.25" in last
    assert re.search(r"10\.0+user/s", text), text  # the rate
    assert "<00:06" in text  # the ETA: 60 users left at 10 a second


def test_a_log_line_is_written_above_a_terminal_bar(monkeypatch):
    from alphafuse_dist.cli import configure_logging

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)  # the terminal's stderr of the moment (runtime.console.terminal)
    configure_logging()
    with Progress("[train]", total=10, unit="step") as bar:
        bar.update(5)
        logging.getLogger("alphafuse_dist.pipeline").info("[train] a line")
        bar.update(1)
    text = tty.getvalue()
    assert "\r[train] a line\n" in text  # the bar cleared first: the line starts at the margin
    assert "6/10" in text.split("[train] a line")[1]  # and drawn again below it


def test_without_a_terminal_the_bar_prints_a_bounded_number_of_plain_lines(caplog):
    stream = io.StringIO()
    caplog.set_level(logging.DEBUG, logger="alphafuse_dist.runtime.progress")
    with Progress("[train] epoch 1/2", total=100_000, unit="step", stream=stream) as bar:
        for _ in range(100_000):
            bar.update(1, loss=1.0)
        bar.update(0, total=100_000)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    # the last line only: one per LINE_EVERY_S seconds, none at 0, and this loop is short
    assert len(lines) == 1, lines
    assert "100000/100000" in lines[-1] and "step/s" in lines[-1] and lines[-1].startswith("[train] epoch 1/2")
    # the log file's handler gets the final state too
    assert any("100000/100000" in r.getMessage() for r in caplog.records)


def test_plain_lines_follow_the_line_interval(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("tqdm.std.time", lambda: clock[0])
    monkeypatch.setattr(progress_module, "LINE_EVERY_S", 10.0)
    stream = io.StringIO()
    bar = Progress("[embed] encoding", total=600, unit="item", stream=stream)
    for _ in range(600):  # 60 s at 10 items a second: a line every 10 s
        clock[0] += 0.1
        bar.update(1)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert 5 <= len(lines) <= 7, lines
    assert "600/600" in lines[-1] and "10.00item/s" in lines[-1]


def test_ray_workers_move_the_driver_bar_through_a_reporter(ray_session):
    import ray

    @ray.remote(num_cpus=0)
    def work(reporter, n: int) -> None:
        for _ in range(n):
            reporter.update(1, loss=0.5)
        reporter.flush(wait=True)

    stream = io.StringIO()
    with Progress("[train]", total=50, unit="step", stream=stream) as bar:
        reporter = bar.remote()
        ray.get([work.remote(reporter, 20), work.remote(reporter, 30)])
    assert bar.bar.n == 50
    assert "50/50" in stream.getvalue().splitlines()[-1] and "loss=0.5" in stream.getvalue()


def test_the_quiet_command_shows_the_training_bar_and_logs_the_detail(tmp_path):
    from test_console import alphafuse

    rows = [f"u{u},i{(u * 3 + k) % 9},{1000 + k}" for u in range(200) for k in range(8)]
    (tmp_path / "clicks.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    done = alphafuse("run", "--config", "quickstart", "--stages", "prepare,train,evaluate", "method=sasrec_id",
                     "data.source=interactions", f"data.path={tmp_path / 'clicks.csv'}", "data.text_template=null",
                     f"run_dir={run}", "train.backend=torch", "train.num_workers=1", "train.epochs=2",
                     "train.batch_size=16", "train.log_every=5", "model.dim=16", "model.id_dims=8",
                     "model.max_len=6", "train.num_negatives=8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert "[train] ..." in err and "[evaluate] ..." in err  # the stage lines
    train_bar = [line for line in err.splitlines() if line.startswith("[train] epoch 2/2")]
    assert train_bar and "step/s" in train_bar[-1] and re.search(r"(\d+)/\1 ", train_bar[-1]), err
    assert any(line.startswith("[evaluate] test users") and "user/s" in line for line in err.splitlines()), err
    assert "step 5/" not in err  # the step lines stay in the log file
    log = (run / "alphafuse.log").read_text()
    assert "[train] epoch 1/2 step 5/" in log and "seq/s" in log and "[train] epoch 2: loss" in log
    assert len(err.splitlines()) <= 20, err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
