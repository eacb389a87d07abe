"""Where results go: paths checked before anything is written, results written whole or not at all.

The package never deletes or overwrites anything it did not write:

* a path inside a Zarr store (a folder above it holds ``zarr.json``) is
  refused, whatever it names: writing there would replace part of a store;
* an existing result (a Zarr folder or netCDF file whose root attributes
  carry :data:`RESULT_ATTR`, written by :func:`write_result`) is replaced
  only when the caller says ``overwrite=True`` (the CLI's ``--overwrite``);
* a sketch store, any other file, and any non-empty folder are refused;
* a result is written into a temporary sibling and renamed into place, so
  a path holds the old result or the new one, never half of either.

Folders that a run fills over time and resumes (a spectrum ``--out``
folder, an intrinsic-dimension search folder, the demo's report folder)
are checked by :func:`check_folder`: they may not lie inside a store and
are created if absent; what they already hold is kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from .location import Location, place

logger = logging.getLogger(__name__)

#: the root attribute that marks a result of this package (its value says which kind)
RESULT_ATTR = "sketcharray_result"
#: text written into every PNG plot of this package (its ``Software`` chunk), so a plot can be replaced
PLOT_SOFTWARE = "sketcharray"


class OutputError(ValueError):
    """A path that output must not be written to (inside a store, or holding something else)."""


def enclosing_store(path) -> Path | None:
    """The Zarr store (or group) that ``path`` lies inside, or None: the nearest folder above ``path`` that holds
    ``zarr.json`` (for a URL, the nearest prefix, as a Location)."""
    path = place(path)
    if isinstance(path, Location):
        return next((p for p in path.parents() if p.child("zarr.json").is_file()), None)
    for parent in path.absolute().parents:
        if (parent / "zarr.json").is_file():
            return parent
    return None


def refuse_inside_store(path, what: str) -> None:
    """Refuse ``path`` (named in messages after ``what``) when it lies inside a Zarr store or below a file."""
    store = enclosing_store(path)
    if store is not None:
        raise OutputError(f"{what} {path} lies inside the Zarr store {store}; writing there would replace part of "
                          "that store: choose a path outside it")
    path = place(path)
    if isinstance(path, Location):
        return  # object storage has no files that folders could lie below
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{what} {path}: {parent} is a file, not a folder")
            break


def check_store_parent(path) -> None:
    """Refuse a store path below a regular file (``--out file.txt/s.zarr``) or inside another Zarr store, as a
    :class:`~sketcharray.storage.layout.StoreError`."""
    from .layout import StoreError

    try:
        refuse_inside_store(path, "cannot create store")
    except OutputError as exc:
        raise StoreError(str(exc)) from None


def result_kind(path) -> str | None:
    """The kind of result this package wrote at ``path`` (its :data:`RESULT_ATTR`), or None when it wrote none."""
    path = place(path)
    if isinstance(path, Location):
        try:
            return (json.loads(path.child("zarr.json").read_bytes()).get("attributes") or {}).get(RESULT_ATTR)
        except Exception:  # unreadable or absent: not a result this package can vouch for
            return None
    try:
        if path.is_dir():
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes") or {}
            if RESULT_ATTR not in attrs and {"sketch_spec", "iterations", "hvps"} <= set(attrs):
                return "spectrum"  # stored by sketcharray < 0.5, before results were marked
            return attrs.get(RESULT_ATTR)
        if path.is_file() and path.suffix == ".nc":
            import xarray as xr

            with xr.open_dataset(path) as ds:
                return ds.attrs.get(RESULT_ATTR)
    except Exception:  # unreadable: not a result this package can vouch for
        return None
    return None


def check_result_path(path, kind: str, *, overwrite: bool = False, what: str = "--out") -> Path:
    """Refuse ``path`` as the place of a new result of ``kind`` unless it is free, or (with ``overwrite``) a
    result of this package.  Call it before the work that produces the result."""
    path = place(path)
    if isinstance(path, Location):
        return _check_remote_result(path, overwrite=overwrite, what=what)
    refuse_inside_store(path, what)
    if not path.exists() and not path.is_symlink():
        return path
    if path.is_dir() and not any(path.iterdir()):
        return path
    have = result_kind(path)
    if have is None:
        from .read import read_attrs

        thing = ("a sketch store" if path.is_dir() and _quiet(read_attrs, path) is not None
                 else "a folder that is not a result of sketcharray" if path.is_dir()
                 else "a file that is not a result of sketcharray")
        raise OutputError(f"{what} {path} is {thing}; it would be replaced: choose a new path (nothing there was "
                          "changed)")
    if not overwrite:
        raise OutputError(f"{what} {path} holds an earlier result ({have}); pass --overwrite (overwrite=True) to "
                          "replace it, or choose a new path")
    return path


def _check_remote_result(loc, *, overwrite: bool, what: str):
    refuse_inside_store(loc, what)
    if loc.name.endswith(".nc"):
        raise OutputError(f"{what} {loc}: netCDF results are written to local paths; on object storage give a Zarr "
                          "name (e.g. result.zarr)")
    if not loc.objects():
        return loc
    have = result_kind(loc)
    if have is None:
        from .read import read_attrs

        thing = "a sketch store" if _quiet(read_attrs, loc) is not None else "objects that are not a result of sketcharray"
        raise OutputError(f"{what} {loc} holds {thing}; it would be replaced: choose a new URL (nothing there was "
                          "changed)")
    if not overwrite:
        raise OutputError(f"{what} {loc} holds an earlier result ({have}); pass --overwrite (overwrite=True) to "
                          "replace it, or choose a new URL")
    return loc


def _quiet(func, *args):
    try:
        return func(*args)
    except Exception:
        return None


def write_result(ds, path, kind: str | None = None, *, overwrite: bool = False) -> Path:
    """Write the Dataset ``ds`` at ``path`` as a result of ``kind`` (Zarr, or netCDF when ``path`` ends in
    ``.nc``), checked by :func:`check_result_path` and renamed into place once whole.

    On object storage (a URL or Location) the result is written locally, then uploaded with its root metadata
    last; an earlier result there is removed first, root metadata first: readers find the old result, none,
    or the new one, never part of either.
    """
    import warnings

    kind = kind or ds.attrs.get(RESULT_ATTR) or "result"
    check_result_path(path, kind, overwrite=overwrite)
    ds = ds.copy(deep=False)
    ds.attrs[RESULT_ATTR] = kind
    loc = place(path)
    if isinstance(loc, Location):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sketcharray-result-") as tmp:
            local = Path(tmp, "result.zarr")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=FutureWarning)
                ds.to_zarr(str(local), mode="w-", consolidated=False, zarr_format=3)
            if loc.objects():
                loc.remove_tree()
            loc.upload(local)
        return loc
    path = loc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if path.suffix == ".nc":
            ds.to_netcdf(tmp)
        else:
            with warnings.catch_warnings():  # zarr's note that fixed-width strings (names) lack a v3 spec
                warnings.simplefilter("ignore", category=FutureWarning)
                ds.to_zarr(str(tmp), mode="w-", consolidated=False, zarr_format=3)
        _swap_in(tmp, path)
    finally:
        _remove(tmp)
    return path


def leftovers(path, *tags: str) -> list[Path]:
    """The hidden siblings this package names ``.NAME.TAG-[PID-]HEX8`` beside ``path`` (a store's or a state's
    temporary copy, left by a process killed while it wrote): only names of exactly that form, which nothing but
    this package makes, so removing them never touches a user's file."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:{'|'.join(map(re.escape, tags))})-(?:\d+-)?[0-9a-f]{{8}}$")
    return [p for p in path.parent.glob(f".{path.name}.*") if pattern.match(p.name)]


