"""Progress of long work: a bar on a terminal, plain lines in a log file.

On a terminal the bar redraws in place (at most five times a second); when
the stream is not a terminal (output redirected to a file, CI) it writes one
plain line at each tenth of the work instead of thousands of carriage-return
frames.  :class:`TaskProgress` drives it from a dask computation, counting
finished tasks of one kind (the batches of a sketch, say), so it moves batch
by batch rather than by the scheduler's clock.
"""

from __future__ import annotations

import sys
import time

from dask.callbacks import Callback


class Progress:
    """``update(done)`` as work completes, ``close()`` at the end; silent when ``enabled`` is False."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, stream=None, unit: str = ""):
        self.label, self.total, self.enabled, self.unit = label, max(int(total), 0), enabled, unit
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0, self._last_draw, self._last_tenth, self.done = time.perf_counter(), 0.0, -1, 0

    def _text(self, extra: str = "") -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.label}: {self.done}/{self.total}{unit} {time.perf_counter() - self.t0:.1f} s {extra}".rstrip()

    def update(self, done: int, extra: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if done >= self.total or now - self._last_draw >= 0.2:
                self._last_draw = now
                width = 30
                filled = int(width * done / max(self.total, 1))
                self.stream.write(f"\r[{'#' * filled}{' ' * (width - filled)}] {self._text(extra)}")
                self.stream.flush()
            return
        tenth = 10 * done // max(self.total, 1)
        if tenth != self._last_tenth:
            self._last_tenth = tenth
            print(self._text(extra), file=self.stream, flush=True)

    def close(self, note: str = "") -> None:
        """End the bar with a final line: where the work stopped (``done`` of ``total``), its time and ``note``
        (e.g. "converged" when it stopped early), so a bar never seems stuck at 42/60."""
        if not self.enabled:
            return
        if self.tty:
            self.stream.write(f"\r{self._text(note)}\n")
            self.stream.flush()
        elif note or 10 * self.done // max(self.total, 1) != 10:
            print(self._text(note), file=self.stream, flush=True)


class TaskProgress(Callback):
    """A dask callback that advances a :class:`Progress` as tasks whose key starts with ``prefix`` finish."""

    def __init__(self, progress: Progress, prefix: str | None = None):
        super().__init__()
        self.progress, self.prefix, self.count = progress, prefix, 0

    def _matches(self, key) -> bool:
        if self.prefix is None:
            return True
        name = key[0] if isinstance(key, tuple) else key
        return str(name).startswith(self.prefix)

    def _start_state(self, dsk, state):
        if self.prefix is None:  # every task counts: the total is the graph's size
            self.progress.total = len(state["ready"]) + len(state["waiting"]) + len(state.get("finished", ()))

    def _posttask(self, key, result, dsk, state, worker_id):
        if self._matches(key):
            self.count += 1
            self.progress.update(self.count)

    def _finish(self, dsk, state, errored):
        self.progress.close()
