"""The store's layout: its variables and format, storage dtypes and codecs, digests, errors."""

from __future__ import annotations

import hashlib
import json

import numpy as np


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


def ids_array(ids) -> np.ndarray:
    arr = np.asarray(ids)
    return arr.astype(object) if arr.dtype.kind in "UST" else arr


def _jsonable(v):
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True)
    return "" if v is None else v
