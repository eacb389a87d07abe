"""Per-example gradients and their sketches, explicit and implicit (docs/concepts.md).

The batch protocol: a batch is a tuple/list of tensors with a leading example
dimension (``(inputs, labels, ...)``) or a dict of them.  ``forward(model,
batch)`` produces the model output (default: ``model(batch[0])`` for
tuples, ``model(**batch)`` without ``"label"``/``"labels"`` for dicts) and
``loss_fn(output, batch)`` returns one loss per example.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .params import ParamSet

LABEL_KEYS = ("label", "labels")


def default_forward(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def batch_labels(batch):
    """The batch's labels when it carries them (second tuple item or a label key), else None."""
    if isinstance(batch, dict):
        for k in LABEL_KEYS:
            if k in batch:
                return batch[k]
        return None
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return batch[1]
    return None


def batch_size_of(batch) -> int:
    leaves = list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, (tuple, list)) else [batch]
    return int(next(t for t in leaves if isinstance(t, torch.Tensor)).shape[0])


def _map(batch, fn):
    if isinstance(batch, dict):
        return {k: fn(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(fn(v) for v in batch)
    return fn(batch)


def to_device(batch, device, model=None):
    """``batch`` on ``device``; with ``model``, its floating-point tensors in the model's floating dtype.

    Data often come as float64 (NumPy's default) for a float32 model; the
    forward would fail on the mismatch (``mat1 and mat2 must have the same
    dtype``), so inputs take the model's precision, as training would.  The
    data's fingerprint is taken of the data as given, before this.  Integer
    tensors (labels, token ids, masks) are left as they are.
    """
    dtype = None if model is None else model_float_dtype(model)

    def move(t):
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return t.to(device=device, dtype=dtype)
        return t.to(device)

    return _map(batch, move)


def model_float_dtype(model):
    """The floating dtype of the model's parameters (None when it has none, or several)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def data_fingerprint(batches) -> str:
    """SHA-256 (16 hex digits) of a list of batches: every tensor's key, dtype, shape and values, in order."""
    import hashlib

    h = hashlib.sha256()

    def feed(x, key=""):
        if isinstance(x, torch.Tensor):
            t = x.detach().to("cpu").contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                feed(x[k], f"{key}.{k}")
        elif isinstance(x, (tuple, list)):
            for i, v in enumerate(x):
                feed(v, f"{key}[{i}]")
        else:
            h.update(f"{key}={x!r};".encode())

    for i, batch in enumerate(batches):
        feed(batch, f"batch{i}")
    return h.hexdigest()[:16]


class _Forward(nn.Module):
    """Lets ``functional_call`` run a user's ``forward(model, batch)``."""

    def __init__(self, model: nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, batch):
        return self.fn(self.model, batch)


class _PerExample:
    """Loss of one example as a function of (selected params, the rest of the state)."""

    def __init__(self, model, loss_fn, forward, paramset: ParamSet):
        self.wrapper = _Forward(model, forward or default_forward)
        self.loss_fn = loss_fn
        self.paramset = paramset
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.frozen = {"model." + k: v.detach() for k, v in state.items() if k not in paramset.names}
        self.theta = {k: dict(model.named_parameters())[k].detach() for k in paramset.names}

    def loss_one(self, params: dict, example):
        batch = _map(example, lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t)
        state = {**self.frozen, **{"model." + k: v for k, v in params.items()}}
        out = functional_call(self.wrapper, state, (batch,))
        return self.loss_fn(out, batch).reshape(-1)[0]

    def losses(self, params: dict, batch):
        """Per-example losses of a batch with per-example parameters (leading dim = example)."""
        return vmap(self.loss_one, in_dims=(0, 0))(params, batch)


_vmap_failures: dict[type, str] = {}


def _warn_fallback(model: nn.Module, what: str, exc: Exception) -> None:
    key = type(model)
    if key not in _vmap_failures:
        _vmap_failures[key] = f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"torch.func.vmap cannot run {type(model).__name__} ({_vmap_failures[key].splitlines()[0][:200]}); "
            f"computing {what} one example at a time (slower, same result)",
            RuntimeWarning,
            stacklevel=3,
        )


def per_example_gradients(model, loss_fn, batch, paramset: ParamSet, *, forward=None, per_example: str = "auto"):
    """Flattened per-example gradients ``(B, N)`` and losses ``(B,)`` of one batch.

    ``per_example="vmap"`` uses ``torch.func`` (functional_call + vmap(grad));
    ``"loop"`` differentiates one example at a time; ``"auto"`` tries vmap and
    falls back (with a warning naming the reason) for models vmap cannot run,
    e.g. data-dependent control flow, ``.item()`` calls, or batch norm in
    training mode.
    """
    pe = _PerExample(model, loss_fn, forward, paramset)
    if per_example in ("auto", "vmap"):
        try:
            def loss_and_aux(params, example):
                loss = pe.loss_one(params, example)
                return loss, loss.detach()

            grads, losses = vmap(grad(loss_and_aux, has_aux=True), in_dims=(None, 0))(pe.theta, batch)
            return paramset.flatten(grads, batch_dims=1), losses
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            if per_example == "vmap":
                raise
            _warn_fallback(model, "per-example gradients", exc)
    rows, losses = [], []
    params = [dict(model.named_parameters())[k] for k in paramset.names]
    fwd = forward or default_forward
    for i in range(batch_size_of(batch)):
        one = _map(batch, lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) else t)
        loss = loss_fn(fwd(model, one), one).reshape(-1)[0]
        g = torch.autograd.grad(loss, params, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        rows.append(torch.cat([gi.reshape(-1) for gi in g]))
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


class _AdjointFn(torch.autograd.Function):
    """theta-offset = Phi^T omega, whose backward is the sketch Phi itself."""

    @staticmethod
    def forward(ctx, omega, op):
        ctx.op = op
        return op.adjoint(omega, check_finite=False)

    @staticmethod
    def backward(ctx, g):
        return ctx.op.apply(g, check_finite=False), None


def adjoint_offset(op, omega: torch.Tensor) -> torch.Tensor:
    """``Phi^T omega`` for a (B, D) or (D,) tensor, differentiable (its gradient is ``Phi``)."""
    return _AdjointFn.apply(omega, op)


def implicit_sketches(model, loss_fn, batch, paramset: ParamSet, op, *, forward=None, per_example="auto"):
    """``Phi g_i = grad_omega L(theta + Phi^T omega; z_i)`` at omega = 0, for each example.

    One forward pass of the model with per-example parameters
    ``theta + Phi^T omega_i`` (vmap) and one backward pass through the model
    and through ``Phi^T``: the gradient reaching omega_i is ``Phi g_i``.
    """
    pe = _PerExample(model, loss_fn, forward, paramset)
    b = batch_size_of(batch)
    ref = next(iter(pe.theta.values()))
    omega = torch.zeros(b, op.n_out, dtype=ref.dtype, device=ref.device, requires_grad=True)
    if per_example in ("auto", "vmap"):
        try:
            offsets = paramset.unflatten(adjoint_offset(op, omega))
            params = {k: pe.theta[k].unsqueeze(0) + offsets[k] for k in paramset.names}
            losses = pe.losses(params, batch)
            (sk,) = torch.autograd.grad(losses.sum(), omega)
            return sk, losses.detach()
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
            if per_example == "vmap":
                raise
            _warn_fallback(model, "implicit sketches", exc)
    rows, losses = [], []
    for i in range(b):
        one = _map(batch, lambda t: t[i : i + 1] if isinstance(t, torch.Tensor) else t)
        w = torch.zeros(1, op.n_out, dtype=ref.dtype, device=ref.device, requires_grad=True)
        offsets = paramset.unflatten(adjoint_offset(op, w)[0])
        params = {k: pe.theta[k] + offsets[k] for k in paramset.names}
        loss = pe.loss_one(params, _map(one, lambda t: t[0] if isinstance(t, torch.Tensor) else t))
        (g,) = torch.autograd.grad(loss, w)
        rows.append(g[0])
        losses.append(loss.detach())
    return torch.stack(rows), torch.stack(losses)


def sketch_batch(model, loss_fn, batch, paramset: ParamSet, op, *, mode: str = "explicit",
                 forward=None, per_example: str = "auto") -> dict[str, Any]:
    """Sketches ``(B, D)``, losses ``(B,)`` and validity ``(B,)`` of one batch, as torch tensors.

    A non-finite gradient (or loss) marks its example invalid; its sketch row is NaN.
    (A factored sketch is computed by :func:`sketcharray.torch.factored.sketch_batch`.)
    """
    if mode == "explicit":
        g, losses = per_example_gradients(model, loss_fn, batch, paramset, forward=forward, per_example=per_example)
        # finiteness is checked on the D-sized sketch: a NaN or inf entry of g reaches every output it has a
        # nonzero weight in (NaN * 0 is NaN too), so no pass over the (B x N) gradients is needed
        sk = op.apply(g, check_finite=False)
        del g
        valid = torch.isfinite(sk).all(dim=1) & torch.isfinite(losses)
    elif mode == "implicit":
        sk, losses = implicit_sketches(model, loss_fn, batch, paramset, op, forward=forward, per_example=per_example)
        valid = torch.isfinite(sk).all(dim=1) & torch.isfinite(losses)
    else:
        raise ValueError(f"mode must be 'explicit' or 'implicit'; got {mode!r}")
    sk = torch.where(valid[:, None], sk, torch.full_like(sk, float("nan")))
    return {"grad": sk.detach(), "loss": losses.detach(), "valid": valid}
