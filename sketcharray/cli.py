"""The ``sketcharray`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def _bench_sketch(args) -> int:
    from .bench import sketch

    return sketch.main(args=args)


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, workload=args.workload, device=args.device, method=args.method, n_out=args.n_out,
             batch_size=args.batch_size)
    return 0


def _bench_tda(args) -> int:
    from .bench import tda

    return tda.main(args=args)


def _bench_tda_scale(args) -> int:
    from .bench import tda_scale

    return tda_scale.main(args=args)


def _bench_spectrum(args) -> int:
    from .bench import spectrum

    return spectrum.main(args=args)


def _bench_intrinsic(args) -> int:
    from .bench import intrinsic

    return intrinsic.main(args=args)


def _bench_stream(args) -> int:
    from .bench import stream

    return stream.main(args=args)


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
    from .bench import sketch

    sk = bench_sub.add_parser("sketch", help="sketch operators against a memcpy of the same data",
                              description=sketch.__doc__)
    sketch.build_parser(sk)
    sk.set_defaults(func=_bench_sketch)
    from .bench import stream

    sm = bench_sub.add_parser("stream", help="streaming gradient sketches: time split and throughput",
                              description=stream.__doc__)
    stream.build_parser(sm)
    sm.set_defaults(func=_bench_stream)
    from .bench import tda

    td = bench_sub.add_parser("tda", help="TDA accuracy per sketch method (the paper's Tables 6 and 1)",
                              description=tda.__doc__)
    tda.build_parser(td)
    td.set_defaults(func=_bench_tda)
    from .bench import tda_scale

    ts = bench_sub.add_parser("tda-scale", help="out-of-core top-k over a store larger than the memory allowed",
                              description=tda_scale.__doc__)
    tda_scale.build_parser(ts)
    ts.set_defaults(func=_bench_tda_scale)
    from .bench import spectrum

    sp = bench_sub.add_parser("spectrum", help="Hessian-spectrum accuracy and solver speed (Tables 7 and 1, Fig. 2)",
                              description=spectrum.__doc__)
    spectrum.build_parser(sp)
    sp.set_defaults(func=_bench_spectrum)
    from .bench import intrinsic

    idm = bench_sub.add_parser("intrinsic", help="intrinsic-dimension search (Table 10; FFD vs AFFD/QK)",
                               description=intrinsic.__doc__)
    intrinsic.build_parser(idm)
    idm.set_defaults(func=_bench_intrinsic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
