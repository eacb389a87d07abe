"""One writer at a time: the writer lock on the store's resolved path, taken over from a dead writer."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from .layout import StoreLocked
from .write import _check_parent

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
    """Hold the exclusive writer lock of the store at ``path`` (which need not exist yet).

    Raises :class:`StoreLocked` at once, naming the holder, when another
    process (or another call in this one) holds it.  A record left by a
    writer that died is reported and taken over.
    """
    import filelock

    # the lock belongs to the store, not to how its path is spelled: a symlink or a relative alias of the same
    # store takes the same lock
    path = Path(os.path.realpath(path))
    parent = path.parent
    _check_parent(path)
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
        yield
    finally:
        with contextlib.suppress(OSError):
            owner_file.unlink()
        lock.release()


def _read_owner(owner_file: Path) -> dict | None:
    try:
        return json.loads(owner_file.read_text())
    except (OSError, ValueError):
        return None
