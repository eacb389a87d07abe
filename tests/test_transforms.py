"""Orthogonal building blocks: Hadamard, Kronecker products, Hartley, truncation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from sketcharray.sketches import backend
from sketcharray.sketches import random as rnd
from sketcharray.sketches import transforms as tf
from sketcharray.sketches.precond import Preconditioner


@pytest.mark.parametrize("b", [1, 2, 8, 64])
def test_hadamard_is_orthonormal_symmetric_sylvester(b):
    h = tf.hadamard(b)
    np.testing.assert_allclose(h @ h, np.eye(b), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_allclose(h, scipy.linalg.hadamard(b) / math.sqrt(b))


def test_pow2_factors_are_balanced_and_bounded():
    assert tf.pow2_factors(1 << 24, 64) == (64, 64, 64, 64)
    assert tf.pow2_factors(1 << 20, 1024) == (1024, 1024)
    assert tf.pow2_factors(1 << 13, 64) == (32, 16, 16)
    for bits in range(0, 28):
        f = tf.pow2_factors(1 << bits, 64)
        assert math.prod(f) == 1 << bits and max(f) <= 64


def test_kron_apply_equals_dense_kronecker(rng):
    mats = [rng.standard_normal((3, 4)), rng.standard_normal((5, 2)), rng.standard_normal((2, 3))]
    x = rng.standard_normal((6, 4 * 2 * 3))
    dense = np.kron(np.kron(mats[0], mats[1]), mats[2])
    np.testing.assert_allclose(tf.kron_apply(np, x, mats), x @ dense.T, rtol=1e-12)
    y = rng.standard_normal((6, 3 * 5 * 2))
    np.testing.assert_allclose(tf.kron_apply(np, y, mats, transpose=True), y @ dense, rtol=1e-12)


@pytest.mark.parametrize("n_out", [1, 3, 16, 17, 100, 256, 4096])
def test_truncated_kronecker_keeps_exactly_the_first_outputs(rng, n_out):
    factors = (16, 16, 16)
    rows = tf.kept_rows(factors, n_out)
    full = [tf.hadamard(b)[rng.permutation(b)] for b in factors]
    x = rng.standard_normal((2, 4096))
    reference = tf.kron_apply(np, x, full)[:, :n_out]
    truncated = tf.kron_apply(np, x, [m[:r] for m, r in zip(full, rows)])[:, :n_out]
    np.testing.assert_allclose(truncated, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000])
def test_hartley_matches_definition_and_is_an_involution(rng, n):
    x = rng.standard_normal((3, n))
    f = np.fft.fft(x, axis=-1)
    expected = (f.real - f.imag) / math.sqrt(n)
    h = tf.hartley(np, x)
    np.testing.assert_allclose(h, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tf.hartley(np, h), x, rtol=1e-10, atol=1e-12)


def test_roll_matches_numpy(rng):
    x = rng.standard_normal((2, 10))
    for s in (0, 3, 10, 13, -2):
        np.testing.assert_array_equal(tf.roll(np, x, s), np.roll(x, s, axis=-1))


def test_haar_factor_is_orthogonal_with_deterministic_rows():
    key = rnd.stream_key(3, "haar")
    q = tf.haar_orthogonal(key, 32)
    np.testing.assert_allclose(q @ q.T, np.eye(32), atol=1e-12)
    thin = tf.haar_orthogonal(key, 32, rows=5)
    np.testing.assert_allclose(thin @ thin.T, np.eye(5), atol=1e-12)
    # Householder QR of the first 5 columns gives the first 5 columns of the full Q (to rounding)
    np.testing.assert_allclose(thin, q[:5], atol=1e-12)


@pytest.mark.parametrize("precond", ["hadamard", "fft", "kron"])
@pytest.mark.parametrize("permute", [None, "rows", "cols"])
def test_mixing_is_orthogonal_and_truncates(precond, permute, rng):
    n = 256
    full = Preconditioner(precond, n, rnd.stream_key(1, "mix"), n, permute, max_factor=16)
    st = full.build(np, None, np.float64)
    t = full.forward(np, np.eye(n), st).T  # columns are T e_j
    np.testing.assert_allclose(t @ t.T, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(full.adjoint(np, np.eye(n), st).T, t.T, atol=1e-12)
    cut = Preconditioner(precond, n, rnd.stream_key(1, "mix"), 40, permute, max_factor=16)
    x = rng.standard_normal((3, n))
    np.testing.assert_allclose(cut.forward(np, x, cut.build(np, None, np.float64)), x @ t.T[:, :40], atol=1e-10)


def _dense_hadamard_factors(factors, perms, permute):
    mats = []
    for b, p in zip(factors, perms):
        h = tf.hadamard(b)
        mats.append(h[p] if permute == "rows" else h[:, p] if permute == "cols" else h)
    return mats


@pytest.mark.parametrize("factors", [(2,), (8,), (4, 2), (32, 16, 8), (16, 16, 16, 16), (64, 64, 32), (2,) * 12,
                                     (32, 32, 32, 32)])
@pytest.mark.parametrize("permute", [None, "rows", "cols"])
@pytest.mark.parametrize("transpose", [False, True])
def test_butterfly_kernel_equals_the_dense_kronecker_factors(factors, permute, transpose, rng):
    """The compiled FWHT computes the same matrix as kron_apply's products, with both diagonals and padding."""
    perms = [rng.permutation(b) for b in factors]
    mats = _dense_hadamard_factors(factors, perms, permute)
    n_full = math.prod(factors)
    n = n_full if transpose else max(1, n_full - 5)  # padding only on the forward side
    x = rng.standard_normal((3, n))
    d_in, d_out = rng.standard_normal(n), rng.standard_normal(max(1, n_full - 3))  # a short d_out
    expected = tf.kron_apply(np, x * d_in, mats, transpose=transpose)
    expected[:, : d_out.size] *= d_out
    got = backend.kron_hadamard(x, factors, perms, permute=permute, transpose=transpose, d_in=d_in, d_out=d_out)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    got32 = backend.kron_hadamard(x.astype(np.float32), factors, perms, permute=permute, transpose=transpose)
    assert got32.dtype == np.float32
    # float32: rounding the input and each of the log2 N butterfly stages (orthogonal up to a
    # factor sqrt 2) adds at most about one ulp of the norm ||x|| <= sqrt(N) max|x| to the error
    # norm, which bounds every entry's error; 4x covers the final scaling.
    bound = 4 * (math.log2(n_full) + 1) * 2.0**-23 * math.sqrt(n_full) * np.abs(x).max()
    np.testing.assert_allclose(got32, tf.kron_apply(np, x, mats, transpose=transpose), rtol=0, atol=bound)


