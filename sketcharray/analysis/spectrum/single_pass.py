"""The single-pass spectrum from one stored pass Y = K Omega, with error estimates on held-out columns (docs/spectrum.md)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ...core.settings import WHICH
from .common import SKETCHED_NOTE, _padded, _select, _spectrum_dataset


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
        from ...sketches.random import random_test_matrix

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
