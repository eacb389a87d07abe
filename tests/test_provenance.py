"""Two sets of sketches meet only when the same operator, parameters and (at one checkpoint) model made them."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from sketcharray.analysis import attribute, gram, self_influence
from sketcharray.collect import sketch_gradients
from sketcharray.storage.provenance import check_same_sketch, provenance, stack_checkpoints
from sketcharray.storage.store import open_sketches

from .workload_fixture import _model, tiny

SPEC = {"method": "afjl", "n_out": 8, "seed": 0}


@pytest.fixture(scope="module")
def w():
    return tiny()


@pytest.fixture(scope="module")
def stores(w, tmp_path_factory):
    """Training and query stores, and query stores made by another seed, method, parameter set and model."""
    root = tmp_path_factory.mktemp("prov")

    def make(name, data, ids, spec=SPEC, model=None, params=None, checkpoint=None):
        sketch_gradients(model or w.model_factory, w.loss_fn, data, spec, batch_size=12, ids=ids, store=root / name,
                         checkpoint=checkpoint, model_settings={"params": params}, execution={"progress": False})
        return open_sketches(root / name)

    return {
        "train": make("train.zarr", w.train, w.train_ids),
        "test": make("test.zarr", w.test, w.test_ids),
        "seed": make("seed.zarr", w.test, w.test_ids, spec={**SPEC, "seed": 1}),
        "method": make("method.zarr", w.test, w.test_ids, spec={**SPEC, "method": "qk"}),
        "params": make("params.zarr", w.test, w.test_ids, params=["0.*"], spec={**SPEC, "n_out": 8}),
        "model": make("model.zarr", w.test, w.test_ids, model=functools.partial(_model, 1)),
        "train-b": make("train-b.zarr", w.train, w.train_ids, model=functools.partial(_model, 1), checkpoint="b"),
        "test-b": make("test-b.zarr", w.test, w.test_ids, model=functools.partial(_model, 1), checkpoint="b"),
    }


def test_a_store_and_its_variables_carry_their_provenance(stores):
    p = provenance(stores["train"])
    assert p["sketch_spec"]["seed"] == 0 and p["param_sizes"] == [48, 8, 24, 3] and len(p["model_fingerprint"]) == 16
    assert provenance(stores["train"].grad.isel(example=slice(0, 3))) == p


@pytest.mark.parametrize("other, key, pattern", [
    ("seed", "sketch_spec", r'"seed": 0.*"seed": 1'),
    ("method", "sketch_spec", r'"method": "afjl".*"method": "qk"'),
    ("params", "param_names", r'\["0.weight", "0.bias", "2.weight", "2.bias"\].*\["0.weight", "0.bias"\]'),
])
@pytest.mark.parametrize("k", [None, 3])
def test_attribution_across_sketches_is_refused_naming_both(stores, other, key, pattern, k):
    with pytest.raises(ValueError, match=rf"train has {key}=.*queries has {key}=") as info:
        attribute(stores["train"], stores[other], k=k)
    assert __import__("re").search(pattern, str(info.value))


def test_another_model_at_one_checkpoint_is_refused_unless_allowed(stores):
    with pytest.raises(ValueError, match=r"come from different model weights.*allow_model_mismatch=True"):
        attribute(stores["train"], stores["model"], k=3)
    top = attribute(stores["train"], stores["model"], k=3, allow_model_mismatch=True)
    assert "train model" in top.attrs["model_mismatch_allowed"]
    scores = attribute(stores["train"], stores["model"].grad, allow_model_mismatch=True)
    assert "model_mismatch_allowed" in scores.attrs
    assert "model_mismatch_allowed" not in attribute(stores["train"], stores["test"], k=3).attrs


def test_bare_arrays_carry_nothing_to_check(stores):
    q = np.random.default_rng(0).standard_normal((2, 8))
    assert attribute(stores["train"], q, k=2).score.shape == (2, 2)


def test_a_preconditioner_from_another_sketch_is_refused(stores):
    with pytest.raises(ValueError, match="train has sketch_spec=.*preconditioner has sketch_spec="):
        attribute(stores["train"], stores["test"], score="influence", preconditioner=gram(stores["seed"]))
    with pytest.raises(ValueError, match="preconditioner"):
        self_influence(stores["train"], score="influence", preconditioner=gram(stores["method"]))
    ok = self_influence(stores["train"], score="influence", preconditioner=gram(stores["train"]))
    assert np.isfinite(ok.values).all()


def test_tracin_over_checkpoints_checks_each_checkpoint(stores):
    train = stack_checkpoints({"a": stores["train"], "b": stores["train-b"]})
    queries = stack_checkpoints({"a": stores["test"], "b": stores["test-b"]})
    assert train.grad.dims == ("checkpoint", "example", "sketch") and list(train.checkpoint.values) == ["a", "b"]
    fp = provenance(train)["model_fingerprint"]
    assert fp["a"] != fp["b"]  # different weights across checkpoints are expected
    top = attribute(train, queries, k=3).compute()
    per = [attribute(stores[t], stores[q]).values for t, q in (("train", "test"), ("train-b", "test-b"))]
    expected = np.sort(per[0] + per[1], axis=1)[:, ::-1][:, :3]
    np.testing.assert_allclose(top.score.values, expected, rtol=1e-6)
    swapped = stack_checkpoints({"a": stores["test-b"], "b": stores["test"]})
    with pytest.raises(ValueError, match="checkpoint a: train model .* queries model"):
        attribute(train, swapped, k=3)
    with pytest.raises(ValueError, match=r"train holds checkpoints \['a', 'b'\] but queries holds \['None'\]"):
        attribute(train, stores["test"], k=3)


def test_stacking_refuses_other_sketches_and_other_examples(stores):
    with pytest.raises(ValueError, match="checkpoint a has sketch_spec=.*checkpoint b has sketch_spec="):
        stack_checkpoints({"a": stores["test"], "b": stores["seed"]})
    with pytest.raises(ValueError, match="checkpoint b holds other example ids than checkpoint a"):
        stack_checkpoints({"a": stores["test"], "b": stores["train-b"]})


def test_check_same_sketch_names_both_sets():
    a = {"sketch_spec": {"method": "afjl"}, "param_names": ["w"], "param_sizes": [3], "model_fingerprint": "x"}
    with pytest.raises(ValueError, match="left has param_sizes=\\[3\\], right has param_sizes=\\[4\\]"):
        check_same_sketch(a, {**a, "param_sizes": [4]}, names=("left", "right"))
    assert check_same_sketch(a, None) is None
    assert check_same_sketch(a, {**a, "model_fingerprint": "y"}, allow_model_mismatch=True).startswith("train model x")


def test_lazy_sketches_carry_provenance_too(w):
    x, y = w.train[:20]
    lazy = sketch_gradients(w.model_factory, w.loss_fn, torch.utils.data.TensorDataset(x, y), SPEC, batch_size=10)
    other = sketch_gradients(w.model_factory, w.loss_fn, torch.utils.data.TensorDataset(x, y), {**SPEC, "seed": 5},
                             batch_size=10)
    with pytest.raises(ValueError, match="sketched differently"):
        attribute(lazy, other.grad)
