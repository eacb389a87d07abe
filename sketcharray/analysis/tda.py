"""Training data attribution on gradient sketches (docs/tda.md).

Scores of a query sketch q against training sketches Phi g_i:

* ``dot``: <q, Phi g_i> (TracIn at one checkpoint; with a ``checkpoint``
  dimension, summed with per-checkpoint weights: TracIn-CP);
* ``cosine``: the same on unit-normalised sketches;
* ``trak``: TRAK's estimator (Park et al., *TRAK: Attributing Model Behavior
  at Scale*, ICML 2023, Eq. 13 with its implementation's normalisation) on
  sketches of the gradients of the model output function f (sketch with
  ``loss_fn=classification_margin``): q^T (G^T G + lambda I)^{-1} Phi g_i, the
  inverse divided by its mean absolute entry, averaged over checkpoints, times
  the average over checkpoints of the reweighting 1 - p_i = sigmoid(-f_i)
  read from the stored values (lambda = 0 by default, as in TRAK).  The
  ``traker`` package projects with an unnormalised Gaussian and divides
  gradients by sqrt(N) (N parameters): its features are sqrt(D/N) times
  these norm-keeping sketches, so where G^T G is well conditioned its
  scores are these times D/N (docs/tda.md: measured);
* ``influence``: q^T (F + lambda I)^{-1} Phi g_i with F the Gauss-Newton /
  Fisher estimate from the training sketches (their D x D Gram divided by
  the number of valid examples; one F per checkpoint when there are
  several) or a user-supplied D x D matrix (e.g. from HVP sketches); lazy,
  through an eigendecomposition of F when computed.

Everything is lazy: the full score matrix is a dask array; ``k=`` gives the
top (or bottom) k per query through a blockwise running merge that never
holds more than one training chunk's scores per query batch.  Invalid
training examples (``valid`` False) never enter a score, a Gram or a top-k.
"""

from __future__ import annotations


import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..storage.provenance import check_same_sketch, provenance, with_provenance
from ..sketches import backend

SCORES = ("dot", "cosine", "influence", "trak")


# ------------------------------------------------------ the one normalisation
def unit_rows(x, axis: int = -1):
    """``x / ||x||`` along ``axis`` (the sketch axis), in float32 or wider whatever ``x``'s dtype.

    The norm is taken of ``x / max|x|``, so neither the squares of float16
    values nor those of tiny float32 ones underflow.  A row whose entries are
    all zero has no direction: it comes back NaN, as does a row holding a
    non-finite value.  Cosine scores of such a row are therefore NaN, and it
    is never ranked (a zero training row is left out of every cosine top-k;
    a zero query gets no ranking, see :func:`attribute`).  NumPy, CuPy and
    torch arrays alike.
    """
    xp = backend.library(x)
    x = x.astype(_at_least_float32(x.dtype, xp))
    m = xp.max(xp.abs(x), axis=axis, keepdims=True)
    has_direction = m > 0
    y = x / xp.where(has_direction, m, xp.ones_like(m))
    n = xp.sqrt(xp.sum(y * y, axis=axis, keepdims=True))
    return xp.where(has_direction, y / xp.where(has_direction, n, xp.ones_like(n)), xp.full_like(y, float("nan")))


def _at_least_float32(dtype, xp=np):
    """``dtype`` widened to float32 when it is narrower (float16, bfloat16); float64 stays."""
    wide = xp.float64 if dtype == xp.float64 else xp.float32
    return wide


def _unit_sketch_rows(a: xr.DataArray) -> xr.DataArray:
    """:func:`unit_rows` over the ``sketch`` dimension of a (lazy) DataArray."""
    out = xr.apply_ufunc(unit_rows, a, input_core_dims=[["sketch"]], output_core_dims=[["sketch"]],
                         dask="parallelized", output_dtypes=[_at_least_float32(a.dtype)], keep_attrs=True)
    return out.transpose(*a.dims)


