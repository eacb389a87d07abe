"""Resume after a kill, through the command line: ``spectrum --out`` killed at random points, rerun, compared bit for bit.

Runs ``sketcharray spectrum ... --out FOLDER`` once whole (the reference),
then ``--kills`` times: start it in a fresh folder, kill it at a random point
(SIGKILL, or two SIGINTs, at a random moment: before the solver's state
exists, as it is created, or after a random number of committed products),
rerun the same command to the end, and compare the stored eigenvalues and
residuals with the reference's, bit for bit.  Prints a table of the trials
and writes JSON; exits 1 when any trial differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._util import format_table, write_json


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_resume", description=__doc__)
    p.add_argument("--kills", type=int, default=20, help="interrupted runs, each resumed and compared")
    p.add_argument("--workload", default="digits", help="digits (default) or module:factory")
    p.add_argument("--n-out", type=int, default=64, help="D of the sketch")
    p.add_argument("--k", type=int, default=3, help="eigenvalues at each end")
    p.add_argument("--examples", type=int, default=256, help="H of the mean loss over the first N examples")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--solver", default="lanczos", choices=("lanczos", "randomized"))
    p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
    p.add_argument("--json", default="bench-out/bench-resume.json")
    return p


def _command(args, out: Path) -> list[str]:
    return [sys.executable, "-c", "import sys; from sketcharray.app.cli import main; sys.exit(main())", "spectrum",
            "--workload", args.workload, "--n-out", str(args.n_out), "--k", str(args.k), "--examples",
            str(args.examples), "--batch-size", str(args.batch_size), "--solver", args.solver, "--out", str(out),
            "--quiet"]


def _result(out: Path) -> dict:
    import xarray as xr

    with xr.open_zarr(out / "checkpoint-current.zarr", consolidated=False) as ds:
        return {"eigenvalue": ds.eigenvalue.values.copy(), "residual": ds.residual.values.copy(),
                "iterations": int(ds.attrs["iterations"])}


def _committed(out: Path) -> int:
    """Products committed in the solver's state (-1: no state yet)."""
    try:
        progress = json.loads((out / "solver-current.zarr" / "zarr.json").read_text())["attributes"]["progress"]
        return int(progress.get("m", progress.get("iterations", 0)))
    except (OSError, ValueError, KeyError):
        return -1


def kill_trial(args, folder: Path, rng: np.random.Generator, products: int, target: int | None = None,
               how: str | None = None) -> dict:
    """One run killed at a random point (or after ``target`` committed products), then resumed to the end: what
    was killed where, and the result."""
    how = how or ("SIGKILL" if rng.random() < 0.7 else "2 x SIGINT")
    if target is None:
        target = int(rng.integers(-1, products))  # -1: before the state exists; 0: as it is created
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(_command(args, folder), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        done = _committed(folder)
        if done >= target and (target >= 0 or (folder / "solver-current.zarr").exists() or rng.random() < 0.02):
            time.sleep(float(rng.uniform(0, 0.05)))  # somewhere inside the next product or commit
            break
        time.sleep(0.002)
    if proc.poll() is None:
        if how == "SIGKILL":
            proc.kill()
        else:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
    code = proc.wait()
    killed_said = (proc.stderr.read().strip().splitlines() or [""])[-1]
    at = _committed(folder)
    resumed = subprocess.run(_command(args, folder), env=env, capture_output=True, text=True)
    trial = {"how": how, "target": target, "killed_after": at, "exit": code, "said": killed_said,
             "resumed": resumed.returncode}
    if resumed.returncode != 0:
        return {**trial, "error": resumed.stderr.strip().splitlines()[-1:] or [""]}
    return {**trial, **_result(folder)}


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    rng = np.random.default_rng(args.seed)
    root = Path(tempfile.mkdtemp(prefix="sketcharray-bench-resume-"))
    try:
        t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        whole = subprocess.run(_command(args, root / "whole"), env=env, capture_output=True, text=True)
        if whole.returncode != 0:
            print(whole.stderr, file=sys.stderr)
            return 1
        reference = _result(root / "whole")
        seconds = time.perf_counter() - t0
        rows = []
        for i in range(args.kills):
            trial = kill_trial(args, root / f"trial-{i}", rng, reference["iterations"])
            # NaN marks an end's places K has no eigenvalue for: equal to NaN here
            same = (trial.get("resumed") == 0
                    and np.array_equal(trial["eigenvalue"], reference["eigenvalue"], equal_nan=True)
                    and np.array_equal(trial["residual"], reference["residual"], equal_nan=True))
            # a killed run ends by the signal (SIGKILL) or with exit 130 and one line (Ctrl-C), nothing else
            clean = (trial["exit"] == -signal.SIGKILL if trial["how"] == "SIGKILL" else
                     trial["exit"] == 130 and "interrupted; rerun" in trial["said"])
            rows.append({"trial": i, "signal": trial["how"], "killed after": trial["killed_after"],
                         "exit": trial["exit"], "clean": clean, "said": trial["said"], "resumed": trial["resumed"],
                         "bit-identical": same,
                         **({"error": trial["error"][0]} if "error" in trial else {})})
            shutil.rmtree(root / f"trial-{i}", ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(format_table(rows, [("trial", "trial"), ("signal", "signal"), ("killed after", "products committed"),
                              ("exit", "exit of the killed run"), ("clean", "clean exit"),
                              ("resumed", "exit of the rerun"),
                              ("bit-identical", "bit-identical")]))
    same = sum(r["bit-identical"] for r in rows)
    print(f"\n{same} of {len(rows)} interrupted runs resumed to the reference's eigenvalues and residuals bit for bit "
          f"(reference: {reference['iterations']} products in {seconds:.1f} s)")
    write_json(args.json, {"benchmark": "resume", "solver": args.solver, "rows": rows, "identical": same,
                           "trials": len(rows), "reference_eigenvalues": reference["eigenvalue"].tolist()})
    print(f"wrote {args.json}")
    return 0 if same == len(rows) and all(r["clean"] for r in rows) else 1
