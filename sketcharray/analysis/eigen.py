"""Extreme eigenvalues of the sketched Hessian K = Phi H Phi^T (docs/spectrum.md).

Two eigen-solvers on a symmetric operator given by a batched ``matvec``
(``(b, D) -> (b, D)``); both compute now (they iterate) and show progress:

* :func:`lanczos` -- symmetric Lanczos with full reorthogonalisation: one
  product per iteration, a Krylov basis of D-dimensional vectors, Ritz values
  at both ends of the spectrum, stopping when the wanted Ritz residuals fall
  below ``tol`` x the spectral scale, or at ``max_iter``.
* :func:`randomized` -- randomized block Krylov iteration with Rayleigh-Ritz,
  each step one batch of ``k + 10`` products: the form that maps onto batched
  HVPs (and dask tasks).

:func:`hessian_spectrum` runs either on a model, over one or several
checkpoints, and returns a labeled Dataset; :func:`spectrum_statistics` gives
the paper's RNEG, R_n and outlier counts.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import xarray as xr

from ..outputs import check_folder, leftovers, save_figure, write_result
from ..progress import Progress
from ..provenance import function_identity
from ..settings import WHICH, Execution, ModelSettings, SolverSettings, coerce, moved_options

logger = logging.getLogger(__name__)


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


class _SolveState:
    """A solve's state in a Zarr folder, committed after every product (see :func:`lanczos`'s ``state``).

    attrs: ``settings`` (what the solve is: the operator's identity, k, tolerance, seed, ...) and
    ``progress``, written last, so a kill between the arrays and the progress leaves the previous
    product's state.  Chunks carry CRC32C; a state left by another solve is refused, naming the difference.
    """

    def __init__(self, path, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as JSON gives it back

    def _open(self):
        """(group, progress) of a committed state, or None for no state; raises ValueError for another solve's."""
        import zarr

        from ..store import check_codecs

        if not (self.path / "zarr.json").exists():
            if self.path.is_file() or (self.path.is_dir() and any(self.path.iterdir())):
                raise ValueError(f"{self.path} holds something that is not a solver state of sketcharray; it is left "
                                 "as it is: choose another folder")
            return None
        try:
            check_codecs(self.path)
            group = zarr.open_group(str(self.path), mode="r", zarr_format=3)
            attrs = dict(group.attrs)
            have = attrs["settings"]
        except (KeyError, OSError, json.JSONDecodeError) as exc:
            raise self._unreadable(exc) from exc
        if "progress" not in attrs:  # created by a solve killed before its first commit: nothing to resume
            logger.info("solver state %s holds no committed product; starting the solve over", self.path)
            return None
        progress = attrs["progress"]
        if have != self.settings:
            differ = sorted(key for key in set(have) | set(self.settings) if have.get(key) != self.settings.get(key))
            raise ValueError(f"{self.path} holds the state of another solve: {({k: have.get(k) for k in differ})}, "
                             f"but this call is {({k: self.settings.get(k) for k in differ})}; use another state "
                             "folder, or delete this one to start over")
        return group, progress

    def _opened(self, mode: str = "r"):
        """The state's Zarr group: the one this solve created or wrote to (kept), else opened with ``mode``
        (kept when writable)."""
        group = getattr(self, "_group", None)
        if group is None:
            import zarr

            group = zarr.open_group(str(self.path), mode=mode, zarr_format=3)
            if mode != "r":
                self._group = group
        return group

    def _replace(self, build) -> None:
        """Write a new state with ``build(group)`` into a temporary sibling, then rename it over ``path`` (the old
        state, if any, goes only once the new one is whole)."""
        import shutil
        import uuid

        import zarr

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stale in leftovers(self.path, "tmp", "old"):  # left by a solve killed while it created its state
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            build(zarr.open_group(str(tmp), mode="w", zarr_format=3))
            old = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            if self.path.exists():
                self.path.rename(old)
            tmp.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._group = None

    def _unreadable(self, exc) -> ValueError:
        return ValueError(f"the solver state in {self.path} cannot be read ({type(exc).__name__}: {exc}); delete "
                          "the folder to start the solve over")


class _LanczosState(_SolveState):
    """Lanczos: arrays ``basis`` ((m_max + 1) x dim, one row per chunk: a product writes one row), ``alpha``
    and ``beta``; ``progress`` holds the products done, restarts and the random generator's state."""

    def load(self, rows: bool = True):
        """(basis rows (None without ``rows``), alpha, beta, m, restarts, rng state) of the last committed product,
        or None for no state."""
        opened = self._open()
        if opened is None:
            return None
        group, progress = opened
        try:
            m = int(progress["m"])
            basis = group["basis"][: m + 1] if rows else None
            alpha, beta = group["alpha"][:], group["beta"][:]
        except (KeyError, OSError) as exc:
            raise self._unreadable(exc) from exc
        return basis, alpha, beta, m, int(progress["restarts"]), progress["rng"]

    def create(self, dim: int, m_max: int, basis_dtype, vector, rng) -> None:
        """A new state holding the start vector (the first commit), made whole in a sibling and renamed into
        place: the folder holds either the previous state or this one, never a state without a product."""
        from ..store import chunk_codecs

        def build(group):
            group.create_array("basis", shape=(m_max + 1, dim), chunks=(1, dim), dtype=basis_dtype,
                               compressors=chunk_codecs(compressed=False), fill_value=0)
            for name in ("alpha", "beta"):
                group.create_array(name, shape=(m_max,), chunks=(m_max,), dtype=np.float64,
                                   compressors=chunk_codecs(compressed=False), fill_value=0)
            group["basis"][0] = vector
            group.attrs.update(settings=self.settings, progress=self._progress(0, 0, rng))

        self._replace(build)

    @staticmethod
    def _progress(m: int, restarts: int, rng) -> dict:
        return {"m": m, "restarts": restarts, "rng": rng.bit_generator.state}

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` of the stored basis (checksummed chunks: a damaged one is an error, not a wrong basis)."""
        return np.array(self._opened()["basis"][a:b])

    def commit(self, row: int, vector, alpha, beta, m: int, restarts: int, rng) -> None:
        group = self._opened("r+")
        group["basis"][row] = vector
        group["alpha"][:] = alpha
        group["beta"][:] = beta
        group.attrs["progress"] = self._progress(m, restarts, rng)


class _RandomizedState(_SolveState):
    """Randomized block Krylov: arrays ``q{i}`` (the basis blocks), ``kq{i}`` (their images) and
    ``rayleigh`` (V^T K V so far); ``progress`` holds the blocks multiplied."""

    def load(self, blocks: bool = True):
        """(basis blocks, images, rayleigh, iterations) of the last committed block, or None for no state;
        without ``blocks`` only the newest basis block (the next to multiply) is read."""
        opened = self._open()
        if opened is None:
            return None
        group, progress = opened
        try:
            it = int(progress["iterations"])
            basis = [np.array(group[f"q{i}"]) for i in (range(it + 1) if blocks else [it])]
            images = [np.array(group[f"kq{i}"]) for i in range(it)] if blocks else []
            rayleigh = np.array(group["rayleigh"]) if it else np.zeros((0, 0))
        except (KeyError, OSError) as exc:
            raise self._unreadable(exc) from exc
        return basis, images, rayleigh, it

    def block(self, kind: str, j: int) -> np.ndarray:
        """Basis block ``j`` (``kind="q"``) or its image (``"kq"``), as committed (checksummed chunks)."""
        return np.array(self._opened()[f"{kind}{j}"])

    def commit(self, it: int, basis, images, rayleigh) -> None:
        """Block ``it``'s image, the next basis block and the Rayleigh quotient; the progress last.  ``basis`` and
        ``images`` are indexed by block (lists, or dicts holding at least these blocks)."""
        from ..store import chunk_codecs

        def put(group, name, values):
            values = np.ascontiguousarray(values, dtype=np.float64)
            arr = group.create_array(name, shape=values.shape, chunks=values.shape or (1,), dtype=np.float64,
                                     compressors=chunk_codecs(compressed=False), overwrite=True)
            arr[...] = values

        if it == 0:  # a new state, made whole before it replaces whatever the folder held
            def build(group):
                put(group, "q0", basis[0])
                group.attrs.update(settings=self.settings, progress={"iterations": 0})

            self._replace(build)
            return
        group = self._opened("r+")
        put(group, f"kq{it - 1}", images[it - 1])
        put(group, "rayleigh", rayleigh)
        put(group, f"q{it}", basis[it])
        group.attrs["progress"] = {"iterations": it}


class _MemoryBasis:
    """The Krylov basis V ((m_max + 1) x dim) as one array in RAM."""

    def __init__(self, rows: int, dim: int, dtype):
        self.a = np.zeros((rows, dim), dtype=dtype)
        self.dtype = self.a.dtype

    def row(self, j: int) -> np.ndarray:
        return self.a[j]

    def set(self, j: int, v) -> None:
        self.a[j] = v

    def load(self, rows: np.ndarray) -> None:
        self.a[: len(rows)] = rows

    def project_out(self, w: np.ndarray, count: int) -> np.ndarray:
        """``w - V_c^T V_c w`` twice (full reorthogonalisation; in the basis dtype, no upcast copy)."""
        b = self.a[:count]
        for _ in range(2):
            w -= b.T @ (b @ w.astype(b.dtype, copy=False))
        return w

    def combine(self, count: int, s: np.ndarray) -> np.ndarray:
        """``V_c^T s``: the Ritz vectors of the coefficients ``s`` (count x r)."""
        return self.a[:count].T @ s.astype(self.dtype)


class _DiskBasis(_MemoryBasis):
    """The Krylov basis as the solve's Zarr state holds it (a row per product), read back ``block`` rows at a
    time: the memory a product needs is a few such blocks, whatever the Krylov dimension."""

    def __init__(self, state: "_LanczosState", dim: int, dtype, block: int):
        self.state, self.dim, self.dtype, self.block = state, dim, np.dtype(dtype), max(1, int(block))
        self.rows = {}  # the rows set since their commit (the current and the next vector)

    def row(self, j: int) -> np.ndarray:
        return self.rows[j] if j in self.rows else self._read(j, j + 1)[0]

    def set(self, j: int, v) -> None:
        self.rows = {j: np.asarray(v, dtype=self.dtype)}  # written by the state's commit, read back from there

    def load(self, rows: np.ndarray) -> None:  # already on disk
        pass

    def _read(self, a: int, b: int) -> np.ndarray:
        return self.state.rows(a, b)

    def project_out(self, w: np.ndarray, count: int) -> np.ndarray:
        for _ in range(2):
            coef = np.concatenate([self._block(a, count) @ w.astype(self.dtype, copy=False)
                                   for a in range(0, count, self.block)])
            for a in range(0, count, self.block):
                w -= self._block(a, count).T @ coef[a : a + self.block]
        return w

    def _block(self, a: int, count: int) -> np.ndarray:
        b = min(count, a + self.block)
        block = self._read(a, b)
        for j, v in self.rows.items():  # a row set but not yet committed
            if a <= j < b:
                block[j - a] = v
        return block

    def combine(self, count: int, s: np.ndarray) -> np.ndarray:
        out = np.zeros((self.dim, s.shape[1]), dtype=self.dtype)
        for a in range(0, count, self.block):
            out += self._block(a, count).T @ s[a : a + self.block].astype(self.dtype)
        return out


def _basis_on_disk(solver: SolverSettings, state, need: int, what: str, lower: str) -> tuple[bool, int]:
    """(whether the solver's basis goes to its state store, the memory budget): it does when its ``need`` bytes
    exceed ``solver.memory_budget`` (default half the available memory), and a solve without a store is then
    refused before it starts (``what`` describes the basis, ``lower`` the settings that shrink it)."""
    budget = _memory_budget(solver)
    if need > budget and state is None:
        raise MemoryError(f"{what} but the memory budget is {budget:,} bytes; give a state folder (state=..., or "
                          "hessian_spectrum's store=) to keep it on disk, raise SolverSettings.memory_budget, or "
                          f"lower {lower}")
    return need > budget, budget


def _memory_budget(solver: SolverSettings) -> int:
    if solver.memory_budget is not None:
        return int(solver.memory_budget)
    from ..sketches.base import available_memory

    return available_memory() // 2


@moved_options(solver=SolverSettings)
def lanczos(matvec, dim: int, k: int = 10, *, solver: SolverSettings | dict | None = None, progress: bool = True,
            state=None, identity=None) -> dict:
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
    bar = Progress("lanczos", m_max, enabled=progress, unit="HVPs")
    result = None
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
    bar.close()
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


@moved_options(solver=SolverSettings)
def randomized(matvec, dim: int, k: int = 10, *, solver: SolverSettings | dict | None = None,
               progress: bool = True, state=None, identity=None) -> dict:
    """Extreme eigenpairs by randomized block Krylov iteration with Rayleigh-Ritz.

    Starts from a random Gaussian block of ``block`` (default k + 10)
    vectors and grows the basis [Q, KQ, K^2 Q, ...] one block per
    iteration, each block one batched product (``block`` HVPs at once),
    orthogonalised against the basis.  Rayleigh-Ritz on the basis gives both
    ends of the spectrum (a Krylov space, unlike plain subspace iteration, is
    not slowed at the negative end by a dominant positive part).  Stops when
    the wanted Ritz residuals fall below ``tol`` x the spectral scale, after
    ``n_iter`` blocks, or when the basis spans the space.

    ``solver``: a :class:`~sketcharray.settings.SolverSettings` (or a dict of
    its fields) with ``method="randomized"``: ``which``, ``tol``, ``n_iter``
    (default 30), ``block``, ``seed``.  ``state`` and ``identity`` as for
    :func:`lanczos`: the basis blocks, their images and the Rayleigh
    quotient are committed to Zarr after every block, and a rerun after a
    kill resumes from the last committed block to the same numbers.
    """
    solver = _solver_for("randomized", solver)
    which, tol, seed, n_iter = solver.which, solver.tol, solver.seed, solver.n_iter or 30
    p = min(dim, solver.block or k + 10)
    cap = min(dim, p * (n_iter + 1))  # the most basis columns the solve can reach
    need = 2 * dim * cap * 8
    on_disk, _ = _basis_on_disk(solver, state, need, f"the randomized solver's basis and its images need up to "
                                                     f"{need:,} bytes (2 x {dim} x {cap} float64)", "n_iter or block")
    saver = None if state is None else _RandomizedState(state, {
        "dim": dim, "k": k, "which": which, "block": p, "n_iter": n_iter, "tol": tol, "seed": seed,
        "basis": "disk" if on_disk else "memory", "operator": identity})
    saved = None if saver is None else saver.load(blocks=not on_disk)
    if saved is not None:
        basis, images, rayleigh, done = saved
    else:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((dim, p)))
        basis, images, done = [np.ascontiguousarray(q)], [], 0
        rayleigh = np.zeros((0, 0))  # V^T K V, grown by one block of rows and columns per product
        if saver is not None:
            saver.commit(0, basis, images, rayleigh)
    # the blocks of V = [Q_0, Q_1, ...] and of KV, a block at a time: from RAM, or (over the memory budget) read
    # back from the state store, where each is committed once; only the newest ones are then held
    blocks = _KrylovBlocks(basis, images, saver if on_disk else None, done)
    bar = Progress("randomized", n_iter, enabled=progress, unit="blocks")
    result, it, exact = None, done, False
    for it in range(done + 1, n_iter + 1):
        bar.update(it)
        # K Q_i: one batched product; every block is kept C-ordered, as the state store gives it back, since
        # BLAS sums in another order for another memory layout (a resumed solve must give the same bits)
        image = np.ascontiguousarray(np.asarray(matvec(blocks.last_q().T), dtype=np.float64).T)
        blocks.add_image(image)
        cross = blocks.t_dot("q", image)  # V^T K Q_i; the rows of Q_i against older blocks follow by symmetry
        n_old, cols = rayleigh.shape[0], cross.shape[0]
        grown = np.zeros((cols, cols))
        grown[:n_old, :n_old] = rayleigh
        grown[:, n_old:] = cross
        grown[n_old:, :n_old] = cross[:n_old].T
        rayleigh = grown
        theta, s = np.linalg.eigh(rayleigh)
        kk = min(k, theta.size)
        order = np.argsort(theta)
        wanted = np.unique(np.concatenate([order[::-1][:kk], order[:kk]]))
        res = np.zeros_like(theta)  # residuals of the wanted Ritz pairs only (_select reads no others)
        sw = s[:, wanted]
        vectors = blocks.dot("q", sw)
        res[wanted] = np.linalg.norm(blocks.dot("kq", sw) - vectors * theta[wanted], axis=0)
        ritz = _Columns(vectors, wanted)
        scale = np.abs(theta).max()
        result = _select(theta, ritz, res, kk, which, zero=tol * scale)
        room = dim - cols
        exact = room == 0  # the basis spans the space: the Ritz pairs are K's
        if np.all(res[_wanted(theta, kk, which)] <= tol * scale) or exact:
            break
        z = image
        for _ in range(2):  # block Gram-Schmidt against the whole basis, twice
            z = z - blocks.dot("q", blocks.t_dot("q", z))
        q, r = np.linalg.qr(z)
        keep = np.abs(np.diag(r)) > 1e-10 * max(1.0, np.abs(np.diag(r)).max())
        if not keep.any():
            exact = True
            break  # the Krylov space is invariant: Ritz values are exact
        blocks.add_basis(np.ascontiguousarray(q[:, keep][:, :room]))
        if saver is not None:
            saver.commit(it, blocks.basis, blocks.images, rayleigh)
    bar.close()
    out = {key: (vals, np.asarray(vecs), res) for key, (vals, vecs, res) in result.items()}
    out["iterations"] = it
    return _finish(out, theta, res, kk, which, tol * scale, exact, "randomized", f"n_iter={n_iter} blocks of {p}")


class _Columns:
    """Ritz vectors held for the wanted columns only, indexed like the full (dim, n) matrix by ``[:, cols]``."""

    def __init__(self, vectors: np.ndarray, wanted: np.ndarray):
        self.vectors, self.where = vectors, {int(c): i for i, c in enumerate(wanted)}

    def __getitem__(self, key):
        _, cols = key
        return self.vectors[:, [self.where[int(c)] for c in cols]]


class _KrylovBlocks:
    """The randomized solver's basis blocks Q_j and images K Q_j, in RAM or read back from the state store.

    ``state`` (over the memory budget): blocks already committed are read from it when needed and not kept;
    only the blocks of the current product (the newest Q, its image, the next Q) are held.
    """

    def __init__(self, basis: list, images: list, state: "_RandomizedState | None", done: int):
        self.state = state
        self.n_q, self.n_kq = (done + 1, done) if state is not None else (len(basis), len(images))
        self.basis = basis if state is None else {done: basis[-1]} if basis else {done: state.block("q", done)}
        self.images = images if state is None else {}

    def _get(self, kind: str, j: int) -> np.ndarray:
        held = self.basis if kind == "q" else self.images
        if self.state is None or j in held:
            return held[j]
        return self.state.block(kind, j)

    def last_q(self) -> np.ndarray:
        return self._get("q", self.n_q - 1)

    def add_image(self, image) -> None:
        if self.state is None:
            self.images.append(image)
        else:
            self.images = {self.n_kq: image}
        self.n_kq += 1

    def add_basis(self, q) -> None:
        if self.state is None:
            self.basis.append(q)
        else:
            self.basis = {self.n_q - 1: self.basis.get(self.n_q - 1), self.n_q: q}
        self.n_q += 1

    def t_dot(self, kind: str, z) -> np.ndarray:
        """``V^T z`` over the blocks multiplied so far (those with an image)."""
        return np.concatenate([self._get(kind, j).T @ z for j in range(self.n_kq)])

    def dot(self, kind: str, c) -> np.ndarray:
        """``V c`` (or ``KV c``) summed block by block over the blocks multiplied so far."""
        out, row = None, 0
        for j in range(self.n_kq):
            block = self._get(kind, j)
            part = block @ c[row : row + block.shape[1]]
            out = part if out is None else out + part
            row += block.shape[1]
        return out


SOLVERS = {"lanczos": lanczos, "randomized": randomized}


#: a single-pass eigenvalue is flagged unreliable when its error estimate exceeds this fraction of its magnitude
SINGLE_PASS_FLAG = 0.1

SINGLE_PASS_NOTE = (
    "single pass (Halko, Martinsson & Tropp 2011, 5.5): K is approximated by Q B Q^T from one stored pass Y = K "
    "Omega, with Q spanning the top of Y's range; it is exact when rank K <= probes - oversampling and otherwise "
    "misses the part of K the probes did not capture, which can move the small ends (the negative eigenvalues) by "
    "more than their size, even flip their sign. error_estimate is max_j ||(K - K_h) omega_j|| over probes held out "
    "of a fit K_h on the others (HMT 4.3): by Weyl's inequality each eigenvalue of K_h is within ||K - K_h|| <= "
    "that (about ||K - K_h||_F) of K's; the reported eigenvalues use every probe, so the estimate is conservative. "
    "reliable is False where it exceeds 0.1 of the eigenvalue's magnitude: use Lanczos there. ")


def single_pass_spectrum(hvps: xr.Dataset, k: int = 10, *, which: str = "both", oversampling: int | None = None,
                         rows: int = 1 << 14, held_out: int | None = None,
                         flag_fraction: float = SINGLE_PASS_FLAG) -> xr.Dataset:
    """Extreme eigenvalues of ``K = Phi H Phi^T`` from one stored pass ``Y = K Omega``, out of core.

    Halko, Martinsson & Tropp, "Finding structure with randomness" (SIAM
    Review 53, 2011), Section 5.5, the single-pass algorithm for Hermitian
    matrices, with its oversampling: of the ``l`` probes, ``r = l - p``
    directions span the model, ``Q`` = the top ``r`` left singular vectors
    of ``Y``; the small symmetric ``B`` (r x r) that best solves
    ``B (Q^T Omega) = Q^T Y``, an overdetermined (r x l) system, in least
    squares stands for ``Q^T K Q``; the eigenvalues of ``B`` are those of
    ``Q B Q^T ~ K``.  Nothing but ``Y`` and ``Omega`` is read: no further
    Hessian-vector products.

    Parameters
    ----------
    hvps : xarray.Dataset
        From :func:`sketcharray.collect.sketch_hvps` with ``space="sketch"``
        (lazy, or opened from a store): ``hvp`` = ``Y^T`` and ``omega`` =
        ``Omega^T``, both (probe, sketch), ``l`` probes.
    k : int
        Eigenvalues at each end; at most ``r``.
    oversampling : int, optional
        ``p``, probes beyond the model's rank (default ``min(10, l // 3)``).
        With ``p = 0`` the system is square and always solved exactly, so
        ``relative_fit`` tells nothing.
    rows : int
        Sketch rows per block: ``Y`` is orthogonalised by a tall-skinny QR
        over blocks of (rows x l) and ``Q^T Omega`` summed over the same
        blocks, so no more than a few such blocks are held at once.
    held_out : int, optional
        Probes held out of a second fit to estimate its error (default
        ``min(10, max(2, l // 8))``, fewer when the probes are too few;
        0: no estimate).  The eigenvalues themselves use every probe.
    flag_fraction : float
        An eigenvalue whose error estimate exceeds this fraction of its own
        magnitude is flagged ``reliable=False``.

    Conditions
    ----------
    K must be symmetric; it may be indefinite.  The result is exact (up to
    rounding) when ``rank K <= r``: then ``range(Y) = range(K)``.  Otherwise
    it is a Nystrom-type approximation, ``B = (Q^T Omega)^+T (Omega^T K
    Omega) (Q^T Omega)^+`` in the square case, which for an indefinite K is
    not bounded by K's spectrum (a near-singular ``Omega^T K Omega`` inflates
    it), and it is accurate only when the eigenvalues past the ``r``-th
    largest ``|lambda|`` are negligible next to the wanted ones, of either
    sign.  ``relative_fit`` (attrs), ``||B Q^T Omega - Q^T Y|| / ||Q^T Y||``,
    is 0 in the exact case and measures the part of K the probes missed: a
    value that is not small says to take more probes, or to use Lanczos.

    When to trust it: when ``rank K <= l - p`` (exact), and otherwise for
    the eigenvalues whose ``error_estimate`` is small next to them
    (``reliable``): typically the top end, rarely the small negative end.

    Returns
    -------
    xarray.Dataset like :func:`hessian_spectrum`'s (``eigenvalue`` by sign
    and rank), without residuals (they would need another pass), with
    ``error_estimate`` (the held-out estimate of ``||K - K_h||``, for every
    eigenvalue: Weyl's bound) and ``reliable`` (sign, rank); the ``note``
    attr says what the single pass approximates.
    """
    import dask
    import dask.array as da

    if which not in WHICH:
        raise ValueError(f"which must be one of {list(WHICH)}; got {which!r}")
    if hvps.attrs.get("probe_space") != "sketch" or "hvp" not in hvps:
        raise ValueError("single_pass_spectrum needs Y = K Omega and Omega: sketch_hvps(..., space='sketch') "
                         f"(probe_space='sketch', an 'hvp' variable); got probe_space="
                         f"{hvps.attrs.get('probe_space', 'parameters')!r} and variables {sorted(hvps.data_vars)}")
    n_probes, dim = hvps.hvp.shape
    if "omega" not in hvps:  # a store keeps Y only: Omega is regenerated from its seed, exactly
        from ..sketches.random import random_test_matrix

        hvps = hvps.assign(omega=(("probe", "sketch"), random_test_matrix(dim, n_probes, int(hvps.attrs["probe_seed"]))))
    if "valid" in hvps and not bool(hvps.valid.all()):
        bad = np.flatnonzero(~hvps.valid.values)[:10].tolist()
        raise ValueError(f"probes {bad} of the stored Y = K Omega have non-finite products (valid=False); the "
                         "single pass needs every column: recompute them, or use Lanczos")
    p = min(10, n_probes // 3) if oversampling is None else int(oversampling)
    rank = n_probes - p
    if not 0 <= p < n_probes:
        raise ValueError(f"oversampling must be between 0 and {n_probes - 1} (probes - 1); got {oversampling!r}")
    h = min(10, max(2, n_probes // 8), rank - 1) if held_out is None else int(held_out)
    if not 0 <= h < rank:
        raise ValueError(f"held_out must be between 0 and {rank - 1} (probes - oversampling - 1); got {held_out!r}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= rank:
        raise ValueError(f"k must be an int between 1 and the probes less the oversampling "
                         f"({n_probes} - {p} = {rank}); got {k!r}")

    def tall(name):
        data = hvps[name].transpose("sketch", "probe").data
        data = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
        return data.astype(np.float64).rechunk({0: min(rows, dim), 1: -1})

    y, omega = tall("hvp"), tall("omega")
    q, r = da.linalg.tsqr(y)  # Y = Q R: Q^T Y = R, and Y's top left singular vectors are Q U
    q_omega, r = dask.compute(q.T @ omega, r)
    # everything below is in the coordinates of q (l x l): Y = q r, and q^T Omega = q_omega
    b, fit = _single_pass_fit(r, q_omega, np.arange(n_probes), rank)
    theta = np.linalg.eigvalsh(b)
    nan = np.full(theta.size, np.nan)
    zero = 1e-6 * float(np.abs(theta).max(initial=0.0))  # as Lanczos's default tol: no sign below it
    out = _spectrum_dataset(_select(theta, np.zeros((0, theta.size)), nan, k, which, zero=zero), k,
                            eigenvectors=False)
    error = np.nan
    if h:
        bounds, error, theta_h = _held_out_residuals(r, q_omega, n_probes, h, rank)
        # each reported eigenvalue takes the bound of the held-out fit's eigenvalue at the same place of its end
        per_end = _select(theta_h, np.zeros((0, theta_h.size)), bounds, k, which, zero=zero)
        out["error_estimate"] = out.eigenvalue.copy(data=np.stack([_padded(per_end[s_][2], k, np.nan)[: k]
                                                                   for s_ in out.sign.values]))
        out["error_estimate"] = out.error_estimate.where(np.isfinite(out.eigenvalue))
        # an empty place at an end claims that K has no more eigenvalues of that sign: by Weyl, sure only when the
        # first of K_h's eigenvalues past that end's lies further from zero, on the other side, than the fit's error
        flipped = {"positive": -theta_h[::-1], "negative": theta_h}  # ascending, the end's own sign negative
        past = {s_: v[np.searchsorted(v, -zero)] if np.searchsorted(v, -zero) < v.size else np.inf
                for s_, v in flipped.items()}
        empty_ok = xr.DataArray([error <= max(0.0, past[s_]) + zero for s_ in out.sign.values], dims="sign")
        out["reliable"] = xr.where(np.isfinite(out.eigenvalue),
                                   out.error_estimate <= flag_fraction * np.abs(out.eigenvalue), empty_ok)
    else:
        out["error_estimate"] = xr.full_like(out.eigenvalue, np.nan)
        out["reliable"] = xr.full_like(out.eigenvalue, False, dtype=bool)
    out.attrs.update(method="single-pass (Halko, Martinsson & Tropp 2011, 5.5)", probes=int(n_probes),
                     oversampling=p, relative_fit=float(fit), held_out=h, error_estimate=error,
                     flag_fraction=float(flag_fraction), note=SINGLE_PASS_NOTE + SKETCHED_NOTE,
                     **{key: hvps.attrs[key] for key in ("sketch_spec", "model_fingerprint", "probe_seed")
                        if key in hvps.attrs})
    return out


#: z of the 1% lower tail of the standard normal, for the Wilson-Hilferty chi-square quantile
_Z_01 = -2.3263


def _held_out_residuals(r, q_omega, n_probes: int, h: int, rank: int):
    """The single pass refit without the last ``h`` probes (K_h, rank ``rank - h``), tested on them.

    For a Ritz pair (theta_i, v_i) of K_h, ``K v_i - theta_i v_i = (K - K_h) v_i``, and for a Gaussian probe
    omega held out of the fit, ``E[(v_i^T (K - K_h) omega)^2] = ||(K - K_h) v_i||^2``: the mean of the h squares
    estimates the squared residual, a chi-square with h degrees of freedom in units of it.  Returned per Ritz
    value of K_h (ascending): the residual estimate scaled to the 99% upper bound of that chi-square
    (sqrt(h / chi2_{h, 0.01}), Wilson-Hilferty), so K has an eigenvalue within it of theta_i with probability
    about 0.99; and ``max_j ||(K - K_h) omega_j||`` (about ||K - K_h||_F >= ||K - K_h||_2: Weyl's bound for claims
    about the whole spectrum, such as "no negative eigenvalue").  All in the coordinates of q (Y = q r).
    """
    fit_cols, test_cols = np.arange(n_probes - h), np.arange(n_probes - h, n_probes)
    b_h, _, u_h = _single_pass_fit(r, q_omega, fit_cols, rank - h, basis=True)
    miss = r[:, test_cols] - u_h @ (b_h @ (u_h.T @ q_omega[:, test_cols]))  # (K - K_h) omega_j, j held out
    theta_h, w = np.linalg.eigh(b_h)
    projections = (u_h @ w).T @ miss  # v_i^T (K - K_h) omega_j: (pairs x h)
    chi2_low = h * (1 - 2 / (9 * h) + _Z_01 * np.sqrt(2 / (9 * h))) ** 3
    bounds = np.sqrt(np.mean(projections**2, axis=1)) * np.sqrt(h / max(chi2_low, 1e-12))
    return bounds, float(np.linalg.norm(miss, axis=0).max()), theta_h


def _single_pass_fit(r, q_omega, cols, rank: int, basis: bool = False):
    """B (rank x rank) from the probes ``cols``: Q = the top ``rank`` left singular vectors of Y[:, cols] (as
    ``u`` in q's coordinates), B (Q^T Omega) = Q^T Y in least squares, symmetrised.  Returns (B, relative fit)
    and, with ``basis``, ``u`` too."""
    u = np.linalg.svd(r[:, cols])[0][:, :rank]
    qty, qto = u.T @ r[:, cols], u.T @ q_omega[:, cols]  # (rank x len(cols)) each
    b_t, *_ = np.linalg.lstsq(qto.T, qty.T, rcond=None)
    b = 0.5 * (b_t.T + b_t)
    fit = np.linalg.norm(b @ qto - qty) / max(np.linalg.norm(qty), np.finfo(float).tiny)
    return (b, fit, u) if basis else (b, fit)


#: sketch dimension up to which the solver's own dense algebra runs on one BLAS thread
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


def _with_seed(sketch, seed: int):
    """The same sketch with another seed: a spec dict, (method, n_out[, seed]) or an operator."""
    from ..sketches import SketchOperator, sketch_from_spec

    if isinstance(sketch, SketchOperator):
        return sketch_from_spec({**sketch.spec, "seed": int(seed)})
    if isinstance(sketch, dict):
        return {**sketch, "seed": int(seed)}
    if isinstance(sketch, (tuple, list)) and 2 <= len(sketch) <= 3:
        return (sketch[0], sketch[1], int(seed))
    raise TypeError(f"sketch must be a SketchOperator, a spec dict or (method, n_out[, seed]); got {sketch!r}")


@moved_options(solver=SolverSettings, model_settings=ModelSettings, execution=Execution)
def hessian_spectrum(model, loss_fn, data, sketch, *, k: int = 10, solver: SolverSettings | dict | None = None,
                     checkpoints=None, seeds=None, store=None, batch_size: int | None = None,
                     model_settings: ModelSettings | dict | None = None,
                     execution: Execution | dict | None = None) -> xr.Dataset:
    """Top-k positive and k most negative eigenvalues of K = Phi H Phi^T (computes now).

    Parameters
    ----------
    model : nn.Module or factory
    loss_fn, data, batch_size : as for ``sketch_gradients``
        H is the Hessian of the mean loss over ``data``.
    sketch : operator, spec dict or (method, n_out[, seed])
    k : int
        Eigenvalues at each end.
    solver : SolverSettings or dict, optional
        The solver (``method`` lanczos or randomized), ``which`` end(s),
        ``tol``, iteration limits, ``seed``, ``eigenvectors`` (also return the
        Ritz vectors in sketch space: sign, rank, sketch); defaults as
        documented there.
    checkpoints : dict name -> state_dict (or path to a ``torch.save``d one), optional
        Compute the spectrum at each; results gain a ``checkpoint`` dimension.
    store : path, optional
        A folder: each checkpoint's result is saved there as it completes
        (Zarr, ``checkpoint-NAME.zarr``; ``checkpoint-current.zarr`` for the
        model's own weights), and a rerun loads finished checkpoints instead
        of recomputing (only for the same weights, data, sketch and solver
        settings).  The solve (Lanczos or randomized) also keeps its state
        there (``solver-NAME.zarr``) after every product until its result is
        written: rerunning the call after a kill resumes it, to the same
        eigenvalues.
    seeds : sequence of int, optional
        Repeat with independent sketches, one per seed (the sketch's own
        seed is replaced): the result gains a ``seed`` dimension and
        ``eigenvalue_mean`` / ``eigenvalue_spread`` (standard deviation over
        seeds), the eigenvalues' error bars.
    model_settings : ModelSettings or dict, optional
        ``params`` (which parameters make up N), ``forward``, ``hvp_mode``.
    execution : Execution or dict, optional
        ``device``, ``progress``, and ``shards``: compute each product
        ``K W`` as a dask reduction over that many shards of the data, on
        whatever dask scheduler is active (threads, a LocalCluster, a remote
        scheduler; see :func:`~sketcharray.collect.subspace_hessian`).
        Default: in this process, no dask.

    Returns
    -------
    xarray.Dataset with ``eigenvalue`` and ``residual`` (``[checkpoint,] sign, rank``),
    ``sign`` in ("positive", "negative"): the top end and the bottom end.  Attrs
    record the method, HVP count and the time split between HVPs and the rest
    (``seconds``, ``hvp_seconds``, ``other_seconds``: the solve), and
    ``setup_seconds``, building the sketch's random state once before it.
    These are eigenvalues of K, not of H: the ``note`` attr says how they
    relate (measured against an exact Hessian; docs/spectrum.md has the
    numbers).  ``converged`` (sign, rank) flags each eigenpair whose Ritz
    residual met ``tol``; an end holds eigenvalues of its sign only (NaN
    beyond the last), so the negative end is all NaN where K has no
    negative eigenvalue.
    """
    solver = coerce(solver, SolverSettings, "solver")
    model_settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (eigenvalues at each end) must be an int >= 1; got {k!r}")
    if seeds is not None:
        return _over_seeds(seeds, lambda s, folder: hessian_spectrum(
            model, loss_fn, data, _with_seed(sketch, s), k=k, solver=solver, checkpoints=checkpoints, store=folder,
            batch_size=batch_size, model_settings=model_settings, execution=execution), store)
    from ..torch.params import as_module, load_weights

    # the caller's module is never loaded into or moved: checkpoints go into a copy
    base = as_module(model, copy=True)
    job = _SpectrumJob(base, loss_fn, data, sketch, k, solver, batch_size, model_settings, execution)
    folder = None if store is None else check_folder(store, "store")
    if checkpoints is None:  # the model's own weights, stored as the checkpoint "current"
        out = job.at("current", folder, checkpoint=False)
    else:
        results = []
        for name, state in checkpoints.items():
            base.load_state_dict(load_weights(state) if isinstance(state, (str, Path)) else state)
            results.append(job.at(name, folder, checkpoint=True))
        out = xr.concat(results, dim="checkpoint", combine_attrs="drop_conflicts")
    out.attrs["note"] = SKETCHED_NOTE
    return out


def _over_seeds(seeds, run, store) -> xr.Dataset:
    """``run(seed, store folder)`` per seed, stacked along ``seed`` with the mean and spread over seeds."""
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct ints, at least one; got {seeds!r}")
    runs = [run(s, None if store is None else Path(store) / f"seed-{s}") for s in seeds]
    out = xr.concat(runs, dim=xr.DataArray(seeds, dims="seed", name="seed"), combine_attrs="drop_conflicts")
    out["eigenvalue_mean"] = out.eigenvalue.mean("seed")
    out["eigenvalue_spread"] = out.eigenvalue.std("seed", ddof=1) if len(seeds) > 1 else np.nan * out.eigenvalue_mean
    out.attrs.update(note=SKETCHED_NOTE, seeds=json.dumps(seeds))
    return out


class _SpectrumJob:
    """One spectrum per set of weights loaded into ``base``: solved, or read back from a store folder."""

    def __init__(self, base, loss_fn, data, sketch, k, solver: SolverSettings, batch_size,
                 model_settings: ModelSettings, execution: Execution):
        self.base, self.loss_fn, self.data, self.sketch, self.k = base, loss_fn, data, sketch, k
        self.solver, self.batch_size, self.model_settings, self.execution = solver, batch_size, model_settings, execution
        self._data_fp = None

    def identity(self) -> dict:
        """What a stored result is checked against: the weights, data, sketch and the solver options that change
        the numbers (those left at their defaults unnamed, as sketcharray 0.3 recorded them)."""
        from ..collect import DataSource, resolve_sketch
        from ..torch.grads import data_fingerprint
        from ..torch.params import model_fingerprint, select_params

        if self._data_fp is None:
            source = DataSource.from_data(self.data, self.batch_size)
            self._data_fp = data_fingerprint(source.load(i, a, b) for i, (a, b) in enumerate(source.bounds))
        solver, params = self.solver, self.model_settings.params
        defaults = SolverSettings(method=solver.method)
        options = {name: value for name, value in solver.identity().items()
                   if name not in ("method", "which") and value != getattr(defaults, name)}
        op = resolve_sketch(self.sketch, select_params(self.base, params).n)
        return {"method": solver.method, "sketch_spec": str(op.spec), "k": self.k, "which": solver.which,
                "params": json.dumps(params), "model_fingerprint": model_fingerprint(self.base),
                "data_fingerprint": self._data_fp, "solver_options": json.dumps(options, sort_keys=True),
                "loss_fn_identity": function_identity(self.loss_fn)[0], "solver_rule": SOLVER_RULE}

    def at(self, name: str, folder: Path | None, *, checkpoint: bool) -> xr.Dataset:
        """The spectrum at the weights now in ``base`` (labelled along ``checkpoint`` as ``name`` when
        ``checkpoint``); with ``folder``, stored as ``checkpoint-NAME.zarr`` (and read back instead of
        recomputed when that holds the same identity), the solver's state kept as ``solver-NAME.zarr``
        until its result is stored."""
        path = None if folder is None else folder / f"checkpoint-{name}.zarr"
        wanted = None if path is None else self.identity()
        if path is not None and path.exists():
            saved = _stored_spectrum(path, wanted)
            if saved is not None:
                return saved
        from ..collect import subspace_hessian

        K = subspace_hessian(self.base, self.loss_fn, self.data, self.sketch, batch_size=self.batch_size,
                             model_settings=self.model_settings, execution=self.execution)
        t0 = time.perf_counter()
        # with a store, a Lanczos solve keeps its state next to the result it will write: a killed solve
        # resumes from its last product when the call is rerun
        resumable = {} if path is None else {"state": folder / f"solver-{name}.zarr", "identity": wanted}
        with _one_blas_thread(K.shape[0]):
            res = SOLVERS[self.solver.method](K.matvec, K.shape[0], self.k, solver=self.solver,
                                              progress=self.execution.progress, **resumable)
        total = time.perf_counter() - t0
        ds = _spectrum_dataset(res, self.k, self.solver.eigenvectors)
        ds.attrs.update(method=self.solver.method, which=self.solver.which, iterations=res["iterations"],
                        hvps=K.hvps, seconds=total, hvp_seconds=K.hvp_seconds, other_seconds=total - K.hvp_seconds,
                        setup_seconds=K.setup_seconds, hvp_mode=K.hvp_mode, sketch_spec=str(K.op.spec),
                        shards=K.shards)
        if checkpoint:
            ds = ds.expand_dims(checkpoint=[name])
        if path is not None:
            ds.attrs.update(wanted)
            write_result(ds, path, "spectrum", overwrite=True)  # a stale result of an earlier solver rule goes
            if resumable:  # the result is stored: the solver's state has served
                import shutil

                shutil.rmtree(resumable["state"], ignore_errors=True)
        return ds


#: how a stored spectrum was solved: 2 (sketcharray 0.5) runs until every wanted pair at both ends converges and
#: keeps each end to its sign; a spectrum stored by an earlier rule is solved again, not reused
SOLVER_RULE = 2


def _stored_spectrum(path: Path, wanted: dict) -> xr.Dataset | None:
    """A spectrum stored at ``path``, refused (naming the difference) unless it was made as ``wanted`` says;
    None for one stored by an earlier solver rule (it is recomputed)."""
    from ..outputs import result_kind
    from ..store import open_zarr_dataset

    saved = open_zarr_dataset(path).load()
    if saved.attrs.get("solver_rule") != SOLVER_RULE:
        if result_kind(path) != "spectrum":
            raise ValueError(f"{path} is not a spectrum this package stored; it is left as it is: use another "
                             "store folder")
        logger.info("%s was solved by an earlier rule (a fixed budget); solving again", path)
        return None
    # a spectrum stored before 0.5 records no loss identity: it is not compared
    wanted = {key: value for key, value in wanted.items() if key != "loss_fn_identity" or key in saved.attrs}
    have = {key: saved.attrs.get(key) for key in wanted}
    have["k"] = saved.sizes["rank"]
    if have != wanted:
        differ = [key for key in wanted if have[key] != wanted[key]]
        raise ValueError(f"{path} holds a spectrum computed with {({key: have[key] for key in differ})}, but "
                         f"this call asks for {({key: wanted[key] for key in differ})}; use a new store "
                         "folder, or the same weights, data and settings to reuse it")
    return saved


def spectrum_statistics(spectrum: xr.Dataset, outlier_ratio: float = 0.2) -> xr.Dataset:
    """The paper's statistics: RNEG = |lambda_min| / lambda_max, R_n = lambda_n / lambda_1,
    and the number of outliers (positive eigenvalues with R_n > ``outlier_ratio``, lambda_1 included).

    lambda_min is the most negative eigenvalue of K; where K has no negative
    eigenvalue (its negative end is empty: NaN), ``lambda_min`` is NaN and
    RNEG is 0, never a positive eigenvalue's ratio.

    With k eigenvalues computed, a count of k means *at least* k: the
    ``outliers_at_least`` flag says so, and :func:`format_outliers` prints
    it as ">= k".
    """
    top = spectrum.eigenvalue.sel(sign="positive")
    lam1 = top.sel(rank=1)
    out = xr.Dataset({"R": top / lam1, "lambda_max": lam1})
    out["outliers"] = (out.R > outlier_ratio).sum("rank")
    out["outliers_at_least"] = out["outliers"] == top.sizes["rank"]
    if "negative" in spectrum.sign.values:
        # the negative end holds negative eigenvalues only: NaN at rank 1 when K has none, and then RNEG is 0
        lam_min = spectrum.eigenvalue.sel(sign="negative", rank=1)
        out["lambda_min"] = lam_min
        out["RNEG"] = xr.where(np.isfinite(lam_min), np.abs(lam_min) / lam1, 0.0)
        out["RNEG"].attrs["note"] = ("|lambda_min| / lambda_max over the negative eigenvalues of K; 0 where K has "
                                     "none (lambda_min is then NaN: no negative eigenvalue)")
    if "seed" in out.dims and out.sizes["seed"] > 1:  # per seed, then mean and spread over the sketches
        for name in [v for v in ("lambda_max", "lambda_min", "RNEG") if v in out]:
            out[f"{name}_mean"] = out[name].mean("seed")
            out[f"{name}_spread"] = out[name].std("seed", ddof=1)
    return out.drop_vars("sign", errors="ignore")


def format_outliers(stats: xr.Dataset) -> list[str]:
    """The outlier counts as text, ">= k" where all k computed eigenvalues are outliers."""
    counts = np.atleast_1d(stats.outliers.values)
    at_least = np.atleast_1d(stats.get("outliers_at_least", xr.zeros_like(stats.outliers, dtype=bool)).values)
    return [f">= {int(c)}" if a else str(int(c)) for c, a in zip(counts, at_least)]


def plot_spectrum_evolution(stats: xr.Dataset, path) -> None:
    """The paper's Figure 2: RNEG over checkpoints, and R_n against n per checkpoint (with a ``seed`` dimension:
    the mean over the sketches, their spread as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if "checkpoint" not in stats.dims:
        stats = stats.expand_dims(checkpoint=["-"])
    labels = [str(c) for c in stats.checkpoint.values]
    seeded = "seed" in stats.dims  # several sketches: the mean over them, with their spread as error bars
    if "RNEG" in stats:
        if seeded:
            spread = stats.RNEG.std("seed", ddof=1) if stats.sizes["seed"] > 1 else 0 * stats.RNEG.mean("seed")
            a.errorbar(labels, stats.RNEG.mean("seed").values, yerr=spread.values, marker="o", capsize=3,
                       label=f"mean ± spread over {stats.sizes['seed']} sketches")
            a.legend(fontsize=8)
        else:
            a.plot(labels, stats.RNEG.values, marker="o")
    a.set_xlabel("checkpoint")
    a.set_ylabel("RNEG = |lambda_min| / lambda_max")
    a.set_title("negative eigenvalues over training")
    for c, lab in zip(stats.checkpoint.values, labels):
        r = stats.R.sel(checkpoint=c)
        if seeded:
            err = r.std("seed", ddof=1).values if stats.sizes["seed"] > 1 else None
            b.errorbar(r["rank"].values, r.mean("seed").values, yerr=err, marker=".", capsize=2, label=lab)
            continue
        b.plot(r["rank"].values, r.values, marker=".", label=lab)
    b.axhline(0.2, color="grey", ls=":", lw=0.8)
    from matplotlib.ticker import MaxNLocator

    b.xaxis.set_major_locator(MaxNLocator(integer=True))  # n is a rank: no tick at 1.5
    b.set_xlabel("n")
    b.set_ylabel("R_n = lambda_n / lambda_1")
    b.set_title("outliers: R_n > 0.2")
    b.legend(title="checkpoint", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