# ----------------------------------------------------------------- inputs
def _as_train(train) -> tuple[xr.DataArray, xr.DataArray | None]:
    """The gradient sketches (example, sketch[, checkpoint]) and the valid mask of a training set."""
    if isinstance(train, xr.Dataset):
        if "grad" not in train:
            raise ValueError(f"train must hold a 'grad' variable; it has {sorted(train.data_vars)}")
        grad, valid = train["grad"], train.get("valid")
    elif isinstance(train, xr.DataArray):
        grad, valid = train, None
    else:
        raise TypeError(f"train must be an xarray Dataset or DataArray of sketches; got {type(train).__name__}")
    if "example" not in grad.dims or "sketch" not in grad.dims:
        raise ValueError(f"train sketches need dims ('example', 'sketch'); got {grad.dims}")
    return grad, valid


def _as_queries(queries) -> xr.DataArray:
    """Query sketches with dims (query, sketch[, checkpoint])."""
    if isinstance(queries, xr.Dataset):
        queries = queries["grad"].where(queries["valid"]) if "valid" in queries else queries["grad"]
    if not isinstance(queries, xr.DataArray):
        arr = np.asarray(queries)
        queries = xr.DataArray(arr if arr.ndim == 2 else arr[None, :], dims=("query", "sketch"))
    if "example" in queries.dims:
        queries = queries.rename(example="query")
    if "query" not in queries.dims:
        queries = queries.expand_dims("query")
    if "query" not in queries.coords:
        queries = queries.assign_coords(query=np.arange(queries.sizes["query"]))
    return queries


def _valid_mask(grad: xr.DataArray, valid) -> xr.DataArray:
    ok = xr.ones_like(grad.isel(sketch=0, drop=True), dtype=bool) if valid is None else valid.astype(bool)
    finite = np.isfinite(grad).all("sketch")
    return _like_chunks(ok, grad) & finite


def _like_chunks(mask: xr.DataArray, grad: xr.DataArray) -> xr.DataArray:
    """``mask`` in the array library of ``grad``'s chunks: flags read from a store are NumPy, and a CuPy chunk
    is masked on its device (each flag block moved there, not the chunk to the host)."""
    meta = getattr(grad.data, "_meta", None)
    lib = backend.library(meta) if meta is not None else np
    if lib is np or not isinstance(mask.data, da.Array):
        return mask
    return mask.copy(data=mask.data.map_blocks(lib.asarray, meta=lib.empty((0,), dtype=bool)))


def _checkpoint_weights(grad: xr.DataArray, weights, score: str = "dot") -> xr.DataArray | None:
    if "checkpoint" not in grad.dims:
        if weights is not None:
            raise ValueError("checkpoint_weights given but the sketches have no 'checkpoint' dimension")
        return None
    n = grad.sizes["checkpoint"]
    if weights is None:
        weights = np.full(n, 1.0 / n) if score == "trak" else np.ones(n)  # TRAK averages over models
    weights = xr.DataArray(np.asarray(weights, dtype=np.float64), dims="checkpoint")
    if weights.sizes["checkpoint"] != n:
        raise ValueError(f"checkpoint_weights has {weights.sizes['checkpoint']} entries for {n} checkpoints")
    return weights.assign_coords(checkpoint=grad["checkpoint"])


# ------------------------------------------------------------- the Gram
def gram(train, *, checkpoint=None) -> xr.DataArray:
    """F = sum_i g_i g_i^T / n over valid training sketches: a lazy D x D (one blockwise pass)."""
    grad, valid = _as_train(train)
    ok = _valid_mask(grad, valid)
    if checkpoint is not None:
        grad, ok = grad.sel(checkpoint=checkpoint), ok.sel(checkpoint=checkpoint) if "checkpoint" in ok.dims else ok
    g = grad.where(ok, 0.0).transpose(..., "example", "sketch")
    n = ok.sum("example")
    f = xr.dot(g, g.rename(sketch="sketch_"), dim="example") / n
    f = f.rename(sketch_="sketch2").assign_coords(sketch2=grad["sketch"].values)
    return with_provenance(f, provenance(train))


DEFAULT_DAMPING = "0.1 x trace(F) / D"


