"""Orthogonal transforms the sketches are composed of (SPEC.md, "Notation").

* Kronecker products of small dense matrices applied factor by factor to the
  reshaped input (the Kronecker Hadamard ``H_N = H_{b1} x ... x H_{bK}`` and
  Kronecker products of Haar-random orthogonal matrices), optionally keeping
  only the first ``D`` outputs ``R_D`` -- computed without the rest;
* the orthonormal discrete Hartley transform through the FFT;
* small helpers for padding, sizes and scatter-adds.

All functions take the array namespace ``xp`` of their input (numpy, torch or
cupy through ``array_api_compat``).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from . import random as rnd

#: Largest Kronecker factor of the Hadamard and orthogonal preconditioners.
MAX_FACTOR = 1024


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def pow2_factors(n_pad: int, max_factor: int) -> tuple[int, ...]:
    """Split a power of two into the fewest, most balanced power-of-two factors <= max_factor."""
    bits = n_pad.bit_length() - 1
    max_bits = max_factor.bit_length() - 1
    k = max(1, math.ceil(bits / max_bits))
    base, extra = divmod(bits, k)
    return tuple(1 << (base + (1 if i < extra else 0)) for i in range(k))


def hadamard(b: int, *, dtype=np.float64) -> np.ndarray:
    """Orthonormal Sylvester-Walsh-Hadamard matrix of size ``b`` (a power of two)."""
    i = np.arange(b)
    parity = np.zeros((b, b), dtype=np.int64)
    anded = i[:, None] & i[None, :]
    while anded.any():
        parity ^= anded & 1
        anded >>= 1
    return ((1 - 2 * parity) / math.sqrt(b)).astype(dtype)


def haar_orthogonal(key, b: int, rows: int | None = None) -> np.ndarray:
    """First ``rows`` rows of a Haar-random ``b x b`` orthogonal matrix (float64, host).

    The transpose of the Q factor of a ``b x rows`` Gaussian matrix from the
    project's generator (column ``j`` holds draws ``j*b .. (j+1)*b - 1``),
    with the signs of ``R``'s diagonal folded into ``Q`` so that the
    distribution is exactly Haar (uniform on the Stiefel manifold).  A thin
    QR: ``O(b rows^2)`` work, and fewer rows are the first rows of more.
    """
    r = b if rows is None else rows
    z = rnd.normal(np, key, 0, b * r).reshape(r, b).T
    q, upper = np.linalg.qr(z)
    q *= np.sign(np.diag(upper))[None, :]
    return np.ascontiguousarray(q.T)


def kept_rows(factors: tuple[int, ...], n_out: int) -> tuple[int, ...]:
    """Rows of each Kronecker factor needed for the first ``n_out`` outputs (row-major).

    Leading factors whose whole block of trailing outputs exceeds ``n_out``
    need only row 0; the first factor that ``n_out`` cuts needs
    ``ceil(n_out / trailing)`` rows; later factors need all rows.  The product
    set of kept rows, flattened row-major, begins with the first ``n_out``
    outputs.
    """
    rows = []
    cut = False
    for k, b in enumerate(factors):
        trailing = math.prod(factors[k + 1 :])
        if cut:
            rows.append(b)
        elif n_out <= trailing:
            rows.append(1)
        else:
            rows.append(min(b, -(-n_out // trailing)))
            cut = True
    return tuple(rows)


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


#: entries below which a transform runs on one core (a thread hand-off costs more than it saves), and
#: below which a leading contraction is left to numpy (no compiled kernel to load for a small job)
_SPLIT_MIN = 1 << 18

#: working-set size of the fused sign-and-pad leading contraction
_BLOCK_BYTES = 1 << 28


def leading_contraction(xp, x, m, n_pad: int, signs=None):
    """``m`` applied along the leading Kronecker axis of ``pad(x * signs)``, without forming it.

    ``x`` is (B, n) with n <= n_pad; the rows are read once, a block of
    leading slices at a time, so neither the sign-flipped nor the padded copy
    of the input is ever allocated.  Returns (B, r, n_pad // b).  With few
    rows ``r`` (a pass bound by memory) host arrays go through a compiled
    kernel that reads each entry once and keeps the running sums in cache;
    otherwise (bound by arithmetic, which BLAS does best) through blocked
    matrix products.
    """
    batch, n = int(x.shape[0]), int(x.shape[1])
    rest = n_pad // int(m.shape[1])
    host = [host_array(a) for a in (x, m, signs if signs is not None else x)]
    if (int(m.shape[0]) <= _CONTRACTION_ROWS and batch * n >= _SPLIT_MIN and all(h is not None for h in host)
            and host[0].dtype in (np.float32, np.float64)):
        return _signed_contraction(xp, host[0], host[1], None if signs is None else host[2], rest)
    full, tail = divmod(n, rest)
    group = max(1, _BLOCK_BYTES // max(1, batch * rest * 4))
    out = None
    for g0 in range(0, full + (1 if tail else 0), group):
        g1 = min(full + (1 if tail else 0), g0 + group)
        xs = x[:, g0 * rest : min(n, g1 * rest)]
        if signs is not None:
            xs = xs * signs[g0 * rest : min(n, g1 * rest)]
        if g1 * rest > n:
            xs = pad_columns(xp, xs, (g1 - g0) * rest)
        part = xp.matmul(m[:, g0:g1], xp.reshape(xs, (batch, g1 - g0, rest)))
        out = part if out is None else out + part
    return out


#: entries of the running sums one unit of the compiled leading contraction keeps: an L2 cache of float32
_CONTRACTION_ACC = FWHT_BLOCK
#: the most rows the compiled leading contraction takes: past that BLAS's matrix products are faster
#: (QK at N = 2^24, D = 2^12 contracts with 64 rows: 12.5x a memcpy compiled, 3.1x through BLAS)
_CONTRACTION_ROWS = 8
#: the most columns one unit sums: longer runs read from each slice keep the hardware prefetcher ahead
#: (at N = 2^24, B = 8 on the 2-core EPYC: 0.47x a memcpy with 32768 columns, 0.71x with 2048)
_CONTRACTION_WIDTH = 1 << 15


def _signed_contraction(xp, x: np.ndarray, m: np.ndarray, signs, rest: int):
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
    _split(units, lambda u0, u1: kernels.signed_contraction(src, n, sg, signs is not None, mat, out, u0, u1, width),
           src.size)
    return xp.asarray(out) if xp is not np else out


def kron_apply(xp, x, mats, *, transpose: bool = False, signs=None):
    """Apply ``mats[0] x mats[1] x ...`` to the rows of ``x``.

    Parameters
    ----------
    x : array, shape (B, n) with n <= prod(in_sizes)
        Rows in row-major Kronecker order; shorter rows are zero-padded
        implicitly.
    signs : array (n,), optional
        A sign (or any) diagonal applied to ``x`` first, fused with the
        padding into the first contraction when that contraction shrinks
        the data (a truncated leading factor).
    mats : sequence of arrays, ``mats[k]`` of shape (r_k, b_k)
        The factors; with ``transpose=True`` their transposes are applied
        (``x`` then has ``prod(r_k)`` columns and the result ``prod(b_k)``).

    Returns
    -------
    array, shape (B, prod(out_sizes))

    Notes
    -----
    Factors that shrink the data most are contracted first, so a truncated
    transform (``R_D``) costs about one pass over the input.  Each
    contraction is one batched matrix product on a (pre, b, post) view.
    """
    ops = [xp.matrix_transpose(m) if transpose else m for m in mats]
    dims = [int(m.shape[1]) for m in ops]
    batch = int(x.shape[0])
    order = sorted(range(len(ops)), key=lambda k: int(ops[k].shape[0]) / dims[k])
    n_full = math.prod(dims)
    if order[0] == 0 and int(ops[0].shape[0]) < dims[0]:
        x = leading_contraction(xp, x, ops[0], n_full, signs)
        dims[0] = int(ops[0].shape[0])
        order = order[1:]
    else:
        if signs is not None:
            x = x * signs
        x = pad_columns(xp, x, n_full)
    for k in order:
        m = ops[k]
        r, b = int(m.shape[0]), dims[k]
        pre = batch * math.prod(dims[:k])
        post = math.prod(dims[k + 1 :])
        if post == 1:
            x = xp.matmul(xp.reshape(x, (pre, b)), xp.matrix_transpose(m))
        else:
            x = xp.matmul(m, xp.reshape(x, (pre, b, post)))
        dims[k] = r
    return xp.reshape(x, (batch, math.prod(dims)))


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





def _split(units: int, run, entries: int) -> None:
    # Run ``run(u0, u1)`` over [0, units): split across the cores from the main thread (the kernels
    # release the GIL); on one core from any other thread, where dask already runs one chunk per core.
    from ._threads import cores, run_ranges

    main = threading.current_thread() is threading.main_thread()
    parts = min(cores(), units) if main and entries >= _SPLIT_MIN else 1
    if parts <= 1:
        run(0, units)
        return
    run_ranges(run, [units * j // parts for j in range(parts + 1)])


def warm_up(dtype) -> None:
    """Compile (or load from numba's cache) the FWHT kernels for ``dtype`` (float32 or float64)."""
    x = np.ones((1, 64), dtype=np.dtype(str(dtype).rsplit(".", 1)[-1]))
    kron_hadamard(x, (8, 8), [np.arange(8)] * 2, permute="rows", d_in=x[0], d_out=x[0])
    kron_hadamard(x[:, :8], (8, 8), transpose=True, periodic=True)


def host_array(x):
    """A zero-copy numpy view of ``x`` if the compiled CPU kernels may read it, else None.

    numpy arrays and plain CPU torch tensors outside autograd qualify; GPU
    arrays, tensors that require grad and tensors wrapped by ``torch.func``
    transforms do not (they stay on the array-API path).
    """
    lib = _library(x)
    if lib is np:
        return x
    if lib.__name__ != "torch" or x.device.type != "cpu" or x.requires_grad:
        return None
    try:
        return x.numpy()
    except (RuntimeError, TypeError):  # functorch-wrapped tensors have no storage to share
        return None


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
            _split(batch * (n_full // g), lambda u0, u1: kernels.contiguous_pass(
                src, n_in, mask, di, d_in is not None, out, u0, u1, g, min(g, FWHT_L1_BLOCK), in_hi, in_lo, same_in,
                out_hi, out_lo,
                same_out, s, d, has_d), out.size)
        else:
            width = min(q, max(16, min(FWHT_STRIDED_WIDTH, FWHT_STRIDED_BYTES // (g * dtype.itemsize))))
            units = batch * (n_full // (g * q)) * -(-q // width)
            if last and fused:
                mat = np.ascontiguousarray(lead, dtype=dtype)
                red = np.empty((batch, int(mat.shape[0]), q), dtype=dtype)
                _split(units, lambda u0, u1: kernels.strided_lead_pass(out, u0, u1, g, q, width, in_idx, out_idx,
                                                                       s, d, has_d, mat, red), out.size)
                return red.reshape(batch, -1)
            _split(units, lambda u0, u1: kernels.strided_pass(out, u0, u1, g, q, width, in_idx, out_idx, s, d,
                                                              has_d), out.size)
    if lead is not None:
        width = int(lead.shape[1])
        if width not in {math.prod(factors[:k]) for k in range(1, len(factors) + 1)}:
            raise ValueError(f"lead has {width} columns; expected a product of leading factors of {factors}")
        return _signed_contraction(np, out, lead, None, n_full // width).reshape(batch, -1)
    return out


def hartley(xp, x):
    """Orthonormal discrete Hartley transform along the last axis: (Re F x - Im F x)/sqrt(n).

    Real, symmetric and its own inverse, for any length ``n``.
    """
    n = int(x.shape[-1])
    spec = xp.fft.rfft(x, axis=-1)
    re, im = xp.real(spec), xp.imag(spec)
    m = int(spec.shape[-1])
    head = re - im
    tail = xp.flip((re + im)[..., 1 : n - m + 1], axis=-1)
    out = xp.concat([head, tail], axis=-1) if n - m > 0 else head
    return out * (1.0 / math.sqrt(n))


def roll(xp, x, shift: int):
    """Cyclic shift along the last axis by a fixed amount: two contiguous slices, no gather."""
    n = int(x.shape[-1])
    shift %= n
    if shift == 0:
        return x
    return xp.concat([x[..., n - shift :], x[..., : n - shift]], axis=-1)


def pad_columns(xp, x, n_pad: int):
    """Zero-pad the rows of ``x`` (B, n) to length ``n_pad``."""
    n = int(x.shape[-1])
    if n == n_pad:
        return x
    zeros = xp.zeros((int(x.shape[0]), n_pad - n), dtype=x.dtype, device=_device(x))
    return xp.concat([x, zeros], axis=-1)


def scatter_add_rows(values, index, n: int):
    """``out[b, index[j]] += values[b, j]`` for a batch of rows; returns (B, n).

    Scatter-add is not in the array API standard, so this dispatches on the
    array library (torch's ``index_add``, numpy/cupy ``bincount``).
    """
    lib = _library(values)
    batch = int(values.shape[0])
    if lib.__name__ == "torch":
        out = lib.zeros((batch, n), dtype=values.dtype, device=values.device)
        return out.index_add_(1, index, values)
    offsets = lib.arange(batch, dtype=lib.int64)[:, None] * n
    flat = (index[None, :] + offsets).reshape(-1)
    summed = lib.bincount(flat, weights=values.reshape(-1), minlength=batch * n)
    return summed.reshape(batch, n).astype(values.dtype, copy=False)


def _library(x):
    name = type(x).__module__.split(".")[0]
    if name == "torch":
        import torch

        return torch
    if name == "cupy":
        import cupy

        return cupy
    return np


def _device(x):
    from array_api_compat import device

    return device(x)
