"""Subspace reparametrisation theta = theta_0 + Phi^T omega (docs/intrinsic.md)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .grads import adjoint_offset
from .params import select_params


class SubspaceModel(nn.Module):
    """Wraps a model so that its only trainable tensor is omega in R^D (starting at 0).

    The selected parameters become ``theta_0 + Phi^T omega`` (the others stay
    frozen); forward and backward go through the sketch's adjoint and the
    sketch itself, never through a D x N matrix.  ``active`` limits training
    to the first ``active`` coordinates of omega (the gradient of the rest is
    zeroed), which nests the subspaces of the doubling search.

    Parameters
    ----------
    model : nn.Module
        Its current weights are theta_0 (copied; the model is not modified).
    op : SketchOperator
        Any method of the registry with ``n_in`` = N of the selected parameters.
    params : None, name or glob pattern(s)
    """

    def __init__(self, model: nn.Module, op, params=None):
        super().__init__()
        self.paramset = select_params(model, params)
        if op.n_in != self.paramset.n:
            raise ValueError(f"sketch n_in={op.n_in} does not match the {self.paramset.n} selected parameters")
        self.model = model
        self.op = op
        named = dict(model.named_parameters())
        self.theta0 = {k: named[k].detach().clone() for k in self.paramset.names}
        for p in model.parameters():
            p.requires_grad_(False)
        ref = next(iter(self.theta0.values()))
        self.omega = nn.Parameter(torch.zeros(op.n_out, dtype=ref.dtype, device=ref.device))
        self.active = op.n_out
        self.omega.register_hook(self._mask)

    def _mask(self, grad):
        if self.active >= grad.shape[0]:
            return grad
        mask = torch.zeros_like(grad)
        mask[: self.active] = 1
        return grad * mask

    def parameters_now(self) -> dict[str, torch.Tensor]:
        """theta_0 + Phi^T omega, as a name -> tensor dict (differentiable in omega)."""
        offset = self.paramset.unflatten(adjoint_offset(self.op, self.omega[None, :])[0])
        return {k: self.theta0[k] + offset[k] for k in self.paramset.names}

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.parameters_now(), args, kwargs, strict=False)