def _damped_solve(f, q, lam):
    """q (F + lam I)^{-1} for one D x D F (symmetric) and queries q (m, D), by an eigendecomposition of F.

    For a Gram F (positive semi-definite) every eigenvalue of F + lam I is at
    least lam > 0.  A user-supplied F may be indefinite (a sketched Hessian):
    then an eigenvalue of F + lam I at zero, to working precision, is an error
    rather than an amplified inverse.
    """
    xp = backend.library(f)  # numpy, or CuPy for a Gram of device chunks: solved where it lives
    f = xp.asarray(f, dtype=xp.float64)
    w, u = xp.linalg.eigh((f + f.T) / 2)
    shifted = w + float(lam)
    smallest = float(xp.abs(shifted).min())
    if smallest <= 1e-12 * max(float(xp.abs(shifted).max()), 1e-300):
        raise ValueError(f"F + lambda I is singular (lambda = {float(lam):.3g}, smallest |eigenvalue| "
                         f"{smallest:.3g}); increase damping")
    return ((xp.asarray(q, dtype=xp.float64) @ u) / shifted) @ u.T


def _preconditioned(q: xr.DataArray, train, damping, preconditioner) -> tuple[xr.DataArray, xr.DataArray, dict]:
    """Queries times (F + lambda I)^{-1}, lazily, one F per checkpoint when there are several.

    F is the Gram of the valid training sketches (one blockwise pass,
    :func:`gram`) or ``preconditioner``; the default damping is 0.1 x the
    mean eigenvalue trace(F)/D, computed from F in the same graph.  Nothing
    is computed here: the eigendecomposition of each D x D F runs when the
    scores are computed.  Returns (queries, damping used (lazy), attrs).
    """
    grad, _ = _as_train(train)
    d = grad.sizes["sketch"]
    if preconditioner is None:
        f = gram(train)
    else:
        check_same_sketch(provenance(train), provenance(preconditioner), names=("train", "preconditioner"),
                          allow_model_mismatch=True)
        f = preconditioner if isinstance(preconditioner, xr.DataArray) else xr.DataArray(
            np.asarray(preconditioner, dtype=np.float64), dims=("sketch", "sketch2"))
        if f.shape[-2:] != (d, d):
            raise ValueError(f"preconditioner must be {d} x {d} (sketch x sketch); got shape {f.shape}")
        if "sketch2" not in f.dims:
            f = f.rename({f.dims[-1]: "sketch2"}) if f.dims[-1] != "sketch" else f.rename({f.dims[-2]: "sketch2"})
    eye = xr.DataArray(np.eye(d), dims=("sketch", "sketch2"))
    if damping is None:
        lam = 0.1 * (f * eye).sum(("sketch", "sketch2")) / d
    else:
        if not damping > 0:
            raise ValueError(f"damping must be > 0; got {damping!r}")
        lam = xr.DataArray(float(damping))
    solved = _solve_per_checkpoint(_damped_solve, f, q, lam)
    return solved, lam, {"damping": float(damping) if damping is not None else DEFAULT_DAMPING}


def _solve_per_checkpoint(solve, f: xr.DataArray, q: xr.DataArray, lam: xr.DataArray) -> xr.DataArray:
    """``solve(F, q, lam)`` on each D x D F and the queries, vectorised over checkpoints; lazy (dask)."""
    solved = xr.apply_ufunc(
        solve, f.drop_vars([c for c in ("sketch", "sketch2") if c in f.coords]),
        q.drop_vars("sketch", errors="ignore"), lam,
        input_core_dims=[["sketch", "sketch2"], ["query", "sketch"], []], output_core_dims=[["query", "sketch"]],
        vectorize=True, dask="parallelized", output_dtypes=[np.float64],
        dask_gufunc_kwargs={"allow_rechunk": True})
    return solved.assign_coords(sketch=q["sketch"].values) if "sketch" in q.coords else solved


