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
  through :mod:`sketcharray.storage.provenance`.

The layout, the lock, writing, reading and verification each live in a module of
:mod:`sketcharray.storage` (``layout``, ``lock``, ``write``, ``read``, ``verify``, ``backend``); this
module is their one import path.
"""

from __future__ import annotations

from .layout import (DIGEST, IDENTITY_ATTRS, PROGRESS, STORAGE_DTYPES, STORE_FORMAT, StoreDamaged,
                     StoreError, StoreLocked, chunk_codecs, decode_bfloat16, digest, digest_key, encode,
                     ids_array)
from .location import Location, LocationError, locate
from .lock import check_lease, writer_lock
from .write import create_store, write_batch
from .read import (SAFE_CODECS, check_codecs, check_compatible, open_sketches, open_zarr_dataset,
                   pending_batches, read_attrs, read_rows)
from .verify import Damage, StoreReport, prepare_store, repair_store, verify_store
from .backend import SketchBackend

__all__ = [
    'DIGEST', 'Damage', 'IDENTITY_ATTRS', 'Location', 'LocationError', 'check_lease', 'locate', 'PROGRESS', 'SAFE_CODECS', 'STORAGE_DTYPES', 'STORE_FORMAT',
    'SketchBackend', 'StoreDamaged', 'StoreError', 'StoreLocked', 'StoreReport', 'check_codecs',
    'check_compatible', 'chunk_codecs', 'create_store', 'decode_bfloat16', 'digest', 'digest_key',
    'encode', 'ids_array', 'open_sketches', 'open_zarr_dataset', 'pending_batches', 'prepare_store',
    'read_attrs', 'read_rows', 'repair_store', 'verify_store', 'write_batch', 'writer_lock'
]
