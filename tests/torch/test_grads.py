"""Per-example gradients (vmap and loop), implicit sketches, parameter selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sketcharray.sketches import make_sketch
from sketcharray.torch import model_fingerprint, per_example_gradients, select_params, sketch_batch
from sketcharray.workloads import cross_entropy_per_example


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def tiny_batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def one_by_one(model, batch, names=None):
    """Reference: autograd on each example separately, flattened in parameter order."""
    params = [p for n, p in model.named_parameters() if names is None or n in names]
    rows = []
    for i in range(batch[0].shape[0]):
        one = (batch[0][i : i + 1], batch[1][i : i + 1])
        loss = cross_entropy_per_example(model(one[0]), one)[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("how", ["vmap", "loop"])
def test_per_example_gradients_match_autograd_one_by_one(how):
    model, batch = tiny_model(), tiny_batch()
    ps = select_params(model)
    g, losses = per_example_gradients(model, cross_entropy_per_example, batch, ps, per_example=how)
    torch.testing.assert_close(g, one_by_one(model, batch), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(losses, cross_entropy_per_example(model(batch[0]), batch))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.func.vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3).double()

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_vmap_failure_falls_back_to_loop_with_a_warning():
    torch.manual_seed(0)
    model, batch = Branchy(), tiny_batch()
    ps = select_params(model)
    with pytest.warns(RuntimeWarning, match="vmap cannot run Branchy.*one example at a time"):
        g, _ = per_example_gradients(model, cross_entropy_per_example, batch, ps)
    torch.testing.assert_close(g, one_by_one(model, batch))
    with pytest.raises(RuntimeError):
        per_example_gradients(model, cross_entropy_per_example, batch, ps, per_example="vmap")


@pytest.mark.parametrize("method", ["afjl", "qk", "dense", "ffd"])
@pytest.mark.parametrize("how", ["vmap", "loop"])
def test_implicit_equals_explicit(method, how):
    model, batch = tiny_model(), tiny_batch()
    ps = select_params(model)
    op = make_sketch(method, ps.n, 16, seed=3)
    explicit = sketch_batch(model, cross_entropy_per_example, batch, ps, op, mode="explicit", per_example=how)
    implicit = sketch_batch(model, cross_entropy_per_example, batch, ps, op, mode="implicit", per_example=how)
    torch.testing.assert_close(implicit["grad"], explicit["grad"], rtol=1e-10, atol=1e-12)
    ref = op.apply(one_by_one(model, batch).numpy())
    np.testing.assert_allclose(explicit["grad"].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_select_params_by_name_and_pattern():
    model = tiny_model()
    assert select_params(model).names == ("0.weight", "0.bias", "2.weight", "2.bias")
    ps = select_params(model, ["2.*", "0.bias"])
    assert ps.names == ("0.bias", "2.weight", "2.bias")  # model order, not pattern order
    assert ps.n == 7 + 21 + 3
    flat = torch.arange(ps.n, dtype=torch.float64)
    torch.testing.assert_close(ps.flatten(ps.unflatten(flat)), flat)
    with pytest.raises(ValueError, match=r"params pattern 'encoder\.\*' matches no trainable parameter; the model has: 0.weight"):
        select_params(model, "encoder.*")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        select_params(model)


def test_gradients_of_a_parameter_subset():
    model, batch = tiny_model(), tiny_batch()
    ps = select_params(model, "2.*")
    g, _ = per_example_gradients(model, cross_entropy_per_example, batch, ps)
    torch.testing.assert_close(g, one_by_one(model, batch, names=set(ps.names)))


def test_fingerprint_changes_with_weights_only():
    a, b = tiny_model(0), tiny_model(0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b[0].bias[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_non_finite_gradient_marks_the_example_invalid():
    model, batch = tiny_model(), tiny_batch()
    batch[0][2, 1] = float("nan")
    ps = select_params(model)
    out = sketch_batch(model, cross_entropy_per_example, batch, ps, make_sketch("afjl", ps.n, 8, seed=0))
    assert out["valid"].tolist() == [True, True, False, True, True, True]
    assert torch.isnan(out["grad"][2]).all() and torch.isfinite(out["grad"][[0, 1, 3, 4, 5]]).all()
