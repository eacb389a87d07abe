"""The paper's statistics of a spectrum (RNEG, R_n, outliers) and their plot."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ...storage.outputs import save_figure


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
