"""Intrinsic-dimension reproduction (issue: intrinsic dimension): the paper's Table 10 and FFD vs AFFD/QK.

Runs the doubling search (docs/intrinsic.md) for three seeds with AFFD, and once each with
FFD and QK, on an embedded workload: ``digits`` trains the MLP from a fresh
initialisation (metric: test accuracy); ``minilm`` fine-tunes the pre-trained
encoder's topic head task from the packaged weights (metric: test accuracy).
Prints D* per seed and per method with the final and check-run metrics, and
saves a plot of metric against D with the 90% line.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace

import numpy as np

import torch

from ...analysis.intrinsic import intrinsic_dimension, largest_d, plot_intrinsic
from ...sketches import make_sketch
from ...core.settings import Execution, ModelSettings
from ...workloads import load_workload
from ._util import format_table, write_json


class LinearModel(torch.nn.Module):
    """theta -> x theta: linear regression, the model of the least-squares toys."""

    def __init__(self, n: int):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return x @ self.theta


def square_loss(out, batch):
    return (out - batch[1]) ** 2


def unaligned_toy(n_params: int = 4096, n: int = 2048, k: int = 8, method: str = "affd", seed: int = 0,
                  d0: int = 16):
    """Linear regression whose solution lies in a random k-dimensional subspace of parameter space, which no
    subspace of the search aligns with: (model at theta_0 = 0, data, R^2 metric, {d: least-squares R^2}).

    Least squares inside the search's own nested subspaces (the first d rows of its Phi) is the reference this
    package did not write: the best any training at dimension d can reach; it reaches 1 at d = n (the system
    becomes square), well before k is found.
    """
    d_max = largest_d(method, n_params, d0)
    op = make_sketch(method, n_params, d_max, seed=seed)
    rng = np.random.default_rng(7)
    basis = np.linalg.qr(rng.standard_normal((n_params, k)))[0]
    theta_star = basis @ rng.standard_normal(k) * np.sqrt(n_params / k)
    x = rng.standard_normal((n, n_params)) / np.sqrt(n_params)
    y = x @ theta_star
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def r2(model):
        return float(1 - ((model(xt) - yt) ** 2).sum() / ((yt - yt.mean()) ** 2).sum())

    least_squares, d = {}, d0
    while d <= d_max:
        a = x @ np.asarray(op.adjoint(np.eye(d, d_max))).T  # the data in the first d coordinates of omega
        coef = np.linalg.lstsq(a, y, rcond=None)[0]
        least_squares[d] = float(1 - np.sum((a @ coef - y) ** 2) / np.sum((y - y.mean()) ** 2))
        d *= 2
    return LinearModel(n_params), torch.utils.data.TensorDataset(xt, yt), r2, least_squares


def best_per_d(res, seed: int = 0) -> dict[int, float]:
    """The best metric the search reached at each d (its trajectory), for one seed."""
    best: dict[int, float] = {}
    for d, m in zip(res.d.sel(seed=seed).values, res.metric.sel(seed=seed).values):
        if np.isfinite(d):
            best[int(d)] = max(best.get(int(d), -np.inf), float(m))
    return best


def run_toy(args) -> dict:
    """The unaligned toy with default settings, its best metric at each d next to least squares."""
    model, data, r2, ls = unaligned_toy(args.toy_params, args.toy_examples)
    t0 = time.perf_counter()
    res = intrinsic_dimension(model, square_loss, data, r2, "affd", search={"seeds": (0,), "d0": 16},
                              execution={"progress": False})
    best = best_per_d(res)
    rows = [{"d": d, "ls": f"{ls[d]:.3f}", "search": f"{best[d]:.3f}" if d in best else "-",
             "gap": f"{ls[d] - best[d]:+.3f}" if d in best else "-"} for d in sorted(ls) if d <= max(best)]
    print(f"\nunaligned least-squares toy (N={args.toy_params}, n={args.toy_examples}, solution in a random "
          f"8-dimensional subspace), AFFD, default settings:")
    print(format_table(rows, [("d", "D"), ("ls", "least squares R^2"), ("search", "search's best R^2"),
                              ("gap", "least squares - search")]))
    print(f"D* {res.d_star.item():.0f} (least squares reaches the target {res.attrs['target_metric']:.3f} at D = "
          f"{min((d for d, v in ls.items() if v >= res.attrs['target_metric']), default=float('nan'))}); "
          f"{time.perf_counter() - t0:.0f} s")
    return {"least_squares": ls, "search_best": best, "d_star": float(res.d_star.item())}


def setup(workload: str):
    w = load_workload(workload)
    return w, w.search_model()


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_intrinsic", description=__doc__)
    p.add_argument("--workload", default="digits", help="digits (default), minilm or module:factory")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--params", nargs="+", metavar="GLOB", default=None,
                   help="parameters the subspace spans (default: all)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["ffd", "qk"],
                   help="methods compared with AFFD on seed 0")
    p.add_argument("--d-max", type=int, default=None, help="largest D (default: the workload's)")
    p.add_argument("--steps-per-eval", type=int, default=None, help="steps between evaluations")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate for omega (default: the workload's)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the check runs at D*/2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--toy-params", type=int, default=4096, help="N of the unaligned least-squares toy")
    p.add_argument("--toy-examples", type=int, default=2048, help="examples of the unaligned least-squares toy")
    p.add_argument("--toy-only", action="store_true", help="only the unaligned least-squares toy")
    p.add_argument("--json", default="bench-out/bench-intrinsic.json")
    p.add_argument("--plot", default="bench-out/bench-intrinsic.png")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    toy = run_toy(args)
    if args.toy_only:
        write_json(args.json, {"benchmark": "intrinsic", "unaligned_toy": toy})
        print(f"wrote {args.json}")
        return 0
    w, base = setup(args.workload)
    metric = w.accuracy
    search, training = w.intrinsic_settings(d_max=args.d_max, steps_per_eval=args.steps_per_eval, lr=args.lr,
                                            check=args.check, seeds=tuple(range(args.seeds)))
    common = dict(training=training, model_settings=ModelSettings(params=args.params, forward=w.forward),
                  execution=Execution(device=args.device))
    t0 = time.perf_counter()
    runs = {"affd": intrinsic_dimension(base, w.loss_fn, w.train, metric, "affd", search=search, **common)}
    reference = runs["affd"].attrs["reference"]
    # the other methods on seed 0, against the same reference
    others = replace(search, seeds=(0,), reference=reference)
    for method in args.methods:
        runs[method] = intrinsic_dimension(base, w.loss_fn, w.train, metric, method, search=others, **common)
    elapsed = time.perf_counter() - t0

    def fmt(v):
        return "-" if not np.isfinite(v) else (str(int(v)) if float(v).is_integer() else f"{v:.3f}")

    target = runs["affd"].attrs["target_metric"]
    print(f"\nTable 10 analogue ({args.workload}, N={runs['affd'].attrs['n_params']:,}): reference (full "
          f"fine-tuning) {reference:.4f}, target {target:.4f}")
    rows = [{"seed": int(s), "d": fmt(float(runs["affd"].d_star.sel(seed=s))),
             "final": fmt(float(runs["affd"].d_star_metric.sel(seed=s))),
             "check": fmt(float(runs["affd"].check_metric.sel(seed=s)))} for s in runs["affd"].seed.values]
    print(format_table(rows, [("seed", "AFFD seed"), ("d", "D*"), ("final", "metric at D*"),
                              ("check", "metric at D*/2")]))
    print("\nFFD vs AFFD vs QK (seed 0):")
    rows = [{"m": m, "d": fmt(float(ds.d_star.sel(seed=0))), "final": fmt(float(ds.d_star_metric.sel(seed=0))),
             "check": fmt(float(ds.check_metric.sel(seed=0))), "steps": fmt(float(ds.step.sel(seed=0).max()))}
            for m, ds in runs.items()]
    print(format_table(rows, [("m", "method"), ("d", "D*"), ("final", "metric at D*"), ("check", "metric at D*/2"),
                              ("steps", "steps")]))
    d_stars = runs["affd"].d_star.values
    spread = float(np.nanmax(d_stars) / np.nanmin(d_stars)) if np.isfinite(d_stars).any() else float("nan")
    print(f"\nAFFD D* across seeds within a factor {spread:.0f} ({elapsed:.0f} s in all)")
    plot_intrinsic(runs, args.plot, reference=reference, metric_name="test accuracy")
    write_json(args.json, {"benchmark": "intrinsic", "workload": args.workload, "reference": reference,
                           "runs": {m: ds.to_dict() for m, ds in runs.items()}, "seconds": elapsed,
                           "unaligned_toy": toy})
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
