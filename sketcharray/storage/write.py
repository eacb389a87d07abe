"""Creating a store whole (on a local disk written beside it and renamed into place; on object storage uploaded
with its root metadata last) and writing one batch's rows, digests and done flag."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .. import __version__
from .layout import (DIGEST, PROGRESS, STORE_FORMAT, StoreError, _ids_digest, _jsonable, _numpy_dtype,
                     _rows_digest, chunk_codecs, digest_key, encode, ids_array)
from .location import locate
from .outputs import check_store_parent


# ----------------------------------------------------------------- creation
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
        ds.to_zarr(os.fspath(path), mode="w-", compute=False, zarr_format=3, consolidated=False, encoding=encoding)


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
    loc = locate(path)
    check_store_parent(loc)
    if not loc.is_local:
        return _create_remote(loc, skeleton)
    path = loc.path
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


def _create_remote(loc, skeleton: dict) -> None:
    """Object storage has no rename: the skeleton is written locally, then uploaded with its root ``zarr.json``
    last, so until the last request readers find no store there.  What a creator killed before that left (array
    metadata and coordinates of a skeleton, no root) is replaced; anything else under the prefix is refused."""
    with tempfile.TemporaryDirectory(prefix="sketcharray-skeleton-") as tmp:
        local = Path(tmp, loc.name)
        _write_skeleton(local, **skeleton)
        ours = {p.name for p in local.iterdir() if p.is_dir()}
        found = loc.objects()
        foreign = [k for k in found if k == "zarr.json" or k.split("/", 1)[0] not in ours
                   or not (k.endswith("zarr.json") or "/c/" in f"/{k}")]
        if foreign:
            raise StoreError(f"cannot create store {loc}: the prefix holds objects that are not part of a "
                             f"sketcharray store ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                             "choose another URL or remove them")
        if found:
            import logging

            logging.getLogger(__name__).warning("store %s: replacing the partial skeleton left by a creator that "
                                                "was stopped (%d objects)", loc, len(found))
            loc.remove_tree()
        loc.upload(local)


def _open_for_writing(loc):
    return zarr.open_group(loc.zarr_store(read_only=False), mode="r+", zarr_format=3)


# ------------------------------------------------------------------ writing
def write_batch(path, batch_index: int, start: int, stop: int, result: dict[str, np.ndarray], ids) -> None:
    """Write one batch's rows (whole chunks), then its digests, then flag the batch done.

    ``path``: a path, URL or Location; a Location bound to a writer lease (object storage) checks the lease
    before the rows and again before the done flag, and writes nothing once it is lost.
    """
    from .lock import check_lease

    loc = locate(path)
    check_lease(loc)
    group = _open_for_writing(loc)
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
    check_lease(loc)
    group[PROGRESS][batch_index] = 1
