"""Progress bars of the long stages (embed, train, evaluate): count, rate and ETA on the terminal.

On a terminal the bar (tqdm) redraws itself in place; where stderr is no terminal (CI, a pipe, a
file) it prints a plain line every ``LINE_EVERY_S`` seconds once it has moved, and a last one when
it closes. The run's log file gets the same plain lines at DEBUG (logger of this module).

Ray workers report through :meth:`Progress.remote`: a picklable :class:`Reporter` whose updates go
to a small actor, which a thread of the driver polls to move the bar.

Example::

    with Progress("[embed] encoding", total=9742, unit="item") as bar:
        bar.update(128)
        reporter = bar.remote()           # to Ray tasks or Ray Train workers
        ...                               # in a worker: reporter.update(128); reporter.flush(wait=True)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, TextIO

from tqdm import tqdm

from .console import terminal

_log = logging.getLogger(__name__)

LINE_EVERY_S = 30.0  # plain lines (no terminal, the log file): at most one per this many seconds
REDRAW_S = 0.2  # a terminal's bar: redrawn at most this often
SEND_EVERY_S = 0.5  # a Reporter sends its updates at most this often
POLL_S = 0.5  # the driver's thread reads the reports this often


class _Lines:
    """tqdm's stream where the terminal is no TTY: each redraw a line of its own, not a ``\\r``,
    once ``started()`` (no lines of a bar at 0)."""

    def __init__(self, stream: TextIO, started: Callable[[], bool]):
        self.stream, self.started = stream, started

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text and self.started():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _tty_width(stream: TextIO) -> int | None:
    """None where ``stream`` is no terminal, else its width (0 where it reports none)."""
    try:
        if not stream.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


class Progress:
    """A bar of ``total`` ``unit``s named ``desc`` on ``stream`` (default: the terminal's stderr,
    :func:`console.terminal`). Thread-safe; a context manager that closes it."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", stream: TextIO | None = None):
        stream = terminal().err if stream is None else stream
        width = _tty_width(stream)
        tty = width is not None
        every = REDRAW_S if tty else LINE_EVERY_S
        # a terminal that reports no width (a pty without a size) gets 100 columns
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream if tty else _Lines(stream, self._started),
                        mininterval=every, maxinterval=max(every, 10.0), dynamic_ncols=bool(width),
                        ncols=None if width or not tty else 100, ascii=not tty, smoothing=0.1)
        self._lock = threading.Lock()
        self._postfix: dict = {}
        self._logged = time.monotonic()
        self._poller: tuple[threading.Thread, threading.Event, object] | None = None

    def _started(self) -> bool:
        return getattr(self, "bar", None) is not None and self.bar.n > 0

    def update(self, n: int = 0, *, desc: str | None = None, total: int | None = None, **postfix) -> None:
        """Advance by ``n``; a new ``desc`` or ``total`` (given before any progress it also restarts
        the clock: the setup before the work stays out of the rate); ``postfix`` fields (shown as
        ``k=v``, each kept until it is given again)."""
        with self._lock:
            if desc is not None:
                self.bar.set_description_str(desc, refresh=False)
            if total is not None and self.bar.n == 0:
                self.bar.reset(total)
            elif total is not None:
                self.bar.total = total
            if postfix:
                self._postfix.update(postfix)
                self.bar.set_postfix(self._postfix, refresh=False)
            self.bar.update(n)
            line = str(self.bar) if self.bar.n and time.monotonic() - self._logged >= LINE_EVERY_S else None
            if line:
                self._logged = time.monotonic()
        if line:
            _log.debug(line)

    def remote(self) -> "Reporter":
        """A picklable :class:`Reporter` for Ray workers (Ray must be initialised); a thread of
        this process moves the bar with its reports until :meth:`close`."""
        if self._poller is None:
            import ray

            actor = ray.remote(num_cpus=0)(_Inbox).remote()  # no CPU: training workers may hold them all
            stop = threading.Event()
            thread = threading.Thread(target=self._poll, args=(actor, stop), daemon=True, name="progress")
            thread.start()
            self._poller = (thread, stop, actor)
        return Reporter(self._poller[2])

    def _poll(self, actor, stop: threading.Event) -> None:
        import ray

        while True:
            last = stop.wait(POLL_S)
            try:
                for n, fields in ray.get(actor.take.remote()):
                    self.update(n, **fields)
            except Exception:  # the bar is a view: a lost actor (Ray shut down) ends it, never the stage
                _log.debug("progress reports stopped", exc_info=True)
                return
            if last:
                return

    def close(self) -> None:
        """Read the last reports, draw the final state and log it."""
        if self._poller is not None:
            thread, stop, actor = self._poller
            stop.set()
            thread.join()
            self._poller = None
            import ray

            ray.kill(actor)
        with self._lock:
            self.bar.close()
            _log.debug(str(self.bar))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def clear_bars(stream: TextIO):
    """A context in which the bars drawn on ``stream`` are cleared, drawn again after it: a line
    written within it does not run into a bar."""
    return tqdm.external_write_mode(file=stream)


class _Inbox:
    """The actor behind :meth:`Progress.remote`: holds reports until the driver takes them."""

    def __init__(self):
        self.reports: list[tuple[int, dict]] = []

    def add(self, n: int, fields: dict) -> None:
        self.reports.append((n, fields))

    def take(self) -> list[tuple[int, dict]]:
        out, self.reports = self.reports, []
        return out


class Reporter:
    """Progress from any process of the Ray cluster: :meth:`update` takes the arguments of
    :meth:`Progress.update` and sends them at most every ``SEND_EVERY_S`` seconds without waiting."""

    def __init__(self, actor):
        self.actor = actor
        self._n, self._fields, self._sent = 0, {}, 0.0

    def __getstate__(self) -> dict:
        return {"actor": self.actor}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["actor"])

    def __call__(self, n: int = 0, **fields) -> None:
        self.update(n, **fields)

    def update(self, n: int = 0, **fields) -> None:
        self._n += n
        self._fields.update(fields)
        if time.monotonic() - self._sent >= SEND_EVERY_S:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Send what is pending; ``wait``: until the actor holds it (before the process ends)."""
        self._sent = time.monotonic()
        if self._n or self._fields:
            ref = self.actor.add.remote(self._n, self._fields)
            self._n, self._fields = 0, {}
            if wait:
                import ray

                ray.get(ref)
