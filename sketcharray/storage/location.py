"""Where a store lives: a local path, or an fsspec URL (``s3://``, ``gs://``, ``memory://``) with its storage options.

A :class:`Location` is what every store function of this package takes in
place of a path.  It pickles (a dask worker rebuilds the filesystem from the
URL and the options), it prints as its URL alone (storage options, which hold
credentials, never appear in a message, a log line or a stored attribute) and
it offers the few operations the stores need beyond Zarr's own: reading and
writing small objects, a **conditional write** (create only if absent, or
replace only the version read: the writer lease of :mod:`.lock` rests on it),
uploading a folder with its root metadata last (creation all-or-nothing for
readers), and removing a tree with its root metadata first.

Local paths keep their POSIX promises (rename, ``flock``); ``file://`` URLs
are local paths.  docs/reliability.md says which operation is atomic on which
backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

#: protocols whose conditional writes this package uses for the writer lease (reading works for any fsspec URL)
WRITABLE_PROTOCOLS = ("s3", "memory")
_MEMORY_LOCK = threading.Lock()  # a memory:// filesystem lives in one process: a lock makes its writes conditional


class LocationError(ValueError):
    """A URL or storage option that cannot be used: unknown protocol, missing package, options for a local path."""


def is_url(target) -> bool:
    return isinstance(target, str) and "://" in target


def locate(target, storage_options: dict | None = None) -> "Location":
    """``target`` (a path, a URL, or a Location) as a :class:`Location`; ``storage_options`` go with a URL."""
    if isinstance(target, Location):
        if storage_options and storage_options != target._options:
            raise LocationError(f"{target} already carries its storage options; pass them once")
        return target
    if target is None:
        raise LocationError("expected a path or URL; got None")
    return Location(target, storage_options)


def storage_option(text: str) -> tuple[str, object]:
    """One ``KEY=VALUE`` of the command line's ``--storage-option``: VALUE is JSON when it parses (``true``, ``3``,
    ``{"a": 1}``), else a string; a dotted KEY reaches into nested options (see :func:`storage_options`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE (e.g. client_kwargs.endpoint_url=http://host:9000); got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def storage_options(pairs) -> dict | None:
    """``(key, value)`` pairs as fsspec's nested options dict (``client_kwargs.endpoint_url`` ->
    ``{"client_kwargs": {"endpoint_url": ...}}``); None when there are none."""
    if not pairs:
        return None
    out: dict = {}
    for key, value in pairs:
        *heads, last = key.split(".")
        node = out
        for head in heads:
            node = node.setdefault(head, {})
            if not isinstance(node, dict):
                raise ValueError(f"--storage-option {key}: {head} was already given a value")
        node[last] = value
    return out


def place(target, storage_options: dict | None = None):
    """Where results go: a local path as a :class:`~pathlib.Path` (the POSIX code paths), a URL or a Location on
    object storage as a :class:`Location`; ``storage_options`` only with a URL."""
    if isinstance(target, Location):
        return target.path if target.is_local else locate(target, storage_options)
    if is_url(str(target)):
        loc = locate(str(target), storage_options)
        return loc.path if loc.is_local else loc
    if storage_options:
        raise LocationError(f"storage options apply to URLs (s3://, gs://, memory://); {target} is a local path")
    return Path(target)


class Location:
    """A store's place: ``Location("run.zarr")``, ``Location("s3://bucket/run.zarr", {"anon": False})``."""

    def __init__(self, target, storage_options: dict | None = None, *, lease: str | None = None):
        text = os.fspath(target)
        self._options = dict(storage_options or {})
        self.lease = lease  # the writer lease this location writes under (see .lock); None: no fence
        if text.startswith("file://"):
            text = text[len("file://"):]
        if is_url(text):
            self.protocol = text.split("://", 1)[0]
            self.url = text.rstrip("/")
            self.path = None
        else:
            if self._options:
                raise LocationError(f"storage options apply to URLs (s3://, gs://, memory://); {text} is a local path")
            self.protocol = "file"
            self.path = Path(text)
            self.url = str(self.path)
        self._fs = None

    # ------------------------------------------------------------- identity
    @property
    def is_local(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"  # never the options: they may hold credentials

    def __fspath__(self) -> str:
        if not self.is_local:
            raise TypeError(f"{self.url} is a URL, not a local path")
        return str(self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _key(self):
        return (self.url, json.dumps(self._options, sort_keys=True, default=str), self.lease)

    def __getstate__(self):
        return {"url": self.url, "options": self._options, "lease": self.lease}

    def __setstate__(self, state):
        self.__init__(state["url"], state["options"], lease=state["lease"])

    def __dask_tokenize__(self):
        return ("sketcharray.Location", self.url, self.lease)

    def with_lease(self, lease: str | None) -> "Location":
        return Location(self.url, self._options, lease=lease)

    # ------------------------------------------------------------- relatives
    @property
    def name(self) -> str:
        return self.path.name if self.is_local else self.url.rsplit("/", 1)[-1]

    def child(self, *parts: str) -> "Location":
        if self.is_local:
            return Location(self.path.joinpath(*parts), lease=self.lease)
        return Location("/".join([self.url, *parts]), self._options, lease=self.lease)

    __truediv__ = child

    def sibling(self, suffix: str) -> "Location":
        """The location named as this one plus ``suffix`` (``run.zarr`` -> ``run.zarr.lease.json``)."""
        if self.is_local:
            return Location(self.path.with_name(self.path.name + suffix))
        return Location(self.url + suffix, self._options)

    def parents(self) -> list["Location"]:
        """The enclosing folders (prefixes), nearest first, up to the bucket (or the filesystem's root)."""
        if self.is_local:
            return [Location(p) for p in self.path.absolute().parents]
        proto, rest = self.url.split("://", 1)
        parts = rest.split("/")
        return [Location(f"{proto}://{'/'.join(parts[:i])}", self._options) for i in range(len(parts) - 1, 0, -1)]

    # ------------------------------------------------------------ filesystem
    @property
    def fs(self):
        """The fsspec filesystem (built on first use; for a local path, fsspec's local filesystem)."""
        if self._fs is None:
            import fsspec

            try:
                self._fs = fsspec.filesystem(self.protocol, **self._options)
            except ImportError as exc:
                raise LocationError(f"{self.url}: the {self.protocol}:// filesystem needs a package that is not "
                                    f"installed ({exc}); for S3: pip install 'sketcharray[s3]'") from None
            except ValueError as exc:  # unknown protocol
                raise LocationError(f"{self.url}: {exc}") from None
        return self._fs

    @property
    def key(self) -> str:
        """The path inside the filesystem (``bucket/run.zarr``)."""
        return str(self.path.absolute()) if self.is_local else self.fs._strip_protocol(self.url)

    def zarr_store(self, *, read_only: bool = True):
        """What to hand Zarr or xarray: the local path as a string, or an ``FsspecStore`` on the URL."""
        if self.is_local:
            return str(self.path)
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self._options or None, read_only=read_only)

    def exists(self) -> bool:
        if self.is_local:
            return self.path.exists()
        self.fs.invalidate_cache(self.key)
        return self.fs.exists(self.key)

    def is_file(self) -> bool:
        if self.is_local:
            return self.path.is_file()
        self.fs.invalidate_cache(self.key)
        return self.fs.isfile(self.key)

    def read_bytes(self) -> bytes:
        """The object's bytes; FileNotFoundError when there is none."""
        if self.is_local:
            return self.path.read_bytes()
        return self.fs.cat_file(self.key)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        if self.is_local:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(data)
            return
        self.fs.pipe_file(self.key, data)
        self.fs.invalidate_cache(self.key)

    def delete(self) -> None:
        """Remove this one object (a missing one is fine)."""
        if self.is_local:
            self.path.unlink(missing_ok=True)
            return
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.key)

    def objects(self) -> list[str]:
        """Every object below this prefix, as keys relative to it (``grad/c/0/0``)."""
        if self.is_local:
            return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()) \
                if self.path.is_dir() else []
        self.fs.invalidate_cache(self.key)
        try:
            found = self.fs.find(self.key)
        except FileNotFoundError:
            return []
        prefix = self.key.rstrip("/") + "/"
        return sorted(k[len(prefix):] for k in found if k.startswith(prefix))

    def children(self) -> list[str]:
        """The names of the folders (prefixes) directly below this one: one listing request on object storage."""
        if self.is_local:
            return sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []
        self.fs.invalidate_cache(self.key)
        try:
            entries = self.fs.ls(self.key, detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")

    # ------------------------------------------------------ whole trees
    def upload(self, local_dir: Path, names: list[str] | None = None) -> None:
        """Copy a folder written locally to this prefix, its root ``zarr.json`` last (readers see the whole tree
        or none); ``names``: only these top-level entries (and no root metadata)."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if names is not None:
            files = [p for p in files if p.relative_to(local_dir).parts[0] in names]
        root = local_dir / "zarr.json"
        for p in [f for f in files if f != root] + ([root] if root in files else []):
            self.child(*p.relative_to(local_dir).parts).write_bytes(p.read_bytes())

    def remove_tree(self) -> None:
        """Remove every object below this prefix, the root ``zarr.json`` first (readers see the whole tree or
        none)."""
        self.child("zarr.json").delete()
        keys = self.objects()
        if keys:
            self.fs.rm([f"{self.key}/{k}" for k in keys])
        self.fs.invalidate_cache(self.key)

    # ---------------------------------------------------- conditional writes
    def version(self) -> str | None:
        """An opaque version of the object (S3's ETag), or None when there is none."""
        self._check_conditional()
        if self.protocol == "memory":
            try:
                return hashlib.sha256(self.fs.cat_file(self.key)).hexdigest()
            except FileNotFoundError:
                return None
        self.fs.invalidate_cache(self.key)
        try:
            return self.fs.info(self.key)["ETag"]
        except FileNotFoundError:
            return None

    def put_if(self, data: bytes, version: str | None) -> str | None:
        """Write ``data`` only if the object is still at ``version`` (None: only if there is no object).

        Returns the new version, or None, writing nothing, when another writer got there first.  One request on
        S3 (``If-None-Match: *`` or ``If-Match: ETAG``), atomic at the server.
        """
        self._check_conditional()
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                if self.version() != version:
                    return None
                self.fs.pipe_file(self.key, data)
                return hashlib.sha256(data).hexdigest()
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        response = self._s3_conditional("put_object", Body=data, **condition)
        return None if response is None else response.get("ETag") or self.version()

    def delete_if(self, version: str) -> bool:
        """Remove the object only if it is still at ``version``; False when it changed (or is gone)."""
        self._check_conditional()
        if self.protocol == "memory":
            with _MEMORY_LOCK:
                if self.version() != version:
                    return False
                self.fs.rm_file(self.key)
                return True
        try:
            return self._s3_conditional("delete_object", IfMatch=version) is not None
        except FileNotFoundError:
            return False

    def _s3_conditional(self, method: str, **kwargs):
        """One conditional S3 request on this object: its response, or None when its condition did not hold."""
        bucket, _, key = self.key.partition("/")
        try:
            return self.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except OSError as exc:
            if _precondition_failed(exc):
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.key)

    def _check_conditional(self) -> None:
        if self.protocol not in WRITABLE_PROTOCOLS:
            raise LocationError(f"{self.url}: writing a store needs conditional writes for its writer lease, which "
                                f"this package uses on {', '.join(p + '://' for p in WRITABLE_PROTOCOLS)} and local "
                                f"paths; {self.protocol}:// stores can be read, not written")


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error says a conditional write's condition did not hold (HTTP 412, or 409 for a
    concurrent conditional write)."""
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause is not None else None
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409") or \
        "pre-conditions you specified did not hold" in str(exc)
