"""Sketch operators: adjoints, structure, dtypes, backends, determinism, memory."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sketcharray.sketches import METHODS, make_sketch, sketch_from_spec
from sketcharray.sketches.fastfood import theorem_31_input

from .conftest import GPU_BACKENDS, METHOD_CASES, Backend, case_id

N_ODD = 3001  # not a power of two, a multiple of 8 or a square: exercises padding everywhere


def _make(case, n_in=N_ODD, n_out=64, seed=5):
    method, opts = case
    return make_sketch(method, n_in, n_out, seed=seed, **opts)


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_adjoint_identity_in_float64(case, rng):
    """<Phi x, y> = <x, Phi^T y> to rounding, for any N (padding inside)."""
    op = _make(case)
    x = rng.standard_normal((4, N_ODD))
    y = rng.standard_normal((4, 64))
    lhs = np.sum(op.apply(x) * y, axis=1)
    rhs = np.sum(x * op.adjoint(y), axis=1)
    # float64 rounding: a few ulps times the sum of |terms| (~ sqrt(N) ||x|| ||y||)
    scale = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-12 * float(scale.max()))


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_apply_is_linear_and_rowwise(case, rng):
    op = _make(case)
    x, z = rng.standard_normal((2, 3, N_ODD))
    a, b = 1.7, -0.3
    np.testing.assert_allclose(op.apply(a * x + b * z), a * op.apply(x) + b * op.apply(z), atol=1e-10)
    np.testing.assert_allclose(op.apply(x[1]), op.apply(x)[1], atol=1e-12)
    assert op.apply(x[1]).shape == (64,)
    assert op.adjoint(op.apply(x[1])).shape == (N_ODD,)


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_explicit_matrix_has_the_spec_structure(case):
    """Phi Phi^T from the explicit matrix, against what the formula in docs/sketches.md implies."""
    method, opts = case
    n, d = (576 if method == "qk" else 512), 32  # 576 = 24 x 24: QK's blocks without padding
    op = make_sketch(method, n, d, seed=11, **opts)
    assert op.n_pad == n
    phi = op.apply(np.eye(n)).T  # (d, n), column j = Phi e_j
    np.testing.assert_allclose(op.adjoint(np.eye(d)), phi, atol=1e-12)
    gram = phi @ phi.T
    if method == "qk":
        # Kronecker of orthonormal-row factors, scaled sqrt(N/D): rows orthogonal with norm^2 N/D
        np.testing.assert_allclose(gram, np.eye(d) * op.n_pad / d, atol=1e-10)
    elif method == "afjl" and opts["precond"] != "fft":
        # sqrt(N/D) G R H B: rows are orthogonal, squared norms (N/D) g_i^2
        off = gram - np.diag(np.diag(gram))
        assert np.abs(off).max() < 1e-10 * np.abs(gram).max()
    elif method in ("dense", "dense-otf"):
        # i.i.d. N(0, 1/D) entries: diagonal of Phi Phi^T ~ N/D * chi2_N / N
        assert np.allclose(np.diag(gram), n / d, rtol=5 * np.sqrt(2 / n))
    # every method: E ||Phi e_j||^2 = 1, so the mean over columns is near 1 (loose: structure check only)
    assert 0.5 < np.mean(np.sum(phi**2, axis=0)) < 1.5


def test_dense_otf_regenerates_the_dense_matrix(rng):
    x = rng.standard_normal((3, 5000))
    dense, otf = make_sketch("dense", 5000, 200, seed=2), make_sketch("dense-otf", 5000, 200, seed=2)
    np.testing.assert_array_equal(otf.apply(x), dense.apply(x))
    y = rng.standard_normal((3, 200))
    np.testing.assert_allclose(otf.adjoint(y), dense.adjoint(y), rtol=1e-12, atol=1e-12)
    assert otf.state_nbytes == 0 and dense.state_nbytes == 4 * 5000 * 200


@pytest.mark.parametrize("d", [16, 64, 256])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem_31_identity_ffd_norm_is_one_gaussian_squared(d, seed):
    """x = column c of H_D in block 1, zero elsewhere: ||FFD^T x||^2 = (G_1)_c^2 exactly."""
    n, c = 4096, 5
    op = make_sketch("ffd", n, d, seed=seed)
    x = theorem_31_input(n, d, column=c)
    assert np.isclose(np.sum(x**2), 1.0)
    g = op._state(np, x)["G"][0, c]  # the one Gaussian the theorem names
    np.testing.assert_allclose(np.sum(op.apply(x) ** 2), g**2, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_numpy_dtypes_and_output_dtype(dtype, rng):
    op = make_sketch("afjl", 1000, 32, seed=0)
    x = rng.standard_normal((2, 1000)).astype(dtype)
    y = op.apply(x)
    assert y.dtype == (np.float64 if dtype == "float64" else np.float32)
    ref = op.apply(x.astype(np.float64))
    # float32 accumulation: relative error ~ 1e-6 * sqrt(log N) levels; float16 input is exact in float32
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtypes_and_output_dtype(dtype, rng):
    op = make_sketch("qk", 1000, 32, seed=0)
    x = torch.as_tensor(rng.standard_normal((2, 1000))).to(dtype)
    y = op.apply(x)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = op.apply(x.double().numpy())
    np.testing.assert_allclose(y.double().numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _assert_backend_agrees(op, backend: Backend, rng, dtype):
    x = rng.standard_normal((3, op.n_in))
    y = rng.standard_normal((3, op.n_out))
    got = backend.to_numpy(op.apply(backend.asarray(x, dtype)))
    ref = op.apply(x)
    tol = 1e-10 if dtype == "float64" else 2e-4
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    got_adj = backend.to_numpy(op.adjoint(backend.asarray(y, dtype)))
    ref_adj = op.adjoint(y)
    np.testing.assert_allclose(got_adj, ref_adj, rtol=tol, atol=tol * np.abs(ref_adj).max())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_torch_cpu_agrees_with_numpy(case, dtype, rng):
    _assert_backend_agrees(_make(case), Backend("torch-cpu"), rng, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS, ids=str)
@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_gpu_agrees_with_numpy(case, backend, rng):
    op = _make(case)
    _assert_backend_agrees(op, backend, rng, "float64")
    _assert_backend_agrees(op, backend, rng, "float32")
    x = backend.asarray(rng.standard_normal((2, N_ODD)))
    assert type(op.apply(x)) is type(x)


@pytest.mark.parametrize("case", METHOD_CASES, ids=case_id)
def test_spec_round_trips_and_values_compare_by_spec(case):
    op = _make(case)
    again = sketch_from_spec(op.spec)
    assert again == op and hash(again) == hash(op)
    assert pickle.loads(pickle.dumps(op)) == op
    assert _make(case, seed=6) != op
    x = np.random.default_rng(0).standard_normal((2, N_ODD))
    op.apply(x)  # fills the cache of op only
    np.testing.assert_array_equal(again.apply(x), op.apply(x))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(op)).apply(x), op.apply(x))


def test_same_spec_gives_identical_output_in_another_process(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, N_ODD))
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(
        f"""
        import numpy as np
        from sketcharray.sketches import make_sketch
        from tests.conftest import METHOD_CASES
        x = np.load({str(tmp_path / "x.npy")!r})
        out = {{f"{{m}}{{o}}": make_sketch(m, {N_ODD}, 64, seed=5, **o).apply(x) for m, o in METHOD_CASES}}
        np.savez({str(tmp_path / "out.npz")!r}, **out)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(_repo_root()))
    other = np.load(tmp_path / "out.npz")
    for case in METHOD_CASES:
        method, opts = case
        np.testing.assert_array_equal(other[f"{method}{opts}"], _make(case).apply(x))


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("method", ["affd", "afjl", "qk", "ffd"])
def test_lookup_free_state_does_not_grow_with_d(method):
    n = 1 << 16
    sizes = {d: make_sketch(method, n, d, seed=0).state_nbytes for d in (16, 256, 4096)}
    if method in ("affd", "afjl"):
        assert len(set(sizes.values())) == 1, sizes
    elif method == "qk":
        op = make_sketch("qk", n, 4096, seed=0)
        assert max(sizes.values()) <= 4 * sum(b * b for b in op.blocks)
    else:  # ffd: 4 vectors of length N (padded to a multiple of D)
        assert max(sizes.values()) <= 4 * 6 * (n + 4096) + 4 * 64 * 64
    # and far below a D x N matrix
    assert max(sizes.values()) < 4 * 4096 * n / 50