@pytest.mark.parametrize("log_n", [4, 10, 15])
def test_butterfly_kernel_equals_an_fwht_library_we_did_not_write(log_n, rng, monkeypatch):
    """fht-cpu (SIMD C++) is the reference: the unnormalised Sylvester transform, so ours times sqrt(N).

    A small lowest group makes N = 2^15 run in three passes (contiguous and two strided), the path
    large N take; float64 keeps the comparison at rounding level (log2 N stages of sums of N terms).
    """
    fht_cpu = pytest.importorskip("fht_cpu")
    monkeypatch.setattr(backend, "FWHT_BLOCK", 1 << 6)
    monkeypatch.setattr(backend, "FWHT_L1_BLOCK", 1 << 4)
    n = 1 << log_n
    x = rng.standard_normal((3, n))
    expected = fht_cpu.fht(x.copy()) / math.sqrt(n)
    for factors in (tf.pow2_factors(n, 64), tf.pow2_factors(n, 8)):
        np.testing.assert_allclose(backend.kron_hadamard(x, factors), expected, rtol=0, atol=1e-12 * math.sqrt(n))


@pytest.mark.parametrize("factors", [(8, 8, 8), (4, 8, 16, 32), (64, 32)])
@pytest.mark.parametrize("lead_factors", [1, 2])
def test_a_lead_matrix_after_the_transform_fused_or_not(factors, lead_factors, rng, monkeypatch):
    """``lead`` contracts the leading factors of the result: fused into the last pass when that pass is
    exactly those factors, else applied after it; both equal the Kronecker product of the two."""
    monkeypatch.setattr(backend, "FWHT_BLOCK", 1 << 6)
    monkeypatch.setattr(backend, "FWHT_STRIDED_BLOCK", 1 << 6)
    n_full = math.prod(factors)
    g = math.prod(factors[:lead_factors])
    lead = rng.standard_normal((2, g))
    x = rng.standard_normal((3, n_full - 7))
    d_in, d_out = rng.standard_normal(n_full - 7), rng.standard_normal(n_full)
    full = backend.kron_hadamard(x, factors, d_in=d_in, d_out=d_out)
    expected = np.einsum("rg,bgq->brq", lead, full.reshape(3, g, -1)).reshape(3, -1)
    np.testing.assert_allclose(backend.kron_hadamard(x, factors, d_in=d_in, d_out=d_out, lead=lead), expected,
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="lead has 3 columns"):
        backend.kron_hadamard(x, factors, lead=np.ones((1, 3)))


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("small", [0, 1 << 30])
def test_leading_contraction_reads_the_signed_padded_input(rows, signed, small, rng, monkeypatch):
    """The compiled kernel (up to 8 rows, inputs that are not small) and the blocked products against
    the formula."""
    monkeypatch.setattr(backend, "SPLIT_MIN", small)
    n, n_pad, b = 1000, 1024, 16
    x, m = rng.standard_normal((5, n)), rng.standard_normal((rows, b))
    signs = np.sign(rng.standard_normal(n)) if signed else None
    padded = np.pad(x * (1 if signs is None else signs), ((0, 0), (0, n_pad - n)))
    expected = np.einsum("rg,bgq->brq", m, padded.reshape(5, b, -1))
    np.testing.assert_allclose(tf.leading_contraction(np, x, m, n_pad, signs), expected, rtol=1e-12, atol=1e-12)
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as xt

    got = tf.leading_contraction(xt, torch.from_numpy(x), torch.from_numpy(m), n_pad,
                                 None if signs is None else torch.from_numpy(signs))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_butterfly_kernel_gives_the_same_numbers_on_any_thread(rng, monkeypatch):
    """Issue 16: a dask worker thread's sketch is split over the shared pool like the main thread's (it used to
    run on one core); the split never changes a bit, and a pool thread runs its work inline."""
    import concurrent.futures
    import threading

    factors = tf.pow2_factors(1 << 18, 64)
    perms = [rng.permutation(b) for b in factors]
    x = rng.standard_normal((2, (1 << 18) - 11)).astype(np.float32)
    main = backend.kron_hadamard(x, factors, perms, permute="rows")
    seen = []
    real = backend.run_ranges
    monkeypatch.setattr(backend, "run_ranges", lambda run, bounds: seen.append(len(bounds) - 1) or real(run, bounds))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="a-dask-worker") as pool:
        worker = pool.submit(backend.kron_hadamard, x, factors, perms, permute="rows").result()
    np.testing.assert_array_equal(main, worker)
    if backend.cores() > 1:  # split over the pool, at most a part per core
        assert seen and 1 < max(seen) <= backend.cores()
    inline = []
    monkeypatch.setattr(threading.current_thread(), "name", backend._POOL_PREFIX + "_0")
    backend.split_work(4, lambda a, b: inline.append((a, b)), 1 << 30)
    assert inline == [(0, 4)]


