"""Issue 21, item 2: zero rows and float16 stores never give a ranking from NaN or tied scores.

A query whose sketch is zero (a well-fitted example's gradient, or float16 squares that underflowed)
scores every training example alike; a training row whose sketch is zero has no cosine direction.
Every score is checked with both, on in-memory sketches and on float16 stores, against NumPy.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from sketcharray.analysis import attribute
from sketcharray.analysis.tda import unit_rows

from .test_tda import make_queries, make_train

ZERO_TRAIN, ZERO_QUERY = 7, 2


def _with_zeros(score):
    ds, grad, valid = make_train(n=40, d=8, chunk=10, invalid=(3,))
    grad[ZERO_TRAIN] = 0.0
    ds["grad"] = (("example", "sketch"), da.from_array(grad, chunks=(10, 8)))
    if score == "trak":
        ds["loss"] = ("example", np.linspace(-1, 1, 40))
        ds.attrs["loss_fn"] = "tests:margin"
    qa, q = make_queries(m=4)
    q[ZERO_QUERY] = 0.0
    qa = qa.copy(data=q)
    return ds, grad, valid, qa, q


@pytest.mark.parametrize("score", ["dot", "cosine", "influence", "trak"])
def test_a_zero_query_gets_no_ranking_under_any_score(score):
    ds, grad, valid, qa, q = _with_zeros(score)
    for which in ("top", "bottom"):
        res = attribute(ds, qa, score=score, k=5, which=which).compute()
        assert res.ranked.values.tolist() == [True, True, False, True]
        assert np.isnan(res.score.values[ZERO_QUERY]).all() and (res["index"].values[ZERO_QUERY] == -1).all()
        assert (res.example.values[ZERO_QUERY] == "").all()
        others = np.delete(np.arange(4), ZERO_QUERY)
        assert np.isfinite(res.score.values[others]).all() and (res["index"].values[others] >= 0).all()


@pytest.mark.parametrize("score", ["dot", "cosine"])
def test_the_ranked_queries_match_numpy_and_a_zero_training_row_has_no_cosine(score):
    ds, grad, valid, qa, q = _with_zeros(score)
    g = np.where(valid[:, None], grad, 0.0)
    if score == "cosine":
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            expected = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / norms).T
    else:
        expected = q @ g.T
    expected[:, ~valid] = np.nan
    full = attribute(ds, qa, score=score).values
    np.testing.assert_allclose(full, expected, rtol=1e-12)
    if score == "cosine":  # no direction: NaN, never a number
        assert np.isnan(full[:, ZERO_TRAIN]).all() and np.isnan(full[ZERO_QUERY]).all()
    res = attribute(ds, qa, score=score, k=6).compute()
    for i in np.flatnonzero(res.ranked.values):
        row = np.where(np.isfinite(expected[i]), expected[i], -np.inf)
        want = np.argsort(-row, kind="stable")[:6]
        np.testing.assert_array_equal(res["index"].values[i], want)
        if score == "cosine":
            assert ZERO_TRAIN not in res["index"].values[i]


def test_a_k_beyond_the_rows_with_a_cosine_score_leaves_blank_ranks():
    ds, grad, valid, qa, q = _with_zeros("cosine")
    res = attribute(ds, qa, score="cosine", k=int(valid.sum())).compute()  # one row (zero) has no score
    for i in np.flatnonzero(res.ranked.values):
        assert (res["index"].values[i, -1], res.example.values[i, -1]) == (-1, "")
        assert np.isnan(res.score.values[i, -1]) and np.isfinite(res.score.values[i, :-1]).all()


def test_unit_rows_in_float32_whatever_the_dtype():
    x = np.array([[1e-4, -2e-4, 0, 3e-4], [0, 0, 0, 0], [1, np.nan, 0, 0]], dtype=np.float16)
    assert x[0, 0] ** 2 == 0  # the float16 square of 1e-4 underflows: a norm taken in float16 loses it
    u = unit_rows(x)
    assert u.dtype == np.float32
    want = x[0].astype(np.float64) / np.linalg.norm(x[0].astype(np.float64))
    np.testing.assert_allclose(u[0], want, rtol=1e-6)
    assert np.isnan(u[1]).all() and np.isnan(u[2]).all()
    tiny = np.full((1, 4), 1e-30, dtype=np.float32)  # float32 squares underflow to 0 as well
    np.testing.assert_allclose(unit_rows(tiny), 0.5, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float16_stores_rank_queries_whose_squares_underflow(tmp_path, dtype):
    """Sketches around 1e-4: their float16 squares (1e-8) underflow, which made the cosine of every query NaN."""
    from sketcharray.storage import store as st
    from sketcharray.storage.store import open_sketches

    rng = np.random.default_rng(3)
    n, d = 30, 16
    rows = (rng.standard_normal((n, d)) * 1e-4).astype(np.float32)
    rows[5] = 0.0
    st.create_store(tmp_path / "s.zarr", variable="grad", row_dim="example", n_rows=n, n_out=d, chunk=10,
                    ids=[f"e{i}" for i in range(n)], has_label=False, storage_dtype=dtype,
                    attrs={"sketch_spec": {"method": "afjl", "n_out": d}})
    for b, (a, z) in enumerate([(0, 10), (10, 20), (20, 30)]):
        st.write_batch(tmp_path / "s.zarr", b, a, z, {"grad": rows[a:z], "loss": np.zeros(z - a, np.float32),
                                                      "valid": np.ones(z - a, bool)}, [f"e{i}" for i in range(a, z)])
    ds = open_sketches(tmp_path / "s.zarr")
    stored = ds.grad.values.astype(np.float64)
    q = ds.grad.isel(example=[0, 5, 9])
    res = attribute(ds, q, score="cosine", k=3).compute()
    assert res.ranked.values.tolist() == [True, False, True]
    unit = stored / np.linalg.norm(stored, axis=1, keepdims=True).clip(1e-300)
    unit[5] = np.nan
    for i, row in ((0, 0), (2, 9)):
        s = np.where(np.isfinite(unit @ unit[row]), unit @ unit[row], -np.inf)
        np.testing.assert_array_equal(res["index"].values[i], np.argsort(-s, kind="stable")[:3])
        np.testing.assert_allclose(res.score.values[i], np.sort(s)[::-1][:3], rtol=1e-5)
    assert res["index"].values[0, 0] == 0 and res.score.values[0, 0] == pytest.approx(1.0, rel=1e-5)
    report = st.verify_store(tmp_path / "s.zarr")
    assert report.ok and report.zero_rows == 1 and "1 row(s) with a zero sketch" in str(report)


def test_the_cli_says_a_query_has_no_ranking(tmp_path, capsys):
    """Through the command: a zero query's line says so instead of listing arbitrary examples."""
    from sketcharray.app import cli
    from sketcharray.storage import store as st

    rng = np.random.default_rng(4)
    for name, n, zero in (("train", 20, None), ("test", 4, 1)):
        rows = rng.standard_normal((n, 8)).astype(np.float32)
        if zero is not None:
            rows[zero] = 0
        st.create_store(tmp_path / f"{name}.zarr", variable="grad", row_dim="example", n_rows=n, n_out=8, chunk=n,
                        ids=[f"{name}{i}" for i in range(n)], has_label=False,
                        attrs={"sketch_spec": {"method": "afjl", "n_out": 8}})
        st.write_batch(tmp_path / f"{name}.zarr", 0, 0, n, {"grad": rows, "loss": np.zeros(n, np.float32),
                                                          "valid": np.ones(n, bool)}, [f"{name}{i}" for i in range(n)])
    assert cli.main(["attribute", str(tmp_path / "train.zarr"), str(tmp_path / "test.zarr"), "--score", "cosine",
                     "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "| test1 | - | no ranking: the query's sketch is zero or non-finite |" in out
    assert out.count("| test0 |") == 2 and "| test1 | 1 |" not in out
