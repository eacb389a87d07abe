"""Streaming sketches from PyTorch into lazy Datasets and resumable Zarr stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import dask
import numpy as np
import pytest
import torch
import xarray as xr

from sketcharray.collect import random_probes, sketch_gradients, sketch_hvps, subspace_hessian
from sketcharray.sketches import make_sketch
from sketcharray.storage.store import open_sketches
from sketcharray.torch import select_params
from sketcharray.workloads import cross_entropy_per_example, digits

from .torch.test_grads import one_by_one
from .torch.test_hvp import exact_hessian

SKETCH = {"method": "afjl", "n_out": 64, "seed": 1}


@pytest.fixture(scope="module")
def work():
    return digits()


@pytest.fixture(scope="module")
def small(work):
    """The first 120 training examples as a dataset."""
    x, y = work.train[:120]
    return torch.utils.data.TensorDataset(x, y), work.train_ids[:120]


def test_lazy_dataset_is_labeled_and_chunked_by_batch(work, small):
    data, ids = small
    ds = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=32, ids=ids, checkpoint="final")
    assert ds.grad.dims == ("example", "sketch")
    assert ds.grad.data.chunks == ((32, 32, 32, 24), (64,))
    assert list(ds.example.values) == ids
    assert ds.checkpoint.item() == "final"
    assert ds.attrs["sketch_spec"]["n_in"] == work.info["n_params"]
    assert ds.attrs["param_sizes"] == [2048, 32, 1024, 32, 320, 10]
    names = {dask.utils.key_split(k) for k in ds.grad.data.__dask_graph__()}
    assert "sketch-gradients" in names  # named tasks, as the dashboard shows them
    out = ds.compute()
    assert out.valid.all() and np.array_equal(out.label.values, data.tensors[1].numpy())


def test_sketches_equal_the_operator_on_exact_gradients(work, small):
    data, _ = small
    model = work.model().double()
    ps = select_params(model)
    op = make_sketch("qk", ps.n, 64, seed=2)
    batch = (data.tensors[0].double(), data.tensors[1])
    exact = op.apply(one_by_one(model, batch).numpy())
    for mode in ("explicit", "implicit"):
        ds = sketch_gradients(model, cross_entropy_per_example, [batch], op, model_settings={"mode": mode})
        np.testing.assert_allclose(ds.grad.values, exact, rtol=1e-5, atol=1e-6 * np.abs(exact).max())


def test_explicit_and_implicit_agree_in_float32(work, small):
    data, _ = small
    e = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=40).grad.values
    i = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=40,
                         model_settings={"mode": "implicit"}).grad.values
    # float32: relative rounding ~1e-6 times the mixing depth
    np.testing.assert_allclose(i, e, rtol=1e-4, atol=1e-5 * np.abs(e).max())


def test_data_as_dataloader_or_batches_gives_the_same_rows(work, small):
    data, _ = small
    ref = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=40).grad.values
    loader = torch.utils.data.DataLoader(data, batch_size=40)
    np.testing.assert_array_equal(sketch_gradients(work.model_factory, work.loss_fn, loader, SKETCH).grad.values, ref)
    batches = [data[s : s + 40] for s in range(0, 120, 40)]
    np.testing.assert_array_equal(sketch_gradients(work.model_factory, work.loss_fn, batches, SKETCH).grad.values, ref)


def test_store_round_trip_and_progress(work, small, tmp_path):
    data, ids = small
    lazy = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=32, ids=ids).compute()
    ds = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=32, ids=ids,
                          store=tmp_path / "s.zarr", execution={"progress": False})
    assert ds.grad.data.chunks[0] == (32, 32, 32, 24)
    np.testing.assert_array_equal(ds.grad.values, lazy.grad.values)
    np.testing.assert_array_equal(ds.loss.values, lazy.loss.values)
    assert list(ds.example.values) == ids and bool(ds.batch_done.all())
    again = open_sketches(tmp_path / "s.zarr")
    assert again.attrs["sketch_spec"]["method"] == "afjl"
    xr.testing.assert_identical(again.grad, ds.grad)


@pytest.mark.parametrize("dtype, rtol", [("float16", 2e-3), ("bfloat16", 8e-3)])
def test_half_precision_storage(work, small, tmp_path, dtype, rtol):
    data, _ = small
    ref = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=60).grad.values
    ds = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=60, dtype=dtype,
                          store=tmp_path / "h.zarr", execution={"progress": False})
    assert ds.grad.dtype == (np.float16 if dtype == "float16" else np.float32)
    # float16 has an 11-bit significand (relative error 2^-11), bfloat16 8 bits (2^-8)
    np.testing.assert_allclose(ds.grad.values.astype(np.float32), ref, rtol=rtol, atol=1e-3 * np.abs(ref).max())


def test_mismatched_store_names_both_values(work, small, tmp_path):
    data, _ = small
    path = tmp_path / "m.zarr"
    sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=60, store=path,
                     execution={"progress": False})
    with pytest.raises(ValueError, match=r'sketch_spec=.*"seed": 1.*this run has sketch_spec=.*"seed": 2'):
        sketch_gradients(work.model_factory, work.loss_fn, data, {**SKETCH, "seed": 2}, batch_size=60, store=path)
    with pytest.raises(ValueError, match=r"param_names="):
        sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=60, store=path,
                         model_settings={"params": "4.*"})
    other = work.model()
    with torch.no_grad():
        other[0].bias.add_(0.01)
    with pytest.raises(ValueError, match=r"model_fingerprint='[0-9a-f]{16}', but this run has model_fingerprint='[0-9a-f]{16}'"):
        sketch_gradients(other, work.loss_fn, data, SKETCH, batch_size=60, store=path)
    with pytest.raises(ValueError, match="not a sketcharray store"):
        open_sketches(tmp_path / "nothing.zarr")


def test_non_finite_examples_are_stored_invalid_with_a_warning(work, small, tmp_path):
    x, y = small[0].tensors
    x = x.clone()
    x[[5, 77]] = float("nan")
    data = torch.utils.data.TensorDataset(x, y)
    with pytest.warns(RuntimeWarning, match="2 example"):
        ds = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=40, store=tmp_path / "n.zarr",
                              execution={"progress": False})
    assert np.flatnonzero(~ds.valid.values).tolist() == [5, 77]
    assert np.isnan(ds.grad.values[[5, 77]]).all() and np.isfinite(ds.grad.values[ds.valid.values]).all()


def test_bad_arguments(work, small):
    data, ids = small
    with pytest.raises(ValueError, match="ids has 3 entries but data has 120 examples"):
        sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=40, ids=ids[:3])
    with pytest.raises(ValueError, match="sketch has n_in=10 but the selected parameters have N=3466"):
        sketch_gradients(work.model_factory, work.loss_fn, data, make_sketch("afjl", 10, 4), batch_size=40)
    with pytest.raises(ValueError, match="mode must be 'explicit' or 'implicit'; got 'fast'"):
        sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=40, model_settings={"mode": "fast"})
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH)


RESUME_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from sketcharray.collect import sketch_gradients
    from sketcharray.workloads import digits
    w = digits()
    calls = [0]
    def tick():  # the kill point comes from the environment: the loss is the same function in every run
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
    def loss(out, batch):
        tick()
        return w.loss_fn(out, batch)
    x, y = w.train[:300]
    sketch_gradients(w.model_factory, loss, torch.utils.data.TensorDataset(x, y), json.loads(os.environ["SPEC"]),
                     batch_size=25, ids=w.train_ids[:300], store=sys.argv[1], execution={"progress": False})
    """
)


