"""The on-disk layout of sketch stores: Zarr v3, filled batch by batch, checksummed, one writer at a time.

A store holds, along ``example``: ``grad`` (example, sketch), ``loss``,
``valid`` and, when the data carry labels, ``label``; along ``batch``:
``batch_done`` (the progress record) and ``batch_digest`` (batch, part).

What a store promises, and how:

* **Resume.** Metadata and coordinates are written once by
  :func:`create_store`; each batch is then written as whole Zarr chunks
  (the chunking of every ``example`` variable is the batch size, so no two
  batches share a chunk), then its digest, and only then its done flag.  A
  run killed at any point leaves at worst a batch written but not flagged,
  which a resumed run recomputes and rewrites with identical values.
* **Integrity.** Every chunk carries a CRC32C checksum (Zarr v3's ``crc32c``
  codec), and every finished batch a digest per part (its ids and each
  variable's rows: the first 64 bits of SHA-256 over the batch index, the
  part name and the stored bytes).  Reading a chunk checks both, so a
  missing, truncated, corrupt, swapped or foreign chunk raises
  :class:`StoreDamaged` naming the variable, the batch and the example
  range; it is never read as fill values.  :func:`verify_store` checks every
  chunk and lists the damage; rerunning the ``sketch_gradients`` call that
  made the store recomputes exactly the damaged batches.
* **One writer.** Creating a store builds it in a temporary sibling and
  renames it into place (atomic on a local filesystem), and a writer holds
  an exclusive lock (``filelock``, the file ``STORE.lock`` beside the store,
  the holder's host and pid in ``STORE.writer.json``) for the whole run; a
  second writer gets :class:`StoreLocked` naming the holder.  A lock left by
  a killed writer is released by the operating system and taken over with
  a message.  Readers never lock.
* **Provenance.** The root attributes record the sketch spec, the
  parameter selection and the model fingerprint; resuming with other
  settings is refused with both values named, and two stores meet only
  through :mod:`sketcharray.provenance`.
"""

from __future__ import annotations

import logging

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

from . import __version__
from .provenance import provenance, with_provenance

log = logging.getLogger(__name__)

PROGRESS = "batch_done"
DIGEST = "batch_digest"
#: 2: checksummed chunks and per-batch digests; 3: digests keyed on the store's identity (:func:`digest_key`);
#: stores without ``store_format`` predate digests
STORE_FORMAT = 3
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
#: attrs that must agree for a run to resume into an existing store
IDENTITY_ATTRS = ("param_names", "param_sizes", "model_fingerprint", "sketch_spec", "mode",
                  "n_examples", "batch_size", "storage_dtype", "checkpoint", "variable",
                  # stores of sketched HVPs: the data that define the Hessian, and the probes
                  "data_fingerprint", "probe_space", "probe_seed", "probes_digest",
                  # the loss (or model output) differentiated: its name, and since 0.5 its code and bound values
                  "loss_fn", "loss_fn_identity")
#: identity attrs a store written by an earlier version may lack: not compared when the store has none
_SINCE_0_5 = ("loss_fn", "loss_fn_identity")


class StoreError(ValueError):
    """A store that cannot be used as asked: damaged, locked by another writer, or in the way."""


class StoreDamaged(StoreError):
    """A chunk or metadata document of a store is missing, corrupt, or not the one that was written.

    ``variable`` and ``reason`` say what and why; ``batch`` is None when a
    whole array (its metadata, or a coordinate) is damaged.
    """

    def __init__(self, path, variable: str, reason: str, batch: int | None = None, start: int | None = None,
                 stop: int | None = None):
        where = variable if batch is None else f"{variable} of batch {batch} (examples {start}..{stop - 1})"
        super().__init__(f"store {path}: {where}: {reason}; rerun the command that wrote it to repair")
        self.variable, self.reason, self.batch, self.start, self.stop = variable, reason, batch, start, stop


class StoreLocked(StoreError):
    """Another writer holds the store."""


