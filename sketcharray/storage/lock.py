"""One writer at a time: on a local disk the ``flock`` on the store's resolved path, on object storage a lease
object renewed while the writer runs; either is taken over from a dead writer."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .layout import StoreLocked
from .location import locate
from .outputs import check_store_parent

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ locking
def _sibling(path, suffix: str) -> Path:
    p = Path(path)
    return p.with_name(p.name + suffix)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def writer_lock(path, *, quiet: bool = False):
    """Hold the exclusive writer lock of the store at ``path`` (a path, URL or Location; it need not exist yet).

    Yields the store's :class:`~sketcharray.storage.location.Location`, bound to the lease on object storage:
    batches written through it check the lease first (:func:`check_lease`).  Raises :class:`StoreLocked` at
    once, naming the holder, when another process (or another call in this one) holds it.  A lock left by a
    writer that died is reported and taken over.
    """
    loc = locate(path)
    if not loc.is_local:
        with _Lease(loc, quiet=quiet) as token:
            yield loc.with_lease(token)
        return
    import filelock

    path = loc.path
    # the lock belongs to the store, not to how its path is spelled: a symlink or a relative alias of the same
    # store takes the same lock
    path = Path(os.path.realpath(path))
    parent = path.parent
    check_store_parent(path)
    parent.mkdir(parents=True, exist_ok=True)
    owner_file = _sibling(path, ".writer.json")
    lock = filelock.FileLock(str(_sibling(path, ".lock")), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        holder = _read_owner(owner_file)
        who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})" if holder
               else "another process")
        raise StoreLocked(f"store {path} is being written by {who}; wait for it to finish, or use another "
                          f"path (the lock is {_sibling(path, '.lock')})") from None
    try:
        stale = _read_owner(owner_file)
        if stale and not quiet:
            state = ("no longer running" if stale.get("host") == socket.gethostname()
                     and not _pid_alive(int(stale.get("pid", 0))) else "its lock released")
            log.warning("taking over the lock of store %s left by process %s on %s (%s)", path, stale.get("pid"),
                        stale.get("host"), state)
        owner_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        yield loc
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
        lock.release()


def _read_owner(owner_file: Path) -> dict | None:
    try:
        return json.loads(owner_file.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ leases
#: how long a lease on object storage lasts without renewal (seconds); renewed every quarter of it
LEASE_SECONDS = float(os.environ.get("SKETCHARRAY_LEASE_SECONDS", "60"))


def lease_location(loc):
    """The lease object of the store at ``loc``: ``STORE.lease.json`` beside it."""
    return loc.sibling(".lease.json")


class _Lease:
    """The writer lease of a store on object storage: an object beside the store holding the writer's identity
    and expiry, created with a conditional write (only if absent), renewed by a thread every quarter of its
    term (only if it is still the version this writer wrote), deleted on exit (same condition).

    A lease held by a live writer is refused, naming it; one past its expiry (plus a quarter term for clocks
    that disagree), or held by a process of this host that is no longer running, is taken over with a
    conditional write on the version read, so of two writers taking over at once exactly one wins.  Writes
    under the lease check it first (:func:`check_lease`) and stop a quarter term before it expires.
    """

    def __init__(self, loc, *, quiet: bool = False, seconds: float | None = None):
        self.loc, self.quiet = loc, quiet
        self.obj = lease_location(loc)
        self.seconds = float(seconds or LEASE_SECONDS)
        self.token = uuid.uuid4().hex
        self.since = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.version = None
        self._stop = threading.Event()
        self.lost = None

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
                           "since": self.since,
                           "expires": now + self.seconds, "seconds": self.seconds}).encode()

    def __enter__(self) -> str:
        check_store_parent(self.loc)
        for _ in range(3):  # a lease deleted between our reads is simply taken again
            body = self._body()
            self.version = self.obj.put_if(body, None)
            if self.version:
                break
            version, holder = self.obj.version(), _read_lease(self.obj)
            if version is None:
                continue
            why = _takeover_reason(holder, self.seconds)
            if why is None:
                raise StoreLocked(f"store {self.loc} is being written by {_who(holder)}; its lease "
                                  f"({self.obj}) runs until {_when(holder)}: wait for it to finish, or use "
                                  "another URL")
            self.version = self.obj.put_if(body, version)
            if not self.version:
                raise StoreLocked(f"store {self.loc}: another writer took over the lease ({self.obj}) of "
                                  f"{_who(holder)} at the same time; it proceeds, this run stops")
            if not self.quiet:
                log.warning("taking over the lease of store %s left by %s (%s)", self.loc, _who(holder), why)
            break
        else:
            raise StoreLocked(f"store {self.loc}: its lease {self.obj} keeps changing; another writer is starting")
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.loc}", daemon=True)
        self._thread.start()
        return self.token

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                renewed = self.obj.put_if(self._body(), self.version)
                if not renewed:
                    self.lost = f"the lease {self.obj} was taken over or removed"
                    log.error("store %s: %s; this writer stops writing", self.loc, self.lost)
                    return
                self.version = renewed
            except Exception as exc:  # a network error: try again next quarter; writes stop at expiry
                log.warning("store %s: renewing the lease failed (%s: %s); retrying", self.loc,
                            type(exc).__name__, exc)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost is None and self.version is not None:
            with contextlib.suppress(Exception):
                self.obj.delete_if(self.version)


def check_lease(loc) -> None:
    """Before a write under a lease (``loc.lease`` set): raise :class:`StoreLocked` unless the lease object still
    holds this writer's token with at least a quarter of its term left.  No-op for locations without a lease."""
    if loc.lease is None:
        return
    holder = _read_lease(lease_location(loc))
    if holder is None or holder.get("token") != loc.lease:
        who = "nobody" if holder is None else _who(holder)
        raise StoreLocked(f"store {loc}: this writer no longer holds its lease (it is held by {who}); the batch "
                          "was not written")
    left = float(holder.get("expires", 0)) - time.time()
    if left < float(holder.get("seconds", LEASE_SECONDS)) / 4:
        raise StoreLocked(f"store {loc}: this writer's lease expires in {left:.0f} s and was not renewed; the "
                          "batch was not written")


def _read_lease(obj) -> dict | None:
    try:
        return json.loads(obj.read_bytes())
    except (OSError, ValueError):
        return None


def _takeover_reason(holder: dict | None, seconds: float) -> str | None:
    """Why a lease may be taken over, or None while its holder may still write."""
    if holder is None:
        return "its lease is unreadable"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0) or 0)):
        return "no longer running"
    grace = float(holder.get("seconds", seconds)) / 4  # clocks of two machines may disagree by this much
    if time.time() > float(holder.get("expires", 0)) + grace:
        return "its lease expired"
    return None


def _who(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"


def _when(holder: dict | None) -> str:
    expires = float((holder or {}).get("expires", 0))
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(expires))
