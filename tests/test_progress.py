"""Progress: a bar on a terminal, a few plain lines in a log, batch by batch under dask."""

from __future__ import annotations

import io

import dask

from sketcharray.core.progress import Progress, TaskProgress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_file_gets_one_plain_line_per_tenth_not_carriage_returns():  # the start, then each tenth
    log = io.StringIO()
    bar = Progress("sketching", 1000, stream=log, unit="batches")
    for i in range(1, 1001):
        bar.update(i)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 11 and lines[-1].startswith("sketching: 1000/1000 batches")


def test_a_terminal_gets_a_bar_redrawn_in_place():
    term = _Terminal()
    bar = Progress("lanczos", 3, stream=term)
    for i in range(1, 4):
        bar.update(i)
    bar.close()
    assert term.getvalue().startswith("\r[") and "3/3" in term.getvalue() and term.getvalue().endswith("\n")


def test_task_progress_counts_the_batches_of_a_dask_computation():
    log = io.StringIO()
    tasks = [dask.delayed(lambda i: i, pure=True)(i, dask_key_name=("sketch-gradients-x", i)) for i in range(5)]
    total = dask.delayed(sum)(tasks)
    bar = Progress("sketching", 5, stream=log, unit="batches")
    with TaskProgress(bar, "sketch-gradients"):
        assert dask.compute(total, scheduler="threads")[0] == 10
    assert [line.split(" ")[1] for line in log.getvalue().splitlines()] == ["1/5", "2/5", "3/5", "4/5", "5/5"]
