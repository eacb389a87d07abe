"""Out-of-core top-k attribution over a synthetic store larger than the memory allowed (issue: TDA).

Writes a synthetic Zarr store of examples x D float32 sketches (uncompressed,
one chunk per ``--chunk-rows`` rows), then, each in a fresh process whose
address space is capped at ``--memory-limit-gb``: (1) reads the whole store
once with no computation (the read bandwidth), (2) runs
``attribute(store, queries, k=...)``.  Reports rows per second, the fraction
of the read bandwidth reached, and peak RSS, at two store sizes to show the
memory stays flat.  The page cache is dropped before each read when the
machine allows it (else the figures are marked "cached").

With ``--url s3://bucket/prefix`` the stores go to object storage (options
from ``--storage-option`` or the environment; ``--local-s3`` starts moto's
S3 server on 127.0.0.1 for the run, moto keeping the objects in memory):
the baseline is then fetching every chunk object of the store once, all at
once (fsspec's concurrent ``cat``), and the table adds the requests one
chunk read issues (counted at the client: s3fs asks an object's size with a
HEAD, then splits an object larger than its block size into concurrent
ranged GETs).
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
import collections, json, os, resource, sys, time
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np, zarr, dask
from sketcharray.storage.location import locate
path, what = sys.argv[1], sys.argv[2]
loc = locate(path, json.loads(os.environ.get("SKETCHARRAY_BENCH_STORAGE_OPTIONS", "null")))
calls = collections.Counter()
if not loc.is_local and loc.protocol == "s3":  # count the requests at the client, by kind
    import s3fs
    real = s3fs.S3FileSystem._call_s3
    async def counted(self, method, *args, **kwargs):
        calls[method] += 1
        return await real(self, method, *args, **kwargs)
    s3fs.S3FileSystem._call_s3 = counted
t0 = time.perf_counter()
if what == "read" and not loc.is_local:  # every chunk object of the sketches, fetched once, all at once
    arr = zarr.open_group(loc.zarr_store(), mode="r")["grad"]
    keys = [f"{loc.key}/grad/{arr.metadata.encode_chunk_key((i, 0))}" for i in range(arr.cdata_shape[0])]
    calls.clear()
    t0 = time.perf_counter()
    nbytes = sum(len(b) for b in loc.fs.cat(keys).values())
    rows = arr.shape[0]
elif what == "read":
    arr = zarr.open_group(path, mode="r")["grad"]
    step = arr.chunks[0]
    nbytes = 0
    for s in range(0, arr.shape[0], step):
        nbytes += arr[s:s + step].nbytes
    rows = arr.shape[0]
else:
    from sketcharray.analysis import attribute
    from sketcharray.storage.store import open_sketches
    t0 = time.perf_counter()  # the query: opening the store (its metadata, ids and digests) and the top-k
    ds = open_sketches(loc)
    calls.clear()
    q = np.random.default_rng(1).standard_normal((int(sys.argv[4]), ds.sizes["sketch"])).astype(np.float32)
    with dask.config.set(scheduler="threads", num_workers=int(os.environ.get("SKETCHARRAY_BENCH_THREADS", "2"))):
        out = attribute(ds, q, k=int(sys.argv[5])).compute()
    rows, nbytes = ds.sizes["example"], ds.grad.nbytes
    assert out.score.shape == (q.shape[0], int(sys.argv[5]))
elapsed = time.perf_counter() - t0
print(json.dumps({"seconds": elapsed, "rows": rows, "bytes": nbytes, "requests": dict(calls),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def make_store(path, rows: int, d: int, chunk_rows: int) -> None:
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


def child(path, what: str, limit: int, queries: int, k: int, env: dict | None = None) -> dict:
    dropped = drop_caches()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
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
    p.add_argument("--url", default=None, metavar="URL",
                   help="put the stores under this object-storage prefix (s3://bucket/prefix; a run-specific prefix "
                        "below it is removed after) instead of --dir")
    p.add_argument("--threads", type=int, default=None,
                   help="dask threads of the top-k (default 2 on a local disk, 8 with --url: object-storage reads "
                        "wait on the network, so more requests in flight pay)")
    p.add_argument("--local-s3", action="store_true",
                   help="with --url s3://BUCKET/...: start moto's S3 server on 127.0.0.1 for the run (the bench "
                        "extra installs it) and create the bucket")
    from ..cli import storage_option

    p.add_argument("--storage-option", dest="storage_option", action="append", type=storage_option, default=None,
                   metavar="KEY=VALUE", help="fsspec option for --url (repeatable; dotted keys nest)")
    return p


def _local_s3(url: str) -> tuple[object, dict, dict]:
    """moto's S3 server on 127.0.0.1 (a free port) with the URL's bucket; (server, the environment that reaches
    it, the same as storage options)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_DEFAULT_REGION": "us-east-1"}
    options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"],
                                                                   "region_name": "us-east-1"}}
    import s3fs

    s3fs.S3FileSystem(**options).call_s3("create_bucket", Bucket=url.split("://", 1)[1].split("/")[0])
    return server, env, options


