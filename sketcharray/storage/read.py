"""Reading a store lazily with every chunk's checksum and digest checked, and checking a run against it."""

from __future__ import annotations

import collections
import json
import os
import threading
import warnings

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .layout import (DIGEST, IDENTITY_ATTRS, PROGRESS, StoreDamaged, StoreError, _SINCE_0_5, _ids_digest,
                     _jsonable, _rows_digest, decode_bfloat16, digest_key, ids_array)
from .location import locate
from .provenance import provenance, with_provenance


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

    loc = locate(path)
    for name, meta in [("", loc.child("zarr.json")), *((n, loc.child(n, "zarr.json")) for n in loc.children())]:
        try:  # the only arrays ever opened: the root's children
            doc = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            continue  # unreadable metadata is reported as damage where the array is opened
        if not isinstance(doc, dict) or doc.get("node_type") != "array":
            continue
        unsafe = sorted({str(n) for n in names(doc.get("codecs")) if n not in SAFE_CODECS})
        if unsafe:
            raise StoreError(f"store {loc}: {name or loc.name} uses codec(s) {unsafe}, which this package never "
                             f"writes and will not decode (allowed: {sorted(SAFE_CODECS)})")


def open_zarr_dataset(path, storage_options: dict | None = None) -> xr.Dataset:
    """``xarray.open_zarr`` for result folders this package wrote (spectra, HVP sketches), codecs checked first."""
    loc = locate(path, storage_options)
    check_codecs(loc)
    return xr.open_zarr(loc.zarr_store(), consolidated=False, zarr_format=3)


def read_attrs(path) -> dict | None:
    """The store's root attrs, or None when ``path`` holds no sketch store.

    Raises :class:`StoreDamaged` when the root metadata exists but cannot be read.
    """
    meta = locate(path).child("zarr.json")
    try:
        raw = meta.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except OSError as exc:
        raise StoreDamaged(path, "zarr.json", f"the root metadata is unreadable ({exc})") from None
    try:
        attrs = json.loads(raw).get("attributes", {})
    except (ValueError, AttributeError) as exc:
        raise StoreDamaged(path, "zarr.json", f"the root metadata is unreadable ({exc})") from None
    return dict(attrs) if "variable" in attrs and "sketch_spec" in attrs else None


def _group(path):
    return zarr.open_group(locate(path).zarr_store(), mode="r", zarr_format=3)


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


def _chunk_path(path, arr, batch: int):
    """The Location of a batch's chunk of ``arr``."""
    key = arr.metadata.encode_chunk_key((batch,) + (0,) * (arr.ndim - 1))
    return locate(path).child(arr.path, *key.split("/"))


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


def _read_block(path, variable, bounds, done, digests, decode, tail, out_dtype, key=b"", state=None,
                block_id=None):
    """One stored batch of one variable; a batch not yet written reads as missing (NaN, or False/0)."""
    batch = block_id[0]
    start, stop = bounds[batch]
    if not done[batch]:
        return np.full((stop - start, *tail), np.nan if np.issubdtype(out_dtype, np.floating) else 0,
                       dtype=out_dtype)
    return read_rows(path, variable, batch, start, stop, None if digests is None else digests[batch], decode,
                     arr=_opened_array(path, variable, state), key=key)


_OPENED: "collections.OrderedDict" = collections.OrderedDict()  # (location, name, state) -> zarr array
_OPENED_LOCK = threading.Lock()


def _opened_array(path, name: str, state, arr=None):
    """A variable's Zarr array, opened once per process and store state (``state``; :func:`open_sketches` hands
    over the arrays it opened): a lazy read then costs one request per chunk on object storage, not three."""
    key = (path, name, state)
    with _OPENED_LOCK:
        if arr is None and key in _OPENED:
            _OPENED.move_to_end(key)
            return _OPENED[key]
    arr = arr if arr is not None else _array(_group(path), path, name)
    with _OPENED_LOCK:
        _OPENED[key] = arr
        while len(_OPENED) > 64:
            _OPENED.popitem(last=False)
    return arr


def _read_whole(path, group, name) -> np.ndarray:
    arr = _array(group, path, name)
    try:
        return arr[...]
    except Exception as exc:
        raise StoreDamaged(path, name, f"corrupt or truncated ({type(exc).__name__}: {exc})") from None


def open_sketches(path, *, allow_incomplete: bool = False, verify: bool = True,
                  storage_options: dict | None = None) -> xr.Dataset:
    """Open a sketch store lazily (dask arrays, one chunk per stored batch).

    Parameters
    ----------
    path : str, Path or Location
        A local path or an fsspec URL (``s3://bucket/run.zarr``).
    allow_incomplete : bool
        Open a store whose run has not finished: its missing rows are NaN
        with ``valid`` False.  Otherwise an incomplete store raises.
    verify : bool
        Check each chunk read against the digest written with its batch
        (64 bits of SHA-256, about 2 GB/s per core); the CRC32C checksum of
        every chunk is checked either way.
    storage_options : dict, optional
        For a URL: fsspec's options (credentials, ``client_kwargs``'s
        ``endpoint_url``); never stored or shown.

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
    path = locate(path, storage_options)
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
    if parts is not None:
        try:
            digests = _read_whole(path, group, DIGEST)
        except StoreDamaged:
            if verify:
                raise
    if verify and digests is not None:
        for b in np.flatnonzero(done):
            start, stop = bounds[b]
            if _ids_digest(b, ids[start:stop], key) != int(digests[b, 0]):
                raise StoreDamaged(path, row_dim, "the ids do not match the digest written with the batch (the "
                                   "ids, the digest record or the store's attributes were changed)", b, start, stop)
    # the graph's names follow the store's state: a batch written or repaired since gives other keys
    stamp = (str(path.path.resolve()), os.stat(path.path / PROGRESS).st_mtime_ns) if path.is_local else path.url
    token = dask.base.tokenize(stamp, done, digests, verify)
    if not verify:
        digests = None
    data_vars = {}
    for name, arr in arrays.items():
        _opened_array(path, name, token, arr)
        decode = name == variable and attrs["storage_dtype"] == "bfloat16"
        col = None if digests is None else digests[:, parts.index(name)]
        chunks = (tuple(b - a for a, b in bounds),) + tuple((s,) for s in arr.shape[1:])
        dtype = np.float32 if decode else arr.dtype
        data = da.map_blocks(_read_block, path=path, variable=name, bounds=bounds, done=tuple(done.tolist()),
                             digests=col, decode=decode, tail=arr.shape[1:], out_dtype=dtype, key=key, state=token, dtype=dtype,
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
    arr = _group(path)[PROGRESS]
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
        stored = _read_whole(path, _group(path), existing.get("row_dim", "example"))
        if len(stored) != len(ids) or not np.array_equal(ids_array(stored), ids_array(ids)):
            raise ValueError(f"store {path} holds different example ids than this run ({len(stored)} vs {len(ids)} ids)")