def _swap_in(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an earlier result there (already checked as replaceable) goes only after."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if path.is_dir():
            path.rmdir()
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _remove(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_folder(path, what: str = "--out") -> Path:
    """A folder that a run fills and resumes (spectra, searches, the demo): not inside a store, not a file; what
    it holds is kept (the run adds its own entries and never removes others).  A URL comes back as a Location."""
    path = place(path)
    if isinstance(path, Location):
        refuse_inside_store(path, what)
        if path.child("zarr.json").is_file():
            raise OutputError(f"{what} {path} is a Zarr store; expected a prefix of results (new, or one this "
                              "command wrote before)")
        return path
    refuse_inside_store(path, what)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file; expected a folder (new, or one this command wrote before)")
    if (path / "zarr.json").is_file():
        raise OutputError(f"{what} {path} is a Zarr store; expected a folder of results (new, or one this command "
                          "wrote before)")
    return path


def remove_folder(path) -> None:
    """Remove a folder this package wrote (a solver state once its result is stored): a local tree, or every
    object below a prefix, root metadata first."""
    path = place(path)
    if isinstance(path, Location):
        path.remove_tree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def check_file(path, *, suffixes: tuple[str, ...], marker: bytes, what: str) -> Path:
    """A file the package writes whole and may replace (a plot, a benchmark's JSON): refused inside a store, and
    when it exists but does not hold ``marker`` (it was not written by this package)."""
    path = Path(path)
    refuse_inside_store(path, what)
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"{what} {path}: expected a file name ending in {' or '.join(suffixes)}")
    if path.exists():
        if not path.is_file():
            raise OutputError(f"{what} {path} is a folder; expected a file")
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if marker not in head:
            raise OutputError(f"{what} {path} exists and was not written by sketcharray; choose a new path (it was "
                              "left unchanged)")
    return path


def save_figure(fig, path, *, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG at ``path`` (checked by :func:`check_file`), marked as this package's."""
    path = check_file(path, suffixes=(".png",), marker=PLOT_SOFTWARE.encode(), what="plot")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png", metadata={"Software": PLOT_SOFTWARE})
    return path