# -------------------------------------------------------------- scoring
def _checked(train, queries, score, allow_model_mismatch=False):
    """Validated (grad, valid, queries, provenance attrs) for a score.

    Sketch sets that carry provenance (stores, ``sketch_gradients``) must
    come from the same operator and parameters, and at one checkpoint from
    the same model unless ``allow_model_mismatch``.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}; got {score!r}")
    grad, valid = _as_train(train)
    allowed = check_same_sketch(provenance(train), provenance(queries), allow_model_mismatch=allow_model_mismatch)
    q = _as_queries(queries)
    if q.sizes["sketch"] != grad.sizes["sketch"]:
        raise ValueError(f"queries have D={q.sizes['sketch']} but train has D={grad.sizes['sketch']} "
                         "(sketch both with the same operator)")
    return grad, valid, q, {} if allowed is None else {"model_mismatch_allowed": allowed}


def _with_damping(out, lam):
    """The damping used, as a (lazy) ``damping`` coordinate where its dims fit the result.

    With several checkpoints summed (TracIn-CP) the per-checkpoint dampings
    have no place in a (query, example) result; the attrs name the rule.
    """
    if lam is None or not set(lam.dims) <= set(out.dims):
        return out
    return out.assign_coords(damping=lam)


#: eigenvalues of G^T G + lambda I below this fraction of the largest are treated as zero (a pseudo-inverse)
TRAK_RCOND = 1e-10


def _trak_solve(f, q, lam):
    """q (G^T G + lam I)^+ for one checkpoint, the inverse divided by its mean absolute entry as TRAK does.

    A pseudo-inverse: gradients of the margin are blind to a shift of all
    logits, so G^T G has (numerically) null directions, which the queries'
    gradients share; TRAK's own float32 ``inv`` turns them into noise.
    """
    f = np.asarray(f, dtype=np.float64)
    w, u = np.linalg.eigh((f + f.T) / 2)
    shifted = w + float(lam)
    keep = shifted > TRAK_RCOND * max(shifted.max(), 1e-300)
    inv = (u[:, keep] / shifted[keep]) @ u[:, keep].T
    return (np.asarray(q, dtype=np.float64) @ inv) / np.abs(inv).mean()


def _trak_queries(q: xr.DataArray, train, damping):
    """Queries times TRAK's kernel (G^T G + lambda I)^{-1}, lazily, one per checkpoint."""
    grad, valid = _as_train(train)
    if damping is not None and not damping >= 0:
        raise ValueError(f"damping (TRAK's lambda) must be >= 0; got {damping!r}")
    f = gram(train) * _valid_mask(grad, valid).sum("example")  # G^T G over the valid rows
    lam = xr.DataArray(0.0 if damping is None else float(damping))
    return _solve_per_checkpoint(_trak_solve, f, q, lam), {"damping": float(lam)}


def _trak_reweighting(train) -> xr.DataArray:
    """TRAK's 1 - p_i = sigmoid(-f_i) from the stored model outputs f, averaged over checkpoints (lazy)."""
    if not isinstance(train, xr.Dataset) or "loss" not in train:
        raise ValueError("score='trak' needs the training sketches' stored model outputs (the 'loss' variable of "
                         "a store made with loss_fn=classification_margin); got no 'loss'")
    made_with = str(train.attrs.get("loss_fn") or "")
    if made_with.endswith("cross_entropy_per_example"):
        raise ValueError(f"score='trak' needs gradients of the model output f (loss_fn=classification_margin, "
                         f"'sketch --margin'), but these training sketches are gradients of {made_with}")
    q = 1.0 / (1.0 + np.exp(train["loss"].astype(np.float64)))
    return q.mean("checkpoint") if "checkpoint" in q.dims else q


def _scored_queries(q, score, train, damping, preconditioner):
    """Queries ready for a plain inner product: unit-normalised (cosine) or preconditioned (influence, trak).

    Returns (queries, damping (a lazy scalar, or per checkpoint) or None, attrs).
    """
    attrs = {"score": score}
    lam = None
    if score == "cosine":
        q = _unit_sketch_rows(q)
    elif score == "influence":
        q, lam, extra = _preconditioned(q, train, damping, preconditioner)
        attrs.update(extra)
    elif score == "trak":
        if preconditioner is not None:
            raise ValueError("score='trak' builds its own kernel from the training sketches; preconditioner= "
                             "is for score='influence'")
        q, extra = _trak_queries(q, train, damping)
        attrs.update(extra)
    return q, lam, attrs


