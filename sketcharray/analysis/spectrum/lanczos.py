"""Symmetric Lanczos with full reorthogonalisation on a batched matvec, resumable from a store (docs/theory.md, "The Hessian spectrum")."""

from __future__ import annotations

import logging

import numpy as np

from ...core.progress import Progress
from ...core.settings import SolverSettings, moved_options
from .common import LANCZOS_BUDGET, _finish, _select, _solver_for, _wanted
from .state import _DiskBasis, _LanczosState, _MemoryBasis, _basis_on_disk, _memory_budget

logger = logging.getLogger(__name__)


@moved_options(solver=SolverSettings)
def lanczos(matvec, dim: int, k: int = 10, *, solver: SolverSettings | dict | None = None, progress: bool = True,
            state=None, identity=None, label: str | None = None) -> dict:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Returns ``{"positive"|"negative": (values, vectors (dim, k), residuals)}``
    plus ``"iterations"`` and ``"restarts"``.  Residuals are the Ritz residual
    norms ``|beta_m s_{m,i}|`` = ||K v_i - lambda_i v_i||.  When the Krylov
    space becomes invariant (K has fewer distinct eigenvalues than the basis
    needs, or repeated ones, which one start vector sees once each), the
    iteration restarts from a random vector orthogonal to the basis, with a
    zero coupling in the tridiagonal matrix, so every copy of a repeated
    eigenvalue is found and the relation K V = V T + beta v e^T still
    holds.  The Krylov basis takes
    ``(max_iter + 1) x dim`` entries of ``basis_dtype``; float32 halves it
    for very long vectors (a reference run on an unsketched Hessian), with the
    projections computed in float32 and the recurrence in float64.

    ``solver``: a :class:`~sketcharray.settings.SolverSettings` (or a dict of
    its fields) with ``method="lanczos"``: ``which``, ``tol``, ``max_iter``,
    ``seed``, ``check_every``, ``basis_dtype``.

    ``state`` (a folder path) keeps the solve's state in Zarr after every
    product; rerunning the same call after a kill resumes from the last
    committed product and gives the same numbers as a solve never
    interrupted.  ``identity`` (JSON-able) says what ``matvec`` is, e.g.
    the model's and data's fingerprints and the sketch: a state left by
    another operator or other settings is refused, naming the difference.
    """
    solver = _solver_for("lanczos", solver)
    which, tol, seed, check_every = solver.which, solver.tol, solver.seed, solver.check_every
    basis_dtype = np.dtype(solver.basis_dtype)
    m_max = min(dim, solver.max_iter or _lanczos_budget(solver, state, dim, k, basis_dtype))
    if k > m_max:
        raise ValueError(f"k={k} exceeds the Krylov dimension available ({m_max})")
    rng = np.random.default_rng(seed)
    need = (m_max + 1) * dim * basis_dtype.itemsize
    on_disk, budget = _basis_on_disk(solver, state, need, f"the Krylov basis needs {need:,} bytes ({m_max + 1} x "
                                                          f"{dim} {basis_dtype.name})", "max_iter")
    alpha, beta = np.zeros(m_max), np.zeros(m_max)
    m, restarts = 0, 0
    saver = None
    if state is not None:
        saver = _LanczosState(state, {"dim": dim, "k": k, "which": which, "m_max": m_max, "tol": tol, "seed": seed,
                                      "check_every": check_every, "basis_dtype": np.dtype(basis_dtype).name,
                                      "basis": "disk" if on_disk else "memory", "operator": identity})
    # the basis in RAM while it fits the budget, else read back from the solve's state store by blocks of rows
    basis = (_DiskBasis(saver, dim, basis_dtype, budget // (4 * dim * basis_dtype.itemsize)) if on_disk
             else _MemoryBasis(m_max + 1, dim, basis_dtype))
    saved = None if saver is None else saver.load(rows=not on_disk)
    if saved is not None:  # the generator's state is the one after the start vector and every restart drawn
        rows, alpha, beta, m, restarts, rng_state = saved
        basis.load(rows)
        rng.bit_generator.state = rng_state
    else:
        v = rng.standard_normal(dim)
        basis.set(0, v / np.linalg.norm(v))
        if saver is not None:
            saver.create(dim, m_max, basis_dtype, basis.row(0), rng)
    bar = Progress(label or "lanczos", m_max, enabled=progress, unit="HVPs")
    result, stopped = None, "budget reached"
    for j in range(m, m_max):
        current = basis.row(j)
        w = np.asarray(matvec(current[None, :]), dtype=np.float64)[0]
        alpha[j] = current @ w
        w = basis.project_out(w, j + 1)  # full reorthogonalisation, twice is enough
        beta[j] = np.linalg.norm(w)
        m = j + 1
        bar.update(m)
        invariant = beta[j] <= 1e-12 * max(1.0, np.abs(alpha[: j + 1]).max())
        if invariant:
            beta[j] = 0.0  # K maps span(basis) into itself: the Ritz pairs so far are exact
        # an invariant space is no convergence: its extreme values need not be K's (a repeated
        # eigenvalue appears once), so go on from a fresh direction while there is room
        if m >= k and (m % check_every == 0 or m == m_max):
            t = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
            theta, s = np.linalg.eigh(t)
            res = np.abs(beta[m - 1] * s[-1, :])
            scale = np.abs(theta).max()
            result = _select(theta, s, res, k, which, zero=tol * scale)
            # every wanted pair at both ends, whatever its sign, within tol of the largest |eigenvalue|
            if not invariant and np.all(res[_wanted(theta, k, which)] <= tol * scale):
                stopped = "converged"
                break
        if m == m_max:
            break
        if invariant:
            restarts += 1
            w = basis.project_out(rng.standard_normal(dim), j + 1)
            basis.set(j + 1, w / np.linalg.norm(w))
        else:
            basis.set(j + 1, w / beta[j])
        if saver is not None:
            saver.commit(j + 1, basis.row(j + 1), alpha, beta, m, restarts, rng)
    bar.close(stopped)
    out = {key: (vals, basis.combine(m, s), res) for key, (vals, s, res) in result.items()}
    out["iterations"] = m
    out["restarts"] = restarts
    budget = f"max_iter={m_max}" if solver.max_iter else f"{m_max} products, the default budget"
    return _finish(out, theta, res, k, which, tol * scale, m == dim, "lanczos", budget)


def _lanczos_budget(solver: SolverSettings, state, dim: int, k: int, basis_dtype) -> int:
    """The default Krylov dimension: until every wanted pair converges, at most min(D, LANCZOS_BUDGET) products,
    and no more than the memory budget holds when there is no state store to keep the basis in."""
    m = min(dim, max(LANCZOS_BUDGET, 4 * k + 20))
    if state is None:
        budget = _memory_budget(solver)
        fits = budget // (dim * basis_dtype.itemsize) - 1
        if fits < m:
            logger.info("lanczos: the default budget of %d products is cut to %d, what %s bytes of memory hold", m,
                        max(fits, 4 * k + 20), budget)
            m = max(fits, min(dim, 4 * k + 20))
    return m