@pytest.mark.parametrize("method", [m for m in METHODS if m != "dense"])
def test_apply_never_allocates_a_d_by_n_matrix(method):
    n, d, batch = 1 << 15, 1 << 10, 2
    x = np.random.default_rng(0).standard_normal((batch, n))
    op = make_sketch(method, n, d, seed=0)
    op.apply(x[:1])  # build the state outside the measurement
    tracemalloc.start()
    op.apply(x)
    op.adjoint(np.ones((batch, d)))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < (8 * d * n) / 4, f"{method} peaked at {peak:,} bytes"


def test_fjl_state_grows_with_d_and_density():
    n = 1 << 16
    small, large = (make_sketch("fjl", n, d, seed=0).state_nbytes for d in (256, 4096))
    assert large > 8 * small
    assert make_sketch("fjl", n, 256, seed=0, q=0.5).state_nbytes > 10 * small


@settings(max_examples=60, deadline=None)
@given(
    case=st.sampled_from(METHOD_CASES),
    n_in=st.integers(1, 700),
    log_d=st.integers(0, 9),
    batch=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_adjoint_identity_for_any_sizes(case, n_in, log_d, batch, seed):
    """Property: <Phi x, y> = <x, Phi^T y> for every admissible (N, D), padding included."""
    method, opts = case
    n_out = 1 << log_d
    try:
        op = make_sketch(method, n_in, n_out, seed=seed, **opts)
    except ValueError:
        assume(False)  # an inadmissible D for this N (too large, or no QK factorisation)
    g = np.random.default_rng(seed)
    x, y = g.standard_normal((batch, n_in)), g.standard_normal((batch, n_out))
    lhs, rhs = np.sum(op.apply(x) * y, axis=1), np.sum(x * op.adjoint(y), axis=1)
    scale = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) * max(1.0, np.sqrt(op.n_pad / n_out))
    np.testing.assert_allclose(lhs, rhs, rtol=0, atol=1e-11 * float(scale.max()))


