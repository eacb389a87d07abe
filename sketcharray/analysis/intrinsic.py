"""Intrinsic dimension: subspace training theta = theta_0 + Phi^T omega and the doubling search.

docs/intrinsic.md: draw one projection of dimension D_max once;
"dimension d" trains only omega's first d coordinates, so subspaces are
nested and training continues without restarting when d doubles.  The
metric at theta_0 is evaluated first (the start of the improvement rule; a
theta_0 that already reaches the target is an error).  Loop: train
``steps_per_eval`` steps; evaluate the metric tau; if tau >= target x
reference return d (the raw D*, within a factor 2 of D_int90); else if tau
improved by less than ``min_improvement`` since the last evaluation, double d
(an error past D_max).

The plateau rule stops Adam well before convergence, so the raw D* is often
one doubling too high.  Check runs train a fresh omega at D*/2 *to
convergence* (:func:`train_to_convergence`: Adam, its learning rate halved at
each plateau); while one reaches the target, D* is refined to D*/2 and the
next half is checked.  The result reports the refined ``d_star`` beside the
raw ``d_star_raw``, and ``confirmed`` when the run at d_star/2 falls short
(the factor of 2 holds).  Everything computes now, with progress lines, and
can resume from the state saved after every evaluation.

The settings travel in :class:`~sketcharray.core.settings.SearchSettings` (the
search) and :class:`~sketcharray.core.settings.TrainingSettings` (Adam on each
subspace); the training itself is the torch layer's
(:mod:`sketcharray.torch.training`): this module only calls ``train`` and
``evaluate`` and keeps the search's state as plain arrays and JSON.
"""

from __future__ import annotations

import logging

import io
import json
import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import xarray as xr

from ..storage.location import locate, place
from ..storage.outputs import check_folder, save_figure
from ..core.settings import Execution, ModelSettings, SearchSettings, TrainingSettings, coerce, moved_options
from ..sketches import make_sketch
from ..torch import as_module, select_params
from ..torch.training import SubspaceTrainer, full_finetune_metric, start_metric

log = logging.getLogger(__name__)


class SearchExhausted(RuntimeError):
    """The doubling search passed D_max without reaching the target."""


class StartMeetsTarget(ValueError):
    """theta_0 already reaches the target: the search would measure nothing."""


@dataclass
class SearchState:
    """Everything the doubling search needs to continue: saved after each evaluation."""

    d: int
    step: int = 0
    last: float = -math.inf
    trajectory: list = field(default_factory=list)  # (d, step, metric)
    done: bool = False
    d_star: int | None = None
    theta0: float | None = None  # the metric at theta_0, evaluated before any training
    best: float = -math.inf  # the best metric so far (at this d or a smaller one: the subspaces are nested)
    halvings: int = 0  # learning-rate halvings at this d (PlateauRule)