def main_url(args) -> int:
    """The benchmark on object storage: the same top-k against fetching the same objects once."""
    from ...storage.location import locate, storage_options

    options = storage_options(args.storage_option)
    server, env, local = _local_s3(args.url) if args.local_s3 else (None, {}, {})
    if options:
        env["SKETCHARRAY_BENCH_STORAGE_OPTIONS"] = json.dumps(options)
    options = {**local, **(options or {})} or None  # this process reaches the local server by options
    env["SKETCHARRAY_BENCH_THREADS"] = str(args.threads or 8)
    base = locate(args.url.rstrip("/") + f"/sketcharray-tda-scale-{os.getpid()}-{time.time_ns()}", options)
    limit = int(args.memory_limit_gb * 2**30)
    rows_full = max(args.chunk_rows, int(args.gb * 1e9 // (4 * args.d)) // args.chunk_rows * args.chunk_rows)
    chunk_mb = args.chunk_rows * args.d * 4 / 2**20
    results = []
    try:
        for frac in (0.25, 1.0):
            rows = max(args.chunk_rows, int(rows_full * frac) // args.chunk_rows * args.chunk_rows)
            loc = base.child(f"store-{rows}.zarr")
            t0 = time.perf_counter()
            make_store(loc, rows, args.d, args.chunk_rows)
            print(f"wrote {rows:,} x {args.d} ({rows * args.d * 4 / 1e9:.2f} GB) to {loc} in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            read = child(str(loc), "read", limit, args.queries, args.k, env)
            topk = child(str(loc), "topk", limit, args.queries, args.k, env)
            chunks = rows // args.chunk_rows
            results.append({
                "rows": rows, "gb": rows * args.d * 4 / 1e9, "D": args.d, "chunk_mb": chunk_mb, "url": str(loc),
                "read_gb_per_s": read["bytes"] / read["seconds"] / 1e9,
                "topk_rows_per_s": topk["rows"] / topk["seconds"],
                "topk_gb_per_s": topk["bytes"] / topk["seconds"] / 1e9,
                "fraction_of_read": (topk["bytes"] / topk["seconds"]) / (read["bytes"] / read["seconds"]),
                "requests_read": read["requests"], "requests_topk": topk["requests"],
                "requests_per_chunk_topk": {m: n / chunks for m, n in topk["requests"].items()},
                "peak_rss_topk": topk["peak_rss"],
            })
            r = results[-1]
            print(f"  fetch once {r['read_gb_per_s']:.3f} GB/s, top-k {r['topk_gb_per_s']:.3f} GB/s "
                  f"({100 * r['fraction_of_read']:.0f}%), requests per chunk in the top-k "
                  f"{r['requests_per_chunk_topk']}", flush=True)
    finally:
        base.remove_tree()
        if server is not None:
            server.stop()
    rows = [{"gb": f"{r['gb']:.2f}", "rows": f"{r['rows']:,}", "chunk": f"{r['chunk_mb']:.1f} MiB",
             "read": f"{r['read_gb_per_s']:.3f}", "topk": f"{r['topk_gb_per_s']:.3f}",
             "frac": f"{100 * r['fraction_of_read']:.0f}%",
             "req": ", ".join(f"{m} {n:.2f}" for m, n in sorted(r["requests_per_chunk_topk"].items())),
             "rss": f"{r['peak_rss_topk'] / 2**30:.2f} GiB"} for r in results]
    print()
    print(f"object storage {'(moto on 127.0.0.1) ' if server is not None else ''}{args.url}; memory cap "
          f"{args.memory_limit_gb} GiB, {args.queries} queries, k={args.k}, {env['SKETCHARRAY_BENCH_THREADS']} "
          "threads")
    print(format_table(rows, [("gb", "store GB"), ("rows", "rows"), ("chunk", "chunk"), ("read", "fetch-once GB/s"),
                              ("topk", "top-k GB/s"), ("frac", "of fetch-once"), ("req", "requests per chunk"),
                              ("rss", "peak RSS")]))
    write_json(args.json, {"benchmark": "tda-scale", "storage": "object", "local_s3": bool(server), "results": results,
                           "memory_limit_gb": args.memory_limit_gb, "threads": int(env["SKETCHARRAY_BENCH_THREADS"]),
                           "storage_options": sorted(options or {})})
    return 0


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    if args.url:
        return main_url(args)
    if args.local_s3 or args.storage_option:
        raise ValueError("--local-s3 and --storage-option apply with --url")
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
