"""The ``sketcharray`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

#: ``sketcharray bench NAME``: (module in sketcharray.bench, one-line help)
BENCHMARKS = {
    "sketch": ("sketch", "sketch operators against a memcpy of the same data"),
    "stream": ("stream", "streaming gradient sketches: time split and throughput"),
    "tda": ("tda", "TDA accuracy per sketch method (the paper's Tables 6 and 1)"),
    "tda-scale": ("tda_scale", "out-of-core top-k over a store larger than the memory allowed"),
    "spectrum": ("spectrum", "Hessian-spectrum accuracy and solver speed (Tables 7 and 1, Fig. 2)"),
    "intrinsic": ("intrinsic", "intrinsic-dimension search (Table 10; FFD vs AFFD/QK)"),
}


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, workload=args.workload, device=args.device, method=args.method, n_out=args.n_out,
             batch_size=args.batch_size)
    return 0


def _benchmark_module(name: str):
    return importlib.import_module(f".bench.{BENCHMARKS[name][0]}", __package__)


def _bench(args) -> int:
    return _benchmark_module(args.benchmark).main(args=args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sketcharray",
        description="Sketch per-example gradients and Hessian-vector products of PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"sketcharray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the main job on the embedded default workload",
                          description="Run the main job on the embedded default workload.")
    demo.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    demo.add_argument("--out", default="sketcharray-demo", help="folder for the results")
    demo.add_argument("--workload", default="digits", help="embedded workload: digits (default) or minilm")
    demo.add_argument("--method", default="afjl", help="sketch method (default afjl)")
    demo.add_argument("--n-out", type=int, default=512, help="sketch dimension D (default 512)")
    demo.add_argument("--batch-size", type=int, default=64, help="examples per batch / chunk (default 64)")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)",
                           description="Run a benchmark; each prints a table and writes JSON.")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        module = _benchmark_module(name)
        module.build_parser(bench_sub.add_parser(name, help=help_text, description=module.__doc__))
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
