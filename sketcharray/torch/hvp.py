"""Hessian-vector products of the mean loss, and the sketched Hessian K = Phi H Phi^T."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from torch.func import functional_call, grad, jvp, vmap

from .grads import _Forward, batch_size_of, default_forward, to_device
from .locks import AUTODIFF
from .params import ParamSet



class HVP:
    """``V -> H V`` for the Hessian H of the mean training loss over ``batches``.

    Parameters
    ----------
    model, loss_fn, forward : as for :func:`sketcharray.torch.per_example_gradients`
    batches : list of batches
        The data the loss averages over (each example weighs the same).
    paramset : ParamSet
    mode : {"auto", "forward-over-reverse", "reverse-over-reverse"}
        ``auto`` tries forward-over-reverse (``jvp`` of ``grad``, vmapped over
        the directions) and falls back, with a warning, to reverse-over-reverse
        (plain double backward, one direction at a time) when the model lacks
        forward-mode or vmap support (some attention kernels do).

    ``hvp(V)`` takes ``(k, N)`` directions and returns ``(k, N)``; the k
    directions go through one vmapped pass per data batch.
    """

    def __init__(self, model, loss_fn, batches, paramset: ParamSet, *, forward=None, mode="auto", device=None,
                 n_examples: int | None = None):
        if mode not in ("auto", "forward-over-reverse", "reverse-over-reverse"):
            raise ValueError(f"mode must be 'auto', 'forward-over-reverse' or 'reverse-over-reverse'; got {mode!r}")
        self.model = model
        self.wrapper = _Forward(model, forward or default_forward)
        self.loss_fn = loss_fn
        self.paramset = paramset
        self.device = device
        self.batches = [to_device(b, device, model) for b in batches]
        # the mean is over n_examples (default: these batches'); a shard of the data passes the whole count,
        # so the shards' products sum to the Hessian of the mean over all of them
        self.n_examples = sum(batch_size_of(b) for b in self.batches) if n_examples is None else int(n_examples)
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self.frozen = {"model." + k: v.detach() for k, v in named.items() if k not in paramset.names}
        self.theta = {k: dict(model.named_parameters())[k].detach() for k in paramset.names}
        self.mode = mode
        self.count = 0          # HVPs computed (one per direction)
        self.seconds = 0.0      # time spent in them

    def _loss_sum(self, batch):
        def f(params):
            state = {**self.frozen, **{"model." + k: v for k, v in params.items()}}
            return self.loss_fn(functional_call(self.wrapper, state, (batch,)), batch).sum() / self.n_examples
        return f

    def _forward_over_reverse(self, f, dirs):
        with AUTODIFF:  # forward-mode AD levels are process-global (see torch/locks.py)
            return vmap(lambda v: jvp(grad(f), (self.theta,), (v,))[1])(dirs)

    def _reverse_over_reverse(self, f, dirs):
        # Plain double backward, one direction at a time over a shared graph: it
        # needs neither forward-mode nor vmap support from the model's ops.
        theta = {k: v.detach().requires_grad_(True) for k, v in self.theta.items()}
        grads = torch.autograd.grad(f(theta), list(theta.values()), create_graph=True)
        k = next(iter(dirs.values())).shape[0]
        rows = []
        for i in range(k):
            dot = sum((g * dirs[name][i]).sum() for g, name in zip(grads, theta))
            rows.append(torch.autograd.grad(dot, list(theta.values()), retain_graph=i < k - 1))
        return {name: torch.stack([r[j] for r in rows]) for j, name in enumerate(theta)}

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for directions ``V`` of shape (k, N) or (N,)."""
        squeeze = V.ndim == 1
        V = V.reshape(-1, self.paramset.n)
        t0 = time.perf_counter()
        dirs = self.paramset.unflatten(V)
        out = None
        for batch in self.batches:
            f = self._loss_sum(batch)
            hv = self._batched(f, dirs)
            flat = self.paramset.flatten(hv, batch_dims=1)
            out = flat if out is None else out + flat
        if V.is_cuda:
            torch.cuda.synchronize(V.device)
        self.seconds += time.perf_counter() - t0
        self.count += V.shape[0]
        return out[0] if squeeze else out

    def _batched(self, f, dirs):
        if self.mode == "auto":
            try:
                res = self._forward_over_reverse(f, dirs)
                self.mode = "forward-over-reverse"
                return res
            except (RuntimeError, NotImplementedError) as exc:
                warnings.warn(
                    f"forward-mode AD failed for {type(self.model).__name__} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "using reverse-over-reverse Hessian-vector products",
                    RuntimeWarning, stacklevel=3,
                )
                self.mode = "reverse-over-reverse"
        if self.mode == "forward-over-reverse":
            return self._forward_over_reverse(f, dirs)
        return self._reverse_over_reverse(f, dirs)


