"""Eigen-solvers on the sketched Hessian against dense eigenvalues of Phi H Phi^T."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sketcharray.collect
from sketcharray.analysis import hessian_spectrum, lanczos, randomized, spectrum_statistics
from sketcharray.analysis.eigen import plot_spectrum_evolution
from sketcharray.sketches import make_sketch
from sketcharray.workloads import cross_entropy_per_example

from ..torch.test_grads import tiny_batch, tiny_model
from ..torch.test_hvp import exact_hessian


@pytest.mark.parametrize("solver", [lanczos, randomized])
def test_solvers_find_both_ends_of_a_known_spectrum(solver):
    rng = np.random.default_rng(0)
    d = 200
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ev = np.concatenate([[40.0, 25.0, 9.0], rng.uniform(-1, 1, d - 6), [-2.0, -6.0, -15.0]])
    a = (q * ev) @ q.T
    out = solver(lambda x: x @ a, d, 3, solver={"tol": 1e-9}, progress=False)
    np.testing.assert_allclose(out["positive"][0], [40, 25, 9], rtol=1e-7)
    np.testing.assert_allclose(out["negative"][0], [-15, -6, -2], rtol=1e-7)
    vecs = out["positive"][1]
    np.testing.assert_allclose(np.abs(vecs[:, 0] @ q[:, 0]), 1.0, atol=1e-6)
    assert out["positive"][2].max() < 1e-6 * 40


def test_lanczos_with_a_float32_basis_keeps_float32_accuracy():
    # the long reference runs store the Krylov basis in float32; the top eigenvalues then carry float32
    # rounding relative to the spectral scale: tol ~ a few x 1e-7 x lambda_max x sqrt(iterations)
    rng = np.random.default_rng(1)
    d = 300
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ev = np.concatenate([[50.0, 30.0, 20.0], rng.uniform(-1, 1, d - 3)])
    a = (q * ev) @ q.T
    out = lanczos(lambda x: x @ a, d, 3, progress=False,
                  solver={"which": "top", "tol": 1e-6, "basis_dtype": "float32"})
    np.testing.assert_allclose(out["positive"][0], [50, 30, 20], rtol=1e-5)
    assert out["positive"][1].dtype == np.float32


@pytest.fixture(scope="module")
def small_problem():
    model = tiny_model()
    batches = [tiny_batch(40, seed=3)]
    h, ps = exact_hessian(model, batches)
    return model, batches, h.numpy(), ps


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_spectrum_equals_dense_eigenvalues_of_phi_h_phi_t(small_problem, method):
    model, batches, h, ps = small_problem
    op = make_sketch("affd", ps.n, 32, seed=0)
    phi = op.apply(np.eye(ps.n)).T
    exact = np.linalg.eigvalsh(phi @ h @ phi.T)
    assert exact[0] < 0 < exact[-1]  # an indefinite Hessian: both ends matter
    ds = hessian_spectrum(model, cross_entropy_per_example, batches, op, k=3, solver={"method": method, "tol": 1e-10},
                          execution={"progress": False})
    assert ds.eigenvalue.dims == ("sign", "rank") and list(ds.sign.values) == ["positive", "negative"]
    np.testing.assert_allclose(ds.eigenvalue.sel(sign="positive"), exact[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(ds.eigenvalue.sel(sign="negative"), exact[:3], rtol=1e-6)
    assert float(ds.eigenvalue.sel(sign="negative", rank=1)) < 0
    assert ds.attrs["hvps"] > 0 and ds.attrs["hvp_seconds"] > 0 and ds.attrs["setup_seconds"] > 0


def test_statistics_match_numpy():
    vals = np.array([[[10.0, 3.0, 2.5, 1.0], [-4.0, -1.0, -0.5, -0.1]],
                     [[8.0, 1.0, 0.5, 0.2], [-0.8, -0.2, -0.1, 0.0]]])
    import xarray as xr

    ds = xr.Dataset({"eigenvalue": (("checkpoint", "sign", "rank"), vals)},
                    coords={"checkpoint": ["a", "b"], "sign": ["positive", "negative"], "rank": [1, 2, 3, 4]})
    st = spectrum_statistics(ds)
    np.testing.assert_allclose(st.RNEG.values, [0.4, 0.1])
    np.testing.assert_allclose(st.R.values, vals[:, 0] / vals[:, 0, :1])
    assert st.outliers.values.tolist() == [3, 1]  # R > 0.2: {1, 0.3, 0.25} and {1}
    assert st.outliers_at_least.values.tolist() == [False, False]
    saturated = spectrum_statistics(ds.isel(rank=slice(0, 3)))  # all 3 computed are outliers at checkpoint a
    assert saturated.outliers_at_least.values.tolist() == [True, False]
    from sketcharray.analysis.eigen import format_outliers

    assert format_outliers(saturated) == [">= 3", "1"]


def test_checkpoints_are_saved_and_reused(small_problem, tmp_path, monkeypatch):
    model, batches, _, ps = small_problem
    states = {"early": {k: v * 0.5 for k, v in model.state_dict().items()}, "late": model.state_dict()}
    spec = {"method": "qk", "n_out": 16, "seed": 0}
    kwargs = dict(k=2, checkpoints=states, store=tmp_path / "spec", execution={"progress": False},
                  solver={"tol": 1e-10})
    ds = hessian_spectrum(tiny_model(), cross_entropy_per_example, batches, spec, **kwargs)
    assert ds.eigenvalue.dims == ("checkpoint", "sign", "rank") and list(ds.checkpoint.values) == ["early", "late"]
    calls = []
    original = sketcharray.collect.subspace_hessian
    monkeypatch.setattr(sketcharray.collect, "subspace_hessian", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = hessian_spectrum(tiny_model(), cross_entropy_per_example, batches, spec, **kwargs)
    assert calls == []  # both checkpoints loaded from the store
    np.testing.assert_allclose(again.eigenvalue.values, ds.eigenvalue.values)
    with pytest.raises(ValueError,
                       match="holds a spectrum computed with .*'n_out': 16.*this call asks for .*'n_out': 8"):
        hessian_spectrum(tiny_model(), cross_entropy_per_example, batches, dict(spec, n_out=8), **kwargs)
    assert calls == []
    stats = spectrum_statistics(ds)
    plot_spectrum_evolution(stats, tmp_path / "fig2.png")
    assert (tmp_path / "fig2.png").stat().st_size > 5000
    torch.testing.assert_close(model.state_dict()["0.weight"], states["late"]["0.weight"])


def test_small_solves_run_numpy_blas_on_one_thread():
    """Krylov algebra on D-vectors alternates with torch's HVPs; for small D NumPy's BLAS pool is held at one
    thread so the two libraries' spinning pools do not take each other's cores."""
    from threadpoolctl import threadpool_info

    from sketcharray.analysis.spectrum.common import ONE_BLAS_THREAD_DIM, _one_blas_thread

    def blas_threads():
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    before = blas_threads()
    with _one_blas_thread(1024):
        assert blas_threads() <= {1}
    assert blas_threads() == before
    with _one_blas_thread(ONE_BLAS_THREAD_DIM + 1):
        assert blas_threads() == before


@pytest.mark.parametrize("spectrum, k, top, bottom", [
    # the ends hold eigenvalues of their sign only (issue 22): zeros and positives are no negative end
    ([3.0, -2.0] + [0.0] * 18, 5, [3], [-2]),  # invariant after 3 steps, k = 5
    ([5.0, 5.0, 5.0, 1.0, -1.0] + [0.5] * 25, 3, [5, 5, 5], [-1]),  # a repeated top eigenvalue
])
def test_lanczos_restarts_when_the_krylov_space_becomes_invariant(spectrum, k, top, bottom):
    d = len(spectrum)
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((d, d)))
    a = (q * np.asarray(spectrum)) @ q.T
    out = lanczos(lambda x: x @ a, d, k, progress=False, solver={"tol": 1e-10})
    assert out["restarts"] >= 1
    np.testing.assert_allclose(out["positive"][0], top, atol=1e-8)
    np.testing.assert_allclose(out["negative"][0], bottom, atol=1e-8)
    vecs = out["positive"][1]
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(len(top)), atol=1e-8)  # distinct vectors for a repeated value
    np.testing.assert_allclose(np.linalg.norm(vecs.T @ a - out["positive"][0][:, None] * vecs.T, axis=1), 0,
                               atol=1e-7)


def test_stored_spectra_are_keyed_on_weights_and_data_and_the_callers_model_is_untouched(small_problem, tmp_path):
    model, batches, _, ps = small_problem
    spec = {"method": "qk", "n_out": 16, "seed": 0}
    states = {"c": {k: v * 0.5 for k, v in model.state_dict().items()}}
    mine = tiny_model()
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    kwargs = dict(k=2, store=tmp_path / "spec", execution={"progress": False}, solver={"tol": 1e-10})
    hessian_spectrum(mine, cross_entropy_per_example, batches, spec, checkpoints=states, **kwargs)
    for key, value in mine.state_dict().items():  # the checkpoint went into a copy
        torch.testing.assert_close(value, before[key])
    other_weights = {"c": {k: v * 0.25 for k, v in model.state_dict().items()}}
    with pytest.raises(ValueError, match=r"holds a spectrum computed with \{'model_fingerprint'"):
        hessian_spectrum(mine, cross_entropy_per_example, batches, spec, checkpoints=other_weights, **kwargs)
    x, y = batches[0]
    with pytest.raises(ValueError, match=r"holds a spectrum computed with \{'data_fingerprint'"):
        hessian_spectrum(mine, cross_entropy_per_example, [(x[:-1], y[:-1])], spec, checkpoints=states, **kwargs)
    with pytest.raises(ValueError, match=r"holds a spectrum computed with \{'solver_options'"):
        hessian_spectrum(mine, cross_entropy_per_example, batches, spec, checkpoints=states, **{**kwargs, "solver": {"tol": 1e-4}})


def test_seeds_give_error_bars_and_an_orthogonal_full_size_sketch_has_no_error(small_problem):
    model, batches, h, ps = small_problem
    exact = np.linalg.eigvalsh(h)
    # QK at D = the padded length is sqrt(N/D) times a Kronecker product of square orthogonal factors: Phi^T Phi
    # is the identity on R^N, so K holds H's eigenvalues (and zeros): no sketching error, for every seed
    full = make_sketch("qk", ps.n, 1, seed=0).max_n_out
    ds = hessian_spectrum(model, cross_entropy_per_example, batches, {"method": "qk", "n_out": full}, k=3,
                          seeds=(0, 1, 2), solver={"tol": 1e-12}, execution={"progress": False})
    assert ds.eigenvalue.dims == ("seed", "sign", "rank") and ds.seed.values.tolist() == [0, 1, 2]
    for s in range(3):
        np.testing.assert_allclose(ds.eigenvalue.sel(seed=s, sign="positive"), exact[::-1][:3], rtol=1e-6)
        np.testing.assert_allclose(ds.eigenvalue.sel(seed=s, sign="negative", rank=1), exact[0], rtol=1e-6)
    assert float(ds.eigenvalue_spread.sel(sign="positive").max()) < 1e-6 * exact[-1]
    assert "eigenvalues of the sketched Hessian K = Phi H Phi^T" in ds.attrs["note"]
    # at small D the sketches disagree: the spread is the standard deviation of the per-seed eigenvalues
    small = hessian_spectrum(model, cross_entropy_per_example, batches, ("affd", 16), k=3, seeds=(0, 1, 2, 3),
                             solver={"tol": 1e-10}, execution={"progress": False})
    per_seed = small.eigenvalue.values
    np.testing.assert_allclose(small.eigenvalue_mean.values, per_seed.mean(0), rtol=1e-12)
    np.testing.assert_allclose(small.eigenvalue_spread.values, per_seed.std(0, ddof=1), rtol=1e-12)
    assert float(small.eigenvalue_spread.sel(sign="positive", rank=1)) > 0
    stats = spectrum_statistics(small)
    np.testing.assert_allclose(stats.RNEG_mean.values, stats.RNEG.values.mean(), rtol=1e-12)
    assert stats.RNEG_spread.values > 0


def _k_pass(small_problem, probes, seed=0, d=32):
    from sketcharray.collect import sketch_hvps

    model, batches, h, ps = small_problem
    op = make_sketch("affd", ps.n, d, seed=0)
    phi = op.apply(np.eye(ps.n)).T
    ds = sketch_hvps(model, cross_entropy_per_example, batches, op, probes=probes, seed=seed, space="sketch",
                     execution={"probes_per_task": 8})
    return ds, phi @ h @ phi.T, op


def test_a_sketch_space_pass_is_k_times_omega_and_stays_lazy(small_problem):
    ds, k_exact, _ = _k_pass(small_problem, 12)
    import dask.array as da

    assert isinstance(ds.hvp.data, da.Array) and ds.attrs["probe_space"] == "sketch"
    assert ds.hvp.data.npartitions == 2  # 12 probes, 8 a task: nothing computed while building the graph
    omega = ds.omega.values
    assert omega.shape == (12, 32) and omega.dtype == np.float32
    # float32 storage of Y: relative error ~ 1e-7 per entry times sqrt(D) accumulation, 1e-5 leaves room
    np.testing.assert_allclose(ds.hvp.values, omega @ k_exact.T, rtol=0, atol=1e-5 * np.abs(omega @ k_exact).max())


def _float32_bound(ds, k_exact, oversampling):
    # Y is stored in float32 (eps = 6e-8 per entry, sqrt(D) over a row); solving B (Q^T Omega) = Q^T Y
    # amplifies a relative perturbation of Y by at most cond(Q^T Omega), so by Weyl each eigenvalue is off
    # by at most about sqrt(D) eps cond ||K||; the condition is computed from the data as the solver forms it.
    y, omega = ds.hvp.values.T.astype(np.float64), ds.omega.values.T.astype(np.float64)
    q, r = np.linalg.qr(y)
    u = np.linalg.svd(r)[0][:, : y.shape[1] - oversampling]
    cond = np.linalg.cond(u.T @ q.T @ omega)
    return np.sqrt(y.shape[0]) * 6e-8 * cond * np.abs(np.linalg.eigvalsh(k_exact)).max()


@pytest.mark.parametrize("rows", [8, 1 << 14])
def test_single_pass_spectrum_is_exact_when_the_probes_span_the_sketch_space(small_problem, rows):
    """With l = D probes and no oversampling, range(Y) is the whole sketch space: B is Q^T K Q, up to
    rounding (bound above).  Blocks of 8 rows (a TSQR over 4 blocks) give the same numbers as one."""
    from sketcharray.analysis import single_pass_spectrum

    ds, k_exact, _ = _k_pass(small_problem, 32)
    exact = np.linalg.eigvalsh(k_exact)
    assert exact[0] < 0 < exact[-1]  # indefinite: both ends from one pass
    out = single_pass_spectrum(ds, k=3, rows=rows, oversampling=0)
    bound = _float32_bound(ds, k_exact, 0)
    np.testing.assert_allclose(out.eigenvalue.sel(sign="positive"), exact[::-1][:3], rtol=0, atol=bound)
    np.testing.assert_allclose(out.eigenvalue.sel(sign="negative"), exact[:3], rtol=0, atol=bound)
    assert out.attrs["probes"] == 32 and out.attrs["oversampling"] == 0
    assert np.isnan(out.residual).all()  # no residuals from one pass


def _signed_ce(output, batch):
    return batch[2] * cross_entropy_per_example(output, batch)


def test_single_pass_spectrum_is_exact_for_a_low_rank_indefinite_hessian_and_its_fit_says_so(small_problem):
    """A linear classifier on 3 examples, one of them with a negative weight: H = sum a_i J_i^T S_i J_i has
    rank <= 3 x 2 (softmax curvature has rank C - 1 = 2) and both signs.  12 probes with 4 of oversampling
    model rank 8 >= 6: exact up to float32 rounding, with a fit of 0 (rounding); the full-rank K of the
    small problem with the same 12 probes is not, and its fit says so."""
    from torch.func import functional_call, hessian

    from sketcharray.analysis import single_pass_spectrum
    from sketcharray.collect import sketch_hvps
    from sketcharray.torch import select_params

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    batch = (x, torch.tensor([0, 1, 2]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    ps = select_params(model)
    theta = ps.flatten({k: v.detach() for k, v in model.named_parameters()})
    h = hessian(lambda flat: _signed_ce(functional_call(model, ps.unflatten(flat), (x,)), batch).mean())(theta)
    op = make_sketch("affd", ps.n, 16, seed=1)
    phi = op.apply(np.eye(ps.n)).T
    k_exact = phi @ h.numpy() @ phi.T
    exact = np.linalg.eigvalsh(k_exact)
    scale = np.abs(exact).max()
    assert (exact > 1e-8 * scale).sum() >= 2 and (exact < -1e-8 * scale).sum() == 2  # rank <= 6, indefinite
    ds = sketch_hvps(model, _signed_ce, [batch], op, probes=12, space="sketch", seed=2)
    out = single_pass_spectrum(ds, k=2, oversampling=4)
    bound = _float32_bound(ds, k_exact, 4)
    np.testing.assert_allclose(out.eigenvalue.sel(sign="positive"), exact[::-1][:2], rtol=0, atol=bound)
    np.testing.assert_allclose(out.eigenvalue.sel(sign="negative"), exact[:2], rtol=0, atol=bound)
    assert out.attrs["relative_fit"] < 1e-4  # float32 rounding of Y only
    full_rank = single_pass_spectrum(_k_pass(small_problem, 12)[0], k=2, oversampling=4)
    assert full_rank.attrs["relative_fit"] > 1e-2


def test_single_pass_spectrum_agrees_with_lanczos_from_a_store(small_problem, tmp_path):
    """The same K through a Zarr store read back lazily: one pass of l = D probes against Lanczos on the
    live operator, both accurate to the float32 bound of the single pass."""
    from sketcharray.analysis import single_pass_spectrum
    from sketcharray.storage.store import open_zarr_dataset

    model, batches, h, ps = small_problem
    ds, k_exact, op = _k_pass(small_problem, 32)
    ds.to_zarr(tmp_path / "y.zarr", zarr_format=3, consolidated=False)
    stored = open_zarr_dataset(tmp_path / "y.zarr")
    out = single_pass_spectrum(stored, k=3, oversampling=0)
    lz = hessian_spectrum(model, cross_entropy_per_example, batches, op, k=3, solver={"tol": 1e-10},
                          execution={"progress": False})
    np.testing.assert_allclose(out.eigenvalue, lz.eigenvalue, rtol=0, atol=_float32_bound(ds, k_exact, 0))
    # the resumable store keeps Y only (checksummed, per block); Omega is regenerated from the seed, exactly
    from sketcharray.collect import sketch_hvps
    from sketcharray.storage.store import open_sketches

    sketch_hvps(model, cross_entropy_per_example, batches, op, probes=32, space="sketch", store=tmp_path / "s.zarr",
                execution={"probes_per_task": 8, "progress": False})
    resumable = open_sketches(tmp_path / "s.zarr")
    assert "omega" not in resumable and resumable.attrs["probe_space"] == "sketch"
    np.testing.assert_array_equal(resumable.hvp.values, ds.hvp.values)
    again = single_pass_spectrum(resumable, k=3, oversampling=0)
    np.testing.assert_array_equal(again.eigenvalue, out.eigenvalue)


def test_single_pass_spectrum_refuses_parameter_space_probes(small_problem):
    from sketcharray.analysis import single_pass_spectrum
    from sketcharray.collect import sketch_hvps

    model, batches, h, ps = small_problem
    ds = sketch_hvps(model, cross_entropy_per_example, batches, make_sketch("affd", ps.n, 32, seed=0), probes=4)
    with pytest.raises(ValueError, match="probe_space='parameters'"):
        single_pass_spectrum(ds, k=2)
    ds, _, _ = _k_pass(small_problem, 4)
    with pytest.raises(ValueError, match=r"between 1 and the probes less the oversampling \(4 - 1 = 3\); got 4"):
        single_pass_spectrum(ds, k=4)
    with pytest.raises(ValueError, match="oversampling must be between 0 and 3"):
        single_pass_spectrum(ds, k=1, oversampling=4)
    with pytest.raises(ValueError, match="space must be 'parameters' or 'sketch'"):
        sketch_hvps(model, cross_entropy_per_example, batches, "affd", space="weights")


def test_sharded_products_equal_the_in_process_operator(small_problem):
    """K W as a dask reduction over shards of the data (threads here): the same float64 products summed in
    another order, so equal to ~N eps of the largest entry."""
    from sketcharray.collect import ShardedSubspaceHessian, subspace_hessian

    model, batches, h, ps = small_problem
    many = [tiny_batch(8, seed=s) for s in range(5)]
    op = make_sketch("affd", ps.n, 32, seed=0)
    local = subspace_hessian(model, cross_entropy_per_example, many, op)
    sharded = subspace_hessian(model, cross_entropy_per_example, many, op, execution={"shards": 3})
    assert isinstance(sharded, ShardedSubspaceHessian) and sharded.shards == 3
    w = np.random.default_rng(0).standard_normal((4, 32))
    expected = local.matvec(w)
    np.testing.assert_allclose(sharded.matvec(w), expected, rtol=0, atol=ps.n * 2.2e-16 * np.abs(expected).max())
    np.testing.assert_allclose(sharded.matvec(w[1]), expected[1], rtol=0, atol=ps.n * 2.2e-16 * np.abs(expected).max())
    assert sharded.hvps == 5 and sharded.hvp_seconds > 0
    # one shard per batch at most
    assert subspace_hessian(model, cross_entropy_per_example, many, op, execution={"shards": 99}).shards == 5
    with pytest.raises(ValueError, match="shards must be a positive int or None; got 0"):
        subspace_hessian(model, cross_entropy_per_example, many, op, execution={"shards": 0})


def test_a_local_cluster_computes_the_same_spectrum_with_named_tasks(small_problem):
    """Lanczos on K whose products run as tasks on two worker processes: the eigenvalues of the threaded
    in-process solve (float64 products equal to rounding; Lanczos from the same start vector)."""
    distributed = pytest.importorskip("distributed")
    model, batches, h, ps = small_problem
    many = [tiny_batch(8, seed=s) for s in range(4)]
    op = make_sketch("affd", ps.n, 32, seed=0)
    local = hessian_spectrum(model, cross_entropy_per_example, many, op, k=3, solver={"tol": 1e-10},
                             execution={"progress": False})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            distributed.Client(c) as client:
        spread = hessian_spectrum(model, cross_entropy_per_example, many, op, k=3, solver={"tol": 1e-10},
                                  execution={"progress": False, "shards": 2})
        prefixes = set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
    np.testing.assert_allclose(spread.eigenvalue, local.eigenvalue, rtol=1e-9)
    assert spread.attrs["shards"] == 2 and spread.attrs["hvps"] == local.attrs["hvps"]
    assert "hessian-vector-products" in prefixes


def _known_operator(d=120):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ev = np.concatenate([[40.0, 25.0, 9.0], rng.uniform(-1, 1, d - 6), [-2.0, -6.0, -15.0]])
    return (q * ev) @ q.T


def test_a_lanczos_solve_killed_with_sigkill_resumes_to_the_same_numbers(tmp_path):
    """A process that SIGKILLs itself in the middle of its 10th product; the rerun reads the 9 committed
    products from the state folder, computes only the rest, and gives the uninterrupted solve's numbers."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    a = _known_operator()
    np.save(tmp_path / "a.npy", a)
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from sketcharray.analysis.eigen import lanczos
        a = np.load({str(tmp_path / "a.npy")!r})
        calls = []
        def matvec(x):
            calls.append(1)
            if len(calls) == 10:
                os.kill(os.getpid(), signal.SIGKILL)
            return x @ a
        lanczos(matvec, a.shape[0], 3, solver={{"tol": 1e-12}}, progress=False,
                state={str(tmp_path / "state")!r}, identity={{"operator": "a.npy"}})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    reference = lanczos(lambda x: x @ a, a.shape[0], 3, progress=False, solver={"tol": 1e-12})
    calls = []
    resumed = lanczos(lambda x: calls.append(1) or x @ a, a.shape[0], 3, progress=False, state=tmp_path / "state",
                      identity={"operator": "a.npy"}, solver={"tol": 1e-12})
    assert len(calls) == reference["iterations"] - 9
    _assert_same_pairs(resumed, reference)
    with pytest.raises(ValueError, match=r"another solve: \{'operator': \{'operator': 'a.npy'\}\}.*'b.npy'"):
        lanczos(lambda x: x @ a, a.shape[0], 3, progress=False, state=tmp_path / "state",
                identity={"operator": "b.npy"}, solver={"tol": 1e-12})
    assert os.path.isdir(tmp_path / "state")


