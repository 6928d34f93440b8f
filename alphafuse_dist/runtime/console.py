"""What reaches the terminal: the command's own lines; everything else goes to the run's log file.

A command that runs stages keeps the terminal for its progress lines and results and sends the
rest to ``<run_dir>/alphafuse.log``: its own debug lines, Ray's Python log records, the output of
Ray workers that Ray forwards to the driver, and what Ray's C++ core writes to file descriptors 1
and 2 (which is why the redirect works on the descriptors, not on ``sys.stdout``). The lines of
``alphafuse_dist`` loggers at INFO and above are also shown on the terminal.

Example::

    terminal = redirect_to_log(Path("runs/q/alphafuse.log"))   # once, at the start of a command
    print("results ...", file=terminal.out)
"""
from __future__ import annotations

import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

LOG_FILE = "alphafuse.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class Terminal:
    """Streams that still reach the terminal after :func:`redirect_to_log` (``log``: the file)."""

    out: TextIO
    err: TextIO
    log: Path | None = None


_terminal: Terminal | None = None  # set by redirect_to_log


def terminal() -> Terminal:
    """The terminal's streams: ``sys.stdout`` / ``sys.stderr`` of the moment (a test's capture)
    until :func:`redirect_to_log` moved them."""
    return _terminal or Terminal(sys.stdout, sys.stderr)


def _keep(stream: TextIO, fd: int) -> TextIO:
    """A stream on a copy of ``fd`` if ``stream`` writes to ``fd``, else ``stream`` itself (a test's capture)."""
    try:
        if stream.fileno() == fd:
            stream.flush()
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding=stream.encoding, errors="replace")
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
    return stream


def redirect_to_log(path: Path) -> Terminal:
    """Append file descriptors 1 and 2 of this process (and of the processes it starts) to
    ``path`` and return the terminal's streams; the logging of ``alphafuse_dist`` writes DEBUG and
    above to ``path`` with time, level and module."""
    global _terminal
    path.parent.mkdir(parents=True, exist_ok=True)
    _terminal = Terminal(_keep(sys.stdout, 1), _keep(sys.stderr, 2), path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for target in (1, 2):
            os.dup2(fd, target)
    finally:
        os.close(fd)
    log_to_file(path)
    return _terminal


def log_to_file(path: Path) -> None:
    """DEBUG and above of ``alphafuse_dist`` appended to ``path`` (replacing an earlier such file handler)."""
    logger = logging.getLogger("alphafuse_dist")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def log_tail(lines: int = 40) -> str:
    """The last ``lines`` lines of the log file :func:`redirect_to_log` opened ("" without one)."""
    if _terminal is None or not _terminal.log.exists():
        return ""
    with open(_terminal.log, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 200_000))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])
