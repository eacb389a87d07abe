"""Where dask work runs: the one place the demo and the CLI choose a scheduler.

sketcharray adds no scheduler of its own (DESIGN, "Scale-out"): the library's
functions use whatever is active (a ``dask.distributed`` client if one
exists, else dask's threads); this module only creates that context from a
command-line word.
"""

from __future__ import annotations

import logging

import os
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

#: dashboard links already shown to the user (by :func:`scheduler`): a computation does not show them again
ANNOUNCED: set[str] = set()

_TRIM = "MALLOC_TRIM_THRESHOLD_"
#: the variable as this process had it when sketcharray.collect.cluster loaded (None: not set by the user)
_TRIM_AT_START = os.environ.get(_TRIM)

#: the words ``--scheduler`` accepts besides a scheduler address
SCHEDULERS = ("threads", "local-cluster")


def describe_schedulers() -> str:
    return ("'threads' (dask's local threaded scheduler, the default), 'local-cluster' (a dask.distributed "
            "LocalCluster on this machine, with the dashboard) or the address of a running scheduler "
            "(tcp://host:8786)")


@contextmanager
def scheduler(name: str = "threads", *, n_workers: int | None = None, quiet: bool = False) -> Iterator[object]:
    """Make ``name`` the active dask scheduler inside the ``with`` block; yields the client (or None).

    Parameters
    ----------
    name : str
        ``"threads"``, ``"local-cluster"`` or a scheduler address
        (``tcp://...``, ``tls://...``, ``ucx://...``, ``inproc://...``).
    n_workers : int, optional
        Workers of a local cluster (default: the CPU count, at most 4), one
        thread each: per-batch autodiff holds a lock, so threads within one
        worker would only queue.
    quiet : bool
        Don't print the dashboard link.

    Raises
    ------
    ValueError
        For any other ``name``.
    ImportError
        When a distributed scheduler is asked for without ``dask.distributed``.
    """
    if name == "threads":
        yield None
        return
    if name != "local-cluster" and "://" not in name:
        raise ValueError(f"scheduler must be {describe_schedulers()}; got {name!r}")
    try:
        from distributed import Client
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise ImportError("--scheduler local-cluster or an address needs dask.distributed: "
                          "pip install 'sketcharray[distributed]'") from exc
    if name == "local-cluster":
        workers = n_workers or max(1, min(os.cpu_count() or 1, 4))
        with local_cluster(workers, dashboard_address=":8787") as cluster, Client(cluster) as client:
            if not quiet:
                log.info("dask LocalCluster with %d worker(s); dashboard: %s", workers, client.dashboard_link)
                ANNOUNCED.add(client.dashboard_link)
            yield client
        return
    with Client(name) as client:
        if not quiet:
            log.info("connected to the dask scheduler at %s; dashboard: %s", name, client.dashboard_link)
            ANNOUNCED.add(client.dashboard_link)
        yield client


def local_cluster(n_workers: int, *, dashboard_address: str = ":0"):
    """A ``LocalCluster`` of ``n_workers`` single-threaded worker processes, as sketcharray's work wants them.

    dask's nanny exports ``MALLOC_TRIM_THRESHOLD_=65536`` to its workers, which
    turns off glibc's adaptive mmap threshold: every large temporary (an
    N-sized vector of a Hessian-vector product) is then a fresh mmap whose
    pages fault in again.  On MiniLM that made an HVP on one worker thread
    take 6.2 s instead of 4.4 s (measured with the variable and without), so
    these workers are started without it; ``OMP_NUM_THREADS=1`` and the other
    variables dask sets stay.
    """
    import dask
    from distributed import LocalCluster

    from ..core.localmodules import CONFIG_KEY, allowed

    # the workers import a --workload module from the current folder as this process does, and nothing else from
    # there (a preload installs the same finder: sketcharray.core.localmodules)
    preload = {"distributed.worker.preload": [*dask.config.get("distributed.worker.preload", default=[]),
                                              "sketcharray.core.localmodules"], CONFIG_KEY: allowed()}
    # a nanny writes its variables into this process's environment before it spawns, and children inherit it:
    # a value left by an earlier cluster is dropped while these workers start (a value set before this
    # module loaded, by the user, is kept)
    left = os.environ.pop(_TRIM, None) if _TRIM_AT_START is None else None
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{_TRIM}": None, **preload}):
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                dashboard_address=dashboard_address)
    finally:
        if left is not None:
            os.environ[_TRIM] = left