def test_hessian_spectrum_with_a_store_resumes_an_interrupted_solve(small_problem, tmp_path, monkeypatch):
    from sketcharray.torch.hvp import SubspaceHessian

    model, batches, h, ps = small_problem
    op = make_sketch("affd", ps.n, 32, seed=0)
    whole = hessian_spectrum(model, cross_entropy_per_example, batches, op, k=3, store=tmp_path / "whole",
                             solver={"tol": 1e-10}, execution={"progress": False})
    real = SubspaceHessian.matvec
    calls = []

    def interrupted(self, w):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(self, w)

    monkeypatch.setattr(SubspaceHessian, "matvec", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hessian_spectrum(model, cross_entropy_per_example, batches, op, k=3, store=tmp_path / "run",
                         solver={"tol": 1e-10}, execution={"progress": False})
    assert (tmp_path / "run" / "solver-current.zarr").is_dir()
    calls.clear()
    monkeypatch.setattr(SubspaceHessian, "matvec", lambda self, w: calls.append(1) or real(self, w))
    resumed = hessian_spectrum(model, cross_entropy_per_example, batches, op, k=3, store=tmp_path / "run",
                               solver={"tol": 1e-10}, execution={"progress": False})
    np.testing.assert_array_equal(resumed.eigenvalue, whole.eigenvalue)
    assert len(calls) == whole.attrs["iterations"] - 11
    assert not (tmp_path / "run" / "solver-current.zarr").exists()  # removed once the result is stored


def test_a_basis_over_the_memory_budget_stays_in_the_store_and_resumes(tmp_path, monkeypatch):
    """Issue 16: a Krylov basis larger than SolverSettings.memory_budget is kept in the solve's Zarr state and
    read back by blocks of rows (never more than a block at a time); it finds the in-RAM eigenvalues (the
    same products, summed in another order: float64 rounding), and a run interrupted at a product resumes to
    the bits of one never interrupted."""
    from sketcharray.analysis.spectrum.state import _LanczosState

    rng = np.random.default_rng(5)
    d = 300
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (q * np.concatenate([[30.0, 20.0, 10.0], rng.uniform(-1, 1, d - 6), [-4.0, -8.0, -16.0]])) @ q.T
    ram = lanczos(lambda x: x @ a, d, 3, solver={"tol": 1e-12}, progress=False)
    budget = 8 * d * 8  # eight rows of float64: the basis (up to 61 rows) does not fit
    reads = []
    real_rows = _LanczosState.rows
    monkeypatch.setattr(_LanczosState, "rows", lambda self, i, j: reads.append(j - i) or real_rows(self, i, j))
    solver = {"tol": 1e-12, "memory_budget": budget}
    disk = lanczos(lambda x: x @ a, d, 3, solver=solver, progress=False, state=tmp_path / "whole")
    assert reads and max(reads) <= budget // (4 * d * 8)
    for end in ("positive", "negative"):
        np.testing.assert_allclose(disk[end][0], ram[end][0], rtol=1e-10)
        np.testing.assert_allclose(np.abs(np.sum(disk[end][1] * ram[end][1], axis=0)), 1, atol=1e-8)
    with pytest.raises(MemoryError, match="the Krylov basis needs .* bytes .* give a state folder"):
        lanczos(lambda x: x @ a, d, 3, solver=solver, progress=False)

    interrupted, calls = _interrupted_at(12, a)
    with pytest.raises(KeyboardInterrupt):
        lanczos(interrupted, d, 3, solver=solver, progress=False, state=tmp_path / "run")
    resumed = lanczos(lambda x: x @ a, d, 3, solver=solver, progress=False, state=tmp_path / "run")
    _assert_same_pairs(resumed, disk)
    with pytest.raises(ValueError, match=r"another solve: \{'basis': 'disk'\}.*\{'basis': 'memory'\}"):
        lanczos(interrupted, d, 3, solver={"tol": 1e-12}, progress=False, state=tmp_path / "run")


def test_a_randomized_solve_interrupted_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    """Issue 16: the randomized solver commits its blocks, their images and the Rayleigh quotient after each
    block; rerun after an interruption it multiplies only the remaining blocks and gives the same bits."""
    rng = np.random.default_rng(2)
    d = 200
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (q * np.concatenate([[40.0, 25.0, 9.0], rng.uniform(-1, 1, d - 6), [-2.0, -6.0, -15.0]])) @ q.T
    solver = {"tol": 1e-12, "n_iter": 8, "block": 6}
    whole = randomized(lambda x: x @ a, d, 3, solver=solver, progress=False)
    interrupted, calls = _interrupted_at(4, a)
    with pytest.raises(KeyboardInterrupt):
        randomized(interrupted, d, 3, solver=solver, progress=False, state=tmp_path / "s", identity={"op": "a"})
    calls.clear()
    resumed = randomized(lambda x: calls.append(1) or x @ a, d, 3, solver=solver, progress=False,
                         state=tmp_path / "s", identity={"op": "a"})
    assert len(calls) == whole["iterations"] - 3 and resumed["iterations"] == whole["iterations"]
    _assert_same_pairs(resumed, whole)
    with pytest.raises(ValueError, match=r"another solve: \{'operator': \{'op': 'a'\}\}"):
        randomized(lambda x: x @ a, d, 3, solver=solver, progress=False, state=tmp_path / "s", identity={"op": "b"})
    # over the memory budget (its basis and images: 2 x 200 x 54 float64 = 172,800 bytes here) the blocks stay in
    # the state store, read back one at a time: the same eigenvalues (float64 sums in another order), and an
    # interrupted solve resumes bit for bit; without a store it is refused before a product
    tight = {**solver, "memory_budget": 100_000}
    with pytest.raises(MemoryError, match=r"need up to 172,800 bytes .* memory budget is 100,000 bytes"):
        randomized(lambda x: x @ a, d, 3, solver=tight, progress=False)
    from sketcharray.analysis.spectrum.state import _RandomizedState

    reads, real_block = [], _RandomizedState.block
    monkeypatch.setattr(_RandomizedState, "block", lambda self, kind, j: reads.append(j) or real_block(self, kind, j))
    disk = randomized(lambda x: x @ a, d, 3, solver=tight, progress=False, state=tmp_path / "disk")
    assert reads  # older blocks came back from the store, not from memory
    for end in ("positive", "negative"):
        np.testing.assert_allclose(disk[end][0], whole[end][0], rtol=1e-10)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        randomized(interrupted, d, 3, solver=tight, progress=False, state=tmp_path / "disk-run")
    again = randomized(lambda x: x @ a, d, 3, solver=tight, progress=False, state=tmp_path / "disk-run")
    _assert_same_pairs(again, disk)


def _assert_same_pairs(got: dict, expected: dict) -> None:
    """The same eigenvalues and Ritz vectors at both ends, bit for bit (a resumed solve against a whole one)."""
    for end in ("positive", "negative"):
        np.testing.assert_array_equal(got[end][0], expected[end][0])
        np.testing.assert_array_equal(got[end][1], expected[end][1])


def _interrupted_at(product: int, a: np.ndarray):
    """``(matvec, calls)``: ``x @ a`` that raises KeyboardInterrupt at the ``product``-th call (counted in
    ``calls``, which the caller may clear to count again)."""
    calls = []

    def matvec(x):
        calls.append(1)
        if len(calls) == product:
            raise KeyboardInterrupt
        return x @ a

    return matvec, calls


@pytest.mark.slow
# (the randomized solver's resume is covered in process above; its CLI path is the same store code)
@pytest.mark.parametrize("solver, kills", [("lanczos", [(0, "SIGKILL"), (3, "2 x SIGINT")])])
def test_spectrum_out_killed_through_the_cli_resumes_bit_identically(tmp_path, solver, kills):
    """Issue 21, item 4, the small variant of ``sketcharray bench resume`` (20 random kill points there): the CLI
    killed as its state is created, after some products (SIGKILL) and by two SIGINTs, then rerun."""
    import argparse

    from sketcharray.app.bench.resume import _command, _result, kill_trial

    args = argparse.Namespace(workload="tests.workload_fixture:tiny", n_out=16, k=2, examples=48, batch_size=16,
                              solver=solver)
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run(_command(args, tmp_path / "whole"), env=env).returncode == 0
    reference = _result(tmp_path / "whole")
    rng = np.random.default_rng(0)
    for i, (target, how) in enumerate(kills):
        trial = kill_trial(args, tmp_path / f"t{i}", rng, reference["iterations"], target=target, how=how)
        assert trial["resumed"] == 0, trial
        if trial["exit"] != 0:  # (a run may finish before its kill lands) killed by the signal, or one line and 130
            assert trial["exit"] == (-9 if how == "SIGKILL" else 130), trial
            assert how == "SIGKILL" or trial["said"].endswith("interrupted; rerun the same command to resume")
        np.testing.assert_array_equal(trial["eigenvalue"], reference["eigenvalue"])
        np.testing.assert_array_equal(trial["residual"], reference["residual"])
