"""The CPU backend: where a computation runs, and everything the compiled kernels need.

The operators are written once against the array API (numpy, torch, cupy
through ``array_api_compat``); this module is the one place that decides when
host arrays take the compiled CPU kernels instead (:func:`compiled`), and it
holds what those kernels need: the pool of host threads, cache sizes read
from the machine, per-thread scratch buffers, the blocked FWHT
(:func:`kron_hadamard`, driving ``_fwht_cpu``'s numba kernels), the compiled
leading contraction.  AFFD's fused host path, which also needs the Kronecker
products of ``transforms``, is ``fused.affd_apply`` (so this module imports no
other module of the package).  None of it changes a result: every path computes the same matrix products, and the
split of work over threads never changes how any entry is summed.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


# ----------------------------------------------------------------- dispatch
def library(x):
    """The array library of ``x``: numpy, torch or cupy (by its type, without importing the others)."""
    name = type(x).__module__.split(".")[0]
    if name == "torch":
        import torch

        return torch
    if name == "cupy":
        import cupy

        return cupy
    return np


def device_of(x):
    """The device of ``x`` (array API)."""
    from array_api_compat import device

    return device(x)


def host_array(x):
    """A zero-copy numpy view of ``x`` if the compiled CPU kernels may read it, else None.

    numpy arrays and plain CPU torch tensors outside autograd qualify; GPU
    arrays, tensors that require grad and tensors wrapped by ``torch.func``
    transforms do not (they stay on the array-API path).
    """
    lib = library(x)
    if lib is np:
        return x
    if lib.__name__ != "torch" or x.device.type != "cpu" or x.requires_grad:
        return None
    try:
        return x.numpy()
    except (RuntimeError, TypeError):  # functorch-wrapped tensors have no storage to share
        return None


def compiled(*arrays) -> bool:
    """Whether a computation on ``arrays`` runs on the compiled CPU kernels: every array given (None is
    skipped) is a host array (:func:`host_array`).  GPU arrays, tensors in autograd and tensors inside
    ``torch.func`` transforms take the array-API path; the numbers are the same either way."""
    return all(a is None or host_array(a) is not None for a in arrays)


# ------------------------------------------------------------------ threads
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
#: the names of the pool's threads start with this
_POOL_PREFIX = "sketcharray-kernels"


def cores() -> int:
    """Threads the compiled kernels may use: the cores this process may run on, or fewer where
    ``OMP_NUM_THREADS`` says so -- the share a scheduler gives a process (dask's worker processes get 1, as
    torch and BLAS there do: a pool of all cores in each of several workers would oversubscribe them)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        budget = int(os.environ.get("OMP_NUM_THREADS", "") or n)
    except ValueError:
        budget = n
    return max(1, min(n, budget))


