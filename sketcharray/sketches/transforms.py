"""Orthogonal transforms the sketches are composed of (docs/sketches.md).

* Kronecker products of small dense matrices applied factor by factor to the
  reshaped input (the Kronecker Hadamard ``H_N = H_{b1} x ... x H_{bK}`` and
  Kronecker products of Haar-random orthogonal matrices), optionally keeping
  only the first ``D`` outputs ``R_D`` -- computed without the rest;
* the orthonormal discrete Hartley transform through the FFT;
* small helpers for padding, sizes and scatter-adds.

All functions take the array namespace ``xp`` of their input (numpy, torch or
cupy through ``array_api_compat``).  Where host arrays take a compiled CPU
kernel instead (the blocked FWHT, the fused leading contraction) is decided
in :mod:`.backend`, which holds those kernels' machinery.
"""

from __future__ import annotations

import math

import numpy as np

from . import backend
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
    if (int(m.shape[0]) <= backend.CONTRACTION_ROWS and batch * n >= backend.SPLIT_MIN
            and backend.compiled(x, m, signs) and str(x.dtype).endswith(("float32", "float64"))):
        h = backend.host_array
        return backend.signed_contraction(xp, h(x), h(m), None if signs is None else h(signs), rest)
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
    zeros = xp.zeros((int(x.shape[0]), n_pad - n), dtype=x.dtype, device=backend.device_of(x))
    return xp.concat([x, zeros], axis=-1)


def scatter_add_rows(values, index, n: int):
    """``out[b, index[j]] += values[b, j]`` for a batch of rows; returns (B, n).

    Scatter-add is not in the array API standard, so this dispatches on the
    array library (torch's ``index_add``, numpy/cupy ``bincount``).
    """
    lib = backend.library(values)
    batch = int(values.shape[0])
    if lib.__name__ == "torch":
        out = lib.zeros((batch, n), dtype=values.dtype, device=values.device)
        return out.index_add_(1, index, values)
    offsets = lib.arange(batch, dtype=lib.int64)[:, None] * n
    flat = (index[None, :] + offsets).reshape(-1)
    summed = lib.bincount(flat, weights=values.reshape(-1), minlength=batch * n)
    return summed.reshape(batch, n).astype(values.dtype, copy=False)
