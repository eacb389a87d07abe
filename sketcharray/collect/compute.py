"""Computing dask collections now, with progress: a bar under a local scheduler, the dashboard under a client."""

from __future__ import annotations

import logging

import sys

import dask

log = logging.getLogger(__name__)


def active_client():
    """The active ``dask.distributed`` client, or None (never imports distributed: a process that did not
    import it has no client)."""
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute_with_progress(collections, *, progress: bool = True, message: str | None = None, scheduler=None,
                          prefix: str | None = None, total: int | None = None, unit: str = "tasks",
                          label: str = "computing") -> list:
    """Compute dask collections (delayed tasks, dask arrays, xarray objects) now; returns their values.

    With ``progress``: prints ``message``, then, under a local scheduler, a
    :class:`~sketcharray.core.progress.Progress` that counts finished tasks whose
    key starts with ``prefix`` (all tasks when None; ``total`` of them), a
    bar on a terminal and plain lines otherwise; under an active
    ``dask.distributed`` client, the dashboard link (where the progress shows).
    """
    if not collections:
        return []
    client = active_client()
    if progress and message:
        log.info("%s", message)
    if client is not None and scheduler is None:
        if progress:
            from .cluster import ANNOUNCED

            if client.dashboard_link not in ANNOUNCED:  # shown once per cluster, where it was started
                log.info("dask dashboard: %s", client.dashboard_link)
                ANNOUNCED.add(client.dashboard_link)
        return list(dask.compute(*collections))
    kwargs = {"scheduler": scheduler or "threads"}
    if progress:
        from ..core.progress import Progress, TaskProgress

        bar = Progress(label, total or 0, unit=unit, stream=sys.stdout)
        with TaskProgress(bar, prefix):
            return list(dask.compute(*collections, **kwargs))
    return list(dask.compute(*collections, **kwargs))


def compute_into_store(store, skeleton: dict, task, arguments, *, name: str, token: str, n_parts: int, what: str,
                       unit: str, label: str, progress: bool, scheduler=None, ids=None) -> list:
    """The one way a stream writes a store: take its writer lock, create or check it (``prepare_store``: a run
    made otherwise is refused, damage is repaired), compute the parts not yet done, one named task each.

    ``task(*arguments(i, held), dask_key_name=...)`` is delayed for every pending part ``i`` (its model argument
    a shared graph node; ``held`` the store's Location under the writer lock, which the task writes through:
    on object storage it carries the lease, checked before each write); returns the tasks' results, in the
    order of the pending parts.
    """
    from ..storage import store as st

    with st.writer_lock(store, quiet=not progress) as held:
        todo = st.prepare_store(held, skeleton, quiet=not progress, **({} if ids is None else {"ids": ids}))
        tasks = [dask.delayed(task, pure=True)(*arguments(int(i), held), dask_key_name=(f"{name}-{token}", int(i)))
                 for i in todo]
        return compute_with_progress(tasks, progress=progress, scheduler=scheduler,
                                     message=f"{what} {len(todo)} of {n_parts} {unit} to {store}",
                                     prefix=f"{name}-{token}", total=len(tasks), unit=unit, label=label)
