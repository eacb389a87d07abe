"""One counter-based random generator for every backend.

Every random factor of a sketch (signs B, Gaussian diagonals G, permutations,
the entries of a dense or sparse Gaussian matrix) is a pure function of
``(key, index)``: the ``index``-th draw of the stream named by ``key``.  The
function is written once against the array API with 64-bit integer
arithmetic that never overflows, so numpy, torch (CPU or CUDA) and cupy
produce the same bits, and any block of a stream (say rows ``r0:r1`` of a
dense ``D x N`` matrix) can be regenerated on its own.  That is what lets
``dense-otf`` rebuild exactly the matrix ``dense`` stores.

The bit mixer is MurmurHash3's 32-bit finaliser (a bijection with full
avalanche) applied twice with key whitening in between; uniform draws use the
32 bits as a dyadic fraction, Gaussian draws use both outputs of Box-Muller
on two independent uniform streams.
"""

from __future__ import annotations

import hashlib
import math

_MASK32 = 0xFFFFFFFF


def stream_key(seed: int, *names: object) -> tuple[int, int, int]:
    """Derive three 32-bit key words for the stream ``(seed, *names)``.

    Uses BLAKE2b, so the keys are the same in every process and platform
    (Python's ``hash`` is salted per process).
    """
    text = ":".join([str(int(seed)), *map(str, names)]).encode()
    digest = hashlib.blake2b(text, digest_size=12).digest()
    return tuple(int.from_bytes(digest[i : i + 4], "little") for i in (0, 4, 8))


def _mul32(x, c: int):
    # (x * c) mod 2**32 for x < 2**32 held in int64, without ever exceeding
    # 2**63: split c into 16-bit halves so each partial product is < 2**48.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + ((x * hi) & 0xFFFF) * 65536) & _MASK32


