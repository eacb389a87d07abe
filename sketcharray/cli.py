"""The ``sketcharray`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _bench_sketch(args) -> int:
    from .bench import sketch

    return sketch.main(args=args)


def _demo(args) -> int:
    # Until the streaming pipeline lands, the demo runs the sketch benchmark at a small size.
    from .bench import sketch

    bench_args = sketch.build_parser().parse_args(
        ["--n", "2^16,2^20", "--d", "2^10,2^12", "--device", args.device, "--dense-budget", "2^26",
         "--json", f"{args.out}/bench-sketch.json", "--repeat", "2", "--preconds", "hadamard"]
    )
    print("sketcharray demo: sketch operators on a CPU-sized batch (the full pipeline arrives with streaming)")
    return sketch.main(args=bench_args)


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
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)",
                           description="Run a benchmark; each prints a table and writes JSON.")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    from .bench import sketch

    sk = bench_sub.add_parser("sketch", help="sketch operators against a memcpy of the same data",
                              description=sketch.__doc__)
    sketch.build_parser(sk)
    sk.set_defaults(func=_bench_sketch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