@pytest.mark.parametrize("case", [c for c in METHOD_CASES if c[1].get("precond", "hadamard") == "hadamard"
                                  and c[0] in ("fjl", "ffd", "affd", "afjl")], ids=case_id)
def test_butterfly_path_matches_the_kronecker_products(case, rng, monkeypatch):
    """On the CPU the full Kronecker Hadamard runs as the compiled FWHT; GPUs multiply by the factors.
    Both must be the same operator (float64 rounding)."""
    from sketcharray.sketches.precond import Preconditioner

    x, y = rng.standard_normal((3, N_ODD)), rng.standard_normal((3, 64))
    fast = _make(case)
    fwd, adj = fast.apply(x), fast.adjoint(y)
    monkeypatch.setattr(Preconditioner, "_butterflies", lambda self, *arrays: False)
    slow = _make(case)
    np.testing.assert_allclose(fwd, slow.apply(x), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(adj, slow.adjoint(y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_in, n_out", [(N_ODD, 64), (1 << 12, 64), (5000, 700), (1 << 13, 1 << 13)])
@pytest.mark.parametrize("block", [None, 1 << 6])
def test_affd_is_its_definition_with_the_row_permutation_moved(n_in, n_out, block, rng, monkeypatch):
    """AFFD runs H^{pi2} G P H as (H^{pi2} P)(P^T G P) H, so the FWHT needs no gather: the same matrix.

    Built here from the paper's eq. 6 (docs/sketches.md) with the drawn permutations (rows of H1's factors,
    columns of H2's), on the host (compiled FWHT, with H2's first contraction fused into the FWHT's last pass when the
    lowest group is small) and through torch (the factors' products)."""
    from sketcharray.sketches import random as rnd
    from sketcharray.sketches import transforms as tf

    if block:
        from sketcharray.sketches import backend

        monkeypatch.setattr(backend, "FWHT_BLOCK", block)
    op = make_sketch("affd", n_in, n_out, seed=7)
    h1, h2 = op._precond("H1", op.n_pad, "rows"), op._precond("H2", op.n_out, "cols")
    m1 = [tf.hadamard(b)[p] for b, p in zip(h1.factors, h1.perms())]
    m2 = [tf.hadamard(b)[:, p] for b, p in zip(h2.factors, h2.perms())]
    g = rnd.normal(np, op.key("G"), 0, op.n_pad) * np.sqrt(op.n_pad / n_out)
    signs = rnd.signs(np, op.key("B"), n_in, dtype=np.float64)
    x, y = rng.standard_normal((3, n_in)), rng.standard_normal((3, n_out))
    expected = tf.kron_apply(np, tf.kron_apply(np, x * signs, m1) * g, m2)[:, :n_out]
    np.testing.assert_allclose(op.apply(x), expected, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(op.apply(torch.from_numpy(x).requires_grad_(False)).numpy(), expected,
                               rtol=1e-10, atol=1e-11)
    adjoint = tf.kron_apply(np, tf.kron_apply(np, y, m2, transpose=True)[:, : op.n_pad] * g, m1, transpose=True)
    np.testing.assert_allclose(op.adjoint(y), adjoint[:, :n_in] * signs, rtol=1e-10, atol=1e-11)


def test_revision_names_a_changed_construction():
    """Haar factors changed construction in 0.2: their specs carry revision 2, and a spec of
    another revision is refused rather than silently rebuilt as a different operator."""
    qk, kron, had = (make_sketch(m, 5000, 64, **o) for m, o in
                     (("qk", {}), ("affd", {"precond": "kron"}), ("affd", {})))
    assert qk.spec["revision"] == 2 and kron.spec["revision"] == 2 and "revision" not in had.spec
    assert sketch_from_spec(qk.spec) == qk
    with pytest.raises(ValueError, match=r"revision 1 of sketch 'qk'.*builds revision 2"):
        sketch_from_spec({**qk.spec, "revision": 1})


@pytest.mark.parametrize("module", ["affd", "dense", "fastfood", "fjl", "qk", "__init__"])
def test_each_operators_docstring_example_runs(module):
    """Each operator's class docstring has an example (issue 15: read each operator next to its equation);
    run here, so an example cannot drift from what the code does."""
    import doctest
    import importlib

    mod = importlib.import_module("sketcharray.sketches" + ("" if module == "__init__" else f".{module}"))
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0, result
