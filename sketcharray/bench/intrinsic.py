"""Intrinsic-dimension reproduction (issue: intrinsic dimension): the paper's Table 10 and FFD vs AFFD/QK.

Runs the doubling search (SPEC) for three seeds with AFFD, and once each with
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

from ..analysis.intrinsic import intrinsic_dimension, plot_intrinsic
from ..settings import Execution, ModelSettings
from ..workloads import load_workload
from ._util import format_table, write_json


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
    p.add_argument("--json", default="bench-out/bench-intrinsic.json")
    p.add_argument("--plot", default="bench-out/bench-intrinsic.png")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
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
                           "runs": {m: ds.to_dict() for m, ds in runs.items()}, "seconds": elapsed})
    print(f"wrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
