"""Hessian-vector products and the sketched Hessian against torch.func.hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from sketcharray.sketches import make_sketch
from sketcharray.torch import HVP, SubspaceHessian, select_params
from sketcharray.workloads import cross_entropy_per_example

from .test_grads import tiny_batch, tiny_model


def exact_hessian(model, batches):
    ps = select_params(model)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    n = sum(b[0].shape[0] for b in batches)

    def mean_loss(flat):
        params = ps.unflatten(flat)
        return sum(cross_entropy_per_example(functional_call(model, params, (b[0],)), b).sum() for b in batches) / n

    return hessian(mean_loss)(ps.flatten(theta)), ps


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_hvp_equals_exact_hessian_times_v(mode):
    model = tiny_model()
    batches = [tiny_batch(6, seed=1), tiny_batch(4, seed=2)]
    H, ps = exact_hessian(model, batches)
    V = torch.randn(3, ps.n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    hvp = HVP(model, cross_entropy_per_example, batches, ps, mode=mode)
    torch.testing.assert_close(hvp(V), V @ H.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hvp(V[0]), H @ V[0], rtol=1e-10, atol=1e-12)
    assert hvp.count == 4


class NoForwardMode(torch.autograd.Function):
    """tanh with a backward but no jvp: forward-mode AD cannot pass it."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(5, 7).double(), nn.Linear(7, 3).double()

    def forward(self, x):
        return self.b(NoForwardMode.apply(self.a(x)))


def test_hvp_falls_back_to_reverse_over_reverse_without_forward_mode():
    model, batches = Net(), [tiny_batch()]
    ps = select_params(model)
    V = torch.randn(2, ps.n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    hvp = HVP(model, cross_entropy_per_example, batches, ps)
    with pytest.warns(RuntimeWarning, match="forward-mode AD failed for Net.*reverse-over-reverse"):
        out = hvp(V)
    assert hvp.mode == "reverse-over-reverse"
    ref = HVP(model, cross_entropy_per_example, batches, ps, mode="reverse-over-reverse")(V)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("explicit_limit", [0, 1 << 24], ids=["structured", "materialised"])
@pytest.mark.parametrize("method", ["affd", "qk"])
def test_subspace_hessian_is_phi_h_phi_t(method, explicit_limit):
    model = tiny_model()
    batches = [tiny_batch(8)]
    H, ps = exact_hessian(model, batches)
    op = make_sketch(method, ps.n, 16, seed=0)
    K = SubspaceHessian(HVP(model, cross_entropy_per_example, batches, ps), op, explicit_limit=explicit_limit)
    assert K.explicit == (explicit_limit > 0)
    phi = op.apply(np.eye(ps.n)).T  # (D, N)
    expected = phi @ H.numpy() @ phi.T
    got = K.matvec(np.eye(16))  # a batch of 16 directions: columns of K
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(K @ np.eye(16)[3], expected[3], rtol=1e-9, atol=1e-12)
    assert K.hvp_seconds > 0 and K.other_seconds >= 0 and K.setup_seconds > 0 and K.hvp.count == 17
