"""Attribution scores, top-k, influence and self-influence against direct NumPy computations."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from sketcharray.analysis import attribute, compare_with_exact, gram, self_influence
from sketcharray.analysis.tda import exact_gradient_scores


def make_train(n=57, d=8, chunk=10, seed=0, invalid=(3, 40), checkpoints=None):
    g = np.random.default_rng(seed)
    shape = (n, d) if checkpoints is None else (n, d, checkpoints)
    grad = g.standard_normal(shape)
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    grad[list(invalid)] = np.nan
    dims = ("example", "sketch") if checkpoints is None else ("example", "sketch", "checkpoint")
    chunks = (chunk,) + shape[1:]
    ds = xr.Dataset(
        {"grad": (dims, da.from_array(grad, chunks=chunks)), "valid": ("example", da.from_array(valid, chunks=chunk))},
        coords={"example": [f"ex-{i}" for i in range(n)], "sketch": np.arange(d)},
    )
    return ds, grad, valid


def make_queries(m=5, d=8, seed=1):
    q = np.random.default_rng(seed).standard_normal((m, d))
    return xr.DataArray(q, dims=("query", "sketch"), coords={"query": [f"q{i}" for i in range(m)]}), q


def test_dot_and_cosine_equal_numpy_and_exclude_invalid():
    ds, grad, valid = make_train()
    qa, q = make_queries()
    dot = attribute(ds, qa, score="dot")
    assert isinstance(dot.data, da.Array) and dot.dims == ("query", "example")
    expected = q @ np.where(valid[:, None], grad, 0).T
    np.testing.assert_allclose(dot.values[:, valid], expected[:, valid], rtol=1e-12)
    assert np.isnan(dot.values[:, ~valid]).all()
    assert list(dot.example.values[:2]) == ["ex-0", "ex-1"] and list(dot["query"].values) == [f"q{i}" for i in range(5)]
    cos = attribute(ds, qa, score="cosine").values
    gn = grad[valid] / np.linalg.norm(grad[valid], axis=1, keepdims=True)
    np.testing.assert_allclose(cos[:, valid], (q / np.linalg.norm(q, axis=1, keepdims=True)) @ gn.T, rtol=1e-12)


def test_influence_uses_the_damped_gram_or_a_given_matrix():
    ds, grad, valid = make_train()
    qa, q = make_queries()
    g = grad[valid]
    f = g.T @ g / len(g)
    np.testing.assert_allclose(gram(ds).values, f, rtol=1e-12)
    lam = 0.1 * np.trace(f) / f.shape[0]
    expected = q @ np.linalg.inv(f + lam * np.eye(8)) @ g.T
    got = attribute(ds, qa, score="influence")
    assert got.attrs["damping"] == "0.1 x trace(F) / D" and float(got.damping) == pytest.approx(lam)
    np.testing.assert_allclose(got.values[:, valid], expected, rtol=1e-10)
    h = np.diag(np.arange(1.0, 9.0))
    got = attribute(ds, qa, score="influence", preconditioner=h, damping=0.5)
    np.testing.assert_allclose(got.values[:, valid], q @ np.linalg.inv(h + 0.5 * np.eye(8)) @ g.T, rtol=1e-10)
    with pytest.raises(ValueError, match=r"preconditioner must be 8 x 8 \(sketch x sketch\); got shape \(3, 3\)"):
        attribute(ds, qa, score="influence", preconditioner=np.eye(3))


@pytest.mark.parametrize("which", ["top", "bottom"])
def test_top_k_equals_argsort_with_labels(which):
    ds, grad, valid = make_train(n=103, chunk=7)
    qa, q = make_queries()
    k = 6
    out = attribute(ds, qa, k=k, which=which)
    assert isinstance(out.score.data, da.Array) and out.score.dims == ("query", "rank")
    full = q @ np.where(valid[:, None], grad, 0).T
    full[:, ~valid] = -np.inf if which == "top" else np.inf
    order = np.argsort(-full if which == "top" else full, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(out.index.values, order)
    np.testing.assert_allclose(out.score.values, np.take_along_axis(full, order, axis=1), rtol=1e-12)
    assert out.example.values[0, 0] == f"ex-{order[0, 0]}"
    assert not set(out.index.values.ravel()) & {3, 40}


def test_queries_are_scored_in_batches():
    ds, grad, valid = make_train(n=103, chunk=7)
    qa, q = make_queries(m=11)
    batched = attribute(ds, qa, k=4, query_batch=3)
    assert batched.score.data.chunks[0] == (3, 3, 3, 2)
    got, whole = batched.compute(), attribute(ds, qa, k=4).compute()
    # the same ranking; scores to the last bits only, since BLAS picks its kernel by the number of query rows
    np.testing.assert_array_equal(got.example.values, whole.example.values)
    np.testing.assert_allclose(got.score.values, whole.score.values, rtol=1e-12)


def test_top_k_ties_prefer_the_lower_index_and_k_is_checked():
    grad = np.zeros((20, 2))
    grad[:, 0] = [1.0, 2.0, 2.0, 0.5] * 5  # many ties
    ds = xr.Dataset({"grad": (("example", "sketch"), da.from_array(grad, chunks=(3, 2)))},
                    coords={"example": np.arange(100, 120)})
    out = attribute(ds, np.array([1.0, 0.0]), k=4).compute()
    assert out.index.values.tolist() == [[1, 2, 5, 6]]
    assert out.example.values.tolist() == [[101, 102, 105, 106]]
    with pytest.raises(ValueError, match=r"k must be an int between 1 and the number of valid training examples \(20\); got 21"):
        attribute(ds, np.array([1.0, 0.0]), k=21)


def test_top_k_streams_the_store_chunk_by_chunk():
    """Out of core: one task per training chunk, merges of at most 8 partial results, no full matrix."""
    ds, _, _ = make_train(n=1000, chunk=10, invalid=())
    qa, _ = make_queries(m=3)
    out = attribute(ds, qa, k=5)
    graph = dict(out.score.data.__dask_graph__())
    names = [dask.utils.key_split(key) for key in graph]
    assert names.count("chunk_topk") == 100
    # each training chunk is read exactly once (no separate validity or finiteness pass)
    grad_name = ds.grad.data.name
    assert sum(1 for key in graph if isinstance(key, tuple) and key[0] == grad_name) == 100
    # a tree of fan-in 8: 13 + 2 + 1 merges, then the final sort
    assert names.count("merge_topk") == 13 + 2 + 1 + 1
    for key, task in graph.items():
        if dask.utils.key_split(key) == "merge_topk":
            assert len(task.dependencies) <= 9
    assert out.score.shape == (3, 5)


def test_checkpoints_combine_tracin_cp_and_self_influence():
    ds, grad, valid = make_train(checkpoints=3)
    qa3 = xr.DataArray(np.random.default_rng(2).standard_normal((4, 8, 3)), dims=("query", "sketch", "checkpoint"))
    w = [0.5, 0.25, 0.125]
    s = attribute(ds, qa3, checkpoint_weights=w).values
    expected = sum(w[c] * qa3.values[:, :, c] @ np.where(valid[:, None], grad[:, :, c], 0).T for c in range(3))
    np.testing.assert_allclose(s[:, valid], expected[:, valid], rtol=1e-12)
    top = attribute(ds, qa3, checkpoint_weights=w, k=3).compute()
    full = np.where(valid[None, :], expected, -np.inf)
    np.testing.assert_array_equal(top.index.values, np.argsort(-full, axis=1, kind="stable")[:, :3])
    si = self_influence(ds, checkpoint_weights=w).values
    np.testing.assert_allclose(si[valid], sum(w[c] * np.sum(grad[valid, :, c] ** 2, axis=1) for c in range(3)))
    with pytest.raises(ValueError, match="checkpoint_weights has 2 entries for 3 checkpoints"):
        attribute(ds, qa3, checkpoint_weights=[1, 2])


def test_self_influence_and_accessor():
    ds, grad, valid = make_train()
    si = ds.sketcharray.self_influence()
    assert isinstance(si.data, da.Array)
    np.testing.assert_allclose(si.values[valid], np.sum(grad[valid] ** 2, axis=1), rtol=1e-12)
    assert np.isnan(si.values[~valid]).all()
    qa, _ = make_queries()
    xr.testing.assert_allclose(ds.sketcharray.attribute(qa), attribute(ds, qa))


def test_compare_with_exact():
    _, grad, valid = make_train(invalid=())
    _, q = make_queries()
    exact = exact_gradient_scores(grad, q)
    noisy = exact + 0.01 * np.random.default_rng(0).standard_normal(exact.shape)
    res = compare_with_exact(noisy, exact, k=5)
    assert res.pearson > 0.99 and res.spearman > 0.99 and res.sizes["query"] == 5
    assert float(compare_with_exact(exact, exact, k=5).topk_overlap.min()) == 1.0


def test_bad_inputs():
    ds, _, _ = make_train()
    with pytest.raises(ValueError, match="score must be one of"):
        attribute(ds, np.zeros(8), score="l2")
    with pytest.raises(ValueError, match="queries have D=3 but train has D=8"):
        attribute(ds, np.zeros(3))
    with pytest.raises(TypeError, match="train must be an xarray Dataset or DataArray"):
        attribute(np.zeros((3, 8)), np.zeros(8))


def test_top_k_under_distributed_equals_local(tmp_path):
    distributed = pytest.importorskip("distributed")
    ds, _, _ = make_train(n=300, chunk=25)
    qa, _ = make_queries()
    local = attribute(ds, qa, k=7, score="influence").compute()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c, \
            distributed.Client(c):
        dist = attribute(ds, qa, k=7, score="influence").compute()
    xr.testing.assert_allclose(dist, local)


def test_influence_with_checkpoints_uses_each_checkpoints_gram_and_stays_lazy():
    from dask.callbacks import Callback

    ds, grad, valid = make_train(checkpoints=3)
    qa3 = xr.DataArray(np.random.default_rng(2).standard_normal((4, 8, 3)), dims=("query", "sketch", "checkpoint"))
    w = [0.5, 0.25, 0.125]

    class Count(Callback):
        def __init__(self):
            super().__init__()
            self.tasks = 0

        def _start_state(self, dsk, state):
            self.tasks += len(state["ready"]) + len(state["waiting"])

    full, influence_topk, dot_topk = Count(), Count(), Count()
    with full:  # building the graph runs nothing: neither the Grams nor their eigendecompositions
        lazy = attribute(ds, qa3, score="influence", checkpoint_weights=w)
        si = self_influence(ds, score="influence", checkpoint_weights=w)
    with influence_topk:
        top = attribute(ds, qa3, score="influence", checkpoint_weights=w, k=3)
    with dot_topk:  # top-k checks k against the count of valid rows (the 1-byte flags), and no more
        attribute(ds, qa3, checkpoint_weights=w, k=3)
    assert full.tasks == 0 and influence_topk.tasks == dot_topk.tasks and isinstance(lazy.data, da.Array)
    expected, lams = 0.0, []
    for c in range(3):
        g = np.where(valid[:, None], grad[:, :, c], 0)
        f = g[valid].T @ g[valid] / valid.sum()
        lams.append(0.1 * np.trace(f) / 8)
        expected = expected + w[c] * qa3.values[:, :, c] @ np.linalg.inv(f + lams[-1] * np.eye(8)) @ g.T
    got = lazy.compute()
    np.testing.assert_allclose(got.values[:, valid], expected[:, valid], rtol=1e-10)
    one = attribute(ds.isel(checkpoint=1), qa3.isel(checkpoint=1), score="influence")
    assert isinstance(one.coords["damping"].data, da.Array)  # lazy, and computed with the scores
    assert float(one.coords["damping"]) == pytest.approx(lams[1], rel=1e-12)
    full = np.where(valid[None, :], expected, -np.inf)
    np.testing.assert_array_equal(top.index.values, np.argsort(-full, axis=1, kind="stable")[:, :3])
    assert np.isfinite(si.values[valid]).all()


def test_an_indefinite_preconditioner_that_makes_f_singular_is_an_error():
    ds, grad, valid = make_train()
    qa, q = make_queries()
    h = np.diag([-0.5, 1, 2, 3, 4, 5, 6, 7.0])
    with pytest.raises(ValueError, match="F \\+ lambda I is singular .*increase damping"):
        attribute(ds, qa, score="influence", preconditioner=h, damping=0.5).compute()


# ------------------------------------------------------------------- TRAK
@pytest.fixture(scope="module")
def margin_sketches():
    """Sketches of the margin gradients of the trained digits MLP: 500 training and 100 test examples."""
    import torch

    from sketcharray.collect import sketch_gradients
    from sketcharray.workloads import classification_margin, digits

    w = digits()
    train, test = torch.utils.data.Subset(w.train, range(500)), torch.utils.data.Subset(w.test, range(100))

    def sketches(data, method, d, seed=0):
        return sketch_gradients(w.model_factory, classification_margin, data, {"method": method, "n_out": d,
                                                                              "seed": seed},
                                batch_size=100, execution={"progress": False}).compute()

    return w, train, test, sketches


def test_trak_score_equals_traks_own_computation_on_the_same_features(margin_sketches):
    trak = pytest.importorskip("trak")
    import torch
    from trak.modelout_functions import ImageClassificationModelOutput
    from trak.score_computers import BasicScoreComputer

    w, train, test, sketches = margin_sketches
    tr, te = sketches(train, "afjl", 128), sketches(test, "afjl", 128)
    lam = 1e-2  # TRAK's lambda_reg; with it both inverses are regular and must agree
    ours = attribute(tr, te, score="trak", damping=lam)
    assert ours.attrs["score"] == "trak"
    computer = BasicScoreComputer(dtype=torch.float32, device="cpu", lambda_reg=lam)
    g, gt = torch.tensor(tr.grad.values), torch.tensor(te.grad.values)
    scores = torch.zeros(len(train), len(test))
    computer.get_scores(computer.get_x_xtx_inv(g, computer.get_xtx(g)), gt, accumulator=scores)
    model = w.model()
    x, y = next(iter(torch.utils.data.DataLoader(train, batch_size=len(train))))
    params = {k: v.detach() for k, v in model.named_parameters()}
    out_to_loss = ImageClassificationModelOutput().get_out_to_loss_grad(model, params, {}, (x, y)).numpy()
    theirs = scores.numpy().T * out_to_loss[:, 0][None, :]
    # TRAK computes in float32: agreement to float32 rounding of scores of size ~0.1
    np.testing.assert_allclose(ours.values, theirs, atol=1e-4 * np.abs(theirs).max())
    top = attribute(tr, te, score="trak", damping=lam, k=5).compute()
    np.testing.assert_array_equal(top.index.values, np.argsort(-ours.values, axis=1, kind="stable")[:, :5])


def test_trak_on_our_sketches_agrees_with_trak_as_well_as_trak_agrees_with_itself(margin_sketches, tmp_path):
    pytest.importorskip("trak")
    from sketcharray.app.bench.trak import topk_overlap, trak_package_scores

    w, train, test, sketches = margin_sketches
    d = 256
    ref0, ref1 = (trak_package_scores(w.model(), train, test, d, seed, tmp_path / str(seed)) for seed in (0, 1))
    ours = attribute(sketches(train, "afjl", d), sketches(test, "afjl", d), score="trak").values
    mine, theirs = topk_overlap(ours, ref0), topk_overlap(ref1, ref0)  # per query, paired
    # TRAK against itself with another projection seed is the yardstick; per-query overlaps are independent
    # across queries, so the mean difference may fall below 0 only by sampling noise: 3 standard errors
    diff = mine - theirs
    assert diff.mean() >= -3 * diff.std(ddof=1) / np.sqrt(len(diff)), (mine.mean(), theirs.mean())
    assert mine.mean() > 0.15  # far above chance (10 of 500: 0.02)



def _cuda_cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("no CUDA device")
    return cupy


@pytest.mark.gpu
def test_cupy_chunks_stay_on_the_device_through_influence_and_top_k(monkeypatch):
    """Issue 16: a store's CuPy chunks are scored where they live: the lazy Gram and its eigendecomposition
    run on the device, each chunk's top k is the only thing copied to the host (nothing larger than
    queries x k comes back per chunk), and the result equals NumPy's."""
    cupy = _cuda_cupy()
    from sketcharray.analysis import tda

    ds, grad, valid = make_train(n=300, chunk=50, invalid=(3, 140))
    qa, q = make_queries()
    on_device = ds.copy()
    on_device["grad"] = (("example", "sketch"), ds.grad.data.map_blocks(cupy.asarray))
    copied = []
    real = tda._to_host
    monkeypatch.setattr(tda, "_to_host", lambda x: copied.append(getattr(x, "size", 0)) or real(x))
    for score in ("dot", "influence"):
        copied.clear()
        got = attribute(on_device, qa, score=score, k=4).compute()
        ref = attribute(ds, qa, score=score, k=4).compute()
        np.testing.assert_allclose(got.score.values, ref.score.values, rtol=1e-9)
        assert got.example.values.tolist() == ref.example.values.tolist()
        assert copied and max(copied) <= qa.sizes["query"] * 8  # queries (5 x 8) or one chunk's top k (5 x 4)


def test_compare_with_exact_takes_numpy_arrays():
    """Issue 22, item 5: NumPy (query, example) matrices are accepted, with the same numbers as DataArrays."""
    rng = np.random.default_rng(0)
    exact = rng.standard_normal((4, 30))
    sketched = exact + 0.1 * rng.standard_normal((4, 30))
    got = compare_with_exact(sketched, exact, k=5)
    labeled = compare_with_exact(xr.DataArray(sketched, dims=("query", "example")),
                                 xr.DataArray(exact, dims=("query", "example")), k=5)
    assert float(got.pearson) == pytest.approx(float(labeled.pearson)) and float(got.pearson) > 0.9
    np.testing.assert_array_equal(got.topk_overlap.values, labeled.topk_overlap.values)
    with pytest.raises(ValueError, match=r"must be \(query, example\)"):
        compare_with_exact(sketched[0], exact[0])
