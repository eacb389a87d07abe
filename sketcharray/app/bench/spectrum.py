"""Hessian-spectrum reproduction and performance (issue: spectrum).

* Table 7 analogue: relative error of the top-10 eigenvalues of K = Phi H Phi^T
  against those of the exact Hessian H of an embedded model, per method and
  log2 D, and the smallest log2 D with error < 0.2, 0.1, 0.05 (median over
  seeds; error = max over the 10 of |lambda_i(K) - lambda_i(H)| / |lambda_i(H)|).
* Table 1 analogue: the same error for one layer's diagonal block of H.
* Figure 2 analogue: RNEG, R_n and outliers at checkpoints along training.
* Performance: HVPs per second and the time of a Lanczos and a randomized
  solve, split between HVPs and everything else.
* ``--scheduler local-cluster``: one Lanczos solve whose products are dask
  reductions over data shards, on a LocalCluster of 1 and of 2
  single-threaded worker processes (HVP/s and the speed-up); and the
  single-pass eigensolver from a stored pass ``Y = K Omega`` against
  Lanczos on the same K (time and agreement).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ...analysis.eigen import format_outliers, hessian_spectrum, lanczos, plot_spectrum_evolution, spectrum_statistics
from ...collect import DataSource
from ...sketches import make_sketch
from ...torch import HVP, SubspaceHessian, select_params
from ...workloads import WORKLOADS, digits_checkpoints
from ._util import format_table, write_json
from .tda import layer_groups, smallest_log2d

THRESHOLDS = (0.2, 0.1, 0.05)
METHODS = ("dense", "fjl", "ffd", "affd", "afjl", "qk")


def exact_hessian(w, n_examples: int, batch: int) -> tuple[np.ndarray, object, list]:
    model = w.model().double()
    ps = select_params(model)
    src = DataSource.from_data(torch.utils.data.Subset(w.train, range(n_examples)), batch)
    batches = [tuple(t.double() if t.is_floating_point() else t for t in src.load(i, a, b))
               for i, (a, b) in enumerate(src.bounds)]
    hvp = HVP(model, w.loss_fn, batches, ps)
    eye = torch.eye(ps.n, dtype=torch.float64)
    h = torch.cat([hvp(eye[s : s + 256]) for s in range(0, ps.n, 256)]).numpy()
    return (h + h.T) / 2, ps, batches


def top10_error(vals: np.ndarray, ref: np.ndarray) -> float:
    k = min(10, len(vals))
    return float(np.max(np.abs(vals[:k] - ref[:k]) / np.abs(ref[:k])))


def table7(h, ps, log2ds, seeds):
    ref = np.linalg.eigvalsh(h)[::-1]
    errors = {}
    for method in METHODS:
        errors[method] = {}
        for ld in log2ds:
            errs = []
            for seed in range(seeds):
                try:
                    op = make_sketch(method, ps.n, 1 << ld, seed=seed)
                except ValueError:
                    break
                phi = op.apply(np.eye(ps.n)).T
                errs.append(top10_error(np.linalg.eigvalsh(phi @ h @ phi.T)[::-1], ref))
            if errs:
                errors[method][ld] = float(np.median(errs))
        print("  " + method + ": " + " ".join(f"2^{ld}:{e:.3f}" for ld, e in errors[method].items()), flush=True)
    layers = {}
    for name, slices in layer_groups(ps).items():
        idx = np.concatenate([np.arange(s.start, s.stop) for s in slices])
        block = np.linalg.eigvalsh(h[np.ix_(idx, idx)])[::-1]
        layers[name] = {"n_params": int(idx.size), "top10_error": top10_error(block, ref)}
    return errors, layers, ref[:10]


def sketch_bias(h, ps, methods, log2ds, seeds: int) -> list[dict]:
    """How far K's ends are from H's, with error bars: per method and D, mean and spread over ``seeds`` sketches
    of the top-10 relative error, lambda_min(K) / lambda_min(H) and RNEG(K) / RNEG(H) (K exact: dense Phi H Phi^T)."""
    ref = np.linalg.eigvalsh(h)
    rneg_h = abs(ref[0]) / ref[-1]
    rows = []
    for method in methods:
        for ld in log2ds:
            errs, lmin, rneg = [], [], []
            for seed in range(seeds):
                phi = make_sketch(method, ps.n, 1 << ld, seed=seed).apply(np.eye(ps.n)).T
                vals = np.linalg.eigvalsh(phi @ h @ phi.T)
                errs.append(top10_error(vals[::-1], ref[::-1]))
                lmin.append(vals[0] / ref[0])
                rneg.append(abs(vals[0]) / vals[-1] / rneg_h)
            rows.append({"method": method, "log2d": ld, "top10_error": (np.mean(errs), np.std(errs, ddof=1)),
                         "lambda_min_ratio": (np.mean(lmin), np.std(lmin, ddof=1)),
                         "rneg_ratio": (np.mean(rneg), np.std(rneg, ddof=1)),
                         "lambda_min_more_negative": f"{sum(v > 1 for v in lmin)}/{seeds}"})
    return rows


def bias_table(rows: list[dict]) -> str:
    def pm(v):
        return f"{v[0]:.3f} ± {v[1]:.3f}"

    return format_table([{"m": r["method"], "d": f"2^{r['log2d']}", "e": pm(r["top10_error"]),
                          "l": pm(r["lambda_min_ratio"]), "n": r["lambda_min_more_negative"],
                          "r": pm(r["rneg_ratio"])} for r in rows],
                        [("m", "method"), ("d", "D"), ("e", "top-10 rel. error"),
                         ("l", "λ_min(K)/λ_min(H)"), ("n", "λ_min(K) < λ_min(H)"), ("r", "RNEG(K)/RNEG(H)")])


def threshold_table(errors: dict[str, dict[int, float]]) -> str:
    """Per method, the smallest log2 D whose error falls below each threshold ('-' when none does)."""
    def smallest(errs, t):
        ld = smallest_log2d({d: -e for d, e in errs.items()}, -t)  # smallest_log2d finds values above a threshold
        return "-" if ld is None else str(ld)

    rows = [{"method": m, **{str(t): smallest(errs, t) for t in THRESHOLDS}} for m, errs in errors.items()]
    return format_table(rows, [("method", "method")] + [(str(t), f"error < {t}") for t in THRESHOLDS])


def pretrained_table7(workload: str, methods, log2ds, *, k: int = 10, n_examples: int = 16, ref_iters: int = 80,
                      iters: int = 40, device: str = "cpu") -> dict:
    """Table 7 on a model too large for an exact Hessian: top-k eigenvalues of K against a long Lanczos run
    on H itself (every parameter, no sketch; float32 Krylov basis), all sharing one HVP operator."""
    w = WORKLOADS[workload]()
    model = w.model().to(device)
    ps = select_params(model)
    src = DataSource.from_data(w.split("train", n_examples)[0], 8)
    hvp = HVP(model, w.loss_fn, [src.load(i, a, b) for i, (a, b) in enumerate(src.bounds)], ps, forward=w.forward,
              device=torch.device(device))
    print(f"reference: Lanczos on the full Hessian of {workload} (N={ps.n:,}, {n_examples} examples), "
          f"up to {ref_iters} HVPs ...", flush=True)

    def h_matvec(v):
        return hvp(torch.as_tensor(v, dtype=torch.float32, device=device)).cpu().numpy()

    t0 = time.perf_counter()
    ref = lanczos(h_matvec, ps.n, k, solver={"which": "top", "max_iter": ref_iters, "tol": 1e-3,
                                             "basis_dtype": "float32"})
    ref_vals, ref_res = ref["positive"][0], ref["positive"][2]
    out = {"workload": workload, "n_params": ps.n, "examples": n_examples, "k": k,
           "reference": ref_vals.tolist(), "reference_residuals": ref_res.tolist(),
           "reference_hvps": int(ref["iterations"]), "reference_seconds": time.perf_counter() - t0, "errors": {}}
    print(f"  top-{k} of H: {np.round(ref_vals, 4).tolist()} (largest Ritz residual / lambda_1 "
          f"{ref_res.max() / ref_vals[0]:.1e})", flush=True)
    for method in methods:
        out["errors"][method] = {}
        for ld in log2ds:
            K = SubspaceHessian(hvp, make_sketch(method, ps.n, 1 << ld, seed=0))
            res = lanczos(K.matvec, 1 << ld, k, solver={"which": "top", "max_iter": iters, "tol": 1e-3},
                          progress=False)
            out["errors"][method][ld] = top10_error(res["positive"][0], ref_vals)
        print("  " + method + ": " + " ".join(f"2^{ld}:{e:.3f}" for ld, e in out["errors"][method].items()),
              flush=True)
    return out


def performance(workload: str, methods, n_out: int, k: int, n_examples: int, batch: int, device: str,
                max_iter: int | None = None, n_iter: int = 6) -> list[dict]:
    """Time one Lanczos and one randomized solve per sketch method; split HVPs from everything else."""
    w = WORKLOADS[workload]()
    data, _ = w.split("train", n_examples)
    rows = []
    for sketch in methods:
        for method in ("lanczos", "randomized"):
            limits = {"max_iter": max_iter or 4 * k + 20} if method == "lanczos" else {"n_iter": n_iter}
            ds = hessian_spectrum(w.model_factory, w.loss_fn, data, {"method": sketch, "n_out": n_out}, k=k,
                                  solver={"method": method, "tol": 1e-4, **limits}, batch_size=batch,
                                  model_settings={"forward": w.forward},
                                  execution={"device": device, "progress": False})
            a = ds.attrs
            rows.append({"workload": workload, "sketch": sketch, "solver": method, "D": n_out, "examples": len(data),
                         "hvps": a["hvps"], "seconds": a["seconds"], "setup_seconds": a["setup_seconds"],
                         "hvps_per_s": a["hvps"] / a["hvp_seconds"],
                         "other_fraction": a["other_seconds"] / a["seconds"], "hvp_mode": a["hvp_mode"],
                         "lambda_max": float(ds.eigenvalue.sel(sign="positive", rank=1)),
                         "lambda_min": float(ds.eigenvalue.sel(sign="negative", rank=1))})
            r = rows[-1]
            print(f"  {workload} {sketch} {method}: {r['hvps']} HVPs in {r['seconds']:.1f} s, "
                  f"{r['hvps_per_s']:.2f} HVP/s, other {100 * r['other_fraction']:.1f}% "
                  f"(sketch setup before the solve {r['setup_seconds']:.2f} s)", flush=True)
    return rows


def _local_cluster(workers: int):
    from distributed import Client

    from ...collect.cluster import local_cluster

    cluster = local_cluster(workers)
    return cluster, Client(cluster)


def cluster_scaling(workload: str, sketch: str, n_out: int, k: int, n_examples: int, batch: int, max_iter: int,
                    workers=(1, 2)) -> list[dict]:
    """One Lanczos solve (``max_iter`` products) with each product sharded over 1, then 2, worker processes."""
    w = WORKLOADS[workload]()
    data, _ = w.split("train", n_examples)
    rows = []
    for n in workers:
        cluster, client = _local_cluster(n)
        with cluster, client:
            ds = hessian_spectrum(w.model_factory, w.loss_fn, data, {"method": sketch, "n_out": n_out}, k=k,
                                  solver={"tol": 1e-12, "max_iter": max_iter}, batch_size=batch,
                                  model_settings={"forward": w.forward}, execution={"progress": False, "shards": n})
        a = ds.attrs
        rows.append({"workload": workload, "sketch": sketch, "D": n_out, "examples": len(data), "workers": n,
                     "hvps": a["hvps"], "solve_s": a["seconds"], "setup_s": a["setup_seconds"],
                     "hvps_per_s": a["hvps"] / a["seconds"],
                     "lambda_max": float(ds.eigenvalue.sel(sign="positive", rank=1))})
        print(f"  {workload} {sketch} D={n_out}: {n} worker(s), {a['hvps']} HVPs in {a['seconds']:.1f} s "
              f"({rows[-1]['hvps_per_s']:.2f} HVP/s; setup {a['setup_seconds']:.1f} s)", flush=True)
    for r in rows:
        r["speedup"] = r["hvps_per_s"] / rows[0]["hvps_per_s"]
    return rows


def single_pass_against_lanczos(workload: str, sketch: str, n_out: int, k: int, n_examples: int, batch: int,
                                workers: int, folder) -> dict:
    """``Y = K Omega`` for D test vectors stored in one pass (parallel tasks), the single-pass eigenvalues from
    the store, and Lanczos on the same K (products sharded): times and the largest difference over both ends."""
    from ...analysis.eigen import single_pass_spectrum
    from ...collect import sketch_hvps
    from ...storage.store import open_sketches

    w = WORKLOADS[workload]()
    data, _ = w.split("train", n_examples)
    spec = {"method": sketch, "n_out": n_out}
    cluster, client = _local_cluster(workers)
    with cluster, client:
        t0 = time.perf_counter()
        path = Path(folder) / f"{workload}-y.zarr"
        shutil.rmtree(path, ignore_errors=True)
        # the resumable store: a block of probes per task, checksummed, Omega regenerated from its seed
        sketch_hvps(w.model_factory, w.loss_fn, data, spec, probes=n_out, space="sketch", batch_size=batch,
                    store=path, model_settings={"forward": w.forward},
                    execution={"probes_per_task": max(1, n_out // (4 * workers)), "progress": False})
        t_store = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = single_pass_spectrum(open_sketches(path), k=k, oversampling=0)
        t_single = time.perf_counter() - t0
        lz = hessian_spectrum(w.model_factory, w.loss_fn, data, spec, k=k, solver={"tol": 1e-6}, batch_size=batch,
                              model_settings={"forward": w.forward}, execution={"progress": False, "shards": workers})
    scale = float(np.abs(lz.eigenvalue).max())
    diff = float(np.abs(single.eigenvalue - lz.eigenvalue).max()) / scale
    row = {"workload": workload, "sketch": sketch, "D": n_out, "examples": len(data), "workers": workers,
           "probes": n_out, "store_s": t_store, "single_pass_s": t_single, "lanczos_s": float(lz.attrs["seconds"]),
           "lanczos_hvps": int(lz.attrs["hvps"]), "max_difference": diff}
    print(f"  {workload} {sketch} D={n_out}: one pass of {n_out} products stored in {t_store:.1f} s, single-pass "
          f"solve {t_single:.2f} s; Lanczos {row['lanczos_hvps']} products in {row['lanczos_s']:.1f} s; "
          f"largest difference {diff:.1e} of |lambda|max", flush=True)
    return row


def cluster_section(args) -> dict:
    import tempfile

    from ...workloads import minilm_available

    workload = args.cluster_workload or ("minilm" if minilm_available() else "digits")
    big = workload != "digits"
    print(f"\nProducts as dask reductions over data shards on a LocalCluster ({workload}):", flush=True)
    # batches of 8 on MiniLM: 10 of them, which two workers share evenly (16 would give shards of 2 and 3)
    scaling = cluster_scaling(workload, "afjl", 4096 if big else 1024, 10, 80 if big else 500, 8 if big else 250,
                              args.cluster_iters)
    print(format_table([{"w": r["workload"], "n": r["workers"], "h": r["hvps"], "t": f"{r['solve_s']:.1f}",
                         "r": f"{r['hvps_per_s']:.2f}", "x": f"{r['speedup']:.2f}x"} for r in scaling],
                       [("w", "workload"), ("n", "workers"), ("h", "HVPs"), ("t", "solve s"), ("r", "HVP/s"),
                        ("x", "speed-up")]))
    print("\nSingle pass from a stored Y = K Omega (D probes) against Lanczos on the same K:", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        passes = [single_pass_against_lanczos(wl, "affd", d, 5, n, b, 2, folder)
                  for wl, d, n, b in [("digits", 256, 500, 250)] + ([(workload, args.single_pass_d, 80, 16)] if big else [])]
    print(format_table([{"w": r["workload"], "D": r["D"], "s": f"{r['store_s']:.1f}", "p": f"{r['single_pass_s']:.2f}",
                         "l": f"{r['lanczos_s']:.1f}", "h": r["lanczos_hvps"], "d": f"{r['max_difference']:.1e}"}
                        for r in passes],
                       [("w", "workload"), ("D", "D = probes"), ("s", "store Y s"), ("p", "single pass s"),
                        ("l", "Lanczos s"), ("h", "Lanczos HVPs"), ("d", "max difference / |lambda|max")]))
    two = scaling[-1]
    targets = [f"target speed-up with 2 workers >= 1.6x: {two['speedup']:.2f}x "
               f"{'MET' if two['speedup'] >= 1.6 else 'MISSED'}"]
    print("\n" + "\n".join(targets))
    return {"cluster_scaling": scaling, "single_pass": passes, "cluster_targets": targets}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_spectrum", description=__doc__)
    p.add_argument("--n-examples", type=int, default=500, help="training examples the loss averages over")
    p.add_argument("--log2d", type=lambda s: [int(v) for v in s.split(",")], default=list(range(4, 13)))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--perf-workloads", type=lambda s: s.split(","), default=None,
                   help="workloads for the timing (default digits, and minilm when installed)")
    p.add_argument("--perf-methods", type=lambda s: s.split(","), default=["affd", "afjl", "qk"],
                   help="sketches for the timing")
    p.add_argument("--perf-only", action="store_true", help="skip the accuracy tables; only the timing")
    p.add_argument("--pretrained", default=None, metavar="WORKLOAD",
                   help="also the Table 7 analogue on a pre-trained workload (minilm) against a long Lanczos "
                        "run on its full Hessian (slow on a CPU: about 200 HVPs)")
    p.add_argument("--pretrained-log2d", type=lambda s: [int(v) for v in s.split(",")], default=[8, 10, 12])
    p.add_argument("--pretrained-methods", type=lambda s: s.split(","), default=["affd", "afjl", "qk"])
    p.add_argument("--skip-perf", action="store_true", help="skip the timing")
    p.add_argument("--minilm-iters", type=int, default=24,
                   help="Lanczos iterations (and 2 randomized block steps) for the MiniLM timing, whose HVPs "
                        "take seconds on a CPU; the share per product does not depend on the count")
    p.add_argument("--scheduler", default=None, choices=("local-cluster",),
                   help="also: Lanczos with its products sharded over a LocalCluster of 1 and 2 workers (speed-up), "
                        "and the single-pass solver from a stored pass against Lanczos")
    p.add_argument("--cluster-workload", default=None, help="workload of the cluster timing (default minilm if "
                                                             "installed, else digits)")
    p.add_argument("--cluster-iters", type=int, default=12, help="Lanczos products of the cluster timing")
    p.add_argument("--single-pass-d", type=int, default=32,
                   help="D (= stored products) of the single-pass comparison on the cluster workload")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-out/bench-spectrum.json")
    p.add_argument("--plot", default="bench-out/bench-spectrum.png")
    return p


def accuracy(args) -> dict:
    """Tables 7 and 1 and Figure 2 on the digits MLP, whose Hessian is computed exactly."""
    w = WORKLOADS["digits"]()
    print(f"exact Hessian of the digits MLP (N={w.info['n_params']}) over {args.n_examples} examples ...", flush=True)
    h, ps, _ = exact_hessian(w, args.n_examples, 250)
    errors, layers, ref = table7(h, ps, args.log2d, args.seeds)
    print("\nTable 7 analogue (digits, exact Hessian): smallest log2 D with top-10 eigenvalue relative error "
          f"below the threshold (median of {args.seeds} seeds; '-' = never up to 2^{max(args.log2d)})")
    print(threshold_table({m: errors[m] for m in METHODS}))
    print("\nTable 1 analogue (digits): top-10 eigenvalues of one layer's diagonal Hessian block vs all parameters")
    print(format_table([{"layer": k, "n": f"{v['n_params']:,}", "e": f"{v['top10_error']:.3f}"}
                        for k, v in layers.items()],
                       [("layer", "layer"), ("n", "parameters"), ("e", "top-10 relative error")]))
    bias = sketch_bias(h, ps, ("affd", "afjl", "qk"), [ld for ld in (8, 10, 11) if ld in args.log2d] or
                       args.log2d[-2:], max(args.seeds, 2))
    print(f"\nError bars (digits, exact Hessian): mean ± standard deviation over {max(args.seeds, 2)} sketches; "
          "a ratio above 1 means K's end lies beyond H's")
    print(bias_table(bias))
    print("\nFigure 2 analogue: spectrum along the digits training run (AFFD, D = 1024, Lanczos)", flush=True)
    ckpts = digits_checkpoints()
    data = torch.utils.data.Subset(w.train, range(args.n_examples))
    spec = hessian_spectrum(w.model_factory, w.loss_fn, data, {"method": "affd", "n_out": 1024}, k=10,
                            solver={"tol": 1e-6}, checkpoints=ckpts, batch_size=250, execution={"progress": False})
    stats = spectrum_statistics(spec)
    print(format_table([{"ckpt": str(c), "lmax": f"{float(stats.lambda_max.sel(checkpoint=c)):.4g}",
                         "lmin": f"{float(stats.lambda_min.sel(checkpoint=c)):.4g}",
                         "rneg": f"{float(stats.RNEG.sel(checkpoint=c)):.3f}",
                         "out": format_outliers(stats.sel(checkpoint=c))[0]} for c in stats.checkpoint.values],
                       [("ckpt", "checkpoint"), ("lmax", "lambda_max"), ("lmin", "lambda_min"), ("rneg", "RNEG"),
                        ("out", "outliers (R > 0.2)")]))
    plot_spectrum_evolution(stats, args.plot)
    return {"table7": errors, "layers": layers, "exact_top10": ref.tolist(), "bias": bias,
            "checkpoints": stats.to_dict()}


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    payload = {"benchmark": "spectrum"}
    if not args.perf_only:
        payload.update(accuracy(args))
    if args.pretrained:
        t7 = pretrained_table7(args.pretrained, args.pretrained_methods, args.pretrained_log2d, device=args.device)
        print(f"\nTable 7 analogue ({args.pretrained}, reference: Lanczos on the full Hessian): smallest log2 D "
              f"with top-10 relative error below the threshold ('-' = not up to 2^{max(args.pretrained_log2d)})")
        print(threshold_table(t7["errors"]))
        payload["pretrained_table7"] = t7
        write_json(args.json, payload)
    if args.scheduler == "local-cluster":
        payload.update(cluster_section(args))
        write_json(args.json, payload)
    if args.skip_perf:
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")
        return 0
    print(f"\nPerformance (k = 10; sketches {', '.join(args.perf_methods)}):", flush=True)
    perf_workloads = args.perf_workloads
    if perf_workloads is None:
        from ...workloads import minilm_available

        perf_workloads = ["digits"] + (["minilm"] if minilm_available() else [])
    perf = []
    for wl in perf_workloads:
        if wl == "digits":
            perf += performance(wl, args.perf_methods, 1024, 10, 500, 250, args.device)
        else:
            # H of the mean loss over the whole training set (80 sentences), as a user would take it
            perf += performance(wl, args.perf_methods, 4096, 10, 80, 16, args.device, max_iter=args.minilm_iters,
                                n_iter=2)
    print(format_table([{"w": r["workload"], "m": r["sketch"], "s": r["solver"], "D": r["D"], "h": r["hvps"],
                         "u": f"{r['setup_seconds']:.2f}", "t": f"{r['seconds']:.1f}", "r": f"{r['hvps_per_s']:.2f}",
                         "o": f"{100 * r['other_fraction']:.1f}%"} for r in perf],
                       [("w", "workload"), ("m", "sketch"), ("s", "solver"), ("D", "D"), ("h", "HVPs"),
                        ("u", "setup s"), ("t", "solve s"), ("r", "HVP/s"), ("o", "non-HVP share")]))
    targets = [f"target non-HVP share <= 10%: {r['workload']} {r['sketch']} {r['solver']} "
               f"{100 * r['other_fraction']:.1f}% {'MET' if r['other_fraction'] <= 0.1 else 'MISSED'}" for r in perf]
    print("\n" + "\n".join(targets))
    payload.update(performance=perf, targets=targets)
    write_json(args.json, payload)
    print(f"\nwrote {args.json}" + ("" if args.perf_only else f" and {args.plot}"))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
