"""Orthogonal building blocks: Hadamard, Kronecker products, Hartley, truncation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg

from sketcharray.sketches import random as rnd
from sketcharray.sketches import transforms as tf
from sketcharray.sketches.precond import Mixing


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
    np.testing.assert_array_equal(tf.haar_orthogonal(key, 32, rows=5), q[:5])


@pytest.mark.parametrize("precond", ["hadamard", "fft", "kron"])
@pytest.mark.parametrize("permute", [None, "rows", "cols"])
def test_mixing_is_orthogonal_and_truncates(precond, permute, rng):
    n = 256
    full = Mixing(precond, n, rnd.stream_key(1, "mix"), n, permute, max_factor=16)
    st = full.build(np, None, np.float64)
    t = full.forward(np, np.eye(n), st).T  # columns are T e_j
    np.testing.assert_allclose(t @ t.T, np.eye(n), atol=1e-10)
    np.testing.assert_allclose(full.adjoint(np, np.eye(n), st).T, t.T, atol=1e-12)
    cut = Mixing(precond, n, rnd.stream_key(1, "mix"), 40, permute, max_factor=16)
    x = rng.standard_normal((3, n))
    np.testing.assert_allclose(cut.forward(np, x, cut.build(np, None, np.float64)), x @ t.T[:, :40], atol=1e-10)