def doubling_search(train: Callable[[int, int], None], evaluate: Callable[[], float], *, target_metric: float,
                    search: SearchSettings, training: TrainingSettings, state: SearchState | None = None,
                    on_eval: Callable[[SearchState], None] | None = None, progress: bool = True,
                    control=None) -> SearchState:
    """The paper's search, independent of what is trained, with every D trained to convergence.

    ``train(d, n)`` trains n steps at dimension d (continuing); ``evaluate()``
    returns the metric.  ``search``: ``d0`` and ``d_max`` (which must be
    given); ``training``: ``steps_per_eval``, ``min_improvement``, ``lr``
    and ``max_steps``.  The metric at the start (theta_0) is evaluated
    first.  At each d, training runs to the convergence rule of the check
    runs (:class:`~sketcharray.torch.training.PlateauRule`: the learning
    rate halved at each plateau, d doubled after the last halving);
    ``control`` (``keep_best()``, ``back_to_best()``, ``set_lr(lr)``, e.g. a
    :class:`~sketcharray.torch.training.SubspaceTrainer`) keeps the best
    weights, puts them back before d doubles (the subspaces are nested, so
    the metric at 2d starts at the best of d: it never falls as d grows) and
    sets the rate; without it only the doubling logic runs.  Returns the
    final state (``d_star`` set when the target was reached).  Raises
    :class:`SearchExhausted` past ``d_max`` or ``max_steps``, and
    :class:`StartMeetsTarget` when theta_0 already reaches the target.
    """
    from ..torch.training import PlateauRule

    d0, d_max = search.d0, search.d_max
    if d_max is None:
        raise ValueError("doubling_search needs SearchSettings.d_max (intrinsic_dimension computes it from the "
                         "sketch when it is None)")
    steps_per_eval, min_improvement, max_steps = training.steps_per_eval, training.min_improvement, training.max_steps
    state = state or SearchState(d=d0)
    if state.theta0 is None and state.step == 0:
        state.theta0 = state.last = state.best = float(evaluate())
        if progress:
            log.info("  theta_0: metric=%.4f (target %.4f)", state.theta0, target_metric)
        if state.theta0 >= target_metric:
            raise StartMeetsTarget(
                f"the starting weights theta_0 already reach the target (metric {state.theta0:.4f} >= "
                f"{target_metric:.4f}): the search measures how many dimensions training *from* theta_0 needs. "
                "Start from weights below the target: a Workload's search_start (a factory of the model the "
                "search starts from, e.g. the pre-trained model before fine-tuning or a fresh head), or pass "
                "such a model to intrinsic_dimension")
    if control is not None and state.step == 0:
        control.keep_best()  # theta_0: the weights to fall back to
    while not state.done:
        train(state.d, steps_per_eval)
        state.step += steps_per_eval
        tau = float(evaluate())
        state.trajectory.append((state.d, state.step, tau))
        if progress:
            log.info("  d=%-7d step=%-7d metric=%.4f (target %.4f)", state.d, state.step, tau, target_metric)
        rule = PlateauRule(min_improvement, best=state.best, halvings=state.halvings)
        action = rule.update(tau)
        state.best, state.halvings = rule.best, rule.halvings
        if control is not None and rule.new_best:
            control.keep_best()
        if tau >= target_metric:
            state.done, state.d_star = True, state.d
        elif action == "halve" and control is not None:
            control.set_lr(training.lr / 2**state.halvings)
        elif action == "converged" or control is None and action == "halve":
            # converged at this d (without control: the plateau rule of the doubling alone)
            if state.d * 2 > d_max:
                state.last = tau
                if on_eval:
                    on_eval(state)
                raise SearchExhausted(f"target {target_metric:.4f} not reached up to d_max={d_max} "
                                      f"(best metric {max(t[2] for t in state.trajectory):.4f})")
            state.d *= 2
            state.halvings = 0
            if control is not None:
                control.back_to_best()
                control.set_lr(training.lr)
        state.last = tau
        if max_steps is not None and state.step >= max_steps and not state.done:
            raise SearchExhausted(f"target not reached within max_steps={max_steps}")
        if on_eval:
            on_eval(state)
    return state


def largest_d(method: str, n_params: int, d0: int, **sketch_options) -> int:
    """The largest D the doubling search can reach from ``d0`` that ``method`` admits for N = ``n_params``.

    That is d0 x 2^k for the largest k with d0 x 2^k <= the method's largest
    n_out (the padded input length for most methods).
    """
    limit = make_sketch(method, n_params, 1, seed=0, **sketch_options).max_n_out
    if d0 > limit:
        raise ValueError(f"d0={d0} exceeds the largest D the {method!r} sketch admits for this model "
                         f"(N={n_params}: at most {limit}); lower d0")
    d = d0
    while d * 2 <= limit:
        d *= 2
    return d