def _prepared(train, queries, score, damping, preconditioner, allow_model_mismatch=False):
    grad, valid, q, notes = _checked(train, queries, score, allow_model_mismatch)
    ok = _valid_mask(grad, valid)
    if score == "cosine":  # a zero row has no direction: no cosine score, like an invalid one
        grad = _unit_sketch_rows(grad)
        ok = ok & np.isfinite(grad).all("sketch")
    g = grad.where(ok, 0.0)
    q, lam, attrs = _scored_queries(q, score, train, damping, preconditioner)
    return g, q, ok, lam, {**attrs, **notes}


def attribute(train, queries, *, score: str = "dot", k: int | None = None, which: str = "top",
              damping: float | None = None, preconditioner=None, checkpoint_weights=None,
              query_batch: int = 1024, allow_model_mismatch: bool = False):
    """Attribution scores of training examples for queries (lazy).

    Parameters
    ----------
    train : xarray.Dataset or DataArray
        Training sketches: ``grad`` (example, sketch[, checkpoint]) and
        ``valid``, e.g. from :func:`sketcharray.storage.store.open_sketches`.
    queries : Dataset, DataArray or array
        Query sketches (query or example, sketch[, checkpoint]), same operator.
    score : {"dot", "cosine", "influence", "trak"}
        ``trak`` needs sketches of the model output's gradients (see the
        module docstring and :func:`~sketcharray.workloads.classification_margin`).
    k : int, optional
        Return the k highest (``which="top"``: proponents) or lowest
        (``"bottom"``: opponents) scoring valid training examples per query.
    damping : float, optional
        lambda in (F + lambda I)^{-1} for ``influence``; default 0.1 x the
        mean eigenvalue trace(F)/D.
    preconditioner : (D, D) array, optional
        Use this F (e.g. the sketched Hessian) instead of the Gram.
    checkpoint_weights : sequence, optional
        Weights of the checkpoints (e.g. learning rates) for TracIn-CP;
        default all 1.
    query_batch : int
        With ``k``: queries scored together against each training chunk
        (memory per task: query_batch x chunk rows of scores).
    allow_model_mismatch : bool
        Accept queries sketched at other model weights than the training
        examples at the same checkpoint (e.g. a fine-tuned model against its
        base); the result's ``model_mismatch_allowed`` attr records it.

    Returns
    -------
    xarray.DataArray (query, example) of scores, lazy; invalid examples NaN,
    and for ``cosine`` every score of a row (query or training example)
    whose sketch is zero NaN: it has no direction (:func:`unit_rows`).
    With ``k``: Dataset with ``score`` and ``example`` (query, rank), ranks
    1..k best first, and ``ranked`` (query): False for a query whose sketch
    is zero or non-finite, which scores every training example alike and so
    has no ranking (its scores are NaN, its examples ``""`` (or -1 for
    integer ids) and ``index`` -1); lazy, computing it streams the training
    set chunk by chunk.  Training rows with a zero sketch are never in a
    cosine top-k.

    Raises
    ------
    ValueError
        When train and queries were sketched by different operators or
        parameter selections, or (unless ``allow_model_mismatch``) from
        different model weights at one checkpoint; the message names both.
    """
    if k is not None:
        return _top_k_batches(train, queries, score, damping, preconditioner, checkpoint_weights, k, which,
                              query_batch, allow_model_mismatch)
    g, q, ok, lam, attrs = _prepared(train, queries, score, damping, preconditioner, allow_model_mismatch)
    weights = _checkpoint_weights(g, checkpoint_weights, score)
    s = xr.dot(q, g, dim="sketch")
    if weights is not None:
        s = (s * weights).sum("checkpoint")
    if score == "trak":
        s = s * _trak_reweighting(train)
    if "checkpoint" in ok.dims:
        ok = ok.all("checkpoint")
    out = s.where(ok).transpose("query", "example", ...)
    out = _with_damping(out, lam)
    out.attrs.update(attrs)
    return out.rename("score")


