"""xarray's backend protocol: ``xr.open_dataset(path, engine="sketcharray")`` opens a store with its checks."""

from __future__ import annotations

import xarray as xr

from .read import open_sketches


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