class SubspaceHessian:
    """The sketched Hessian ``K = Phi H Phi^T`` (D x D) as a linear operator.

    ``K w`` needs one HVP at direction ``Phi^T w`` and one sketch; only
    D-dimensional vectors leave this object.  ``matvec`` takes (D,) or a batch
    (k, D) of numpy arrays or torch tensors and returns the same kind.
    ``hvp_seconds`` and ``other_seconds`` split the time between the HVPs
    and everything else (sketching, transfers).

    Tiny operators (``N * max(N, D) <= explicit_limit`` entries) are
    materialised once as the N x D matrix Phi^T, so each product costs two
    matmuls instead of two structured transforms (the same numbers to float
    rounding; tested).  With the compiled FWHT the structured transforms win
    from a few thousand parameters on: on the 3,466-parameter digits MLP at
    D = 1024 they cost 0.7-1.3 ms per product against 1.9-2.8 ms for the
    matmuls with the 14 MB Phi^T.

    The sketch's random state (and Phi^T when explicit) is built at
    construction, once, and timed apart as ``setup_seconds``.
    """

    #: in this process, not sharded over dask tasks (see sketcharray.collect.ShardedSubspaceHessian)
    shards = None

    def __init__(self, hvp: HVP, op, *, explicit_limit: int = 1 << 20):
        if op.n_in != hvp.paramset.n:
            raise ValueError(f"sketch n_in={op.n_in} does not match the {hvp.paramset.n} selected parameters")
        self.hvp = hvp
        self.op = op
        self.shape = (op.n_out, op.n_out)
        self.other_seconds = 0.0
        self.explicit = op.n_in * max(op.n_in, op.n_out) <= explicit_limit
        t0 = time.perf_counter()
        ref = next(iter(hvp.theta.values()))
        op.prepare(torch.zeros((1, op.n_out), dtype=ref.dtype, device=ref.device))
        # Phi^T (N, D) when explicit
        self._phi_t = op.apply(torch.eye(op.n_in, dtype=ref.dtype, device=ref.device)) if self.explicit else None
        self.setup_seconds = time.perf_counter() - t0

    def _adjoint(self, W):
        return W @ self._phi_t.T if self.explicit else self.op.adjoint(W)

    def _apply(self, V):
        return V @ self._phi_t if self.explicit else self.op.apply(V)

    @property
    def hvp_seconds(self) -> float:
        return self.hvp.seconds

    @property
    def hvps(self) -> int:
        """Hessian-vector products computed so far (one per direction)."""
        return self.hvp.count

    @property
    def hvp_mode(self) -> str:
        return self.hvp.mode

    def matvec(self, w):
        t0 = time.perf_counter()
        was_numpy = isinstance(w, np.ndarray)
        ref = next(iter(self.hvp.theta.values()))
        W = torch.as_tensor(w, dtype=ref.dtype, device=ref.device)
        squeeze = W.ndim == 1
        W = W.reshape(-1, self.op.n_out)
        V = self._adjoint(W)
        h0 = self.hvp.seconds
        HV = self.hvp(V)
        out = self._apply(HV)
        self.other_seconds += (time.perf_counter() - t0) - (self.hvp.seconds - h0)
        out = out[0] if squeeze else out
        return out.detach().cpu().numpy().astype(np.float64) if was_numpy else out

    __matmul__ = matvec
