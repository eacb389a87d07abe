"""Verifying a store batch by batch, and preparing or repairing it for a run."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .layout import (DIGEST, PROGRESS, StoreDamaged, StoreError, _ids_digest, _rows_digest, decode_bfloat16,
                     digest_key, ids_array)
from .read import (_array, _batches, _group, _mismatch, _read_whole, check_codecs, check_compatible,
                   pending_batches, read_attrs, read_rows)
from .location import locate
from .write import _open_for_writing, _write_skeleton, create_store

log = logging.getLogger(__name__)


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


def verify_store(path, *, progress: bool = False, storage_options: dict | None = None) -> StoreReport:
    """Read every chunk of a store and check its checksum and its batch's digest.

    Returns a :class:`StoreReport` listing each damaged batch (variable,
    example range, what is wrong) and each array whose metadata or
    coordinates are damaged; it raises only when ``path`` is no store.
    Rerunning the call that wrote the store repairs what it lists.  ``path``: a path, URL or Location
    (``storage_options`` for a URL).
    """
    path = locate(path, storage_options)
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
    from ..core.progress import Progress

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
    loc = locate(path)
    report = verify_store(loc)
    if not report.verifiable or report.ok:
        return []
    attrs = read_attrs(loc)
    row_dim = attrs.get("row_dim", "example")
    restore = set(report.damaged_arrays) | ({row_dim} if any(d.variable == row_dim for d in report.damage) else set())
    if restore:
        # beside a local store; for object storage, in a local scratch folder
        scratch = (loc.path.parent / f".{loc.name}.repair-{os.getpid()}-{uuid.uuid4().hex[:8]}" if loc.is_local
                   else Path(tempfile.mkdtemp(prefix="sketcharray-repair-")))
        tmp = scratch if loc.is_local else scratch / loc.name
        try:
            _write_skeleton(tmp, **skeleton)
            if row_dim in restore or "sketch" in restore:
                _check_ids_against_digests(loc, skeleton["ids"], attrs,
                                           skip={d.batch for d in report.damage if d.variable == DIGEST})
            # only arrays the run's own skeleton has: a name read from the store (row_dim) never leads elsewhere
            for name in [n for n in restore if (tmp / n / "zarr.json").is_file() and Path(n).name == n]:
                if name in (row_dim, "sketch"):  # coordinates: written once at creation, copied whole
                    _replace_array(loc, tmp, name)
                elif loc.is_local:
                    (loc.path / name).mkdir(exist_ok=True)
                    shutil.copy2(tmp / name / "zarr.json", loc.path / name / "zarr.json")
                else:
                    loc.child(name, "zarr.json").write_bytes((tmp / name / "zarr.json").read_bytes())
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        report = verify_store(loc)
    damaged = report.damaged_batches
    if damaged:
        group = _open_for_writing(loc)
        for b in damaged:
            group[PROGRESS][b] = 0
    if not quiet:
        restored = f"restored {', '.join(sorted(restore))} from the run's settings; " if restore else ""
        listed = [str(d) for d in report.damage if d.batch is not None]
        what = "; ".join(listed[:4]) + (f"; and {len(listed) - 4} more" if len(listed) > 4 else "")
        log.warning("repairing store %s: %srecomputing %d damaged batch(es) %s%s", path, restored, len(damaged),
                    damaged, f" ({what})" if what else "")
    return damaged


def _replace_array(loc, skeleton_dir: Path, name: str) -> None:
    """Replace a store's array ``name`` whole by the skeleton's (a coordinate, written once at creation)."""
    if loc.is_local:
        shutil.rmtree(loc.path / name, ignore_errors=True)
        shutil.copytree(skeleton_dir / name, loc.path / name)
        return
    loc.child(name).remove_tree()
    loc.upload(skeleton_dir, names=[name])


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