@pytest.mark.parametrize("spec", [{"method": "affd", "n_out": 128},
                                  {"method": "factored", "factor": "afjl", "n_out": 128}], ids=["affd", "factored"])
@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(work, tmp_path, spec):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "SPEC": json.dumps(spec)}
    store = tmp_path / "r.zarr"
    for kill_at in (4, 3, 6):  # killed three times, at different points, each run resuming the last
        done = subprocess.run([sys.executable, str(script), str(store)], env={**env, "KILL_AT": str(kill_at)})
        assert done.returncode == -9
    done = subprocess.run([sys.executable, str(script), str(store)], env={**env, "KILL_AT": "0"})
    assert done.returncode == 0
    # the uninterrupted run, in a process configured the same way (same torch threads)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ref.zarr")], env={**env, "KILL_AT": "0"})
    assert done.returncode == 0
    ref = open_sketches(tmp_path / "ref.zarr")
    got = open_sketches(store)
    assert got.sizes["example"] == 300 and list(got.example.values) == work.train_ids[:300]
    np.testing.assert_array_equal(got.grad.values, ref.grad.values)
    np.testing.assert_array_equal(got.loss.values, ref.loss.values)


def test_hvp_sketches_equal_phi_h_v(work):
    model = work.model().double()
    x, y = work.train[:50]
    batches = [(x.double(), y)]
    H, ps = exact_hessian(model, batches)
    op = make_sketch("affd", ps.n, 32, seed=0)
    probes = random_probes(ps.n, 5, seed=3).astype(np.float64)
    ds = sketch_hvps(model, cross_entropy_per_example, batches, op, probes=probes, execution={"probes_per_task": 2})
    assert ds.hvp.dims == ("probe", "sketch") and ds.hvp.data.chunks == ((2, 2, 1), (32,))
    expected = op.apply(probes @ H.numpy().T)
    np.testing.assert_allclose(ds.hvp.values, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
    K = subspace_hessian(model, cross_entropy_per_example, batches, op)
    phi = op.apply(np.eye(ps.n)).T
    np.testing.assert_allclose(K.matvec(np.eye(32)[:4]), (phi @ H.numpy() @ phi.T)[:4], rtol=1e-8, atol=1e-12)


def test_hvp_probes_are_made_in_the_tasks_and_a_store_resumes_to_the_same_numbers(work, tmp_path):
    """Issue 16: each task generates its block of directions from (seed, row), so the graph holds no N-sized
    array; sketch_hvps(store=) writes the blocks resumably (a run interrupted after two blocks computes only
    the rest, to the same numbers) and refuses a store made with other probes or data."""
    x, y = work.train[:60]
    data = [(x[:30], y[:30]), (x[30:], y[30:])]
    n = select_params(work.model()).n
    lazy = sketch_hvps(work.model_factory, cross_entropy_per_example, data, SKETCH, probes=7, seed=4,
                       execution={"probes_per_task": 2})
    graph = dict(lazy.hvp.data.__dask_graph__())
    sizes = [v.size for v in dask.core.flatten(list(graph.values()), container=(list, tuple)) if isinstance(v, np.ndarray)]
    assert max(sizes, default=0) < n  # no (k, N) probe block in the graph
    expected = lazy.hvp.values
    # rows 2:4 generated inside a block of 2 and inside a block of 4 are the same directions; the float32
    # products of blocks of different sizes differ in rounding only (~ sqrt(N) eps32 = 4e-6 relative)
    other = sketch_hvps(work.model_factory, cross_entropy_per_example, data, SKETCH, probes=7, seed=4).hvp.values
    np.testing.assert_allclose(other[2:4], expected[2:4], rtol=0, atol=1e-5 * np.abs(expected).max())

    import sketcharray.collect.hvps as hvps

    real, calls = hvps._hvp_task, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    store = tmp_path / "hvp.zarr"
    options = dict(probes=7, seed=4, store=store, execution={"probes_per_task": 2, "progress": False,
                                                             "scheduler": "synchronous"})
    hvps._hvp_task = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            sketch_hvps(work.model_factory, cross_entropy_per_example, data, SKETCH, **options)
        calls.clear()
        hvps._hvp_task = lambda *a, **k: calls.append(1) or real(*a, **k)
        stored = sketch_hvps(work.model_factory, cross_entropy_per_example, data, SKETCH, **options)
    finally:
        hvps._hvp_task = real
    assert len(calls) == 2  # the two blocks the interrupted run did not finish
    np.testing.assert_array_equal(stored.hvp.values, expected)  # the same blocks: the same bits
    assert stored.valid.values.all() and stored.attrs["probe_seed"] == 4
    with pytest.raises(ValueError, match="written with probe_seed=4, but this run has probe_seed=5"):
        sketch_hvps(work.model_factory, cross_entropy_per_example, data, SKETCH, **{**options, "seed": 5})
    with pytest.raises(ValueError, match="written with data_fingerprint="):
        sketch_hvps(work.model_factory, cross_entropy_per_example, data[:1], SKETCH, **options)


@pytest.mark.slow
def test_distributed_equals_local(work, small, tmp_path):
    distributed = pytest.importorskip("distributed")
    data, ids = small
    local = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=30, ids=ids,
                             store=tmp_path / "local.zarr", execution={"progress": False})
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            distributed.Client(cluster):
        dist = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=30, ids=ids,
                                store=tmp_path / "dist.zarr", execution={"progress": False})
        lazy = sketch_gradients(work.model_factory, work.loss_fn, data, SKETCH, batch_size=30, ids=ids).compute()
    np.testing.assert_array_equal(dist.grad.values, local.grad.values)
    np.testing.assert_array_equal(lazy.grad.values, local.grad.values)