@moved_options(search=SearchSettings, training=TrainingSettings, model_settings=ModelSettings, execution=Execution)
def intrinsic_dimension(model, loss_fn, data, eval_fn: Callable, sketch_method: str = "affd", *,
                        search: SearchSettings | dict | None = None, training: TrainingSettings | dict | None = None,
                        store=None, model_settings: ModelSettings | dict | None = None,
                        execution: Execution | dict | None = None, **sketch_options) -> xr.Dataset:
    """D* of the doubling search for each seed, with trajectories (computes now).

    Parameters
    ----------
    model : nn.Module or factory
        Its current weights are theta_0; they must be below the target
        (else :class:`StartMeetsTarget`): a model before fine-tuning, not
        the fine-tuned one (a Workload's ``search_start``).
    loss_fn, data : as for ``sketch_gradients``
    eval_fn : callable
        ``eval_fn(model) -> metric`` (higher is better), called on the
        reparametrised model.
    sketch_method : str
        Any registry method (affd, qk, ffd, dense, ...) with ``sketch_options``.
    search : SearchSettings or dict, optional
        ``target`` (0.9 for D_int90), ``reference`` (the metric of full
        fine-tuning; computed with ``reference_lr`` when not given), ``d0``,
        ``d_max`` (default: the largest D the sketch admits for the model,
        :func:`largest_d`; a larger one is refused before any training),
        ``seeds`` (one projection and minibatch order each), ``check``
        (check runs: a fresh omega trained to convergence at D*/2, refining
        D* to D*/2 while such a run reaches the target).
    training : TrainingSettings or dict, optional
        ``lr``, ``batch_size``, ``steps_per_eval``, ``min_improvement``,
        ``max_steps`` (the paper: delta = 0.1 on accuracy, c = 2000 steps, Adam lr
        1e-4 on a language model; the defaults suit small models).
    store : path, URL or Location, optional
        A folder (or an object-storage prefix; ``Location(url,
        storage_options)`` to give fsspec's options) where the search state is saved after every evaluation (and the
        computed reference once); a rerun resumes each seed where it
        stopped.  Resuming with other settings raises ``ValueError``.
    model_settings : ModelSettings or dict, optional
        ``params`` (which parameters make up N) and ``forward``.
    execution : Execution or dict, optional
        ``device`` and ``progress``.

    Returns
    -------
    xarray.Dataset with, per seed, ``d_star`` (refined by the check runs),
    ``d_star_raw`` (where the doubling search stopped), ``d_star_metric`` (the
    metric reached at d_star), ``final_metric`` (the search's last metric),
    ``check_metric`` (the check run at d_star/2) and ``confirmed`` (that run
    fell short of the target: d_star is within a factor of 2 of the
    intrinsic dimension), and the trajectory ``d``, ``step``, ``metric``
    (seed, eval); attrs hold the reference, the metric at theta_0, the
    target metric and the settings.

    Raises
    ------
    StartMeetsTarget
        When theta_0 already reaches the target.
    ValueError
        When ``d0`` or ``d_max`` exceed what the sketch admits (before any training).
    """
    search = coerce(search, SearchSettings, "search")
    training = coerce(training, TrainingSettings, "training")
    settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    device, progress = execution.device, execution.progress
    base = as_module(model)
    n_params = select_params(base, settings.params).n
    admissible = largest_d(sketch_method, n_params, search.d0, **sketch_options)
    if search.d_max is None:
        search = replace(search, d_max=admissible)
        if progress:
            log.info("d_max = %d: the largest D %s admits for N = %d from d0 = %d", admissible, sketch_method,
                     n_params, search.d0)
    elif search.d_max > admissible:
        raise ValueError(f"d_max={search.d_max} exceeds the largest D the {sketch_method!r} sketch admits for this "
                         f"model (N={n_params}: at most {admissible} from d0={search.d0}); lower d_max (--d-max), or "
                         "leave it out for that largest value")
    # theta_0 first: a search from weights already at the target measures nothing
    theta0 = start_metric(base, eval_fn, device)
    reference = search.reference
    store = None if store is None else locate(check_folder(place(store), "store"))
    ref_file = None if store is None else store.child("reference.json")
    if reference is None and ref_file is not None and ref_file.exists():
        reference = json.loads(ref_file.read_bytes())["reference"]
    if reference is None:
        reference = full_finetune_metric(base, loss_fn, data, eval_fn, training=replace(training, lr=search.reference_lr),
                                         forward=settings.forward, device=device, progress=progress)
        if progress:
            log.info("reference (full fine-tuning) metric: %.4f", reference)
        if ref_file is not None:
            _put(ref_file, json.dumps({"reference": reference}).encode())
    goal = search.target * reference
    if theta0 >= goal:
        raise StartMeetsTarget(
            f"the starting weights theta_0 already reach the target (metric {theta0:.4f} >= {search.target} x "
            f"reference {reference:.4f} = {goal:.4f}): the search measures how many dimensions training *from* "
            "theta_0 needs. Start from weights below the target: a Workload's search_start (a factory of the model "
            "the search starts from, e.g. the pre-trained model before fine-tuning, or a fresh head), or pass such "
            "a model to intrinsic_dimension")
    rows = []
    for seed in search.seeds:
        op = make_sketch(sketch_method, n_params, search.d_max, seed=seed, **sketch_options)
        trainer = SubspaceTrainer(base, op, data, loss_fn, training=training, seed=seed, model_settings=settings,
                                  device=device)
        rows.append(_search_one(trainer, eval_fn, goal, search, sketch_options, store, progress))
    return _result(rows, reference, theta0, goal, sketch_method, n_params, search, training)


