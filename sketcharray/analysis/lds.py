"""The linear datamodeling score (LDS): how well attribution scores predict retraining.

Park et al., *TRAK: Attributing Model Behavior at Scale* (ICML 2023), Sec. 2:
train M models on random subsets S_1..S_M of the training set (here 50%),
record each one's output f(z; theta_{S_j}) on every query z, and predict it
from the attribution scores tau(z) by the additive datamodel
g(z, S_j) = sum_{i in S_j} tau(z)_i.  LDS(z) is the Spearman rank correlation
over the M models between the actual outputs and the predictions; a score
that predicts nothing gives LDS about 0 (standard deviation about
1/sqrt(M - 1) per query), a perfect one 1.  The mean over queries comes with
a 95% confidence interval (normal approximation over queries).

Array-only: the scores, the subsets and the outputs come in as arrays or
xarray objects; training the M models is the caller's (see
``sketcharray bench lds``).
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties averaged (Spearman's convention)."""
    from scipy.stats import rankdata

    return rankdata(x, axis=-1)


def linear_datamodeling_score(scores, subsets, outputs) -> xr.Dataset:
    """LDS of attribution scores against models retrained on subsets (computes now; small arrays).

    Parameters
    ----------
    scores : (query, example) array or DataArray
        tau(z)_i, e.g. ``attribute(train, queries).values``; NaN (invalid
        examples) counts as 0.
    subsets : (model, example) bool array or DataArray
        Which training examples each retrained model saw.
    outputs : (model, query) array or DataArray
        Each retrained model's output on each query (e.g. the margin).

    Returns
    -------
    xarray.Dataset
        ``lds`` per query (NaN for a query with no finite score: it has no
        ranking), and attrs ``mean``, ``ci_low``, ``ci_high`` (95%, over the
        scored queries) and ``models``.

    Raises
    ------
    ValueError
        On mismatched shapes, fewer than 3 models, or non-finite outputs.
    """
    tau = np.asarray(getattr(scores, "values", scores), dtype=np.float64)
    # NaN scores are those of invalid training examples (they count as 0); a query with no finite score at all
    # (a zero sketch under cosine) has no ranking, so no LDS: NaN, and left out of the mean
    scored = np.isfinite(tau).any(axis=1) if tau.ndim == 2 else None
    tau = np.nan_to_num(tau, nan=0.0, posinf=0.0, neginf=0.0)
    s = np.asarray(getattr(subsets, "values", subsets), dtype=bool)
    f = np.asarray(getattr(outputs, "values", outputs), dtype=np.float64)
    if tau.ndim != 2 or s.ndim != 2 or f.ndim != 2:
        raise ValueError(f"scores (query, example), subsets (model, example) and outputs (model, query) must be "
                         f"2-D; got shapes {tau.shape}, {s.shape}, {f.shape}")
    n_query, n_example = tau.shape
    if s.shape[1] != n_example or f.shape != (s.shape[0], n_query):
        raise ValueError(f"shapes disagree: scores {tau.shape} (query, example), subsets {s.shape} (model, example), "
                         f"outputs {f.shape} (model, query); expected subsets (M, {n_example}) and outputs "
                         f"(M, {n_query})")
    if s.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 retrained models; got {s.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("outputs of the retrained models hold NaN or inf")
    predicted = s.astype(np.float64) @ tau.T  # (model, query): g(z, S_j)
    rp, rf = _ranks(predicted.T), _ranks(f.T)  # (query, model)
    rp -= rp.mean(axis=1, keepdims=True)
    rf -= rf.mean(axis=1, keepdims=True)
    denom = np.sqrt((rp**2).sum(axis=1) * (rf**2).sum(axis=1))
    lds = np.where(denom > 0, (rp * rf).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    lds = np.where(scored, lds, np.nan)
    n_scored = int(scored.sum())
    mean = float(lds[scored].mean()) if n_scored else float("nan")
    half = 1.96 * float(lds[scored].std(ddof=1)) / np.sqrt(n_scored) if n_scored > 1 else float("nan")
    coords = {"query": scores["query"].values} if isinstance(scores, xr.DataArray) and "query" in scores.coords else {}
    return xr.Dataset({"lds": ("query", lds)}, coords=coords,
                      attrs={"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "models": int(s.shape[0])})
