"""Out-of-core top-k attribution over a synthetic store larger than the memory allowed (issue: TDA).

Writes a synthetic Zarr store of examples x D float32 sketches (uncompressed,
one chunk per ``--chunk-rows`` rows), then, each in a fresh process whose
address space is capped at ``--memory-limit-gb``: (1) reads the whole store
once with no computation (the read bandwidth), (2) runs
``attribute(store, queries, k=...)``.  Reports rows per second, the fraction
of the read bandwidth reached, and peak RSS, at two store sizes to show the
memory stays flat.  The page cache is dropped before each read when the
machine allows it (else the figures are marked "cached").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ._util import format_table, write_json

CHILD = r"""
import json, resource, sys, time
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np, zarr, dask
path, what = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if what == "read":
    arr = zarr.open_group(path, mode="r")["grad"]
    step = arr.chunks[0]
    nbytes = 0
    for s in range(0, arr.shape[0], step):
        nbytes += arr[s:s + step].nbytes
    rows = arr.shape[0]
else:
    from sketcharray.analysis import attribute
    from sketcharray.storage.store import open_sketches
    ds = open_sketches(path)
    q = np.random.default_rng(1).standard_normal((int(sys.argv[4]), ds.sizes["sketch"])).astype(np.float32)
    with dask.config.set(scheduler="threads", num_workers=2):
        out = attribute(ds, q, k=int(sys.argv[5])).compute()
    rows, nbytes = ds.sizes["example"], ds.grad.nbytes
    assert out.score.shape == (q.shape[0], int(sys.argv[5]))
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "rows": rows, "bytes": nbytes,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_store(path: Path, rows: int, d: int, chunk_rows: int) -> None:
    from ...storage import store as st

    st.create_store(path, variable="grad", row_dim="example", n_rows=rows, n_out=d, chunk=chunk_rows,
                    ids=np.arange(rows), has_label=False, attrs={"sketch_spec": {"method": "synthetic"}},
                    compressors=None)
    rng = np.random.default_rng(0)
    for i, s in enumerate(range(0, rows, chunk_rows)):
        e = min(rows, s + chunk_rows)
        st.write_batch(path, i, s, e, {"grad": rng.standard_normal((e - s, d), dtype=np.float32),
                                       "loss": np.zeros(e - s, np.float32), "valid": np.ones(e - s, bool)},
                       range(s, e))


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def child(path: Path, what: str, limit: int, queries: int, k: int) -> dict:
    dropped = drop_caches()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), what, str(limit), str(queries), str(k)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{what} run failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["cache"] = "dropped" if dropped else "cached"
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_tda_scale", description=__doc__)
    p.add_argument("--gb", type=float, default=20.0, help="size of the larger store in GB (default 20)")
    p.add_argument("--d", type=int, default=1024, help="sketch dimension D (default 1024)")
    p.add_argument("--chunk-rows", type=int, default=16384)
    p.add_argument("--memory-limit-gb", type=float, default=4.0, help="address-space cap of the runs")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--dir", default="bench-out/tda-scale", help="where the synthetic stores go (in a folder of their "
                                                                 "own, deleted after; nothing else there is touched)")
    p.add_argument("--json", default="bench-out/bench-tda-scale.json")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    from ...storage.outputs import refuse_inside_store

    refuse_inside_store(Path(args.dir) / "x", "--dir")
    # a folder of this run's own inside --dir: only it is deleted afterwards, never what --dir held before
    base = Path(args.dir) / f"sketcharray-tda-scale-{os.getpid()}-{time.time_ns()}"
    base.mkdir(parents=True)
    free = shutil.disk_usage(base).free
    gb = args.gb
    if gb * 1e9 * 1.25 > free:
        gb = 0.8 * free / 1.25 / 1e9
        print(f"disk has {free / 1e9:.1f} GB free: scaling the store down to {gb:.1f} GB", flush=True)
    limit = int(args.memory_limit_gb * 2**30)
    rows_full = int(gb * 1e9 // (4 * args.d)) // args.chunk_rows * args.chunk_rows
    results = []
    try:
        for frac in (0.25, 1.0):
            rows = max(args.chunk_rows, int(rows_full * frac) // args.chunk_rows * args.chunk_rows)
            path = base / f"store-{rows}.zarr"
            t0 = time.perf_counter()
            make_store(path, rows, args.d, args.chunk_rows)
            print(f"wrote {rows:,} x {args.d} ({rows * args.d * 4 / 1e9:.1f} GB) in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            read = child(path, "read", limit, args.queries, args.k)
            topk = child(path, "topk", limit, args.queries, args.k)
            results.append({
                "rows": rows, "gb": rows * args.d * 4 / 1e9, "D": args.d,
                "read_gb_per_s": read["bytes"] / read["seconds"] / 1e9,
                "topk_rows_per_s": topk["rows"] / topk["seconds"],
                "topk_gb_per_s": topk["bytes"] / topk["seconds"] / 1e9,
                "fraction_of_read": (topk["bytes"] / topk["seconds"]) / (read["bytes"] / read["seconds"]),
                "peak_rss_read": read["peak_rss"], "peak_rss_topk": topk["peak_rss"], "cache": topk["cache"],
            })
            shutil.rmtree(path, ignore_errors=True)
            r = results[-1]
            print(f"  read {r['read_gb_per_s']:.2f} GB/s, top-k {r['topk_gb_per_s']:.2f} GB/s "
                  f"({100 * r['fraction_of_read']:.0f}%), peak RSS {r['peak_rss_topk'] / 2**30:.2f} GiB", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = [{"gb": f"{r['gb']:.1f}", "rows": f"{r['rows']:,}", "read": f"{r['read_gb_per_s']:.2f}",
             "topk": f"{r['topk_gb_per_s']:.2f}", "rps": f"{r['topk_rows_per_s']:,.0f}",
             "frac": f"{100 * r['fraction_of_read']:.0f}%", "rss": f"{r['peak_rss_topk'] / 2**30:.2f} GiB",
             "cache": r["cache"]} for r in results]
    print()
    print(f"memory cap {args.memory_limit_gb} GiB (address space), {args.queries} queries, k={args.k}")
    print(format_table(rows, [("gb", "store GB"), ("rows", "rows"), ("read", "read GB/s"), ("topk", "top-k GB/s"),
                              ("rps", "top-k rows/s"), ("frac", "of read"), ("rss", "peak RSS"), ("cache", "page cache")]))
    big = results[-1]
    targets = [
        f"target: top-k >= 50% of read bandwidth: {100 * big['fraction_of_read']:.0f}% "
        f"{'MET' if big['fraction_of_read'] >= 0.5 else 'MISSED'}",
        f"target: peak RSS <= 2 GiB: {big['peak_rss_topk'] / 2**30:.2f} GiB {'MET' if big['peak_rss_topk'] <= 2**31 else 'MISSED'}",
        f"peak RSS at {results[0]['gb']:.1f} GB vs {big['gb']:.1f} GB: {results[0]['peak_rss_topk'] / 2**30:.2f} vs "
        f"{big['peak_rss_topk'] / 2**30:.2f} GiB",
    ]
    print("\n" + "\n".join(targets))
    write_json(args.json, {"benchmark": "tda-scale", "results": results, "targets": targets,
                           "memory_limit_gb": args.memory_limit_gb})
    return 0



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