def run_ranges(run, bounds) -> None:
    """``run(a, b)`` for each consecutive pair of ``bounds``, on the shared pool; returns when all are done.

    Callers must not be pool threads themselves (the work would wait on its own pool).
    """
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=cores(), thread_name_prefix=_POOL_PREFIX)
    for f in [_POOL.submit(run, a, b) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()


#: entries below which a transform runs on one core (a thread hand-off costs more than it saves), and
#: below which a leading contraction is left to numpy (no compiled kernel to load for a small job)
SPLIT_MIN = 1 << 18


def split_work(units: int, run, entries: int) -> None:
    """``run(u0, u1)`` over ``[0, units)``, split over the shared pool's threads (the kernels release the GIL).

    From any thread but the pool's own (a pool thread would wait on its own pool): a dask worker thread
    sketching its chunk uses every core the pool has, and however many threads call at once, no more than
    ``cores()`` run kernels.  The split never changes a result: each unit is computed alone.  Below
    ``SPLIT_MIN`` entries the work runs on the calling thread (a hand-off costs more than it saves).
    """
    inside = threading.current_thread().name.startswith(_POOL_PREFIX)
    parts = min(cores(), units) if not inside and entries >= SPLIT_MIN else 1
    if parts <= 1:
        run(0, units)
        return
    run_ranges(run, [units * j // parts for j in range(parts + 1)])


# -------------------------------------------------------- caches and buffers
def cache_bytes(level: int = 2, default: int = 1 << 19) -> int:
    """Size of this machine's per-core data cache at ``level`` (Linux sysfs), or ``default`` where unknown."""
    import glob

    for folder in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{folder}/level") as f_level, open(f"{folder}/type") as f_type, open(f"{folder}/size") as f_size:
                if int(f_level.read()) != level or f_type.read().strip() == "Instruction":
                    continue
                text = f_size.read().strip().upper()
        except (OSError, ValueError):
            continue
        scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
        try:
            return int(text.rstrip("KM")) * scale
        except ValueError:
            return default
    return default


#: entries of the lowest group of factors one pass of the blocked FWHT keeps in cache: an L2 cache of float32
#: (two passes over memory up to N = 2^28 with 64-point factors where L2 holds 1 MiB), at most 2^20
FWHT_BLOCK = 1 << min(20, max(13, (cache_bytes(2) // 4).bit_length() - 1))
#: entries the lower stages of the lowest group run on at a time: a quarter of an L1 data cache of float32
FWHT_L1_BLOCK = 1 << min(14, max(8, (cache_bytes(1, 1 << 15) // 16).bit_length() - 1))
#: entries of a higher (strided) group of factors
FWHT_STRIDED_BLOCK = 1 << 10
#: bytes of the buffer of a strided pass (group entries x columns moved at a time): a quarter of a 1 MiB L2
#: cache; wider blocks amortise the page walk of each strided row (64 x 1024 float32 runs at 1.8x a
#: memcpy where 64 x 256 took 2.1x and 64 x 64 4x, on the 2-core EPYC of docs/benchmarks.md)
FWHT_STRIDED_BYTES = 1 << 18
#: the most columns a strided pass moves at a time
FWHT_STRIDED_WIDTH = 2048


_SCRATCH = threading.local()
#: largest scratch buffer kept between calls (one per thread)
SCRATCH_BYTES = 1 << 29


def scratch_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised host array that this thread reuses between calls.

    For intermediates consumed before the next call on the same thread: a
    fresh allocation of hundreds of MiB costs a page fault per page (or a
    compaction for huge pages) each time, as much as a pass of the transform.
    Buffers above ``SCRATCH_BYTES`` are not kept.
    """
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    held = getattr(_SCRATCH, "buffer", None)
    if held is not None and held.nbytes >= size:
        return held[:size].view(dtype).reshape(shape)
    buf = np.empty(size, dtype=np.uint8)
    if size <= SCRATCH_BYTES:
        _SCRATCH.buffer = buf
    return buf.view(dtype).reshape(shape)


# --------------------------------------------------------------- the FWHT
def fwht_groups(factors: tuple[int, ...]) -> list[tuple[int, int]]:
    """Passes of the blocked FWHT: ranges ``[k0, k1)`` of consecutive factors, lowest (last) first.

    The lowest group is as many trailing factors as fit in ``FWHT_BLOCK``
    entries (at least one); each higher group as many as fit in
    ``FWHT_STRIDED_BLOCK``.  Groups never split a factor, so a factor's
    permutation stays inside one pass.
    """
    groups, k1, limit = [], len(factors), FWHT_BLOCK
    while k1 > 0:
        k0, size = k1 - 1, factors[k1 - 1]
        while k0 > 0 and size * factors[k0 - 1] <= limit:
            k0 -= 1
            size *= factors[k0]
        groups.append((k0, k1))
        k1, limit = k0, FWHT_STRIDED_BLOCK
    return groups


def _digit_index(factors, perms) -> np.ndarray:
    # Row-major gather index of a group: index[i_1..i_k] = sum_j perm_j[i_j] * stride_j.
    index = np.zeros(1, dtype=np.int64)
    for b, p in zip(factors, perms):
        index = (index[:, None] * b + (np.arange(b) if p is None else np.asarray(p))[None, :]).reshape(-1)
    return index


def _two_level(index: np.ndarray, low: int) -> tuple[np.ndarray, np.ndarray]:
    # A digit-wise gather index as (hi, lo) with index[i] = hi[i // low] + lo[i % low] (the last factor is `low`).
    # The last digit is a permutation of range(low), so each run's smallest entry is its higher part.
    runs = index.reshape(-1, low)
    hi = runs.min(axis=1)
    return np.ascontiguousarray(hi), np.ascontiguousarray(runs[0] - hi[0])


def kron_hadamard(x: np.ndarray, factors: tuple[int, ...], perms=None, *, permute: str | None = None,
                  transpose: bool = False, d_in=None, d_out=None, periodic: bool = False,
                  scratch: bool = False, out: np.ndarray | None = None, lead: np.ndarray | None = None) -> np.ndarray:
    """``d_out * M pad(d_in * x)`` (or with ``M^T``) for the Kronecker Hadamard ``M = F_1 x ... x F_K``.

    ``F_k`` is the orthonormal Sylvester Hadamard ``H_{b_k}`` with its rows
    (``permute="rows"``: ``H[perm_k]``) or columns (``"cols"``:
    ``H[:, perm_k]``) permuted, or unpermuted -- the same matrix
    :func:`kron_apply` multiplies by the dense factors, computed with
    butterflies instead (``log2 N`` additions per entry instead of
    ``sum b_k`` multiply-adds) in a few cache-blocked passes: the fast
    Walsh-Hadamard transform.  Host (numpy) arrays only; compiled with numba
    on first use.

    Parameters
    ----------
    x : numpy.ndarray (B, n), float32 or float64, n <= prod(factors)
        (zero-padded); with ``periodic``, n a power of two dividing
        prod(factors) and the input is ``x`` repeated to the full length.
    perms : sequence of index arrays (or None), one per factor
    d_in : array (n,), optional; a diagonal applied to ``x`` before padding
    d_out : array (<= prod(factors),), optional; a diagonal applied to the
        result's first ``len(d_out)`` entries (the others are left as they are)
    scratch : bool
        Write the result into this thread's scratch buffer (see
        :func:`scratch_buffer`), for a result the caller consumes before its
        next call: a fresh array of this size costs the kernel page faults.
    out : numpy.ndarray (B, prod(factors)), optional
        Where to write the result (C-contiguous, the dtype of ``x``).
    lead : numpy.ndarray (r, prod(factors[:k])), optional
        A matrix applied along the leading ``k`` factors of the result
        (``lead x I``), the first step of a truncated Kronecker product that
        follows the transform.  Where the transform's last pass covers
        exactly those factors it is fused into that pass, which then writes
        ``r`` rows instead of ``prod(factors[:k])``; ``out`` (or the scratch
        buffer) is then only a work area.

    Returns
    -------
    numpy.ndarray (B, prod(factors)), the dtype of ``x``; with ``lead``,
    (B, r * prod(factors[k:]))
    """
    from . import _fwht_cpu as kernels

    src = np.ascontiguousarray(x)
    if src.ndim != 2:
        raise ValueError(f"x must be 2-D (batch, n); got shape {src.shape}")
    n_full = math.prod(factors)
    n = src.shape[1]
    if n > n_full or (periodic and (n & (n - 1) or n_full % n)):
        raise ValueError(f"x has {n} columns; the transform has length {n_full}"
                         + (" (a periodic input needs a power of two that divides it)" if periodic else ""))
    perms = [None] * len(factors) if perms is None or permute is None else list(perms)
    # F = H[perm] gathers the transform's outputs; F = H[:, perm] gathers its inputs through perm^-1;
    # transposing swaps the two (H is symmetric).
    gather_out = (permute == "rows") != transpose
    perms = [None if p is None else np.asarray(p) for p in perms]  # host arrays (torch's __array_wrap__ is deprecated)
    inverse = [None if p is None else np.argsort(p) for p in perms]
    dtype = src.dtype
    empty = np.zeros(0, dtype=dtype)
    di = empty if d_in is None else np.ascontiguousarray(d_in, dtype=dtype)
    do = empty if d_out is None else np.ascontiguousarray(d_out, dtype=dtype)
    groups = fwht_groups(tuple(factors))
    batch = src.shape[0]
    if out is None:
        out = scratch_buffer((batch, n_full), dtype) if scratch else np.empty((batch, n_full), dtype=dtype)
    elif out.shape != (batch, n_full) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {dtype} array of shape {(batch, n_full)}; "
                         f"got {out.dtype} {out.shape}")
    scale = 1.0 / math.sqrt(n_full)
    fused = lead is not None and len(groups) > 1 and groups[-1][0] == 0 and (
        int(lead.shape[1]) == math.prod(factors[: groups[-1][1]]))
    for i, (k0, k1) in enumerate(groups):
        none = [None] * (k1 - k0)
        in_idx = _digit_index(factors[k0:k1], none if gather_out else inverse[k0:k1])
        out_idx = _digit_index(factors[k0:k1], perms[k0:k1] if gather_out else none)
        g, q = int(in_idx.size), math.prod(factors[k1:])
        last = i == len(groups) - 1
        s, d, has_d = (scale, do, d_out is not None) if last else (1.0, empty, False)
        if i == 0:
            same_in, same_out = (bool(np.array_equal(idx, np.arange(g))) for idx in (in_idx, out_idx))
            n_in, mask = (n_full, n - 1) if periodic else (n, n_full - 1)
            (in_hi, in_lo), (out_hi, out_lo) = (_two_level(idx, factors[k1 - 1]) for idx in (in_idx, out_idx))
            split_work(batch * (n_full // g), lambda u0, u1: kernels.contiguous_pass(
                src, n_in, mask, di, d_in is not None, out, u0, u1, g, min(g, FWHT_L1_BLOCK), in_hi, in_lo, same_in,
                out_hi, out_lo,
                same_out, s, d, has_d), out.size)
        else:
            width = min(q, max(16, min(FWHT_STRIDED_WIDTH, FWHT_STRIDED_BYTES // (g * dtype.itemsize))))
            units = batch * (n_full // (g * q)) * -(-q // width)
            if last and fused:
                mat = np.ascontiguousarray(lead, dtype=dtype)
                red = np.empty((batch, int(mat.shape[0]), q), dtype=dtype)
                split_work(units, lambda u0, u1: kernels.strided_lead_pass(out, u0, u1, g, q, width, in_idx, out_idx,
                                                                       s, d, has_d, mat, red), out.size)
                return red.reshape(batch, -1)
            split_work(units, lambda u0, u1: kernels.strided_pass(out, u0, u1, g, q, width, in_idx, out_idx, s, d,
                                                              has_d), out.size)
    if lead is not None:
        width = int(lead.shape[1])
        if width not in {math.prod(factors[:k]) for k in range(1, len(factors) + 1)}:
            raise ValueError(f"lead has {width} columns; expected a product of leading factors of {factors}")
        return signed_contraction(np, out, lead, None, n_full // width).reshape(batch, -1)
    return out


def warm_up(dtype) -> None:
    """Compile (or load from numba's cache) the FWHT kernels for ``dtype`` (float32 or float64)."""
    x = np.ones((1, 64), dtype=np.dtype(str(dtype).rsplit(".", 1)[-1]))
    kron_hadamard(x, (8, 8), [np.arange(8)] * 2, permute="rows", d_in=x[0], d_out=x[0])
    kron_hadamard(x[:, :8], (8, 8), transpose=True, periodic=True)


# ------------------------------------------------- the leading contraction
#: entries of the running sums one unit of the compiled leading contraction keeps: an L2 cache of float32
_CONTRACTION_ACC = FWHT_BLOCK
#: the most rows the compiled leading contraction takes: past that BLAS's matrix products are faster
#: (QK at N = 2^24, D = 2^12 contracts with 64 rows: 12.5x a memcpy compiled, 3.1x through BLAS)
CONTRACTION_ROWS = 8
#: the most columns one unit sums: longer runs read from each slice keep the hardware prefetcher ahead
#: (at N = 2^24, B = 8 on the 2-core EPYC: 0.47x a memcpy with 32768 columns, 0.71x with 2048)
_CONTRACTION_WIDTH = 1 << 15


def signed_contraction(xp, x: np.ndarray, m: np.ndarray, signs, rest: int):
    # leading_contraction on host arrays with the compiled kernel; the result is returned in x's library
    from . import _fwht_cpu as kernels

    src = np.ascontiguousarray(x)
    batch, n = src.shape
    mat = np.ascontiguousarray(m, dtype=src.dtype)
    r = int(mat.shape[0])
    sg = np.zeros(0, dtype=src.dtype) if signs is None else np.ascontiguousarray(signs, dtype=src.dtype)
    out = np.empty((batch, r, rest), dtype=src.dtype)
    width = max(16, min(_CONTRACTION_WIDTH, _CONTRACTION_ACC // (batch * r)) // 16 * 16)
    units = -(-rest // width)
    split_work(units, lambda u0, u1: kernels.signed_contraction(src, n, sg, signs is not None, mat, out, u0, u1, width),
           src.size)
    return xp.asarray(out) if xp is not np else out


# ------------------------------------------------------------ AFFD, fused
