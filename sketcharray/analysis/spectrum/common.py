"""Shared pieces of the eigen-solvers: settings per solver, which pairs are wanted, selecting and finishing a result
(converged flags, the tolerance), and the BLAS-thread guard for large D."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from ...core.settings import SolverSettings, coerce


def _solver_for(method: str, solver) -> SolverSettings:
    """``solver`` as SolverSettings for ``method``: a dict without a method is taken as that method's."""
    if solver is None or isinstance(solver, dict):
        solver = {"method": method, **(solver or {})}
    solver = coerce(solver, SolverSettings, "solver")
    if solver.method != method:
        raise ValueError(f"{method}() got SolverSettings(method={solver.method!r}); pass method={method!r} "
                         f"or call {solver.method}()")
    return solver


class ConvergenceWarning(UserWarning):
    """A solver stopped at its budget before every wanted Ritz pair met its tolerance."""


#: Lanczos without ``max_iter``: at most this many products (and at most D, where Lanczos is exact)
LANCZOS_BUDGET = 1000


def _wanted(vals, k: int, which: str) -> np.ndarray:
    """Indices of the Ritz values a solve waits for: the k largest and/or the k smallest, whatever their sign
    (the bottom end must converge before it can say that K has no negative eigenvalue)."""
    order = np.argsort(vals)
    ends = ([order[::-1][:k]] if which in ("both", "top") else []) + ([order[:k]] if which in ("both", "bottom")
                                                                       else [])
    return np.unique(np.concatenate(ends))


def _select(vals, vecs, res, k, which, zero: float = 0.0):
    """The top end (positive Ritz values, largest first) and the bottom end (negative ones, most negative first),
    up to k each: a Ritz value of the other sign, or within ``zero`` of 0 (where the solve cannot tell its sign),
    is never put at an end, so an end may hold fewer than k."""
    order = np.argsort(vals)
    out = {}
    if which in ("both", "top"):
        top = order[::-1][:k]
        top = top[vals[top] > zero]
        out["positive"] = (vals[top], vecs[:, top], res[top])
    if which in ("both", "bottom"):
        bottom = order[:k]
        bottom = bottom[vals[bottom] < -zero]
        out["negative"] = (vals[bottom], vecs[:, bottom], res[bottom])
    return out


def _finish(out: dict, theta, res, k: int, which: str, tolerance: float, exact: bool, solver: str,
            budget: str) -> dict:
    """Add each end's per-pair ``converged`` flags (residual <= ``tolerance``; when the basis spans the space,
    ``exact``, every pair is K's up to rounding), ``all_converged`` (every wanted pair of ``theta``, of either
    sign, converged: only then does an end with fewer than k values mean that K has no more of that sign), and
    warn when a wanted pair has not converged."""
    if exact:
        tolerance = max(tolerance, float(res.max(initial=0.0)))
    pending = int((res[_wanted(theta, k, which)] > tolerance).sum())
    out["converged"] = {key: np.asarray(out[key][2] <= tolerance) for key in ("positive", "negative") if key in out}
    out["tolerance"] = float(tolerance)
    out["all_converged"] = pending == 0
    if pending:
        warnings.warn(f"{solver} stopped at its budget ({budget}) with {pending} wanted Ritz pair(s) not converged "
                      f"(residual above {tolerance:.3g}, tol x the largest |eigenvalue|); the eigenvalues flagged "
                      "converged=False are approximate, and an end may miss values of its sign: raise the budget",
                      ConvergenceWarning, stacklevel=3)
    return out


ONE_BLAS_THREAD_DIM = 1 << 16


def _one_blas_thread(dim: int):
    """NumPy's BLAS on one thread while a solver alternates with torch's HVPs, for D <= ONE_BLAS_THREAD_DIM.

    Both libraries keep a pool of threads that spin after each call; on a few
    cores each pool's spinning steals the other's cores.  The Krylov work on
    D-vectors is small enough for one thread (on the digits MLP this took the
    non-HVP share of a Lanczos solve from about 16% to 4-9%, and the HVPs
    got faster too).
    """
    import contextlib

    if dim > ONE_BLAS_THREAD_DIM:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _padded(values, k: int, fill) -> np.ndarray:
    """``values`` along its first axis, filled up to ``k`` rows with ``fill``."""
    values = np.asarray(values)
    out = np.full((k, *values.shape[1:]), fill, dtype=np.result_type(values.dtype, type(fill)))
    out[: len(values)] = values
    return out


def _spectrum_dataset(result: dict, k: int, eigenvectors: bool) -> xr.Dataset:
    """The solver's ends as (sign, rank) arrays; an end with fewer than k values of its sign is NaN beyond them."""
    signs = [s for s in ("positive", "negative") if s in result]
    vals = np.stack([_padded(result[s][0], k, np.nan) for s in signs])
    res = np.stack([_padded(result[s][2], k, np.nan) for s in signs])
    data = {"eigenvalue": (("sign", "rank"), vals), "residual": (("sign", "rank"), res)}
    if "converged" in result:
        data["converged"] = (("sign", "rank"), np.stack([_padded(result["converged"][s], k, True) for s in signs]))
    if eigenvectors:
        data["eigenvector"] = (("sign", "rank", "sketch"),
                               np.stack([_padded(np.asarray(result[s][1]).T, k, np.nan) for s in signs]))
    if "all_converged" in result:  # every wanted pair, of either sign: only then is a short end K's own
        data["all_converged"] = ((), bool(result["all_converged"]))
    ds = xr.Dataset(data, coords={"sign": signs, "rank": np.arange(1, k + 1)})
    if "tolerance" in result:
        ds.attrs.update(tolerance=result["tolerance"])
    return ds


#: what every spectrum result says about itself
SKETCHED_NOTE = (
    "eigenvalues of the sketched Hessian K = Phi H Phi^T, which estimate those of H. With several sketch seeds "
    "(seeds=...), eigenvalue_mean and eigenvalue_spread (standard deviation over seeds) are the estimate and its "
    "error bar; the spread measures the sketch's variance, not its bias. The ends of K are biased, and not always "
    "the same way: an isolated extreme eigenvalue of H comes out smaller in magnitude (on the digits MLP, "
    "lambda_min(K)/lambda_min(H) = 0.50 at D = 2^8 and 0.87 at 2^10 for AFFD, so RNEG is underestimated there), "
    "while a broad negative bulk is spread outward (lambda_min(K) more negative than H's, RNEG overestimated). "
    "docs/spectrum.md gives the measured errors against an exact Hessian")