def self_influence(train, *, score: str = "dot", damping: float | None = None, preconditioner=None,
                   checkpoint_weights=None) -> xr.DataArray:
    """Each training example's score against itself (lazy, one pass): ||g||^2 or g^T (F+lambda I)^{-1} g."""
    if score not in ("dot", "influence"):
        raise ValueError(f"self_influence score must be 'dot' or 'influence'; got {score!r}")  # trak: not defined
    g, q, ok, lam, attrs = _prepared(train, train, score, damping, preconditioner)
    q = q.rename(query="example")
    s = (g * q.where(ok, 0.0)).sum("sketch")
    weights = _checkpoint_weights(g, checkpoint_weights)
    if weights is not None:
        s = (s * weights).sum("checkpoint")
        ok = ok.all("checkpoint")
    out = s.where(ok).rename("self_influence")
    out = _with_damping(out, lam)
    out.attrs.update(attrs)
    return out


# ---------------------------------------------------------------- top-k
def chunk_topk(q, g, valid, weights, offset, k, sign, normalize, row_scale=None):
    """Top-k (by sign * score) of one raw training chunk: (scores, global indices), each (n_query, k), on the host.

    The chunk is read once, where it lives: a CuPy chunk is scored on its
    device (the small queries, flags and weights are moved there) and only
    the (n_query, k) result comes back.  Rows flagged invalid or holding
    non-finite values are excluded here, ``normalize`` (cosine) scales rows to
    unit norm here, and ``row_scale`` (TRAK's reweighting) multiplies each
    row's scores.
    """
    xp = backend.library(g)
    q = xp.asarray(q)
    g = g.astype(_at_least_float32(g.dtype, xp))  # float16/bfloat16 rows scored in float32
    if normalize:  # the sketch axis is axis 1: (example, sketch[, checkpoint])
        g = unit_rows(g, axis=1)  # a zero row comes back NaN and is excluded below like a non-finite one
    finite = xp.isfinite(g).reshape(g.shape[0], -1).all(axis=1)
    ok = finite if valid is None else (finite & xp.asarray(valid, dtype=bool))
    g = xp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0.0)
    s = xp.einsum("qd...,ed...->qe...", q, g) if g.ndim == 3 else q @ g.T
    if s.ndim == 3:  # (query, example, checkpoint)
        s = s @ xp.asarray(weights)
    if row_scale is not None:
        s = s * xp.asarray(row_scale, dtype=xp.float64)[None, :]
    s = xp.where(ok[None, :], sign * s, -xp.inf)
    kk = min(k, s.shape[1])
    idx = (xp.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < s.shape[1]
           else xp.tile(xp.arange(s.shape[1]), (s.shape[0], 1)))
    return _to_host(xp.take_along_axis(s, idx, axis=1)), _to_host(idx) + offset


