"""The on-disk layout of sketch stores: Zarr v3 through xarray, filled batch by batch.

A store holds, along ``example``: ``grad`` (example, sketch), ``loss``,
``valid`` and, when the data carry labels, ``label``; along ``batch``:
``batch_done``, the progress record.  Metadata and coordinates are written
once by :func:`create_store` (one writer, ``xarray.Dataset.to_zarr`` with
``compute=False``); each batch is then written as whole Zarr chunks (the
chunking of every ``example`` variable is the batch size, so no two batches
share a chunk) and only then flagged done.  A run killed at any point leaves
at worst a batch written but not flagged, which a resumed run recomputes and
rewrites with identical values.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from . import __version__

PROGRESS = "batch_done"
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
#: attrs that must agree for a run to resume into an existing store
IDENTITY_ATTRS = ("param_names", "param_sizes", "model_fingerprint", "sketch_spec", "mode",
                  "n_examples", "batch_size", "storage_dtype", "checkpoint", "variable")


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


def create_store(path, *, variable: str, row_dim: str, n_rows: int, n_out: int, chunk: int, ids,
                 has_label: bool, label_dtype=None, storage_dtype: str = "float32",
                 attrs: dict[str, Any], compressors="default") -> None:
    """Pre-allocate a store: metadata, coordinates and an all-zero progress record.

    ``compressors=None`` stores the sketches uncompressed (random-looking
    floats barely compress; reading them is then pure I/O).
    """
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
    ds = xr.Dataset(data_vars, coords={row_dim: _ids_array(ids), "sketch": np.arange(n_out)})
    ds.attrs.update({k: _jsonable(v) for k, v in attrs.items()})
    ds.attrs.update(storage_dtype=storage_dtype, sketcharray_version=__version__,
                    variable=variable, row_dim=row_dim)
    encoding = {PROGRESS: {"chunks": (1,)}}
    if compressors != "default":
        encoding[variable] = {"compressors": compressors}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        ds.to_zarr(str(path), mode="w", compute=False, zarr_format=3, consolidated=False, encoding=encoding)


def _ids_array(ids) -> np.ndarray:
    arr = np.asarray(ids)
    return arr.astype(object) if arr.dtype.kind in "US" else arr


def _jsonable(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v


def write_batch(path, batch_index: int, start: int, stop: int, result: dict[str, np.ndarray]) -> None:
    """Write one batch's rows (whole chunks), then flag the batch done."""
    group = zarr.open_group(str(path), mode="r+", zarr_format=3)
    storage_dtype = group.attrs["storage_dtype"]
    for name, values in result.items():
        if name == group.attrs["variable"]:
            values = encode(values, storage_dtype)
        group[name][start:stop] = values
    group[PROGRESS][batch_index] = 1


def read_attrs(path) -> dict | None:
    """The store's attrs, or None when ``path`` holds no sketch store."""
    if not Path(path).exists():
        return None
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return None
    return dict(group.attrs) if PROGRESS in group else None


def pending_batches(path) -> np.ndarray:
    """Indices of batches not yet flagged done."""
    group = zarr.open_group(str(path), mode="r", zarr_format=3)
    return np.flatnonzero(group[PROGRESS][:] == 0)


def check_compatible(path, existing: dict, wanted: dict, ids=None) -> None:
    """Raise ValueError naming both values when a store was made by a different run."""
    for key in IDENTITY_ATTRS:
        have, want = existing.get(key), _jsonable(wanted.get(key))
        if key in wanted and have != want:
            raise ValueError(
                f"store {path} was written with {key}={have!r}, but this run has {key}={want!r}; "
                "use a new store path, or the same sketch, parameters and model to resume"
            )
    if ids is not None:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
        stored = group[existing.get("row_dim", "example")][:]
        if len(stored) != len(ids) or not np.array_equal(np.asarray(stored, dtype=object), np.asarray(ids, dtype=object)):
            raise ValueError(f"store {path} holds different example ids than this run ({len(stored)} vs {len(ids)} ids)")


def open_sketches(path, *, allow_incomplete: bool = False) -> xr.Dataset:
    """Open a sketch store lazily (dask arrays, chunks aligned with the stored batches).

    Decodes the storage dtype (float16/bfloat16 become float32 lazily), parses
    the JSON attrs, and checks the progress record: an incomplete store
    raises ``ValueError`` unless ``allow_incomplete`` (then its missing rows
    are NaN with ``valid`` False).
    """
    attrs = read_attrs(path)
    if attrs is None:
        raise ValueError(f"{path} is not a sketcharray store (no {PROGRESS!r} progress record found)")
    ds = xr.open_zarr(str(path), consolidated=False, zarr_format=3)
    done = ds[PROGRESS].values
    if not done.all() and not allow_incomplete:
        raise ValueError(
            f"store {path} is incomplete: {int((done == 0).sum())} of {done.size} batches not written; "
            "rerun the same call to resume, or pass allow_incomplete=True"
        )
    row_dim = attrs.get("row_dim", "example")
    if ds[row_dim].dtype.kind in "TUS":  # string ids as Python objects, as the caller gave them
        ds = ds.assign_coords({row_dim: ds[row_dim].values.astype(object)})
    variable = attrs["variable"]
    if attrs["storage_dtype"] == "bfloat16":
        v = ds[variable]
        ds[variable] = v.copy(data=da.map_blocks(decode_bfloat16, v.data, dtype=np.float32))
    for key in ("sketch_spec", "param_names", "param_sizes"):
        if isinstance(ds.attrs.get(key), str):
            ds.attrs[key] = json.loads(ds.attrs[key])
    return ds
