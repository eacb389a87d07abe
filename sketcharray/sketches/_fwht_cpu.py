"""Compiled CPU kernels of the blocked fast Walsh-Hadamard transform (numba).

Used by :func:`sketcharray.sketches.transforms.kron_hadamard` only; see there
for what is computed.  The transform of length ``N = 2^L`` runs in a few
passes over memory instead of one pass per Kronecker factor: each pass
transforms one *group* of consecutive factors (axis 1 of the (P, g, q) view
of a row) on a small buffer that stays in cache, so the butterflies cost
``log2 g`` additions per entry instead of the ``g`` multiply-adds of a dense
factor.  A factor's row or column permutation becomes a gather inside the
buffer.  Strided passes move ``width`` contiguous entries per row (enough to
amortise the page walk of each strided row); the first four stages of a
contiguous group run in registers.  Kernels release
the GIL and run on one core each over a range of work units: callers split
the units across threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def _stages(flat, h0, length):  # pragma: no cover - compiled
    # Butterfly stages with half-widths h0, 2 h0, ... < length on flat[:length], in place.  The two
    # halves are taken as separate views, which lets LLVM vectorise the inner loop.
    h = h0
    while h < length:
        for i in range(0, length, 2 * h):
            x = flat[i : i + h]
            y = flat[i + h : i + 2 * h]
            for k in range(h):
                a = x[k]
                b = y[k]
                x[k] = a + b
                y[k] = a - b
        h *= 2


@njit(nogil=True, cache=True)
def _stages_within_16(f, length):  # pragma: no cover - compiled
    # The first four stages (h = 8, 4, 2, 1: a 16-point transform) of every run of 16, in registers.
    for i in range(0, length, 16):
        a0 = f[i] + f[i + 8]
        a8 = f[i] - f[i + 8]
        a1 = f[i + 1] + f[i + 9]
        a9 = f[i + 1] - f[i + 9]
        a2 = f[i + 2] + f[i + 10]
        a10 = f[i + 2] - f[i + 10]
        a3 = f[i + 3] + f[i + 11]
        a11 = f[i + 3] - f[i + 11]
        a4 = f[i + 4] + f[i + 12]
        a12 = f[i + 4] - f[i + 12]
        a5 = f[i + 5] + f[i + 13]
        a13 = f[i + 5] - f[i + 13]
        a6 = f[i + 6] + f[i + 14]
        a14 = f[i + 6] - f[i + 14]
        a7 = f[i + 7] + f[i + 15]
        a15 = f[i + 7] - f[i + 15]
        b0, b4, b1, b5 = a0 + a4, a0 - a4, a1 + a5, a1 - a5
        b2, b6, b3, b7 = a2 + a6, a2 - a6, a3 + a7, a3 - a7
        b8, b12, b9, b13 = a8 + a12, a8 - a12, a9 + a13, a9 - a13
        b10, b14, b11, b15 = a10 + a14, a10 - a14, a11 + a15, a11 - a15
        c0, c2, c1, c3 = b0 + b2, b0 - b2, b1 + b3, b1 - b3
        c4, c6, c5, c7 = b4 + b6, b4 - b6, b5 + b7, b5 - b7
        c8, c10, c9, c11 = b8 + b10, b8 - b10, b9 + b11, b9 - b11
        c12, c14, c13, c15 = b12 + b14, b12 - b14, b13 + b15, b13 - b15
        f[i], f[i + 1], f[i + 2], f[i + 3] = c0 + c1, c0 - c1, c2 + c3, c2 - c3
        f[i + 4], f[i + 5], f[i + 6], f[i + 7] = c4 + c5, c4 - c5, c6 + c7, c6 - c7
        f[i + 8], f[i + 9], f[i + 10], f[i + 11] = c8 + c9, c8 - c9, c10 + c11, c10 - c11
        f[i + 12], f[i + 13], f[i + 14], f[i + 15] = c12 + c13, c12 - c13, c14 + c15, c14 - c15


@njit(nogil=True, cache=True)
def contiguous_pass(src, n, mask, signs, has_signs, out, u0, u1, g, in_idx, in_identity, out_idx, out_identity,
                    scale, diag, has_diag):  # pragma: no cover - compiled
    """The lowest group: runs ``u0:u1`` of ``g`` contiguous entries (row-major over the batch), from the unpadded input.

    ``out[b, p*g + i] = scale * diag[p*g + i] * (H_g u)[out_idx[i]]`` with
    ``u = (signs * pad(src[b]))[p*g + in_idx]``; ``diag`` may be shorter than a
    row, entries past its end are not scaled by it.  Entry ``j < n`` of the
    input is ``src[b, j & mask]``: ``mask`` is the input's period minus one
    (a power of two), or the padded length minus one for a plain input.
    """
    nd = diag.shape[0]
    per_row = out.shape[1] // g
    flat = np.empty(g, dtype=out.dtype)
    for unit in range(u0, u1):
        b, base = unit // per_row, (unit % per_row) * g
        if in_identity and base + g <= n and g <= mask + 1:
            run = src[b, (base & mask) : (base & mask) + g]
            if has_signs:
                sg = signs[base : base + g]
                for i in range(g):
                    flat[i] = run[i] * sg[i]
            else:
                for i in range(g):
                    flat[i] = run[i]
        else:
            for i in range(g):
                j = base + in_idx[i]
                if j < n:
                    flat[i] = src[b, j & mask] * signs[j] if has_signs else src[b, j & mask]
                else:
                    flat[i] = 0
        if g >= 16:
            _stages_within_16(flat, g)
            _stages(flat, 16, g)
        else:
            _stages(flat, 1, g)
        row = out[b, base : base + g]
        if out_identity and not (has_diag and base < nd):
            for i in range(g):
                row[i] = flat[i] * scale
        else:
            for i in range(g):
                v = flat[out_idx[i]] * scale
                row[i] = v * diag[base + i] if has_diag and base + i < nd else v


@njit(nogil=True, cache=True)
def strided_pass(x, u0, u1, g, q, width, in_idx, out_idx, scale, diag, has_diag):  # pragma: no cover - compiled
    """A higher group: axis 1 of the (P, g, q) view of each row of ``x``, in place, ``width`` columns at a time.

    Work units ``u0:u1`` number the (row, p, column block) triples row-major.
    ``diag`` may be shorter than a row, as in :func:`contiguous_pass`.
    """
    nd = diag.shape[0]
    blocks = (q + width - 1) // width
    per_row = (x.shape[1] // (g * q)) * blocks
    flat = np.empty(g * width, dtype=x.dtype)
    for unit in range(u0, u1):
        b, rest = unit // per_row, unit % per_row
        base, c0 = (rest // blocks) * g * q, (rest % blocks) * width
        w = min(width, q - c0)  # the buffer holds g rows of w
        for i in range(g):
            src = x[b, base + in_idx[i] * q + c0 : base + in_idx[i] * q + c0 + w]
            dst = flat[i * w : (i + 1) * w]
            for k in range(w):
                dst[k] = src[k]
        _stages(flat, w, g * w)
        for i in range(g):
            src = flat[out_idx[i] * w : (out_idx[i] + 1) * w]
            d = base + i * q + c0
            dst = x[b, d : d + w]
            if has_diag and d + w <= nd:
                dg = diag[d : d + w]
                for k in range(w):
                    dst[k] = src[k] * scale * dg[k]
            elif has_diag:
                for k in range(w):
                    dst[k] = src[k] * scale * diag[d + k] if d + k < nd else src[k] * scale
            else:
                for k in range(w):
                    dst[k] = src[k] * scale