def merge_topk(parts, k):
    scores = np.concatenate([p[0] for p in parts], axis=1)
    index = np.concatenate([p[1] for p in parts], axis=1)
    # highest score first; ties broken by the lower example index (deterministic)
    order = np.lexsort((index, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(index, order, axis=1)


def _to_host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def _top_k_batches(train, queries, score, damping, preconditioner, checkpoint_weights, k, which, query_batch,
                   allow_model_mismatch):
    """Top-k by query batches; each batch streams the raw training chunks once."""
    if which not in ("top", "bottom"):
        raise ValueError(f"which must be 'top' or 'bottom'; got {which!r}")
    grad, valid, q, notes = _checked(train, queries, score, allow_model_mismatch)
    ranked = _rankable(q, score)
    q, lam, attrs = _scored_queries(q, score, train, damping, preconditioner)
    attrs.update(notes, which=which)
    weights = _checkpoint_weights(grad, checkpoint_weights, score)
    row_scale = _trak_reweighting(train) if score == "trak" else None
    # the k check reads only the 1-byte valid flags; non-finite rows are dropped chunk by chunk
    n_valid = int(valid.sum()) if valid is not None else grad.sizes["example"]
    if not isinstance(k, (int, np.integer)) or k < 1 or k > n_valid:
        raise ValueError(f"k must be an int between 1 and the number of valid training examples ({n_valid}); got {k!r}")
    parts = [_top_k(grad, valid, q.isel(query=slice(s, s + query_batch)), weights, k, which, score == "cosine",
                    row_scale, ranked.isel(query=slice(s, s + query_batch)))
             for s in range(0, q.sizes["query"], query_batch)]
    out = parts[0] if len(parts) == 1 else xr.concat(parts, dim="query")
    out = _with_damping(out, lam)
    out.attrs.update(attrs)
    return out


def _rankable(q: xr.DataArray, score: str) -> xr.DataArray:
    """Per query: whether its sketch can rank training examples (lazy).

    A query holding a non-finite value, or whose sketch is zero (a
    well-fitted example's gradient, or float16 values that underflowed to
    zero), scores every training example the same (0, or NaN for cosine):
    its "top k" would be arbitrary, so it gets none.  With checkpoints, a
    cosine query needs a direction at every checkpoint, the other scores at
    one at least.
    """
    other = [d for d in q.dims if d not in ("query", "sketch")]
    finite = np.isfinite(q).all(["sketch", *other])
    nonzero = (q != 0).any("sketch")
    if other:
        nonzero = nonzero.all(other) if score == "cosine" else nonzero.any(other)
    return (finite & nonzero).rename("ranked")


def _unranked(merged, ranked):
    """(scores, indices) of a query batch with the queries that have no ranking blanked: NaN and -1."""
    scores, index = merged
    # a rank no valid training row filled (fewer rows with a score than k) is blank too, never a -inf "score"
    filled = np.asarray(ranked, dtype=bool)[:, None] & np.isfinite(scores)
    return np.where(filled, scores, np.nan), np.where(filled, index, -1)


def _row_blocks(values, chunks):
    """Per-example values as one delayed block per training chunk."""
    arr = values.data if isinstance(values.data, da.Array) else da.from_array(np.asarray(values.values),
                                                                               chunks=(chunks,))
    return arr.rechunk((chunks,)).to_delayed().ravel()


def _top_k(grad, valid, q, weights, k, which, normalize, row_scale=None, ranked=None):
    sign = 1.0 if which == "top" else -1.0
    order = ["example", "sketch"] + (["checkpoint"] if "checkpoint" in grad.dims else [])
    garr = grad.transpose(*order).data
    qarr = q.transpose("query", "sketch", *order[2:]).data
    if not isinstance(garr, da.Array):
        garr = da.from_array(garr, chunks=(max(1, min(garr.shape[0], 4096)),) + garr.shape[1:])
    # one block per training chunk: the sketch and checkpoint axes whole (stacked checkpoints come one chunk each)
    garr = garr.rechunk({axis: -1 for axis in range(1, garr.ndim)})
    okblocks = [None] * len(garr.chunks[0]) if valid is None else _row_blocks(valid, garr.chunks[0])
    scaleblocks = [None] * len(garr.chunks[0]) if row_scale is None else _row_blocks(row_scale, garr.chunks[0])
    w = None if weights is None else weights.values
    qd = dask.delayed(_to_host)(qarr) if isinstance(qarr, da.Array) else np.asarray(qarr)
    parts, offset = [], 0
    for gb, ob, sb, size in zip(garr.to_delayed().ravel(), okblocks, scaleblocks, garr.chunks[0]):
        # the chunk as it is (a CuPy chunk stays on its device); only its top k comes back to the host
        parts.append(dask.delayed(chunk_topk, pure=True)(qd, gb, ob, w, offset, k, sign, normalize, sb))
        offset += size
    while len(parts) > 1:  # tree merge: bounded memory, parallel
        parts = [dask.delayed(merge_topk, pure=True)(parts[i : i + 8], k) for i in range(0, len(parts), 8)]
    merged = dask.delayed(merge_topk, pure=True)(parts, k)
    n_query = q.sizes["query"]
    if ranked is None:
        ranked = xr.ones_like(q["query"], dtype=bool)
    rank_flags = ranked.data if isinstance(ranked.data, da.Array) else np.asarray(ranked.values)
    merged = dask.delayed(_unranked, pure=True)(merged, rank_flags)
    scores = da.from_delayed(merged[0], (n_query, k), dtype=np.float64) * sign
    index = da.from_delayed(merged[1], (n_query, k), dtype=np.int64)
    ids = grad["example"].values
    missing = -1 if ids.dtype.kind in "iu" else ""  # the id of a rank a query without a ranking does not fill
    example = index.map_blocks(lambda i: np.where(i >= 0, ids[np.maximum(i, 0)], missing).astype(ids.dtype),
                               dtype=ids.dtype)
    return xr.Dataset(
        {"score": (("query", "rank"), scores), "example": (("query", "rank"), example),
         "index": (("query", "rank"), index), "ranked": (("query",), ranked.data)},
        coords={"query": q["query"].values, "rank": np.arange(1, k + 1)},
    )


# ----------------------------------------------------- exact comparisons
def compare_with_exact(sketched: xr.DataArray, exact: xr.DataArray, *, k: int = 10) -> xr.Dataset:
    """Pearson and Spearman correlation and top-k overlap of sketched vs exact scores.

    Both (query, example) score matrices (computed): DataArrays with those
    dims, or NumPy arrays of that shape (rows queries, columns training
    examples); returns a Dataset with overall ``pearson`` and ``spearman``
    and per-query ``topk_overlap`` (fraction of the exact top-k found in the
    sketched top-k).  Needs scipy (the ``test`` extra).
    """
    from scipy import stats

    def matrix(scores, name):
        if isinstance(scores, xr.DataArray):
            return np.asarray(scores.transpose("query", "example").values, dtype=np.float64)
        arr = np.asarray(scores, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"{name} scores must be (query, example): a DataArray with those dims or a 2-D array; "
                             f"got shape {arr.shape}")
        return arr

    s, e = matrix(sketched, "sketched"), matrix(exact, "exact")
    if s.shape != e.shape:
        raise ValueError(f"sketched scores {s.shape} and exact scores {e.shape} differ in shape")
    ok = np.isfinite(s) & np.isfinite(e)
    overlap = []
    for qs, qe, m in zip(s, e, ok):
        kk = min(k, int(m.sum()))
        top_s = set(np.flatnonzero(m)[np.argsort(-qs[m])[:kk]])
        top_e = set(np.flatnonzero(m)[np.argsort(-qe[m])[:kk]])
        overlap.append(len(top_s & top_e) / max(kk, 1))
    return xr.Dataset(
        {"pearson": float(stats.pearsonr(s[ok], e[ok])[0]), "spearman": float(stats.spearmanr(s[ok], e[ok])[0]),
         "topk_overlap": ("query", np.array(overlap))},
        coords={"query": sketched["query"].values if isinstance(sketched, xr.DataArray) else np.arange(len(s))},
        attrs={"k": k, "pairs": int(ok.sum())},
    )


def exact_gradient_scores(train_grads: np.ndarray, query_grads: np.ndarray, train_ids=None, query_ids=None) -> xr.DataArray:
    """Exact <g_query, g_train> from unsketched gradients (small models), labeled like ``attribute``."""
    # products in the inputs' precision (long float32 rows need not be copied to float64), result float64
    s = (np.asarray(query_grads) @ np.asarray(train_grads).T).astype(np.float64)
    return xr.DataArray(s, dims=("query", "example"),
                        coords={"query": query_ids if query_ids is not None else np.arange(s.shape[0]),
                                "example": train_ids if train_ids is not None else np.arange(s.shape[1])},
                        name="score")


@xr.register_dataset_accessor("sketcharray")
class SketchAccessor:
    """``train.sketcharray.attribute(queries, ...)`` and ``.self_influence(...)``, ``.gram()``."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def attribute(self, queries, **kwargs):
        return attribute(self._ds, queries, **kwargs)

    def self_influence(self, **kwargs):
        return self_influence(self._ds, **kwargs)

    def gram(self, **kwargs):
        return gram(self._ds, **kwargs)