def test_a_module_updated_in_place_is_not_used_stale_by_worker_threads(work, small):
    """Threads keep private copies of a live module; new weights in the same object must reach them."""
    data, _ = small
    model = work.model()
    first = sketch_gradients(model, work.loss_fn, data, SKETCH, batch_size=20).grad.values
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    second = sketch_gradients(model, work.loss_fn, data, SKETCH, batch_size=20).grad.values
    with dask.config.set(scheduler="synchronous"):  # the caller's module itself, on the main thread
        fresh = sketch_gradients(model, work.loss_fn, data, SKETCH, batch_size=20).grad.values
    assert not np.allclose(first, second, rtol=1e-2)
    # threads vs one thread: float32 sums may round differently, staleness would differ at O(1)
    np.testing.assert_allclose(second, fresh, rtol=1e-5, atol=1e-6 * np.abs(fresh).max())
    # a "factory" that returns the same live module to every thread is copied per thread, not raced on
    shared = sketch_gradients(lambda: model, work.loss_fn, data, SKETCH, batch_size=20).grad.values
    np.testing.assert_allclose(shared, fresh, rtol=1e-5, atol=1e-6 * np.abs(fresh).max())


def test_the_model_factory_is_called_once_per_call(work, small, tmp_path):
    data, ids = small
    calls = []

    def factory():
        calls.append(1)
        return work.model()

    for scheduler in ("sync", "threads"):
        calls.clear()
        ds = sketch_gradients(factory, work.loss_fn, data, SKETCH, batch_size=40, ids=ids,
                              store=tmp_path / f"{scheduler}.zarr",
                              execution={"progress": False, "scheduler": scheduler})
        # the caller's process builds once; its tasks use that module, or a private copy on other threads
        assert len(calls) == 1, scheduler
    np.testing.assert_array_equal(ds.grad.values, open_sketches(tmp_path / "sync.zarr").grad.values)
