"""The counter-based generator: distribution, block regeneration, backend agreement."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketcharray.sketches import random as rnd

from .conftest import GPU_BACKENDS, Backend

KEY = rnd.stream_key(7, "test")


def test_stream_key_is_stable_and_distinct():
    assert rnd.stream_key(7, "test") == KEY
    assert rnd.stream_key(8, "test") != KEY
    assert rnd.stream_key(7, "test", "other") != KEY


def test_bits_are_32_bit_and_blocks_regenerate_exactly():
    bits = rnd.random_bits(np, KEY, 0, 10_000)
    assert bits.min() >= 0 and bits.max() < 2**32
    block = rnd.random_bits(np, KEY, 4_000, 3_000)
    np.testing.assert_array_equal(block, bits[4_000:7_000])


def test_counter_above_32_bits_is_distinct_from_low_counters():
    low = rnd.random_bits(np, KEY, 0, 1000)
    high = rnd.random_bits(np, KEY, 2**32, 1000)
    assert not np.array_equal(low, high)


def test_uniform_and_normal_moments():
    # n draws: the sample mean of a U(0,1) has sd 1/sqrt(12 n); of N(0,1) 1/sqrt(n);
    # the sample variance of N(0,1) has sd sqrt(2/n).  Five standard errors.
    n = 400_000
    u = rnd.uniform(np, KEY, 0, n)
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 / np.sqrt(12 * n)
    z = rnd.normal(np, KEY, 0, n)
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)
    # tail mass: P(|z| > 2) = 0.0455; binomial sd sqrt(p(1-p)/n)
    p = 0.04550026
    assert abs(np.mean(np.abs(z) > 2) - p) < 5 * np.sqrt(p * (1 - p) / n)
    # neighbouring draws are uncorrelated (lag-1 correlation sd 1/sqrt(n))
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 / np.sqrt(n)


def test_signs_are_balanced_and_permutations_valid():
    n = 200_000
    s = rnd.signs(np, KEY, n, dtype=np.float32)
    assert set(np.unique(s)) == {-1.0, 1.0}
    assert abs(s.mean()) < 5 / np.sqrt(n)
    perms = rnd.permutations(np, KEY, 257, 5)
    assert perms.shape == (5, 257)
    for p in perms:
        np.testing.assert_array_equal(np.sort(p), np.arange(257))
    assert not np.array_equal(perms[0], perms[1])


def _draws(xp, device=None):
    return (
        rnd.random_bits(xp, KEY, 123, 5000, device=device),
        rnd.normal(xp, KEY, 0, 5000, device=device),
        rnd.permutations(xp, KEY, 1000, 2, device=device),
    )


def _check_same(ref, other, to_numpy):
    np.testing.assert_array_equal(to_numpy(other[0]), ref[0])
    np.testing.assert_allclose(to_numpy(other[1]), ref[1], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(to_numpy(other[2]), ref[2])


def test_torch_generates_the_same_draws_as_numpy():
    import array_api_compat.torch as xpt

    _check_same(_draws(np), _draws(xpt, device=torch.device("cpu")), lambda t: t.numpy())


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
def test_gpu_generates_the_same_draws_as_numpy(backend: Backend):
    import array_api_compat

    probe = backend.asarray(np.zeros(1))
    xp = array_api_compat.array_namespace(probe)
    _check_same(_draws(np), _draws(xp, device=array_api_compat.device(probe)), backend.to_numpy)


def test_long_numpy_streams_are_generated_in_blocks_with_the_same_numbers():
    """numpy generates long streams in blocks on several threads; every draw is a function of its
    index, so the blocks must join into exactly the single-call stream (odd start: pairs straddle)."""
    key = rnd.stream_key(7, "blocked")
    start, count = 12345, 2 * rnd._BLOCK + 777
    np.testing.assert_array_equal(rnd.normal(np, key, start, count), rnd._normal(np, key, start, count, None, None))
    whole = rnd.signs(np, key, count, dtype=np.float32)
    head = rnd.signs(np, key, 1000, dtype=np.float32)
    np.testing.assert_array_equal(whole[:1000], head)
    assert set(np.unique(whole)) == {-1.0, 1.0}
