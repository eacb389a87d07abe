"""The bodies of the ``sketcharray`` subcommands, each a thin call into the Python API.

Every function takes the parsed ``argparse.Namespace`` and returns an exit
code; argument parsing and the mapping of exceptions to exit codes live in
:mod:`sketcharray.app.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .report import markdown_table
from ..sketches.registry import describe_spec


def _workload(args):
    from ..workloads import load_workload

    return load_workload(args.workload)


def _say(args, *lines) -> None:
    if not args.quiet:
        print(*lines, sep="\n", flush=True)


def _at(args, target):
    """A path or URL argument as the library takes it: a local path as given, a URL as a Location carrying the
    ``--storage-option`` values (refused for a local path)."""
    from ..storage.location import is_url, locate, storage_options

    options = storage_options(getattr(args, "storage_option", None))
    if target is None or (not is_url(str(target)) and not options):
        return target
    return locate(str(target), options)


def _where(target) -> str:
    """A path resolved, a URL as it is (never its storage options)."""
    from ..storage.location import Location, is_url

    if isinstance(target, Location):
        return str(target.path.resolve()) if target.is_local else str(target)
    return str(target) if is_url(str(target)) else str(Path(target).resolve())


def demo(args) -> int:
    from .demo import run_demo

    overrides = {k: v for k, v in (("method", args.method), ("n_out", args.n_out), ("batch_size", args.batch_size),
                                   ("factor", args.factor))
                 if v is not None}
    run_demo(args.out, workload=args.workload, device=args.device, quick=args.quick, scheduler=args.scheduler,
             quiet=args.quiet, seed=args.seed, **overrides)
    return 0


def sketch(args) -> int:
    from ..collect.cluster import scheduler
    from ..collect import sketch_gradients, sketch_hvps
    from ..core.settings import Execution, ModelSettings

    w = _workload(args)
    data, ids = w.split(args.split, args.limit)
    from .demo import gradient_spec

    spec = gradient_spec(args.method, args.n_out, args.seed, args.factor)
    with scheduler(args.scheduler, quiet=args.quiet):
        if args.hvps:
            ds = sketch_hvps(w.model_factory, w.loss_fn, data, spec, probes=args.hvps, seed=args.seed,
                             space=args.hvp_space, batch_size=args.batch_size, store=_at(args, args.out),
                             model_settings=ModelSettings(params=args.params, forward=w.forward),
                             execution=Execution(device=args.device, progress=not args.quiet))
        else:
            from ..workloads import classification_margin

            ds = sketch_gradients(w.model_factory, classification_margin if args.margin else w.loss_fn, data, spec,
                                  batch_size=args.batch_size, ids=ids, store=_at(args, args.out),
                                  checkpoint=args.checkpoint,
                                  dtype=args.dtype,
                                  model_settings=ModelSettings(params=args.params, forward=w.forward, mode=args.mode),
                                  execution=Execution(device=args.device, progress=not args.quiet))
    _say(args, f"wrote {_where(args.out)}", str(ds))
    return 0


def attribute(args) -> int:
    from ..analysis import attribute as attribute_scores
    from ..storage.outputs import check_result_path, write_result
    from ..storage.store import open_sketches

    train, q = open_sketches(_at(args, args.train)), open_sketches(_at(args, args.queries))
    out = _at(args, args.out)
    if out:  # before any work: nothing the package did not write is replaced, nothing inside a store
        check_result_path(out, "attribution", overwrite=args.overwrite)
    if args.query:
        missing = [i for i in args.query if i not in set(map(str, q.example.values))]
        if missing:
            raise ValueError(f"query id(s) {missing} are not in {args.queries} "
                             f"(it holds {q.sizes['example']} examples, e.g. {list(map(str, q.example.values[:3]))})")
        q = q.sel(example=np.asarray(args.query, dtype=object))
    elif args.first is not None:
        if args.first < 1:
            raise ValueError(f"--first must be at least 1; got {args.first}")
        q = q.isel(example=slice(0, args.first))
    from ..collect import compute_with_progress

    res = attribute_scores(train, q, score=args.score, k=args.k, which=args.which, damping=args.damping,
                           allow_model_mismatch=args.allow_model_mismatch)
    (res,) = compute_with_progress([res], progress=not args.quiet,
                                   message=f"scoring {q.sizes['example']} queries against {train.sizes['example']} "
                                           f"training examples in {len(train.chunks['example'])} chunks")
    if out:
        write_result(res, out, "attribution", overwrite=args.overwrite)
    ranked, index = res.ranked.values, res["index"].values
    rows = [{"query": str(qid), "rank": int(r) + 1, "example": str(res.example.values[i, r]),
             "score": float(res.score.values[i, r])}
            for i, qid in enumerate(res["query"].values) for r in range(res.sizes["rank"]) if index[i, r] >= 0]
    rows += [{"query": str(qid), "rank": "-", "example": "no ranking: the query's sketch is zero or non-finite",
              "score": float("nan")} for qid in res["query"].values[~ranked]]
    if not args.quiet:
        if "model_mismatch_allowed" in res.attrs:
            print(f"note: model mismatch allowed: {res.attrs['model_mismatch_allowed']}")
        print(f"{args.which} {args.k} training examples by {args.score} score:")
        print(markdown_table(rows, [("query", "query"), ("rank", "rank"), ("example", "training example"),
                                    ("score", args.score)]))
        if args.out:
            print(f"wrote {_where(out)}")
    return 0


def _checkpoints(values: list[str] | None):
    if not values:
        return None
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).stem, v
        if not Path(path).exists():
            raise ValueError(f"--checkpoint {v!r}: no file {path!r} (expected NAME=PATH of a torch.save'd state_dict)")
        out[name] = path
    return out


def _plot_path(args):
    """``--plot``, checked before any work: a PNG path outside every store, new or written by this package."""
    if args.plot:
        from ..storage.outputs import PLOT_SOFTWARE, check_file

        check_file(args.plot, suffixes=(".png",), marker=PLOT_SOFTWARE.encode(), what="--plot")
    return args.plot


def spectrum(args) -> int:
    from ..analysis import hessian_spectrum, spectrum_statistics
    from ..analysis.eigen import format_outliers, plot_spectrum_evolution
    from ..core.settings import Execution, ModelSettings, SolverSettings

    _plot_path(args)
    if args.plot and args.which == "bottom":
        raise ValueError("--plot shows RNEG and R_n, which need the top end too: use --which both or top")
    out = _at(args, args.out)
    if out:
        from ..storage.outputs import check_folder

        check_folder(out)
    if args.from_hvps:
        ignored = [flag for flag, given in (("--seeds", args.seeds), ("--checkpoint", args.checkpoint),
                                            ("--workload-checkpoints", args.workload_checkpoints),
                                            ("--out", args.out), ("--plot", args.plot)) if given]
        if ignored:
            raise ValueError(f"--from-hvps computes one spectrum from the stored pass alone; {', '.join(ignored)} "
                             "would have no effect there: leave it out")
        return _spectrum_from_hvps(args)
    w = _workload(args)
    data, _ = w.split("train", args.examples)
    checkpoints = _checkpoints(args.checkpoint)
    if checkpoints is None and args.workload_checkpoints:
        if w.checkpoints is None:
            raise ValueError(f"workload {args.workload!r} has no checkpoints; pass --checkpoint NAME=PATH")
        checkpoints = w.checkpoints()
    from ..collect.cluster import scheduler

    import warnings

    from ..analysis.eigen import ConvergenceWarning

    with scheduler(args.scheduler, quiet=args.quiet) as client, warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the table marks the rows it concerns
        # on a cluster each product K W is a reduction over one shard of the data per worker thread
        shards = None if client is None else max(1, sum(client.nthreads().values()))
        res = hessian_spectrum(w.model_factory, w.loss_fn, data, {"method": args.method, "n_out": args.n_out,
                                                                  "seed": args.seed},
                               k=args.k, solver=SolverSettings(method=args.solver, which=args.which, **(
                                   {} if args.max_iter is None else
                                   {"max_iter" if args.solver == "lanczos" else "n_iter": args.max_iter})),
                               checkpoints=checkpoints, seeds=args.seeds, store=out, batch_size=args.batch_size,
                               model_settings=ModelSettings(params=args.params, forward=w.forward),
                               execution=Execution(device=args.device, progress=not args.quiet, shards=shards))
    stats = spectrum_statistics(res) if args.which != "bottom" else None
    if not args.quiet:
        seeded = "seed" in res.dims
        ev = res.eigenvalue_mean if seeded else res.eigenvalue
        ev = ev.expand_dims(checkpoint=["-"]) if "checkpoint" not in ev.dims else ev
        spread = (res.eigenvalue_spread.expand_dims(checkpoint=["-"]) if "checkpoint" not in res.dims
                  else res.eigenvalue_spread) if seeded else None
        conv = res.converged.all("seed") if seeded else res.converged
        conv = conv.expand_dims(checkpoint=["-"]) if "checkpoint" not in conv.dims else conv
        rows = [{"checkpoint": str(c), "sign": str(s), "rank": int(r),
                 "eigenvalue": float(ev.sel(checkpoint=c, sign=s, rank=r)),
                 **({"spread": float(spread.sel(checkpoint=c, sign=s, rank=r))} if seeded else {}),
                 "converged": "yes" if bool(conv.sel(checkpoint=c, sign=s, rank=r)) else "NO"}
                for c in ev.checkpoint.values for s in ev.sign.values for r in ev["rank"].values
                if np.isfinite(float(ev.sel(checkpoint=c, sign=s, rank=r)))]
        columns = [("checkpoint", "checkpoint"), ("sign", "end"), ("rank", "rank"),
                   ("eigenvalue", f"eigenvalue of K (mean of {res.sizes['seed']} sketches)" if seeded
                    else "eigenvalue of K")] + ([("spread", "spread (std over sketches)")] if seeded else []) + [
                   ("converged", "converged")]
        print(markdown_table(rows, columns))
        short = sorted({f"{s} end: {int(np.isfinite(ev.sel(sign=s)).sum('rank').min())} of {args.k}"
                        for s in ev.sign.values if not bool(np.isfinite(ev.sel(sign=s)).all())})
        complete = bool(res.all_converged.all())
        if short and complete:
            print(f"K has fewer eigenvalues of that sign than asked ({'; '.join(short)}): the "
                  "ends hold values of their own sign only")
        elif short:
            print(f"fewer eigenvalues of that sign found than asked ({'; '.join(short)}), but the solve did not "
                  "converge: K may have more")
        if not bool(conv.all()) or not complete:
            print("NOT CONVERGED: the rows marked NO stopped at the solver's budget (--max-iter) with a Ritz residual "
                  "above the tolerance; their values are approximate")
        if stats is not None and "RNEG" in stats:
            if "RNEG_mean" in stats:
                print(f"RNEG: {np.round(np.atleast_1d(stats.RNEG_mean.values), 4).tolist()} ± "
                      f"{np.round(np.atleast_1d(stats.RNEG_spread.values), 4).tolist()} (mean ± spread over sketches)")
            else:
                print(f"RNEG: {np.round(np.atleast_1d(stats.RNEG.values), 4).tolist()}, outliers (R_n > 0.2): "
                      f"{format_outliers(stats)}")
        print("These are eigenvalues of the sketched Hessian K = Phi H Phi^T; its ends are biased (see "
              "docs/spectrum.md), --seeds gives their spread.")
    if args.plot:
        plot_spectrum_evolution(stats, args.plot)
        _say(args, f"wrote {Path(args.plot).resolve()}")
    if args.out:
        _say(args, f"spectra stored per checkpoint under {_where(out)}")
    return 0


def intrinsic_dim(args) -> int:
    from ..analysis.intrinsic import intrinsic_dimension, plot_intrinsic
    from ..core.settings import Execution, ModelSettings

    _plot_path(args)
    out = _at(args, args.out)
    if out:
        from ..storage.outputs import check_folder

        check_folder(out)
    w = _workload(args)
    flags = ("d0", "d_max", "steps_per_eval", "min_improvement", "lr", "batch_size")
    search, training = w.intrinsic_settings(**{key: getattr(args, key) for key in flags}, target=args.target,
                                            seeds=tuple(args.seeds), check=args.check)
    res = intrinsic_dimension(w.search_model(), w.loss_fn, w.train, w.accuracy, args.method, search=search,
                              training=training, store=out,
                              model_settings=ModelSettings(params=args.params, forward=w.forward),
                              execution=Execution(device=args.device, progress=not args.quiet))
    if not args.quiet:
        rows = [{"seed": int(s), "D*": float(r.d_star), "D* of the doubling": float(r.d_star_raw),
                 "metric at D*": float(r.d_star_metric), "metric at D*/2": float(r.check_metric),
                 "factor 2 confirmed": bool(r.confirmed)} for s in res.seed.values for r in [res.sel(seed=s)]]
        print(f"metric at theta_0 {res.attrs['theta0_metric']:.4f}, reference (full training) "
              f"{res.attrs['reference']:.4f}, target {res.attrs['target_metric']:.4f}, d_max {res.attrs['d_max']}")
        print(markdown_table(rows, [(c, c) for c in rows[0]]))
    if args.plot:
        plot_intrinsic({args.method: res}, args.plot, reference=res.attrs["reference"], target=args.target,
                       metric_name=f"test accuracy ({w.name})")
        _say(args, f"wrote {Path(args.plot).resolve()}")
    return 0


# -------------------------------------------------------------------- info
def store_info(path) -> dict:
    """What a sketch store, a spectrum folder or an intrinsic-dimension folder holds (a JSON-able dict).

    Raises ``ValueError`` when ``path`` is none of these.
    """
    from ..storage.location import locate
    from ..storage.store import open_sketches, read_attrs

    loc = locate(path)
    path = loc.path if loc.is_local else loc
    attrs = read_attrs(loc)
    if attrs is not None:
        ds = open_sketches(path, allow_incomplete=True)
        done = ds["batch_done"].values.astype(bool)
        row_dim, variable = attrs.get("row_dim", "example"), attrs["variable"]
        n_rows, chunk = ds.sizes[row_dim], int(attrs["batch_size"])
        rows_done = sum(min(chunk, n_rows - i * chunk) for i in np.flatnonzero(done))
        valid = ds["valid"].values if "valid" in ds else None
        info = {"kind": "HVP sketch store" if variable == "hvp" else "sketch store", "path": str(path),
                "variable": variable,
                "dims": {d: int(s) for d, s in ds[variable].sizes.items()}, "storage_dtype": attrs["storage_dtype"],
                "sketch_spec": ds.attrs["sketch_spec"], "n_params": int(sum(ds.attrs["param_sizes"])),
                "param_groups": len(ds.attrs["param_names"]), "model_fingerprint": attrs.get("model_fingerprint"),
                "checkpoint": attrs.get("checkpoint"), "mode": attrs.get("mode"),
                "batches_done": int(done.sum()), "batches": int(done.size), "rows_done": int(rows_done),
                "complete": bool(done.all()), "version": attrs.get("sketcharray_version")}
        if valid is not None:
            written = np.repeat(done, chunk)[:n_rows]
            info["valid"] = int(valid[written].sum())
            info["invalid"] = int((~valid[written]).sum())
        if variable == "hvp":
            info.update(probe_seed=attrs.get("probe_seed"), probe_space=attrs.get("probe_space"),
                        finite=bool(info.get("invalid", 0) == 0))
        return info
    hvps = _hvp_store(path)
    if hvps is not None:
        return {"kind": "HVP sketch store", "path": str(path), "dims": {d: int(n) for d, n in hvps.hvp.sizes.items()},
                "sketch_spec": hvps.attrs.get("sketch_spec"), "n_params": int(sum(hvps.attrs.get("param_sizes", []))),
                "model_fingerprint": hvps.attrs.get("model_fingerprint"), "probe_seed": hvps.attrs.get("probe_seed"),
                "finite": bool(np.isfinite(hvps.hvp.values).all())}
    if loc.is_local:
        spectra = sorted(path.glob("checkpoint-*.zarr"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    else:
        spectra = [loc.child(n) for n in loc.children() if n.startswith("checkpoint-") and n.endswith(".zarr")]
    if spectra:
        from ..storage.store import open_zarr_dataset

        out = {"kind": "spectrum folder", "path": str(path), "checkpoints": {}}
        for p in spectra:
            ds = open_zarr_dataset(p)
            top = ds.eigenvalue.sel(sign="positive").values.ravel() if "positive" in ds.sign.values else []
            out["checkpoints"][p.name[len("checkpoint-"):-len(".zarr")]] = {
                "method": ds.attrs.get("method"), "k": int(ds.sizes["rank"]), "hvps": ds.attrs.get("hvps"),
                "lambda_max": float(top[0]) if len(top) else None, "sketch_spec": ds.attrs.get("sketch_spec")}
        return out
    if loc.is_local:
        searches = [loc.child(p.parent.name) for p in sorted(path.glob("*/state.json"))] if path.is_dir() else []
    else:
        searches = [loc.child(n) for n in loc.children() if loc.child(n, "state.json").is_file()]
    if searches:
        out = {"kind": "intrinsic-dimension folder", "path": str(path), "searches": {}}
        if loc.child("reference.json").is_file():
            out["reference"] = json.loads(loc.child("reference.json").read_bytes())["reference"]
        for p in searches:
            s = json.loads(p.child("state.json").read_bytes())
            out["searches"][p.name] = {"d": s["d"], "step": s["step"], "done": s["done"],
                                       "d_star": s["d_star"], "evaluations": len(s["trajectory"])}
        return out
    raise ValueError(f"{path} is not a sketcharray store, spectrum folder or intrinsic-dimension folder "
                     "(expected a Zarr store written by sketch_gradients or sketch --hvps, or a folder of "
                     "checkpoint-*.zarr or */state.json)")


def _spectrum_from_hvps(args) -> int:
    from ..analysis import single_pass_spectrum

    path = _at(args, args.from_hvps)
    path = Path(path) if isinstance(path, str) else path
    hvps = _hvp_store(path)
    if hvps is None:
        raise ValueError(f"--from-hvps {path}: not a store of sketched HVPs (expected one written by "
                         "'sketch --hvps P --hvp-space sketch')")
    res = single_pass_spectrum(hvps, k=args.k, which=args.which, oversampling=args.oversampling)
    if not args.quiet:
        rows = [{"sign": str(s), "rank": int(r), "eigenvalue": float(cell.eigenvalue),
                 "error": float(cell.error_estimate), "reliable": "yes" if bool(cell.reliable) else "NO"}
                for s in res.sign.values for r in res["rank"].values for cell in [res.sel(sign=s, rank=r)]
                if np.isfinite(float(cell.eigenvalue))]
        print(markdown_table(rows, [("sign", "end"), ("rank", "rank"), ("eigenvalue", "eigenvalue of K"),
                                    ("error", "error estimate"), ("reliable", "reliable")]))
        for s in res.sign.values:
            if not bool(np.isfinite(res.eigenvalue.sel(sign=s)).all()):
                sure = bool(res.reliable.sel(sign=s).where(~np.isfinite(res.eigenvalue.sel(sign=s)), True).all())
                print(f"the {s} end has fewer than {args.k} eigenvalues: "
                      + ("K has no more of that sign" if sure else "UNRELIABLE: the single pass cannot tell whether "
                         "K has more of that sign (its error estimate is larger than the gap to zero): use Lanczos"))
        if not bool(res.reliable.all()):
            print(f"rows marked NO have an error estimate above {res.attrs['flag_fraction']:g} of their value: "
                  "the single pass cannot be trusted there (take more probes, or use the Lanczos solver)")
        p = res.attrs["oversampling"]
        check = ("no oversampling, so no check of the fit (exact only when the probes span K's range, e.g. as "
                 "many probes as D)" if p == 0 else
                 f"relative fit {res.attrs['relative_fit']:.2e} (0 when rank K <= probes - oversampling; a value "
                 "that is not small says the probes missed part of K: take more, or use the Lanczos solver)")
        print(f"single pass over {res.attrs['probes']} stored products (oversampling {p}): {check}")
    return 0


def _hvp_store(path):
    """The Dataset of a store written by ``sketch --hvps`` (``hvp`` over probe x sketch), else None."""
    from ..storage.location import locate

    if not locate(path).child("zarr.json").is_file():
        return None
    from ..storage.store import StoreError, open_sketches, open_zarr_dataset, read_attrs

    attrs = read_attrs(path)
    if attrs is not None:  # a checksummed store (sketcharray >= 0.4): verified as it is read
        return open_sketches(path) if attrs.get("variable") == "hvp" else None
    try:  # a store written whole by sketcharray 0.3
        ds = open_zarr_dataset(path)
    except StoreError:
        raise
    except (ValueError, KeyError, FileNotFoundError):
        return None
    return ds if "hvp" in ds else None


def info(args) -> int:
    if args.verify:
        from ..storage.store import verify_store

        report = verify_store(_at(args, args.store), progress=not args.json)
        if args.json:
            print(json.dumps({"path": report.path, "verifiable": report.verifiable, "batches": report.batches,
                              "checked": report.checked, "ok": report.ok, "zero_rows": report.zero_rows,
                              "damaged_batches": report.damaged_batches, "damaged_arrays": report.damaged_arrays,
                              "damage": [str(d) for d in report.damage]}, indent=2))
        else:
            print(report)
            if not report.ok:
                print("rerun the sketch command that wrote the store to recompute exactly these batches")
        return 0 if report.ok else 3
    data = store_info(_at(args, args.store))
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print(f"{data['kind']}: {data['path']}")
    if data["kind"] == "sketch store":
        print(f"  {data['variable']} {data['dims']} stored as {data['storage_dtype']}")
        print(f"  sketch: {describe_spec(data['sketch_spec'])}")
        print(f"  N = {data['n_params']:,} parameters in {data['param_groups']} tensors; model "
              f"{data['model_fingerprint']}; checkpoint {data['checkpoint'] or '-'}; mode {data['mode']}")
        state = "complete" if data["complete"] else "INCOMPLETE (rerun the same command to resume)"
        print(f"  progress: {data['batches_done']} of {data['batches']} batches, {data['rows_done']} rows; {state}")
        if "valid" in data:
            print(f"  valid rows (finite gradient and loss): {data['valid']}, invalid: {data['invalid']} (a valid row "
                  "whose sketch is zero has no cosine score: 'info --verify' counts them)")
    elif data["kind"] == "HVP sketch store":
        print(f"  hvp {data['dims']}; sketch: {describe_spec(data['sketch_spec'])}")
        print(f"  N = {data['n_params']:,} parameters; model {data['model_fingerprint']}; probes from seed "
              f"{data['probe_seed']}; all values finite: {data['finite']}")
    elif data["kind"] == "spectrum folder":
        for name, c in data["checkpoints"].items():
            print(f"  checkpoint {name}: {c['method']}, k = {c['k']}, {c['hvps']} HVPs, lambda_max {c['lambda_max']}")
    else:
        if "reference" in data:
            print(f"  reference metric {data['reference']:.4f}")
        for name, s in data["searches"].items():
            print(f"  {name}: d = {s['d']} at step {s['step']}, {'done' if s['done'] else 'in progress'}, "
                  f"D* = {s['d_star']}")
    return 0
