"""``sketcharray demo``: the whole story on one workload, written up as a report folder.

Four steps, each resumable from what the previous run left in the folder:

1. stream the training set's gradient sketches (and the test set's, the
   queries) into Zarr stores;
2. attribute a handful of test predictions: top proponents and opponents by
   cosine similarity of sketched gradients, with their ids and labels;
3. the top and bottom Hessian eigenvalues (sketched HVPs, Lanczos) at two
   checkpoints of the training run, with RNEG and R_n;
4. a short intrinsic-dimension search (AFFD subspace, doubling).

The folder ends up with the stores, ``report.md``/``report.html``/
``report.json`` and the PNG plots they show.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..analysis import attribute, hessian_spectrum, spectrum_statistics
from ..analysis.eigen import format_outliers, plot_spectrum_evolution
from ..analysis.intrinsic import intrinsic_dimension, plot_intrinsic
from ..collect.cluster import scheduler as active_scheduler
from ..collect import compute_with_progress, sketch_gradients
from ..storage.outputs import check_folder, save_figure
from .report import Report, markdown_table
from ..core.settings import Execution, ModelSettings
from ..workloads import Workload, load_workload


@dataclass(frozen=True)
class DemoSettings:
    """How much the demo computes; :data:`FULL` by default, :data:`QUICK` for CI and smoke tests."""

    method: str = "afjl"  #: gradient sketch for TDA ("factored": per-layer sketches from one batched backward)
    factor: str | None = None  #: with method "factored", the family of its factors (default afjl)
    n_out: int = 512  #: D of the gradient sketches
    batch_size: int = 64  #: examples per batch = per Zarr chunk
    n_train: int | None = None  #: training examples streamed (None: all)
    n_queries: int = 6  #: test predictions attributed
    k: int = 5  #: proponents and opponents shown per query
    spectrum_method: str = "affd"
    spectrum_n_out: int = 256
    spectrum_k: int = 5
    spectrum_examples: int = 512  #: training examples in the Hessian's mean loss
    intrinsic_method: str = "affd"
    intrinsic_d_max: int = 512
    intrinsic_check: bool = True  #: also train at D*/2 to confirm the factor of 2


FULL = DemoSettings()
QUICK = DemoSettings(n_out=128, batch_size=100, n_train=400, n_queries=4, k=3, spectrum_n_out=64, spectrum_k=3,
                     spectrum_examples=200, intrinsic_check=False)


class _Say:
    def __init__(self, quiet: bool):
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, *lines: str) -> None:
        if not self.quiet:
            print(*lines, sep="\n", flush=True)


#: the file that marks a folder as a demo's (rerunning into it resumes; another non-empty folder is refused)
DEMO_MARKER = ".sketcharray-demo"


def run_demo(out=None, *, workload: str = "digits", device: str = "cpu", quick: bool = False,
             scheduler: str = "threads", quiet: bool = False, seed: int = 0, **overrides) -> Path:
    """Run the demo and write its report folder (computes now, with progress).

    Parameters
    ----------
    out : path, optional
        The report folder (default ``sketcharray-demo``, or
        ``sketcharray-demo-quick`` with ``quick``).  A rerun reuses the
        stores and searches already there.
    workload : str
        ``digits`` (default), ``minilm`` or ``module:factory`` returning a
        :class:`~sketcharray.workloads.Workload`.
    device : str
        Where the model runs (``cpu``, ``cuda``).
    quick : bool
        The :data:`QUICK` settings (a fraction of the work, for CI).
    scheduler : str
        ``threads``, ``local-cluster`` or a scheduler address (see
        :func:`sketcharray.collect.cluster.scheduler`).
    quiet : bool
        No progress bars and no messages; only errors.
    seed : int
        Seed of every sketch and of the search.
    **overrides
        Fields of :class:`DemoSettings` (``method``, ``n_out``, ``batch_size``, ...).

    Returns
    -------
    Path of ``report.md`` in the folder.
    """
    settings = replace(QUICK if quick else FULL, **overrides)
    out = check_folder(out or ("sketcharray-demo-quick" if quick else "sketcharray-demo"))
    if out.is_dir() and any(out.iterdir()) and not ((out / DEMO_MARKER).exists() or (out / "report.json").exists()):
        raise ValueError(f"--out {out} is a folder that holds other things than a sketcharray demo (no {DEMO_MARKER}); "
                         "choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    say = _Say(quiet)
    progress = not quiet
    say(f"building the {workload!r} workload ...")
    w = load_workload(workload)
    model = w.model()
    report = Report(f"sketcharray demo: {w.name}")
    timings = {}
    with active_scheduler(scheduler, quiet=quiet):
        t = time.perf_counter()
        accuracy = w.accuracy(model)
        _workload_section(report, w, accuracy, settings)
        say(f"  {len(w.train)} training and {len(w.test)} test examples, {w.info.get('n_params', '?')} "
            f"parameters, test accuracy {accuracy:.3f}")
        train, queries = _stream(report, w, out, settings, device, seed, progress, say)
        timings["gradient sketches"] = time.perf_counter() - t

        t = time.perf_counter()
        _attribution(report, w, model, out, train, queries, settings, progress, say)
        timings["attribution"] = time.perf_counter() - t

        t = time.perf_counter()
        _spectrum(report, w, out, settings, device, seed, progress, say)
        timings["Hessian spectrum"] = time.perf_counter() - t

        t = time.perf_counter()
        _intrinsic(report, w, out, settings, device, seed, progress, say)
        timings["intrinsic dimension"] = time.perf_counter() - t

    report.section("Timing")
    report.table([{"step": k, "seconds": f"{v:.1f}"} for k, v in timings.items()],
                 [("step", "step"), ("seconds", "seconds")])
    report.data["timings"] = timings
    path = report.write(out)
    say(f"\nreport: {path.resolve()} (and report.html beside it); {time.perf_counter() - say.t0:.1f} s in all")
    return path


# ---------------------------------------------------------------- the steps
def _workload_section(report: Report, w: Workload, accuracy: float, settings: DemoSettings) -> None:
    report.section("Workload")
    report.text(f"`{w.name}`: {len(w.train)} training and {len(w.test)} test examples, "
                f"{w.info.get('n_params', '?'):,} parameters, test accuracy {accuracy:.3f}.")
    report.data["workload"] = {"name": w.name, "n_train": len(w.train), "n_test": len(w.test),
                               "n_params": w.info.get("n_params"), "settings": settings.__dict__}


def gradient_spec(method: str, n_out: int, seed: int, factor: str | None) -> dict:
    """The sketch spec of a gradient stream from the command line (``--factor`` only with ``--method factored``)."""
    if factor is not None and method != "factored":
        raise ValueError(f"--factor {factor} applies to --method factored only; got --method {method}")
    spec = {"method": method, "n_out": n_out, "seed": seed}
    return {**spec, "factor": factor or "afjl"} if method == "factored" else spec


def _stream(report, w, out, settings, device, seed, progress, say):
    spec = gradient_spec(settings.method, settings.n_out, seed, settings.factor)
    train_data, train_ids = w.split("train", settings.n_train)
    common = dict(batch_size=settings.batch_size, checkpoint="final", model_settings=ModelSettings(forward=w.forward),
                  execution=Execution(device=device, progress=progress))
    train_store, query_store = out / f"{w.name}-train-grad.zarr", out / f"{w.name}-test-grad.zarr"
    train = sketch_gradients(w.model_factory, w.loss_fn, train_data, spec, ids=train_ids, store=train_store,
                             **common)
    queries = sketch_gradients(w.model_factory, w.loss_fn, w.test, spec, ids=w.test_ids, store=query_store,
                               **common)
    norms = np.sqrt((train.grad.where(train.valid) ** 2).sum("sketch")).compute()
    n_valid = int(train.valid.sum())
    say(f"training sketches: {train_store.resolve()} {dict(train.grad.sizes)}, {n_valid} valid",
        f"query sketches:    {query_store.resolve()} {dict(queries.grad.sizes)}")
    report.section("Gradient sketches")
    how = (f"sketched layer by layer from one batched backward (factored, `{spec['factor']}` factors; no per-example "
           "gradient is formed)" if settings.method == "factored" else f"sketched with `{settings.method}`")
    report.text(f"Per-example gradients of all {sum(train.attrs['param_sizes']):,} parameters, {how} "
                f"to D = {settings.n_out} and stored in Zarr (one chunk per batch of "
                f"{settings.batch_size}). Open them lazily with `sketcharray.storage.store.open_sketches(path)`.")
    rows = [{"store": p.name, "examples": ds.sizes["example"], "D": ds.sizes["sketch"],
             "valid": int(ds.valid.sum()), "median norm": float(np.median(n)), "largest norm": float(n.max())}
            for p, ds, n in ((train_store, train, norms.values),
                             (query_store, queries,
                              np.sqrt((queries.grad ** 2).sum("sketch")).values))]
    report.table(rows, [("store", "store"), ("examples", "examples"), ("D", "D"), ("valid", "valid"),
                        ("median norm", "median ‖Φg‖"), ("largest norm", "largest ‖Φg‖")])
    report.data["stores"] = {"train": str(train_store), "test": str(query_store), "rows": rows}
    return train, queries


def _pick_queries(labels: np.ndarray, predicted: np.ndarray, n: int, rankable: np.ndarray) -> np.ndarray:
    """Up to half misclassified test examples (the interesting ones), the rest spread over the correct ones; only
    ``rankable`` ones (a zero gradient, e.g. of a perfectly fitted example, has no cosine ranking)."""
    wrong = np.flatnonzero((predicted != labels) & rankable)
    right = np.flatnonzero((predicted == labels) & rankable)
    wrong = wrong[: n // 2]
    right = right[np.linspace(0, len(right) - 1, n - len(wrong)).astype(int)] if len(right) else right
    return np.sort(np.concatenate([wrong, right]))[:n]


def _attribution(report, w, model, out, train, queries, settings, progress, say):
    labels, predicted = w.labels("test"), w.predictions(model, "test")
    rankable = np.asarray(((queries.grad != 0).any("sketch") & queries.valid).values, dtype=bool)
    chosen = _pick_queries(labels, predicted, settings.n_queries, rankable)
    q = queries.grad.isel(example=chosen)
    top, bottom = compute_with_progress(
        [attribute(train, q, score="cosine", k=settings.k, which=which) for which in ("top", "bottom")],
        progress=progress, message=f"\nattributing {len(chosen)} test predictions (top and bottom {settings.k}) ...")
    train_labels = np.asarray(train.label.values)
    position = {str(e): i for i, e in enumerate(train.example.values)}
    rows = []
    for qi, ti in enumerate(chosen):
        for kind, res in (("proponent", top), ("opponent", bottom)):
            for r in range(settings.k):
                ex = str(res.example.values[qi, r])
                rows.append({"query": w.test_ids[ti], "label": w.classes[labels[ti]],
                             "predicted": w.classes[predicted[ti]], "kind": kind, "rank": r + 1, "example": ex,
                             "example label": w.classes[train_labels[position[ex]]],
                             "cosine": float(res.score.values[qi, r])})
    columns = [("query", "query"), ("label", "label"), ("predicted", "predicted"), ("kind", "kind"),
               ("rank", "rank"), ("example", "training example"), ("example label", "its label"),
               ("cosine", "cosine")]
    if w.describe is not None:
        for row in rows:
            row["text"] = w.describe("train", position[row["example"]])
        columns.append(("text", "text"))
    say("\ntop proponents and opponents (cosine of sketched gradients):",
        markdown_table([r for r in rows if r["rank"] == 1], columns))
    report.section("Training data attribution")
    report.text(f"{len(chosen)} test predictions ({int((predicted[chosen] != labels[chosen]).sum())} of them "
                f"wrong) against the training sketches: the {settings.k} training examples whose sketched "
                "gradients point most along (proponents) and most against (opponents) each query's, by cosine "
                "similarity, computed out of core chunk by chunk.")
    report.table(rows, columns)
    plot = out / "attribution.png"
    _plot_attribution(plot, w, chosen, labels, predicted, top, bottom, position, train_labels)
    report.image(plot.name, "Test queries (left) with their top proponents and opponents")
    report.data["attribution"] = rows


def _plot_attribution(path, w, chosen, labels, predicted, top, bottom, position, train_labels):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = w.info.get("image_shape")
    k = top.sizes["rank"]
    if shape is None:  # no pictures: the scores as bars, labelled by example and label
        fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.6 * len(chosen) + 0.5), squeeze=False)
        for qi, (ax,) in enumerate(axes):
            scores = np.concatenate([top.score.values[qi], bottom.score.values[qi]])
            names = [f"{e} ({w.classes[train_labels[position[str(e)]]]})"
                     for e in np.concatenate([top.example.values[qi], bottom.example.values[qi]])]
            ax.barh(range(len(scores)), scores, color=["tab:green"] * k + ["tab:red"] * k)
            ax.set_yticks(range(len(scores)), names, fontsize=6)
            ti = chosen[qi]
            ax.set_title(f"{w.test_ids[ti]}: label {w.classes[labels[ti]]}, predicted "
                         f"{w.classes[predicted[ti]]}", fontsize=8)
            ax.axvline(0, color="grey", lw=0.5)
        axes[-1, 0].set_xlabel("cosine of sketched gradients")
    else:
        fig, axes = plt.subplots(len(chosen), 1 + 2 * k, figsize=(1.1 * (1 + 2 * k), 1.35 * len(chosen)),
                                 squeeze=False)
        for qi, ti in enumerate(chosen):
            x_query = w.test[int(ti)][0].numpy().reshape(shape)
            cells = [(x_query, f"{w.classes[labels[ti]]}→{w.classes[predicted[ti]]}", "black")]
            for res, color in ((top, "tab:green"), (bottom, "tab:red")):
                for r in range(k):
                    i = position[str(res.example.values[qi, r])]
                    cells.append((w.train[i][0].numpy().reshape(shape),
                                  f"{w.classes[train_labels[i]]} {res.score.values[qi, r]:+.2f}", color))
            for ax, (img, title, color) in zip(axes[qi], cells):
                ax.imshow(img, cmap="gray_r")
                ax.set_title(title, fontsize=7, color=color)
                ax.set_xticks([])
                ax.set_yticks([])
        fig.suptitle("query (label→predicted) | proponents (green) | opponents (red), cosine", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def _spectrum(report, w, out, settings, device, seed, progress, say):
    checkpoints = w.checkpoints() if w.checkpoints is not None else {"final": w.model().state_dict()}
    names = list(checkpoints)
    chosen = {n: checkpoints[n] for n in dict.fromkeys([names[0], names[-1]])}
    data, _ = w.split("train", settings.spectrum_examples)
    sketch = {"method": settings.spectrum_method, "n_out": settings.spectrum_n_out, "seed": seed}
    say(f"\nHessian spectrum at checkpoint(s) {', '.join(chosen)} ({sketch['method']}, D = {sketch['n_out']}, "
        f"{len(data)} examples) ...")
    spec = hessian_spectrum(w.model_factory, w.loss_fn, data, sketch, k=settings.spectrum_k, checkpoints=chosen,
                            store=out / "spectrum", batch_size=256, model_settings=ModelSettings(forward=w.forward),
                            execution=Execution(device=device, progress=progress))
    stats = spectrum_statistics(spec)
    rows = []
    for c in stats.checkpoint.values:
        s = stats.sel(checkpoint=c)
        lam_min = float(s.lambda_min)
        row = {"checkpoint": str(c), "lambda_max": float(s.lambda_max),
               "lambda_min": lam_min if np.isfinite(lam_min) else "none (no negative eigenvalue)",
               "RNEG": float(s.RNEG), "outliers": format_outliers(s)[0],
               "converged": "yes" if bool(spec.converged.sel(checkpoint=c).all())
               and bool(spec.all_converged.sel(checkpoint=c)) else "NO (budget reached)"}
        row.update({f"R{int(n)}": float(s.R.sel(rank=n)) for n in s["rank"].values[1:]})
        rows.append(row)
    columns = [("checkpoint", "checkpoint"), ("lambda_max", "λ_max"), ("lambda_min", "λ_min"), ("RNEG", "RNEG"),
               ("outliers", "outliers (R_n > 0.2)")] + [(f"R{n}", f"R_{n}") for n in spec["rank"].values[1:]] + [
               ("converged", "all eigenpairs converged")]
    say(markdown_table(rows, columns))
    report.section("Hessian spectrum")
    report.text(f"The {settings.spectrum_k} largest and most negative eigenvalues of the sketched Hessian "
                f"K = Φ H Φᵀ ({settings.spectrum_method}, D = {settings.spectrum_n_out}) of the mean loss over "
                f"{len(data)} training examples, by Lanczos on sketched Hessian-vector products, at "
                f"{len(chosen)} checkpoint(s) of the training run. RNEG = |λ_min| / λ_max; "
                "R_n = λ_n / λ_1; an outlier has R_n > 0.2 (the paper's statistics). Lanczos runs until every "
                "wanted eigenpair at both ends has converged (Ritz residual below 1e-6 λ_max); a row marked NO "
                "reached the budget first and holds approximate values. RNEG is 0 where K has no negative "
                "eigenvalue.")
    report.table(rows, columns)
    plot = out / "spectrum.png"
    plot_spectrum_evolution(stats, plot)
    report.image(plot.name, "RNEG over checkpoints (left) and R_n against n (right)")
    report.data["spectrum"] = rows


def _intrinsic(report, w, out, settings, device, seed, progress, say):
    d_max = min(w.search_settings.get("d_max", settings.intrinsic_d_max), settings.intrinsic_d_max)
    search, training = w.intrinsic_settings(d_max=d_max, d0=w.search_settings.get("d0", min(16, d_max)),
                                            seeds=(seed,), check=settings.intrinsic_check)
    say(f"\nintrinsic-dimension search ({settings.intrinsic_method}, D from {search.d0} up to {search.d_max}) ...")
    res = intrinsic_dimension(w.search_model(), w.loss_fn, w.train, w.accuracy, settings.intrinsic_method,
                              search=search, training=training, store=out / "intrinsic",
                              model_settings=ModelSettings(forward=w.forward),
                              execution=Execution(device=device, progress=progress))
    r = res.sel(seed=seed)
    d_star = float(r.d_star)
    raw = float(r.d_star_raw)
    row = {"method": settings.intrinsic_method, "seed": seed, "reference": res.attrs["reference"],
           "target": res.attrs["target_metric"], "D*": "not reached" if not np.isfinite(d_star) else int(d_star),
           "D* of the doubling": "not reached" if not np.isfinite(raw) else int(raw),
           "metric at D*": float(r.d_star_metric), "metric at D*/2": float(r.check_metric),
           "steps": int(np.nanmax(r.step.values))}
    columns = [(c, c) for c in row]
    say(markdown_table([row], columns))
    report.section("Intrinsic dimension")
    report.text(f"Training only ω ∈ R^D in θ = θ₀ + Φᵀω ({settings.intrinsic_method}), doubling D from "
                f"{search.d0} whenever the test accuracy stops improving, until it reaches 90% of full "
                f"training's ({res.attrs['reference']:.3f}). The doubling stops at the first D that does (the search "
                f"stops at D = {search.d_max}); check runs trained to convergence at half of it refine D* "
                "while they reach the target, and the run at D*/2 falling short confirms the factor of 2.")
    report.table([row], columns)
    plot = out / "intrinsic.png"
    plot_intrinsic({settings.intrinsic_method: res}, plot, reference=res.attrs["reference"],
                   metric_name=f"test accuracy ({w.name})")
    report.image(plot.name, "Test accuracy against the subspace dimension D, with the 90% line")
    report.data["intrinsic"] = row