def _search_one(trainer: SubspaceTrainer, eval_fn, goal: float, search: SearchSettings, sketch_options: dict, store,
                progress: bool):
    """One seed's doubling search (resumed from ``store`` when saved there), then its check runs."""
    method, seed, training = trainer.op.spec["method"], trainer.seed, trainer.training
    folder = None if store is None else store.child(f"{method}-seed{seed}")
    settings = {"method": method, "options": sketch_options, "n_params": trainer.op.n_in, "d0": search.d0,
                "d_max": search.d_max, "steps_per_eval": training.steps_per_eval,
                "min_improvement": training.min_improvement, "lr": training.lr, "batch_size": training.batch_size,
                "target_metric": goal, "rule": SEARCH_RULE}
    loaded = _load(folder, trainer, settings)
    state = loaded or SearchState(d=search.d0)
    if progress:
        log.info("%s seed %s: N=%d, D_max=%d%s", method, seed, trainer.op.n_in, search.d_max,
                 f" (resuming at d={state.d}, step {state.step})" if loaded else "")
    error = None
    if not state.done:
        try:
            doubling_search(lambda d, n: trainer.train(d, state.step, n), lambda: trainer.evaluate(eval_fn),
                            target_metric=goal, search=search, training=training, state=state, progress=progress,
                            on_eval=lambda st: _save(folder, st, trainer, settings), control=trainer)
        except SearchExhausted as exc:
            error = str(exc)
    refined, check_metric = state.d_star, np.nan
    at_refined = state.trajectory[-1][2] if state.trajectory else np.nan  # the metric that reached the target
    while search.check and refined is not None and refined > 1:
        check_metric = trainer.check_run(refined // 2, eval_fn, progress)
        if progress:
            log.info("  check run at d=%d: metric=%.4f (target %.4f)%s", refined // 2, check_metric, goal,
                     " -> D* refined" if check_metric >= goal else " -> D* confirmed")
        if check_metric < goal:
            break
        refined, at_refined = refined // 2, check_metric
    return seed, state, refined, (check_metric, at_refined), error


#: 2 (sketcharray 0.5): every D trained to the check runs' convergence rule; a search saved by another rule is
#: refused on resume (its settings differ)
SEARCH_RULE = 2


def _put(loc, data: bytes) -> None:
    """Write one file whole: beside it and renamed into place on a disk, one PUT (atomic per object) on object
    storage."""
    if not loc.is_local:
        loc.write_bytes(data)
        return
    loc.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = loc.path.with_name(loc.path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(loc.path)


def _save(folder, state: SearchState, trainer: SubspaceTrainer, settings: dict) -> None:
    """The search's state after an evaluation, as one object written whole: ``weights.npz`` holds the weights
    and the state beside them (arrays only: nothing in it can run code when read), so a kill at any point leaves
    the previous evaluation's weights and state or this one's, never a mix; ``state.json`` repeats the state for
    people and ``sketcharray info``."""
    if folder is None:
        return
    arrays, groups = trainer.arrays()
    payload = {"d": state.d, "step": state.step, "last": state.last, "trajectory": state.trajectory,
               "done": state.done, "d_star": state.d_star, "theta0": state.theta0, "best": state.best,
               "halvings": state.halvings, "settings": settings, "optimizer": groups}
    text = json.dumps(payload).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_STATE_KEY: np.frombuffer(text, dtype=np.uint8)})
    _put(folder.child("weights.npz"), buffer.getvalue())
    _put(folder.child("state.json"), text)


#: the entry of ``weights.npz`` that holds the search state (JSON bytes) written with those weights
_STATE_KEY = "__search_state__"


def _load(folder, trainer: SubspaceTrainer, settings: dict) -> SearchState | None:
    if folder is None:
        return None
    has_state, has_weights = folder.child("state.json").exists(), folder.child("weights.npz").exists()
    if not has_state and not has_weights:
        return None
    payload = json.loads(folder.child("state.json").read_bytes()) if has_state else {}
    legacy = f"the search saved in {folder} has no weights.npz (a folder from sketcharray < 0.3 keeps a pickle, " \
             "weights.pt, which is never loaded: it could run code); remove the folder to start the search over"
    if not has_weights:
        raise ValueError(legacy)
    with np.load(io.BytesIO(folder.child("weights.npz").read_bytes()), allow_pickle=False) as weights:
        arrays = {k: weights[k] for k in weights.files if k != _STATE_KEY}
        if _STATE_KEY in weights.files:  # the state written with these weights (sketcharray >= 0.6.1)
            payload = json.loads(weights[_STATE_KEY].tobytes())
    if "optimizer" not in payload:
        raise ValueError(legacy)
    saved = payload.pop("settings", None)
    if saved != json.loads(json.dumps(settings)):
        raise ValueError(f"the search saved in {folder} ran with settings {saved}, but this run has {settings}; "
                         "use a new store folder, or the same settings to resume")
    groups = payload.pop("optimizer")
    trainer.restore(arrays, groups)
    payload["trajectory"] = [tuple(t) for t in payload["trajectory"]]
    return SearchState(**payload)