def test_fwht_groups_cover_the_factors_in_cache_sized_passes():
    for bits in range(1, 31):
        factors = tf.pow2_factors(1 << bits, 64)
        groups = backend.fwht_groups(factors)
        assert groups[0][1] == len(factors) and groups[-1][0] == 0
        assert all(a[0] == b[1] for a, b in zip(groups, groups[1:]))  # consecutive, lowest first
        sizes = [math.prod(factors[k0:k1]) for k0, k1 in groups]
        assert sizes[0] <= max(backend.FWHT_BLOCK, factors[-1])
        assert all(s <= max(backend.FWHT_STRIDED_BLOCK, max(factors)) for s in sizes[1:])
    assert len(backend.fwht_groups(tf.pow2_factors(1 << 25, 64))) == 2  # two passes over memory at N = 2^25


def test_host_array_only_for_plain_host_arrays():
    torch = pytest.importorskip("torch")
    a = np.ones(3)
    assert backend.host_array(a) is a
    t = torch.ones(3)
    view = backend.host_array(t)
    view[0] = 5.0
    assert float(t[0]) == 5.0  # zero-copy
    assert backend.host_array(torch.ones(3, requires_grad=True)) is None
    seen = []
    torch.func.vmap(lambda v: seen.append(backend.host_array(v)) or v)(torch.ones(2, 3))
    assert seen == [None]  # a functorch-wrapped tensor has no storage to share


def test_the_kernel_pool_takes_the_share_of_cores_a_scheduler_gives(monkeypatch):
    """dask's worker processes run with OMP_NUM_THREADS=1 (torch and BLAS take one thread there); the kernels'
    pool takes the same share, so several single-threaded workers on one machine do not oversubscribe it."""
    import os

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert backend.cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1000")
    assert backend.cores() == available
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert backend.cores() == available