def encode(values: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 sketches to their storage dtype (bfloat16 as its uint16 bit pattern)."""
    if storage_dtype == "bfloat16":
        bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
        out = (rounded >> 16).astype(np.uint16)
        return np.where(np.isnan(values), np.uint16(0x7FC0), out)
    return np.asarray(values, dtype=storage_dtype)


def decode_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def _numpy_dtype(storage_dtype: str):
    return np.uint16 if storage_dtype == "bfloat16" else np.dtype(storage_dtype)


def chunk_codecs(compressed: bool = True) -> list:
    """The bytes-to-bytes codecs of every array this package writes: Zstd (optional), then CRC32C."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(), Crc32cCodec()] if compressed else [Crc32cCodec()]


# ------------------------------------------------------------------ digests
def _ids_bytes(ids) -> bytes:
    return "\x1f".join(str(i) for i in ids).encode("utf-8")


#: root attributes left out of a store's identity: the version that wrote it (a resume by a later version is the same
#: store)
_NOT_IDENTITY = ("sketcharray_version",)


def digest_key(attrs: dict) -> bytes:
    """The store's identity as digests see it: SHA-256 over its root attributes (the sketch spec, parameters,
    model fingerprint, loss, data, dtype, ids' count, ...; all but the version), as stored.

    Every digest of a format-3 store includes it, so a chunk copied with its digest from another store, or
    a root attribute edited to claim another sketch, seed or model, fails verification.  Stores of format 2
    and earlier have an empty key (their digests are not bound to the store).
    """
    if int(attrs.get("store_format", 0) or 0) < 3:
        return b""
    identity = {k: v for k, v in attrs.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).digest()


def digest(batch_index: int, part: str, payload: bytes, key: bytes = b"") -> int:
    """The digest of one part of one batch: 64 bits of SHA-256 over (store key, batch index, part name, bytes)."""
    h = hashlib.sha256(key)
    h.update(f"{int(batch_index)}|{part}|".encode())
    h.update(payload)
    return int.from_bytes(h.digest()[:8], "little") | 1  # never 0, the fill value of an unwritten digest


def _rows_digest(batch_index: int, part: str, values: np.ndarray, key: bytes = b"") -> int:
    values = np.ascontiguousarray(values)
    return digest(batch_index, part, f"{values.dtype.str}{values.shape}".encode() + values.tobytes(), key)


def _ids_digest(batch_index: int, ids, key: bytes = b"") -> int:
    return digest(batch_index, "example", _ids_bytes(ids), key)


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


# ----------------------------------------------------------------- creation
def _check_parent(path: Path) -> None:
    """Refuse a store path below a regular file (``--out file.txt/s.zarr``) or inside another Zarr store."""
    from .outputs import OutputError, refuse_inside_store

    try:
        refuse_inside_store(path, "cannot create store")
    except OutputError as exc:
        raise StoreError(str(exc)) from None


def _write_skeleton(path, *, variable: str, row_dim: str, n_rows: int, n_out: int, chunk: int, ids,
                    has_label: bool, label_dtype=None, storage_dtype: str = "float32", attrs: dict[str, Any],
                    compressors="default") -> None:
    n_batches = -(-n_rows // chunk)
    rows = (chunk,)
    data_vars = {
        variable: ((row_dim, "sketch"), da.zeros((n_rows, n_out), chunks=(chunk, n_out),
                                                  dtype=_numpy_dtype(storage_dtype))),
        "valid": ((row_dim,), da.zeros(n_rows, chunks=rows, dtype=bool)),
        PROGRESS: (("batch",), np.zeros(n_batches, dtype=np.int8)),
    }
    if row_dim == "example":
        data_vars["loss"] = ((row_dim,), da.zeros(n_rows, chunks=rows, dtype=np.float32))
    if has_label:
        data_vars["label"] = ((row_dim,), da.zeros(n_rows, chunks=rows, dtype=label_dtype))
    parts = [row_dim, variable] + [v for v in ("loss", "valid", "label") if v in data_vars]
    data_vars[DIGEST] = (("batch", "part"), np.zeros((n_batches, len(parts)), dtype=np.uint64))
    ds = xr.Dataset(data_vars, coords={row_dim: ids_array(ids), "sketch": np.arange(n_out)})
    ds.attrs.update({k: _jsonable(v) for k, v in attrs.items()})
    ds.attrs.update(storage_dtype=storage_dtype, sketcharray_version=__version__, variable=variable,
                    row_dim=row_dim, n_examples=n_rows, batch_size=chunk, store_format=STORE_FORMAT,
                    digest_parts=json.dumps(parts))
    codecs = chunk_codecs(compressed=True)
    encoding = {name: {"compressors": codecs} for name in [*data_vars, row_dim, "sketch"]}
    encoding[PROGRESS]["chunks"] = (1,)
    encoding[DIGEST]["chunks"] = (1, len(parts))
    if compressors != "default":
        encoding[variable]["compressors"] = chunk_codecs(compressed=False) if compressors is None else compressors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        ds.to_zarr(str(path), mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)


def create_store(path, **skeleton) -> None:
    """Pre-allocate a store atomically: metadata, coordinates, an all-zero progress record and digests.

    The skeleton is written into a temporary sibling and renamed into
    place, so a store path holds either nothing or a whole skeleton.
    Call it holding :func:`writer_lock`.  ``compressors=None`` stores the
    sketches uncompressed (random-looking floats barely compress; reading
    them is then pure I/O), still checksummed.

    Raises
    ------
    StoreError
        When ``path`` is a file, a folder that holds something else, or
        lies below a file.
    """
    path = Path(path)
    _check_parent(path)
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"cannot create store {path}: it is a file")
        if any(path.iterdir()):
            raise StoreError(f"cannot create store {path}: the folder exists and is not a sketcharray store "
                             "(no zarr.json with a sketch spec); choose another path or remove it")
        path.rmdir()
    from .outputs import leftovers

    for stale in leftovers(path, "tmp"):  # left by a creator that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_skeleton(tmp, **skeleton)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ids_array(ids) -> np.ndarray:
    arr = np.asarray(ids)
    return arr.astype(object) if arr.dtype.kind in "UST" else arr


def _jsonable(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


# ------------------------------------------------------------------ writing
def write_batch(path, batch_index: int, start: int, stop: int, result: dict[str, np.ndarray], ids) -> None:
    """Write one batch's rows (whole chunks), then its digests, then flag the batch done."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    attrs = dict(group.attrs)
    storage_dtype, variable = attrs["storage_dtype"], attrs["variable"]
    parts = json.loads(attrs["digest_parts"]) if "digest_parts" in attrs else None
    key = digest_key(attrs)
    digests = {}
    for name, values in result.items():
        arr = group[name].with_config({"write_empty_chunks": True})  # a chunk file for every batch
        values = encode(values, storage_dtype) if name == variable else np.asarray(values, dtype=arr.dtype)
        arr[start:stop] = values
        digests[name] = _rows_digest(batch_index, name, values, key)
    if parts is not None:
        missing = [p for p in parts[1:] if p not in digests]
        if missing:
            raise ValueError(f"batch {batch_index} must write every variable of the store; missing {missing}")
        if len(ids) != stop - start:
            raise ValueError(f"batch {batch_index} has {stop - start} rows but {len(ids)} ids")
        digests[parts[0]] = _ids_digest(batch_index, ids, key)
        row = np.array([digests[p] for p in parts], dtype=np.uint64)
        group[DIGEST].with_config({"write_empty_chunks": True})[batch_index] = row
    group[PROGRESS][batch_index] = 1


# ------------------------------------------------------------------ reading
#: codecs a store may name; anything else (a pickle codec above all) is refused before a chunk is decoded
SAFE_CODECS = frozenset({"bytes", "zstd", "crc32c", "vlen-utf8", "vlen-bytes", "blosc", "gzip", "transpose",
                         "sharding_indexed"})


def check_codecs(path) -> None:
    """Refuse a Zarr store whose arrays name a codec outside :data:`SAFE_CODECS`.

    Zarr decodes chunks with the codecs the store's metadata names, and
    some codec registries include pickle; a crafted store could run code on
    read.  Only Zarr v3 metadata is ever read (``zarr_format=3``).
    """
    def names(codecs):
        for c in codecs or []:
            name = c.get("name") if isinstance(c, dict) else c
            yield name
            if isinstance(c, dict):
                yield from names((c.get("configuration") or {}).get("codecs"))
                yield from names((c.get("configuration") or {}).get("index_codecs"))

    for meta in [Path(path, "zarr.json"), *Path(path).glob("*/zarr.json")]:  # the only arrays ever opened
        try:
            doc = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue  # unreadable metadata is reported as damage where the array is opened
        if not isinstance(doc, dict) or doc.get("node_type") != "array":
            continue
        unsafe = sorted({str(n) for n in names(doc.get("codecs")) if n not in SAFE_CODECS})
        if unsafe:
            raise StoreError(f"store {path}: {meta.parent.name} uses codec(s) {unsafe}, which this package never "
                             f"writes and will not decode (allowed: {sorted(SAFE_CODECS)})")


def open_zarr_dataset(path) -> xr.Dataset:
    """``xarray.open_zarr`` for result folders this package wrote (spectra, HVP sketches), codecs checked first."""
    check_codecs(path)
    return xr.open_zarr(str(path), consolidated=False, zarr_format=3)


def read_attrs(path) -> dict | None:
    """The store's root attrs, or None when ``path`` holds no sketch store.

    Raises :class:`StoreDamaged` when the root metadata exists but cannot be read.
    """
    root = Path(path)
    if not (root / "zarr.json").is_file():
        return None
    try:
        attrs = json.loads((root / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreDamaged(path, "zarr.json", f"the root metadata is unreadable ({exc})") from None
    return dict(attrs) if "variable" in attrs and "sketch_spec" in attrs else None


def _group(path):
    return zarr.open_group(str(path), mode="r", zarr_format=3)


def _array(group, path, name):
    """One array of the store, or StoreDamaged naming its missing or unreadable metadata."""
    try:
        return group[name]
    except Exception as exc:  # KeyError (no zarr.json), JSONDecodeError, ValueError (bad metadata)
        reason = "missing" if isinstance(exc, KeyError) else f"unreadable: {exc}"
        raise StoreDamaged(path, name, f"its metadata {name}/zarr.json is {reason}") from None


def _example_vars(attrs: dict, group) -> list[str]:
    if "digest_parts" in attrs:
        return json.loads(attrs["digest_parts"])[1:]
    return [v for v in (attrs["variable"], "loss", "valid", "label") if v in group]


def _batches(n_rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(n_rows, s + chunk)) for s in range(0, n_rows, chunk)]


def _chunk_path(path, arr, batch: int) -> Path:
    key = arr.metadata.encode_chunk_key((batch,) + (0,) * (arr.ndim - 1))
    return Path(path, arr.path, *key.split("/"))


def read_rows(path, name: str, batch: int, start: int, stop: int, expected: int | None = None,
              decode: bool = False, arr=None, key: bytes = b"") -> np.ndarray:
    """Rows ``start:stop`` (batch ``batch``) of one variable, checked against its checksum and digest.

    ``arr``: the variable's Zarr array when the caller has it open; ``key``: the store's :func:`digest_key`.
    Raises :class:`StoreDamaged` naming the variable, the batch and the example range.
    """
    if arr is None:
        arr = _array(_group(path), path, name)
    try:
        values = arr[start:stop]
    except Exception as exc:
        raise StoreDamaged(path, name, f"the chunk is corrupt or truncated ({type(exc).__name__}: {exc})", batch,
                           start, stop) from None
    if expected is not None and _rows_digest(batch, name, values, key) != int(expected):
        raise StoreDamaged(path, name, _mismatch(path, arr, batch), batch, start, stop)
    return decode_bfloat16(values) if decode else values


def _mismatch(path, arr, batch: int) -> str:
    """Why a chunk's rows disagree with their digest, as far as the files tell."""
    if not _chunk_path(path, arr, batch).exists():
        return "its chunk file is missing"
    return ("its rows do not match the digest written with the batch (a chunk replaced, swapped, altered or copied "
            "from another store)")


def _read_block(path, variable, bounds, done, digests, decode, tail, out_dtype, key=b"", block_id=None):
    """One stored batch of one variable; a batch not yet written reads as missing (NaN, or False/0)."""
    batch = block_id[0]
    start, stop = bounds[batch]
    if not done[batch]:
        return np.full((stop - start, *tail), np.nan if np.issubdtype(out_dtype, np.floating) else 0,
                       dtype=out_dtype)
    return read_rows(path, variable, batch, start, stop, None if digests is None else digests[batch], decode,
                     key=key)


def _read_whole(path, group, name) -> np.ndarray:
    arr = _array(group, path, name)
    try:
        return arr[...]
    except Exception as exc:
        raise StoreDamaged(path, name, f"corrupt or truncated ({type(exc).__name__}: {exc})") from None


def open_sketches(path, *, allow_incomplete: bool = False, verify: bool = True) -> xr.Dataset:
    """Open a sketch store lazily (dask arrays, one chunk per stored batch).

    Parameters
    ----------
    path : str or Path
    allow_incomplete : bool
        Open a store whose run has not finished: its missing rows are NaN
        with ``valid`` False.  Otherwise an incomplete store raises.
    verify : bool
        Check each chunk read against the digest written with its batch
        (64 bits of SHA-256, about 2 GB/s per core); the CRC32C checksum of
        every chunk is checked either way.

    Returns
    -------
    xarray.Dataset
        ``grad`` (or ``hvp``), ``loss``, ``valid``, ``label`` as dask arrays;
        ``batch_done`` in memory; attrs with the parsed sketch spec and
        parameter lists, also on the sketch variable.  Computing a chunk
        that is missing or damaged raises :class:`StoreDamaged`.

    Raises
    ------
    ValueError
        When ``path`` is no sketch store, or the store is incomplete.
    StoreDamaged
        When its metadata, progress record or ids are damaged.
    """
    attrs = read_attrs(path)
    if attrs is None:
        raise StoreError(f"{path} is not a sketcharray store (no zarr.json with a sketch spec found)")
    check_codecs(path)
    group = _group(path)
    row_dim, variable = attrs.get("row_dim", "example"), attrs["variable"]
    names = _example_vars(attrs, group)
    arrays = {name: _array(group, path, name) for name in names}
    done = _read_whole(path, group, PROGRESS).astype(bool)
    ids = ids_array(_read_whole(path, group, row_dim))
    sketch = _read_whole(path, group, "sketch")
    n_rows, n_out = arrays[variable].shape
    chunk = int(attrs["batch_size"])
    bounds = _batches(n_rows, chunk)
    if len(ids) != n_rows or len(done) != len(bounds) or not np.array_equal(sketch, np.arange(n_out)):
        raise StoreDamaged(path, "coordinates", f"they disagree with the shape ({len(ids)} ids, {len(done)} batch "
                           f"flags and sketch 0..{len(sketch) - 1} for {n_rows} x {n_out})")
    if not done.all() and not allow_incomplete:
        raise StoreError(
            f"store {path} is incomplete: {int((~done).sum())} of {done.size} batches not written; "
            "rerun the same call to resume, or pass allow_incomplete=True"
        )
    parts = json.loads(attrs["digest_parts"]) if "digest_parts" in attrs else None
    key = digest_key(attrs)
    digests = None
    if parts is None:
        warnings.warn(f"store {path} was written before sketcharray 0.3 and has no digests: its chunks cannot be "
                      "verified", UserWarning, stacklevel=2)
    elif verify:
        digests = _read_whole(path, group, DIGEST)
        for b in np.flatnonzero(done):
            start, stop = bounds[b]
            if _ids_digest(b, ids[start:stop], key) != int(digests[b, 0]):
                raise StoreDamaged(path, row_dim, "the ids do not match the digest written with the batch (the "
                                   "ids, the digest record or the store's attributes were changed)", b, start, stop)
    token = dask.base.tokenize(str(Path(path).resolve()), os.stat(Path(path, PROGRESS)).st_mtime_ns, verify)
    data_vars = {}
    for name, arr in arrays.items():
        decode = name == variable and attrs["storage_dtype"] == "bfloat16"
        col = None if digests is None else digests[:, parts.index(name)]
        chunks = (tuple(b - a for a, b in bounds),) + tuple((s,) for s in arr.shape[1:])
        dtype = np.float32 if decode else arr.dtype
        data = da.map_blocks(_read_block, path=str(path), variable=name, bounds=bounds, done=tuple(done.tolist()),
                             digests=col, decode=decode, tail=arr.shape[1:], out_dtype=dtype, key=key, dtype=dtype,
                             chunks=chunks,
                             meta=np.empty((0,) * arr.ndim, dtype=dtype), token=f"read-{name}-{token}")
        dims = tuple(arr.metadata.dimension_names or (row_dim, "sketch")[: arr.ndim])
        data_vars[name] = (dims, data)
    data_vars[PROGRESS] = (("batch",), done.astype(np.int8))
    ds = xr.Dataset(data_vars, coords={row_dim: ids, "sketch": np.arange(n_out)})
    ds.attrs.update(attrs)
    for key in ("sketch_spec", "param_names", "param_sizes", "digest_parts"):
        if isinstance(ds.attrs.get(key), str):
            ds.attrs[key] = json.loads(ds.attrs[key])
    with_provenance(ds[variable], provenance(ds))
    return ds


def pending_batches(path) -> np.ndarray:
    """Indices of batches not yet flagged done (a damaged flag counts as not done)."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    arr = group[PROGRESS]
    try:
        return np.flatnonzero(arr[:] == 0)
    except Exception:  # a damaged flag chunk: read flag by flag
        flags = []
        for b in range(arr.shape[0]):
            try:
                flags.append(int(arr[b]))
            except Exception:
                flags.append(0)
        return np.flatnonzero(np.array(flags) == 0)


def check_compatible(path, existing: dict, wanted: dict, ids=None) -> None:
    """Raise ValueError naming both values when a store was made by a different run."""
    for key in IDENTITY_ATTRS:
        have, want = existing.get(key), _jsonable(wanted.get(key))
        if key in _SINCE_0_5 and key not in existing:
            continue
        if key in wanted and have != want:
            raise ValueError(
                f"store {path} was written with {key}={have!r}, but this run has {key}={want!r}; "
                "use a new store path, or the same sketch, parameters and model to resume"
            )
    if ids is not None:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        stored = _read_whole(path, group, existing.get("row_dim", "example"))
        if len(stored) != len(ids) or not np.array_equal(ids_array(stored), ids_array(ids)):
            raise ValueError(f"store {path} holds different example ids than this run ({len(stored)} vs {len(ids)} ids)")


# ---------------------------------------------------------- verification
@dataclass(frozen=True)
class Damage:
    """One damaged part of a store: a variable of one batch, or a whole array (``batch`` None)."""

    variable: str
    reason: str
    batch: int | None = None
    start: int | None = None
    stop: int | None = None

    def __str__(self) -> str:
        if self.batch is None:
            return f"{self.variable}: {self.reason}"
        return f"{self.variable} of batch {self.batch} (examples {self.start}..{self.stop - 1}): {self.reason}"


@dataclass
class StoreReport:
    """What :func:`verify_store` found: the batches checked and every damaged part."""

    path: str
    verifiable: bool
    batches: int = 0
    checked: int = 0
    damage: list[Damage] = field(default_factory=list)
    #: rows of the verified batches whose sketch is exactly zero: valid, but with no direction (no cosine score)
    zero_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def damaged_batches(self) -> list[int]:
        return sorted({int(d.batch) for d in self.damage if d.batch is not None})

    @property
    def damaged_arrays(self) -> list[str]:
        return sorted({d.variable for d in self.damage if d.batch is None})

    def __str__(self) -> str:
        if not self.verifiable:
            return f"store {self.path}: written before sketcharray 0.3, no digests: cannot be verified"
        head = (f"store {self.path}: {self.checked} finished batches of {self.batches} verified, "
                + ("no damage" if self.ok else f"{len(self.damaged_batches)} damaged batch(es), "
                   f"{len(self.damaged_arrays)} damaged array(s)"))
        zero = ([f"  {self.zero_rows} row(s) with a zero sketch: no cosine score, and as a query no ranking"]
                if self.zero_rows else [])
        return "\n".join([head, *(f"  {d}" for d in self.damage), *zero])


def verify_store(path, *, progress: bool = False) -> StoreReport:
    """Read every chunk of a store and check its checksum and its batch's digest.

    Returns a :class:`StoreReport` listing each damaged batch (variable,
    example range, what is wrong) and each array whose metadata or
    coordinates are damaged; it raises only when ``path`` is no store.
    Rerunning the call that wrote the store repairs what it lists.
    """
    attrs = read_attrs(path)
    if attrs is None:
        raise StoreError(f"{path} is not a sketcharray store (no zarr.json with a sketch spec found)")
    report = StoreReport(str(path), verifiable="digest_parts" in attrs)
    check_codecs(path)
    if not report.verifiable:
        return report
    group = _group(path)
    row_dim, variable = attrs.get("row_dim", "example"), attrs["variable"]
    parts = json.loads(attrs["digest_parts"])
    chunk = int(attrs["batch_size"])
    key = digest_key(attrs)
    n_rows = int(attrs.get("n_examples", 0)) or None
    arrays = {}
    for name in [*parts, PROGRESS, DIGEST, "sketch"]:
        try:
            arrays[name] = _array(group, path, name)
        except StoreDamaged as exc:
            report.damage.append(Damage(name, exc.reason))
    if n_rows is None:
        n_rows = next((a.shape[0] for n, a in arrays.items() if n in parts), 0)
    bounds = _batches(n_rows, chunk)
    report.batches = len(bounds)
    ids = None
    if row_dim in arrays:
        try:
            ids = ids_array(_read_whole(path, group, row_dim))
        except StoreDamaged as exc:
            report.damage.append(Damage(row_dim, exc.reason))
        if ids is not None and len(ids) != n_rows:
            report.damage.append(Damage(row_dim, f"holds {len(ids)} ids for {n_rows} rows"))
            ids = None
    if "sketch" in arrays:
        try:
            sketch = _read_whole(path, group, "sketch")
            n_out = arrays[variable].shape[1] if variable in arrays else len(sketch)
            if not np.array_equal(sketch, np.arange(n_out)):
                report.damage.append(Damage("sketch", f"holds other values than 0..{n_out - 1}"))
        except StoreDamaged as exc:
            report.damage.append(Damage("sketch", exc.reason))
    done = np.zeros(len(bounds), dtype=bool)
    if PROGRESS in arrays:
        done[:] = True
        done[pending_batches(path)] = False
    digests = None
    if DIGEST in arrays:
        digests = np.zeros((len(bounds), len(parts)), dtype=np.uint64)
        for b in np.flatnonzero(done):
            try:
                digests[b] = arrays[DIGEST][b]
            except Exception as exc:
                report.damage.append(Damage(DIGEST, f"corrupt or truncated ({exc})", b, *bounds[b]))
    from .progress import Progress

    bar = Progress(f"verifying {path}", int(done.sum()), enabled=progress, unit="batches")
    checked = 0
    for b in np.flatnonzero(done):
        start, stop = bounds[b]
        if digests is None or digests[b].min() == 0:
            if digests is not None and not any(d.batch == b for d in report.damage):
                report.damage.append(Damage(DIGEST, "the batch is flagged done but has no digest", b, start, stop))
            continue
        report.checked += 1
        # each part against its digest: None (unreadable: corrupt), True or False
        matches = {row_dim: None if ids is None else _ids_digest(b, ids[start:stop], key) == int(digests[b, 0])}
        found = []
        for i, name in enumerate(parts[1:], start=1):
            if name not in arrays:
                continue
            try:
                rows = read_rows(path, name, b, start, stop, arr=arrays[name])  # the checksum only
            except StoreDamaged as exc:
                found.append(Damage(name, exc.reason, b, start, stop))
                continue
            matches[name] = _rows_digest(b, name, rows, key) == int(digests[b, i])
            if not matches[name]:
                found.append(Damage(name, _mismatch(path, arrays[name], batch=b), b, start, stop))
            elif name == variable:
                rows = decode_bfloat16(rows) if attrs["storage_dtype"] == "bfloat16" else rows
                report.zero_rows += int((rows.reshape(len(rows), -1) == 0).all(axis=1).sum())
        if matches[row_dim] is False:
            found.insert(0, Damage(row_dim, "the ids do not match the digest written with the batch", b, start, stop))
        if not any(m for m in matches.values()) and any(m is False for m in matches.values()):
            # nothing of the batch matches its digest record: the record is what was changed (swapped with
            # another batch's, copied from another store), or the store's root attributes it is keyed on
            found = [d for d in found if d.reason.startswith("the chunk is corrupt")]
            found.insert(0, Damage(DIGEST, "the digest record matches neither the batch's ids nor its rows (a digest "
                                           "swapped, altered or copied from another store, or the store's root "
                                           "attributes edited)", b, start, stop))
        report.damage.extend(found)
        checked += 1
        bar.update(checked)
    bar.close()
    return report


def prepare_store(path, skeleton: dict, *, quiet: bool = False, ids=None) -> np.ndarray:
    """Make ``path`` ready for a run and return the batches it still has to write (call it holding
    :func:`writer_lock`).

    A new path gets the skeleton (:func:`create_store`, ``skeleton`` its arguments); an existing store must
    have been made by the same run (:func:`check_compatible` on the skeleton's ``attrs``, and on ``ids``
    after any repair, when given) and is repaired first (:func:`repair_store`), so damaged batches are
    pending again.
    """
    existing = read_attrs(path)
    if existing is None:
        create_store(path, **skeleton)
    else:
        check_compatible(path, existing, skeleton["attrs"])
        repair_store(path, quiet=quiet, **skeleton)
        if ids is not None:
            check_compatible(path, existing, skeleton["attrs"], ids=ids)
    return pending_batches(path)


def repair_store(path, *, quiet: bool = False, **skeleton) -> list[int]:
    """Make a damaged store resumable again; returns the batches flagged for recomputation.

    Array metadata that is missing or unreadable is restored from a fresh
    skeleton built with the run's settings (``skeleton``: the arguments of
    :func:`create_store`), and so are damaged coordinates once the run's
    ids are shown to match the digests of the finished batches; every
    batch with a damaged chunk or digest is flagged not done, so the
    resumed run recomputes exactly those.  Call it holding :func:`writer_lock`.
    """
    path = Path(path)
    report = verify_store(path)
    if not report.verifiable or report.ok:
        return []
    attrs = read_attrs(path)
    row_dim = attrs.get("row_dim", "example")
    restore = set(report.damaged_arrays) | ({row_dim} if any(d.variable == row_dim for d in report.damage) else set())
    if restore:
        tmp = path.parent / f".{path.name}.repair-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_skeleton(tmp, **skeleton)
            if row_dim in restore or "sketch" in restore:
                _check_ids_against_digests(path, skeleton["ids"], attrs,
                                           skip={d.batch for d in report.damage if d.variable == DIGEST})
            # only arrays the run's own skeleton has: a name read from the store (row_dim) never leads elsewhere
            for name in [n for n in restore if (tmp / n / "zarr.json").is_file() and Path(n).name == n]:
                if name in (row_dim, "sketch"):  # coordinates: written once at creation, copied whole
                    shutil.rmtree(path / name, ignore_errors=True)
                    shutil.copytree(tmp / name, path / name)
                else:
                    (path / name).mkdir(exist_ok=True)
                    shutil.copy2(tmp / name / "zarr.json", path / name / "zarr.json")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        report = verify_store(path)
    damaged = report.damaged_batches
    if damaged:
        group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        for b in damaged:
            group[PROGRESS][b] = 0
    if not quiet:
        restored = f"restored {', '.join(sorted(restore))} from the run's settings; " if restore else ""
        listed = [str(d) for d in report.damage if d.batch is not None]
        what = "; ".join(listed[:4]) + (f"; and {len(listed) - 4} more" if len(listed) > 4 else "")
        log.warning("repairing store %s: %srecomputing %d damaged batch(es) %s%s", path, restored, len(damaged),
                    damaged, f" ({what})" if what else "")
    return damaged


def _check_ids_against_digests(path, ids, attrs, skip=()) -> None:
    """Before restoring a damaged id coordinate from this run's ids: they must be the ids the store was written with
    (checked on every finished batch but those in ``skip``, whose digest record is itself damaged)."""
    group = _group(path)
    chunk = int(attrs["batch_size"])
    ids = list(ids)
    try:
        digests = group[DIGEST][...]
        done = ~np.isin(np.arange(digests.shape[0]), pending_batches(path))
    except Exception:
        return  # no readable digests: the damaged batches are recomputed whole
    key = digest_key(attrs)
    for b in np.flatnonzero(done):
        if b in skip:
            continue
        start, stop = b * chunk, min(len(ids), (b + 1) * chunk)
        if digests[b, 0] and _ids_digest(b, ids[start:stop], key) != int(digests[b, 0]):
            raise ValueError(f"store {path} holds different example ids than this run (batch {b}, examples "
                             f"{start}..{stop - 1}); use a new store path, or the same ids to resume")



try:  # xarray's backend protocol: ``xr.open_dataset("train.zarr", engine="sketcharray")``
    from xarray.backends import BackendEntrypoint as _BackendEntrypoint
except ImportError:  # pragma: no cover - xarray without the plugin interface
    _BackendEntrypoint = object


class SketchBackend(_BackendEntrypoint):
    """The ``sketcharray`` engine of :func:`xarray.open_dataset`: a sketch store opened by :func:`open_sketches`,
    with its checks (completeness, checksums, digests), lazily.

    Registered as the ``xarray.backends`` entry point ``sketcharray``; it is
    used only when asked for by name (a plain Zarr store stays xarray's).
    Options: ``allow_incomplete``, ``verify`` (as :func:`open_sketches`).
    """

    description = "sketcharray sketch stores (Zarr) with their checksums and digests verified"
    url = "https://github.com/sketcharray/sketcharray"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "allow_incomplete", "verify")

    def open_dataset(self, filename_or_obj, *, drop_variables=None, allow_incomplete: bool = False,
                     verify: bool = True) -> xr.Dataset:
        ds = open_sketches(filename_or_obj, allow_incomplete=allow_incomplete, verify=verify)
        return ds.drop_vars(list(drop_variables or ()), errors="ignore")

    def guess_can_open(self, filename_or_obj) -> bool:
        return False