def _result(rows, reference, theta0, goal, method, n_params, search: SearchSettings,
            training: TrainingSettings) -> xr.Dataset:
    n_eval = max(len(s.trajectory) for _, s, _, _, _ in rows)
    traj = np.full((len(rows), n_eval, 3), np.nan)
    for i, (_, s, _, _, _) in enumerate(rows):
        if s.trajectory:
            traj[i, : len(s.trajectory)] = np.array(s.trajectory, dtype=float)
    check = np.array([c for _, _, _, (c, _), _ in rows], dtype=float)
    return xr.Dataset(
        {
            "d_star": ("seed", np.array([np.nan if r is None else r for _, _, r, _, _ in rows], dtype=float)),
            "d_star_raw": ("seed", np.array([np.nan if s.d_star is None else s.d_star for _, s, _, _, _ in rows],
                                            dtype=float)),
            "d_star_metric": ("seed", np.array([m for _, _, _, (_, m), _ in rows], dtype=float)),
            "final_metric": ("seed", np.array([s.trajectory[-1][2] if s.trajectory else np.nan
                                               for _, s, _, _, _ in rows])),
            "check_metric": ("seed", check),
            "confirmed": ("seed", np.isfinite(check) & (check < goal)),
            "d": (("seed", "eval"), traj[:, :, 0]),
            "step": (("seed", "eval"), traj[:, :, 1]),
            "metric": (("seed", "eval"), traj[:, :, 2]),
        },
        coords={"seed": [seed for seed, _, _, _, _ in rows], "eval": np.arange(n_eval)},
        attrs={"reference": reference, "theta0_metric": theta0, "target_metric": goal, "method": method,
               "n_params": n_params, "d_max": search.d_max, "steps_per_eval": training.steps_per_eval,
               "min_improvement": training.min_improvement, "lr": training.lr,
               "errors": json.dumps({str(seed): err for seed, _, _, _, err in rows if err})},
    )


#: the grid's default training: shorter runs than the search's (max_steps 20 000)
GRID_TRAINING = TrainingSettings(max_steps=20_000)


@moved_options(training=TrainingSettings, model_settings=ModelSettings, execution=Execution)
def intrinsic_dimension_grid(model, loss_fn, data, eval_fn, sketch_method: str = "affd", *, dims,
                             training: TrainingSettings | dict | None = None, seed: int = 0,
                             model_settings: ModelSettings | dict | None = None,
                             execution: Execution | dict | None = None, **sketch_options) -> xr.Dataset:
    """The classic method: train a fresh omega at each D of ``dims`` to completion; metric per D.

    ``training`` defaults to :data:`GRID_TRAINING`; ``model_settings`` (``params``, ``forward``) and
    ``execution`` (``device``) as for :func:`intrinsic_dimension`.
    """
    training = GRID_TRAINING if training is None else coerce(training, TrainingSettings, "training")
    settings = coerce(model_settings, ModelSettings, "model_settings")
    execution = coerce(execution, Execution, "execution")
    base = as_module(model)
    n_params = select_params(base, settings.params).n
    metrics = []
    for d in dims:
        op = make_sketch(sketch_method, n_params, int(d), seed=seed, **sketch_options)
        trainer = SubspaceTrainer(base, op, data, loss_fn, training=training, seed=seed, model_settings=settings,
                                  device=execution.device)
        metrics.append(trainer.check_run(int(d), eval_fn))
    return xr.Dataset({"metric": ("d", np.array(metrics))}, coords={"d": np.asarray(dims)},
                      attrs={"method": sketch_method, "n_params": n_params})


def plot_intrinsic(results: dict[str, xr.Dataset], path, *, reference: float | None = None, target: float = 0.9,
                   metric_name: str = "metric") -> None:
    """``metric_name`` against D (log scale) per method, with the target line (``target`` x the reference:
    the metric of training all parameters, from theta_0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, ds in results.items():
        if "eval" in ds.dims:  # a search: plot each seed's trajectory
            for s in ds.seed.values:
                t = ds.sel(seed=s).dropna("eval")
                ax.plot(t.d.values, t.metric.values, marker=".", alpha=0.8, label=f"{name} seed {s}")
        else:
            ax.plot(ds.d.values, ds.metric.values, marker="o", label=name)
    if reference is not None:
        ax.axhline(target * reference, color="grey", ls="--", lw=0.8,
                   label=f"target: {100 * target:g}% of training all parameters ({reference:.3g})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("subspace dimension D")
    ax.set_ylabel(metric_name)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
