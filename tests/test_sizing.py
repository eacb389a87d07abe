"""sa.min_n_out: scikit-learn's Johnson-Lindenstrauss dimension, scaled by each method's variance constant."""

from __future__ import annotations

import math

import pytest
from sklearn.random_projection import johnson_lindenstrauss_min_dim

import sketcharray as sa
from sketcharray.sketches.sizing import VARIANCE_CONSTANT, gaussian_min_dim


@pytest.mark.parametrize("n, eps", [(10, 0.5), (1_000, 0.1), (100_000, 0.25), (2, 0.9)])
def test_the_gaussian_dimension_is_scikit_learns(n, eps):
    assert gaussian_min_dim(n, eps) == int(johnson_lindenstrauss_min_dim(n, eps=eps))
    assert sa.min_n_out(n, eps, "dense") == math.ceil(gaussian_min_dim(n, eps))


def test_each_method_scales_the_gaussian_dimension_by_its_variance():
    base = gaussian_min_dim(5_000, 0.2)
    for method, c in VARIANCE_CONSTANT.items():
        assert sa.min_n_out(5_000, 0.2, method) == math.ceil(base * c / 2)
    assert sa.min_n_out(5_000, 0.2, "afjl") == 4 * base  # up to 8/D against 2/D
    fjl = sa.min_n_out(5_000, 0.2, "fjl", n_in=1 << 16)
    assert base <= fjl < 1.1 * base  # a dense enough FJL is nearly Gaussian
    # QK's variance falls as sum 2/D_i, not 2/D: it needs more than AFJL for the same distortion
    assert sa.min_n_out(200, 0.5, "qk", n_in=1 << 12) > sa.min_n_out(200, 0.5, "dense")


def test_what_no_d_can_do_is_refused():
    with pytest.raises(ValueError, match="ffd is not a sketch"):
        sa.min_n_out(100, 0.1, "ffd")
    with pytest.raises(ValueError, match="needs n_in"):
        sa.min_n_out(100, 0.1, "qk")
    with pytest.raises(ValueError, match="eps must be in"):
        sa.min_n_out(100, 1.5)
    with pytest.raises(ValueError, match="n_examples must be an int >= 2"):
        sa.min_n_out(1)


def test_a_too_large_n_out_says_what_would_work():
    with pytest.raises(ValueError, match=r"the largest n_out it allows for n_in=1000 is 1024; "
                                         r"sketcharray.min_n_out\(n_examples, eps, 'afjl'\) gives .* more than N"):
        sa.make_sketch("afjl", 1000, 4096)
