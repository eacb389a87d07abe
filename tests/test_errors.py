"""Bad input fails early with a message naming the argument, the expected and the given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketcharray.sketches import SketchMemoryError, make_sketch


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match=r"unknown sketch method 'jl'.*'affd'"):
        make_sketch("jl", 100, 10)


def test_unknown_option_names_the_allowed_ones():
    with pytest.raises(TypeError, match=r"'qk' got unknown option\(s\) \['precond'\].*blocks"):
        make_sketch("qk", 100, 10, precond="fft")
    with pytest.raises(TypeError, match=r"'dense' got unknown option\(s\) \['q'\]; allowed options: none"):
        make_sketch("dense", 100, 10, q=0.1)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"precond": "wavelet"}, r"precond must be one of \['hadamard', 'fft', 'kron'\]; got 'wavelet'"),
        ({"max_factor": 100}, r"max_factor must be a power of two in \[2, 1024\]; got 100"),
        ({"q": 0.0}, r"q \(fjl density\) must be in \(0, 1\]; got q=0.0"),
    ],
)
def test_bad_option_values(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_sketch("fjl", 100, 10, **kwargs)


@pytest.mark.parametrize("method", ["dense", "fjl", "ffd", "affd", "afjl", "qk"])
def test_n_out_too_large_names_the_limit(method):
    with pytest.raises(ValueError, match=r"n_out=5000 exceeds the padded input length \d+ for method"):
        make_sketch(method, 3000, 5000)


def test_n_out_and_n_in_must_be_positive_ints():
    with pytest.raises(ValueError, match="n_out must be >= 1; got n_out=0"):
        make_sketch("afjl", 100, 0)
    with pytest.raises(ValueError, match="n_in must be >= 1; got n_in=-3"):
        make_sketch("afjl", -3, 1)
    with pytest.raises(TypeError, match="n_out must be an int; got float 8.0"):
        make_sketch("afjl", 100, 8.0)


def test_ffd_hadamard_needs_a_power_of_two():
    with pytest.raises(ValueError, match="ffd with precond='hadamard' needs n_out a power of two.*n_out=24"):
        make_sketch("ffd", 1000, 24)
    make_sketch("ffd", 1000, 24, precond="fft")  # any D with the Hartley transform


def test_qk_impossible_factorisation():
    with pytest.raises(ValueError, match=r"n_out=4099 cannot be written as a product of 2 factors D_i <= B_i"):
        make_sketch("qk", 1 << 16, 4099)  # 4099 is prime and larger than the blocks (256)
    with pytest.raises(ValueError, match=r"out_factors \[8, 8\] multiply to 64, not n_out=32"):
        make_sketch("qk", 1024, 32, blocks=[32, 32], out_factors=[8, 8])


def test_state_too_large_raises_before_allocating():
    with pytest.raises(SketchMemoryError, match=r"'dense' with n_in=1073741824, n_out=65536 needs [\d,]+ bytes"):
        make_sketch("dense", 1 << 30, 1 << 16)
    with pytest.raises(MemoryError, match="fjl"):
        make_sketch("fjl", 1 << 30, 1 << 24)
    make_sketch("afjl", 1 << 30, 1 << 24)  # lookup-free: state independent of D, nothing allocated yet


@pytest.fixture
def op():
    return make_sketch("afjl", 300, 16, seed=0)


def test_wrong_trailing_dimension(op):
    with pytest.raises(ValueError, match=r"x has trailing dimension 299; expected n_in=300 for sketch 'afjl'"):
        op.apply(np.zeros((2, 299)))
    with pytest.raises(ValueError, match=r"y has trailing dimension 15; expected n_out=16"):
        op.adjoint(np.zeros((2, 15)))


def test_wrong_rank_and_type(op):
    with pytest.raises(ValueError, match=r"x must have shape \(n_in,\) or \(batch, n_in\) with n_in=300; got shape \(2, 3, 300\)"):
        op.apply(np.zeros((2, 3, 300)))
    with pytest.raises(TypeError, match="x must have a floating dtype.*got int64"):
        op.apply(np.zeros((2, 300), dtype=np.int64))
    with pytest.raises(TypeError, match="x must be a numpy array, torch tensor or cupy array; got list"):
        op.apply([0.0] * 300)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_the_rows(op, bad):
    x = np.ones((4, 300))
    x[2, 17] = bad
    with pytest.raises(ValueError, match=r"x contains non-finite values \(NaN or inf\) in row\(s\) \[2\]"):
        op.apply(x)
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        op.apply(torch.as_tensor(x))
    assert not np.isfinite(op.apply(x, check_finite=False)[2]).all()


def test_non_finite_detected_for_every_method():
    for method in ("dense", "dense-otf", "fjl", "ffd", "affd", "afjl", "qk"):
        x = np.ones((2, 300))
        x[1, 299] = np.nan  # the last coordinate: FJL's sparse rows still see it through H
        with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
            make_sketch(method, 300, 16, seed=0).apply(x)
