"""Compiled CPU kernels of the transforms (numba): the blocked fast Walsh-Hadamard transform and
the fused sign-and-contract first step of a truncated Kronecker product.

Used by :func:`sketcharray.sketches.transforms.kron_hadamard` and
:func:`sketcharray.sketches.transforms.leading_contraction` only; see there
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
    # Butterfly stages with half-widths h0, 2 h0, ... < length on flat[:length], in place: three at a time
    # (radix 8) where the runs are long, two at a time (radix 4) where they are short (eight runs of a
    # short h cost more in loop overhead than the sweep they save), one at a time for a last odd stage.
    # Each run is taken as a separate view, which lets LLVM vectorise the inner loop.
    h = h0
    while h < length:
        if h >= 64 and 8 * h <= length:
            for i in range(0, length, 8 * h):
                x0 = flat[i : i + h]
                x1 = flat[i + h : i + 2 * h]
                x2 = flat[i + 2 * h : i + 3 * h]
                x3 = flat[i + 3 * h : i + 4 * h]
                x4 = flat[i + 4 * h : i + 5 * h]
                x5 = flat[i + 5 * h : i + 6 * h]
                x6 = flat[i + 6 * h : i + 7 * h]
                x7 = flat[i + 7 * h : i + 8 * h]
                for k in range(h):
                    a0, a1 = x0[k] + x1[k], x0[k] - x1[k]
                    a2, a3 = x2[k] + x3[k], x2[k] - x3[k]
                    a4, a5 = x4[k] + x5[k], x4[k] - x5[k]
                    a6, a7 = x6[k] + x7[k], x6[k] - x7[k]
                    b0, b2, b1, b3 = a0 + a2, a0 - a2, a1 + a3, a1 - a3
                    b4, b6, b5, b7 = a4 + a6, a4 - a6, a5 + a7, a5 - a7
                    x0[k], x4[k], x1[k], x5[k] = b0 + b4, b0 - b4, b1 + b5, b1 - b5
                    x2[k], x6[k], x3[k], x7[k] = b2 + b6, b2 - b6, b3 + b7, b3 - b7
            h *= 8
        elif 4 * h <= length:
            for i in range(0, length, 4 * h):
                x0 = flat[i : i + h]
                x1 = flat[i + h : i + 2 * h]
                x2 = flat[i + 2 * h : i + 3 * h]
                x3 = flat[i + 3 * h : i + 4 * h]
                for k in range(h):
                    a0, a1 = x0[k] + x1[k], x0[k] - x1[k]
                    a2, a3 = x2[k] + x3[k], x2[k] - x3[k]
                    x0[k], x2[k], x1[k], x3[k] = a0 + a2, a0 - a2, a1 + a3, a1 - a3
            h *= 4
        else:
            for i in range(0, length, 2 * h):
                x = flat[i : i + h]
                y = flat[i + h : i + 2 * h]
                for k in range(h):
                    a = x[k]
                    b = y[k]
                    x[k] = a + b
                    y[k] = a - b
            h *= 2


@njit(nogil=True, cache=True, inline="always")
def _h16(f, i, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):  # pragma: no cover
    # f[i:i+16] = H_16 (a0, ..., a15) unnormalised, in registers: the first four stages (h = 8, 4, 2, 1).
    a0, a8 = a0 + a8, a0 - a8
    a1, a9 = a1 + a9, a1 - a9
    a2, a10 = a2 + a10, a2 - a10
    a3, a11 = a3 + a11, a3 - a11
    a4, a12 = a4 + a12, a4 - a12
    a5, a13 = a5 + a13, a5 - a13
    a6, a14 = a6 + a14, a6 - a14
    a7, a15 = a7 + a15, a7 - a15
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
def _stages_within_16(f, length):  # pragma: no cover - compiled
    # The first four stages of every run of 16 of f[:length], in place.
    for i in range(0, length, 16):
        _h16(f, i, f[i], f[i + 1], f[i + 2], f[i + 3], f[i + 4], f[i + 5], f[i + 6], f[i + 7], f[i + 8], f[i + 9],
             f[i + 10], f[i + 11], f[i + 12], f[i + 13], f[i + 14], f[i + 15])


@njit(nogil=True, cache=True)
def _load_within_16(f, run, signs, has_signs, length):  # pragma: no cover - compiled
    # f[:length] = the first four stages of (signs *) run[:length]: the copy into the buffer and the
    # stages that need data from one run of 16 in one pass, so the buffer is not read back for them.
    if has_signs:
        for i in range(0, length, 16):
            r, s = run[i : i + 16], signs[i : i + 16]
            _h16(f, i, r[0] * s[0], r[1] * s[1], r[2] * s[2], r[3] * s[3], r[4] * s[4], r[5] * s[5], r[6] * s[6],
                 r[7] * s[7], r[8] * s[8], r[9] * s[9], r[10] * s[10], r[11] * s[11], r[12] * s[12],
                 r[13] * s[13], r[14] * s[14], r[15] * s[15])
    else:
        for i in range(0, length, 16):
            r = run[i : i + 16]
            _h16(f, i, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13],
                 r[14], r[15])


@njit(nogil=True, cache=True)
def contiguous_pass(src, n, mask, signs, has_signs, out, u0, u1, g, sub, in_hi, in_lo, in_identity, out_hi, out_lo,
                    out_identity, scale, diag, has_diag):  # pragma: no cover - compiled
    """The lowest group: runs ``u0:u1`` of ``g`` contiguous entries (row-major over the batch), from the unpadded input.

    ``out[b, p*g + i] = scale * diag[p*g + i] * (H_g u)[out_idx[i]]`` with
    ``u = (signs * pad(src[b]))[p*g + in_idx]``; ``diag`` may be shorter than a
    row, entries past its end are not scaled by it.  Entry ``j < n`` of the
    input is ``src[b, j & mask]``: ``mask`` is the input's period minus one
    (a power of two), or the padded length minus one for a plain input.

    A gather index is given in two levels, ``idx[i] = hi[i // L] + lo[i % L]``
    with ``L = len(lo)`` (the group's last factor): each run of ``L`` entries
    is gathered from one run of the source, and the index arrays stay small
    enough to leave the cache to the data.  ``sub`` (a power of two, at
    least 16) is the block of entries the lower stages run on before the
    higher ones sweep the whole buffer: a block that stays in L1.
    """
    nd = diag.shape[0]
    per_row = out.shape[1] // g
    low = in_lo.shape[0]
    flat = np.empty(g, dtype=out.dtype)
    for unit in range(u0, u1):
        b, base = unit // per_row, (unit % per_row) * g
        fused = in_identity and base + g <= n and g <= mask + 1 and g >= 16
        if fused:
            run = src[b, (base & mask) : (base & mask) + g]
            _load_within_16(flat, run, signs[base : base + g] if has_signs else signs, has_signs, g)
        else:
            for h in range(g // low):
                o = base + (h * low if in_identity else in_hi[h])
                dst = flat[h * low : (h + 1) * low]
                if o + low <= n and low <= mask + 1:
                    run = src[b, (o & mask) : (o & mask) + low]
                    if in_identity and has_signs:
                        sg = signs[o : o + low]
                        for t in range(low):
                            dst[t] = run[t] * sg[t]
                    elif in_identity:
                        for t in range(low):
                            dst[t] = run[t]
                    elif has_signs:
                        sg = signs[o : o + low]
                        for t in range(low):
                            dst[t] = run[in_lo[t]] * sg[in_lo[t]]
                    else:
                        for t in range(low):
                            dst[t] = run[in_lo[t]]
                else:
                    for t in range(low):
                        j = o + (t if in_identity else in_lo[t])
                        if j < n:
                            dst[t] = src[b, j & mask] * signs[j] if has_signs else src[b, j & mask]
                        else:
                            dst[t] = 0
        if not fused and g >= 16:
            _stages_within_16(flat, g)
        if g >= 16:
            # the stages within blocks of sub entries in L1, then the rest over the whole buffer (in L2)
            for s0 in range(0, g, sub):
                _stages(flat[s0 : s0 + sub], 16, sub)
            _stages(flat, sub, g)
        else:
            _stages(flat, 1, g)
        row = out[b, base : base + g]
        if out_identity and not (has_diag and base < nd):
            for i in range(g):
                row[i] = flat[i] * scale
        else:
            for h in range(g // low):
                s0 = h * low if out_identity else out_hi[h]
                run = flat[s0 : s0 + low]
                dst = row[h * low : (h + 1) * low]
                d0 = base + h * low
                if has_diag and d0 + low <= nd:
                    dg = diag[d0 : d0 + low]
                    if out_identity:
                        for t in range(low):
                            dst[t] = run[t] * scale * dg[t]
                    else:
                        for t in range(low):
                            dst[t] = run[out_lo[t]] * scale * dg[t]
                else:
                    for t in range(low):
                        v = run[t if out_identity else out_lo[t]] * scale
                        dst[t] = v * diag[d0 + t] if has_diag and d0 + t < nd else v


@njit(nogil=True, cache=True)
def _transform_columns(x, b, base, c0, w, g, q, in_idx, flat):  # pragma: no cover - compiled
    # flat[i*w:(i+1)*w] = columns c0:c0+w of row in_idx[i] of the (g, q) block at ``base`` of x[b], then the
    # group's butterfly stages across the g rows (vectorised over the w columns)
    for i in range(g):
        src = x[b, base + in_idx[i] * q + c0 : base + in_idx[i] * q + c0 + w]
        dst = flat[i * w : (i + 1) * w]
        for k in range(w):
            dst[k] = src[k]
    _stages(flat, w, g * w)


@njit(nogil=True, cache=True)
def strided_pass(x, u0, u1, g, q, width, in_idx, out_idx, scale, diag, has_diag):  # pragma: no cover - compiled
    """A higher group: axis 1 of the (P, g, q) view of each row of ``x``, in place, ``width`` columns at a time.

    Work units ``u0:u1`` number the (p, column block, row) triples row-major:
    the rows of a batch follow each other, so the block of ``diag`` they
    share is read from memory once.  ``diag`` may be shorter than a row, as
    in :func:`contiguous_pass`.
    """
    nd = diag.shape[0]
    batch = x.shape[0]
    blocks = (q + width - 1) // width
    flat = np.empty(g * width, dtype=x.dtype)
    for unit in range(u0, u1):
        rest, b = unit // batch, unit % batch
        base, c0 = (rest // blocks) * g * q, (rest % blocks) * width
        w = min(width, q - c0)  # the buffer holds g rows of w
        _transform_columns(x, b, base, c0, w, g, q, in_idx, flat)
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


@njit(nogil=True, cache=True)
def strided_lead_pass(x, u0, u1, g, q, width, in_idx, out_idx, scale, diag, has_diag, lead,
                      red):  # pragma: no cover - compiled
    """The last (highest) group, followed by ``lead`` along it: ``red[b, :, j] = lead @ (H x_b)[:, j]``.

    As :func:`strided_pass` on the (g, q) view of each row of ``x`` (the
    group is the leading factors, so there is one ``p``), but instead of
    writing the transformed rows back it writes their products with the
    rows of ``lead`` (r, g) into ``red`` (B, r, q): a transform followed by
    a contraction of its leading axis costs one read of ``x`` and a write of
    ``r/g`` of it.  ``x`` is left partly transformed.
    """
    nd = diag.shape[0]
    batch = x.shape[0]
    r = lead.shape[0]
    flat = np.empty(g * width, dtype=x.dtype)
    for unit in range(u0, u1):
        c0, b = (unit // batch) * width, unit % batch
        w = min(width, q - c0)
        _transform_columns(x, b, 0, c0, w, g, q, in_idx, flat)
        for rr in range(r):
            acc = red[b, rr, c0 : c0 + w]
            for k in range(w):
                acc[k] = 0
            for i in range(g):
                c = lead[rr, i] * scale
                src = flat[out_idx[i] * w : (out_idx[i] + 1) * w]
                d = i * q + c0
                if has_diag and d + w <= nd:
                    dg = diag[d : d + w]
                    for k in range(w):
                        acc[k] += c * (src[k] * dg[k])
                elif has_diag:
                    for k in range(w):
                        acc[k] += c * (src[k] * diag[d + k] if d + k < nd else src[k])
                else:
                    for k in range(w):
                        acc[k] += c * src[k]


@njit(nogil=True, cache=True)
def signed_contraction(src, n, signs, has_signs, m, out, u0, u1, width):  # pragma: no cover - compiled
    """``out[b, :, j] = m @ v_b[:, j]`` for the (b_k, rest) view ``v_b`` of ``signs * pad(src[b])``.

    ``src`` is (B, n) with ``n <= b_k * rest``; ``out`` is (B, r, rest).
    Work units ``u0:u1`` are blocks of ``width`` columns ``j``; each reads
    its columns of every slice once (the sign flip and the padding happen
    in registers, never in a temporary) and keeps the (B, r, width)
    accumulator in cache.
    """
    batch, r, rest = out.shape
    b_k = m.shape[1]
    acc = np.empty((batch, r, width), dtype=out.dtype)
    tmp = np.empty(width, dtype=out.dtype)
    for unit in range(u0, u1):
        j0 = unit * width
        w = min(width, rest - j0)
        acc[:, :, :w] = 0
        for g in range(b_k):
            base = g * rest + j0
            if base >= n:
                break
            w_in = min(w, n - base)
            sg = signs[base : base + w_in]
            for b in range(batch):
                xs = src[b, base : base + w_in]
                if r == 1:  # one pass, no temporary
                    c = m[0, g]
                    a = acc[b, 0]
                    if has_signs:
                        for k in range(w_in):
                            a[k] += c * (xs[k] * sg[k])
                    else:
                        for k in range(w_in):
                            a[k] += c * xs[k]
                    continue
                if has_signs:
                    for k in range(w_in):
                        tmp[k] = xs[k] * sg[k]
                else:
                    for k in range(w_in):
                        tmp[k] = xs[k]
                for rr in range(r):
                    c = m[rr, g]
                    a = acc[b, rr]
                    for k in range(w_in):
                        a[k] += c * tmp[k]
        out[:, :, j0 : j0 + w] = acc[:, :, :w]
