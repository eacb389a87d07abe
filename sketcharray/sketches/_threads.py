"""One pool of host threads for the sketch kernels that release the GIL (blocked FWHT, random streams)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_ranges(run, bounds) -> None:
    """``run(a, b)`` for each consecutive pair of ``bounds``, on the shared pool; returns when all are done.

    Callers must not be pool threads themselves (the work would wait on its own pool).
    """
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=cores(), thread_name_prefix="sketcharray")
    for f in [_POOL.submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()
