"""The linear datamodeling score against scipy's Spearman, its zero line, and a small retraining run."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from sketcharray.analysis.lds import linear_datamodeling_score


def test_lds_is_spearman_of_outputs_against_additive_predictions():
    rng = np.random.default_rng(0)
    scores, subsets = rng.standard_normal((7, 40)), rng.random((30, 40)) < 0.5
    outputs = rng.standard_normal((30, 7))
    res = linear_datamodeling_score(scores, subsets, outputs)
    expected = [stats.spearmanr(outputs[:, q], subsets @ scores[q]).statistic for q in range(7)]
    np.testing.assert_allclose(res.lds.values, expected, rtol=1e-12)
    assert res.attrs["ci_low"] < res.attrs["mean"] < res.attrs["ci_high"] and res.attrs["models"] == 30
    exact = linear_datamodeling_score(scores, subsets, subsets @ scores.T + 1e-9 * rng.standard_normal((30, 7)))
    np.testing.assert_allclose(exact.lds.values, 1.0)  # an exactly additive datamodel is predicted perfectly


def test_random_scores_give_an_lds_of_zero():
    rng = np.random.default_rng(1)
    n_models, n_query = 40, 200
    subsets = rng.random((n_models, 300)) < 0.5
    outputs = rng.standard_normal((n_models, n_query)) + subsets[:, :1]  # outputs that do depend on the data
    res = linear_datamodeling_score(rng.standard_normal((n_query, 300)), subsets, outputs)
    # under independence each query's Spearman over M models has standard deviation 1/sqrt(M - 1); the mean over
    # Q queries (independent scores per query) has 1/sqrt((M - 1) Q): 4 of those is a 1-in-15,000 false alarm
    assert abs(res.attrs["mean"]) < 4 / np.sqrt((n_models - 1) * n_query)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"expected subsets \(M, 5\) and outputs \(M, 2\)"):
        linear_datamodeling_score(np.zeros((2, 5)), np.zeros((4, 6), bool), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 3 retrained models"):
        linear_datamodeling_score(np.zeros((2, 5)), np.zeros((2, 5), bool), np.zeros((2, 2)))


@pytest.mark.slow
def test_attribution_scores_predict_retraining_on_digits():
    """The small variant of ``sketcharray bench lds``: 12 models on 50% of 400 examples, 60 queries."""
    from sketcharray.analysis import attribute
    from sketcharray.app.bench.lds import exact_gradients, retrain_on_subsets
    from sketcharray.collect import sketch_gradients
    from sketcharray.workloads import digits

    import torch

    w = digits()
    n, m = 400, 60
    subsets, outputs = retrain_on_subsets(12, n_train=n, n_test=m)
    train, test = torch.utils.data.Subset(w.train, range(n)), torch.utils.data.Subset(w.test, range(m))
    model = w.model()
    exact = attribute(exact_gradients(model, w.loss_fn, train, w.train_ids[:n]),
                      exact_gradients(model, w.loss_fn, test, w.test_ids[:m]), score="influence").values
    spec = {"method": "affd", "n_out": 256}
    sketched = attribute(sketch_gradients(w.model_factory, w.loss_fn, train, spec, batch_size=100,
                                          execution={"progress": False}),
                         sketch_gradients(w.model_factory, w.loss_fn, test, spec, batch_size=100,
                                          execution={"progress": False}),
                         score="influence").values
    zero_line = 4 / np.sqrt((12 - 1) * m)  # the random-score bound of the test above
    for scores in (exact, sketched):
        res = linear_datamodeling_score(scores, subsets, outputs)
        assert res.attrs["ci_low"] > zero_line, res.attrs  # measured: 0.3-0.4 on the full benchmark


def test_a_query_without_a_finite_score_has_no_lds_and_leaves_the_mean():
    """Issue 21: a cosine query with a zero sketch scores NaN everywhere; its LDS is NaN, not a tied 0."""
    rng = np.random.default_rng(2)
    scores, subsets = rng.standard_normal((5, 40)), rng.random((30, 40)) < 0.5
    outputs = rng.standard_normal((30, 5))
    scores[3] = np.nan
    res = linear_datamodeling_score(scores, subsets, outputs)
    assert np.isnan(res.lds.values[3]) and np.isfinite(np.delete(res.lds.values, 3)).all()
    assert res.attrs["mean"] == pytest.approx(np.delete(res.lds.values, 3).mean())
