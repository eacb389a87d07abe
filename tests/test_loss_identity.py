"""Issue 21, item 5a: the loss is recorded by what it computes, not only by its name."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from sketcharray.analysis import attribute
from sketcharray.collect import sketch_gradients
from sketcharray.storage.provenance import WeakIdentityWarning, function_identity
from sketcharray.workloads import cross_entropy_per_example

from .workload_fixture import tiny

SPEC = {"method": "afjl", "n_out": 8, "seed": 0}


def smoothed(out, batch, smoothing=0.0):
    return torch.nn.functional.cross_entropy(out, batch[1], reduction="none", label_smoothing=smoothing)


# two lambdas of one module: one qualname ("<lambda>"), two functions
first = lambda out, batch: cross_entropy_per_example(out, batch)  # noqa: E731
second = lambda out, batch: 2.0 * cross_entropy_per_example(out, batch)  # noqa: E731
SCALE = 3.0


def scaled(out, batch):
    return SCALE * cross_entropy_per_example(out, batch)


def test_identities_differ_when_the_function_differs():
    a, _ = function_identity(functools.partial(smoothed, smoothing=0.0))
    b, _ = function_identity(functools.partial(smoothed, smoothing=0.5))
    assert a != b and a == function_identity(functools.partial(smoothed, smoothing=0.0))[0]
    assert function_identity(first)[0] != function_identity(second)[0]
    factor = 2.0
    closure_a = (lambda f: (lambda out, batch: f * cross_entropy_per_example(out, batch)))(factor)
    closure_b = (lambda f: (lambda out, batch: f * cross_entropy_per_example(out, batch)))(3.0)
    assert function_identity(closure_a)[0] != function_identity(closure_b)[0]
    before = function_identity(scaled)[0]
    global SCALE
    SCALE = 4.0
    try:
        assert function_identity(scaled)[0] != before  # a plain-data global it reads is part of it
    finally:
        SCALE = 3.0
    assert function_identity(scaled)[0] == before


def test_an_unreadable_bound_value_makes_a_weak_identity_and_a_warning():
    class Opaque:
        pass

    _, unread = function_identity(functools.partial(smoothed, smoothing=Opaque()))
    assert unread == ["test_an_unreadable_bound_value_makes_a_weak_identity_and_a_warning.<locals>.Opaque "
                      "(no readable value)"]
    w = tiny()
    with pytest.warns(WeakIdentityWarning, match="cannot read"):
        sketch_gradients(w.model_factory, lambda o, b, x=Opaque(): smoothed(o, b), w.test, SPEC, batch_size=12,
                         ids=w.test_ids, execution={"progress": False})


def test_sketches_of_differently_smoothed_losses_do_not_meet(tmp_path):
    w = tiny()
    train = sketch_gradients(w.model_factory, functools.partial(smoothed, smoothing=0.0), w.train, SPEC,
                             batch_size=12, ids=w.train_ids, store=tmp_path / "train.zarr",
                             execution={"progress": False})
    queries = sketch_gradients(w.model_factory, functools.partial(smoothed, smoothing=0.5), w.test, SPEC,
                               batch_size=12, ids=w.test_ids, execution={"progress": False})
    assert train.attrs["loss_fn"] == queries.attrs["loss_fn"]  # the same name: only the identity tells them apart
    assert not np.allclose(queries.grad.values,
                           sketch_gradients(w.model_factory, functools.partial(smoothed, smoothing=0.0), w.test, SPEC,
                                            batch_size=12, ids=w.test_ids, execution={"progress": False}).grad.values)
    with pytest.raises(ValueError, match="are gradients of different functions: both of .*smoothed.*identity"):
        attribute(train, queries, k=2)
    # resuming the store with the other smoothing is refused too
    with pytest.raises(ValueError, match="loss_fn_identity"):
        sketch_gradients(w.model_factory, functools.partial(smoothed, smoothing=0.5), w.train, SPEC, batch_size=12,
                         ids=w.train_ids, store=tmp_path / "train.zarr", execution={"progress": False})