def _fmix32(h, wrapping: bool):
    # MurmurHash3's finaliser.  ``wrapping``: h is uint32 and products wrap
    # mod 2**32 natively (numpy, cupy); otherwise h is int64 and _mul32 wraps.
    mul = (lambda a, c: a * c) if wrapping else _mul32
    h = h ^ (h >> 16)
    h = mul(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _native_uint32(xp) -> bool:
    # numpy and cupy wrap uint32 arithmetic; torch's uint32 lacks multiplication.
    return xp.__name__.split(".")[-1] in ("numpy", "cupy")


def random_bits(xp, key, start: int, count: int, *, device=None):
    """32 random bits (as int64 in ``[0, 2**32)``) for draws ``start .. start+count-1``.

    numpy and cupy hash in native wrapping uint32 (about 3x faster); other
    libraries in int64 with split multiplications.  Both give the same bits.
    """
    k0, k1, k2 = key
    idx = xp.arange(start, start + count, dtype=xp.int64, device=device)
    hi_const = ((start >> 32) + k1) & _MASK32
    if _native_uint32(xp):
        if (start + count - 1) >> 32 != start >> 32:  # the high word changes: split the range
            cut = ((start >> 32) + 1) << 32
            return xp.concat([random_bits(xp, key, start, cut - start, device=device),
                              random_bits(xp, key, cut, start + count - cut, device=device)])
        u32 = xp.uint32
        h = _fmix32(xp.astype(idx & _MASK32, u32) ^ u32(k0), True)
        h = _fmix32(h ^ u32(hi_const), True)
        return xp.astype(h ^ u32(k2), xp.int64)
    h = _fmix32((idx & _MASK32) ^ k0, False)
    h = _fmix32(h ^ (((idx >> 32) + k1) & _MASK32), False)
    return h ^ k2


def _subkey(key, tag: int):
    return tuple(_fmix_int(k ^ (tag * 0x9E3779B9 & _MASK32)) for k in key)


def _fmix_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform(xp, key, start: int, count: int, *, device=None):
    """Uniform draws in the open interval (0, 1), float64."""
    bits = random_bits(xp, key, start, count, device=device)
    return (xp.astype(bits, xp.float64) + 0.5) * (1.0 / 4294967296.0)


#: draws per block when numpy generates a long stream on several threads
_BLOCK = 1 << 20


def _blocked(xp, draw, start: int, count: int, dtype):
    # numpy: ``draw(s, c)`` for blocks of the range on a thread pool (ufuncs release the GIL), written
    # into one array -- the same numbers, since every draw is a function of its index alone.  Blocks
    # start at even offsets so Box-Muller pairs are never split.  Other libraries: one call.
    if xp.__name__.split(".")[-1] != "numpy" or count <= 2 * _BLOCK:
        return draw(start, count)
    from .backend import run_ranges

    out = xp.empty(count, dtype=dtype)

    def fill(a, b):
        out[a - start : b - start] = draw(a, b - a)

    run_ranges(fill, [start] + list(range(start - start % 2 + _BLOCK, start + count, _BLOCK)) + [start + count])
    return out


def normal(xp, key, start: int, count: int, *, dtype=None, device=None):
    """Standard Gaussian draws; draw ``2k`` and ``2k+1`` are the two Box-Muller outputs of pair ``k``."""
    return _blocked(xp, lambda s, c: _normal(xp, key, s, c, dtype, device), start, count,
                    xp.float64 if dtype is None else dtype)


def _normal(xp, key, start: int, count: int, dtype, device):
    first, last = start // 2, (start + count + 1) // 2
    u1 = uniform(xp, _subkey(key, 1), first, last - first, device=device)
    u2 = (2.0 * math.pi) * uniform(xp, _subkey(key, 2), first, last - first, device=device)
    radius = xp.sqrt(-2.0 * xp.log(u1))
    pairs = xp.stack([radius * xp.cos(u2), radius * xp.sin(u2)], axis=1)
    z = xp.reshape(pairs, (-1,))[start - 2 * first : start - 2 * first + count]
    return z if dtype is None else xp.astype(z, dtype)


def signs(xp, key, count: int, *, dtype, device=None):
    """Rademacher draws: +1 or -1 with probability 1/2 each."""
    def draw(s, c):
        return xp.astype(1 - 2 * (random_bits(xp, _subkey(key, 3), s, c, device=device) >> 31), dtype)

    return _blocked(xp, draw, 0, count, dtype)


def permutations(xp, key, n: int, count: int = 1, *, device=None):
    """``count`` independent uniform permutations of ``range(n)``, shape ``(count, n)``.

    Sorting by 62-bit random keys (two streams) makes ties practically
    impossible, so every backend returns the same permutation.
    """
    hi = random_bits(xp, _subkey(key, 4), 0, n * count, device=device)
    lo = random_bits(xp, _subkey(key, 5), 0, n * count, device=device)
    sort_key = xp.reshape((hi >> 2) * 2**31 + (lo >> 1), (count, n))
    return xp.argsort(sort_key, axis=1, stable=True)


def random_probes(n_params: int, k: int, seed: int = 0, *, rows: tuple[int, int] | None = None):
    """k unit-norm Gaussian probe directions of the parameter space (float32 numpy, (k, n_params)).

    ``rows=(start, stop)`` gives only those rows, the same numbers as the
    slice of the whole: each row is a function of (seed, row) alone, so a
    task generates its own block instead of receiving it.
    """
    import numpy as np

    start, stop = (0, k) if rows is None else rows
    v = normal(np, stream_key(seed, "probes"), start * n_params, (stop - start) * n_params)
    v = v.reshape(stop - start, n_params)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def random_test_matrix(n_out: int, k: int, seed: int = 0, *, rows: tuple[int, int] | None = None):
    """k standard Gaussian test vectors of the sketch space (float32 numpy, (k, n_out)); ``rows`` as for
    :func:`random_probes`."""
    import numpy as np

    start, stop = (0, k) if rows is None else rows
    v = normal(np, stream_key(seed, "omega"), start * n_out, (stop - start) * n_out)
    return v.reshape(stop - start, n_out).astype(np.float32)
