"""The ``sketcharray`` command: a thin layer over the Python API.

Exit codes: 0 done; 1 an unexpected failure (with a traceback); 2 a usage
error (unknown option, missing argument); 3 bad input (a store that doesn't
match the run, an impossible D, an unknown workload, NaN input, ...); 4 out
of memory before allocating; 130 interrupted (rerun the same command to
resume: stores and searches keep what they finished).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__

# commands, the cluster words and everything they load are imported inside main(), where an interrupt (Ctrl-C
# while torch loads) is caught and answered with exit 130 and one line, never a traceback

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INPUT, EXIT_MEMORY, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

#: ``sketcharray bench NAME``: (module in sketcharray.app.bench, one-line help)
BENCHMARKS = {
    "sketch": ("sketch", "sketch operators against a memcpy of the same data"),
    "stream": ("stream", "streaming gradient sketches: time split and throughput"),
    "tda": ("tda", "TDA accuracy per sketch method (the paper's Tables 6 and 1)"),
    "tda-scale": ("tda_scale", "out-of-core top-k over a store larger than the memory allowed"),
    "spectrum": ("spectrum", "Hessian-spectrum accuracy and solver speed (Tables 7 and 1, Fig. 2)"),
    "intrinsic": ("intrinsic", "intrinsic-dimension search (Table 10; FFD vs AFFD/QK)"),
    "trak": ("trak", "TRAK scores on sketches against the traker package (top-10 overlap)"),
    "lds": ("lds", "attribution quality: linear datamodeling score over models retrained on subsets"),
    "peer": ("peer", "factored per-layer sketches against dattri's LoGra: agreement with exact scores, time"),
    "resume": ("resume", "spectrum --out killed at random points and rerun: bit-identical to a whole run?"),
}

WORKLOAD_HELP = ("the model and data: an embedded workload (digits, the default; minilm with the 'workloads' "
                 "extra) or your own as module:factory, a function returning a sketcharray.workloads.Workload; "
                 "the module is imported from the installed packages first and from the current folder only "
                 "as a fallback, and the current folder serves no other import")


def _benchmark_module(name: str):
    return importlib.import_module(f".bench.{BENCHMARKS[name][0]}", __package__)


def benchmark_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``sketcharray bench NAME`` (its module is imported only now: ``--help`` stays cheap)."""
    module = _benchmark_module(name)
    return module.build_parser(argparse.ArgumentParser(prog=f"sketcharray bench {name}", description=module.__doc__,
                                                       formatter_class=_Formatter))


def _bench(args) -> int:
    bench_args = benchmark_parser(args.benchmark).parse_args(args.bench_args)
    return _benchmark_module(args.benchmark).main(args=bench_args)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default when it has a meaningful one and its help doesn't say it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, True, argparse.SUPPRESS) or not action.option_strings):
            return text
        return f"{text} (default: {default})"


def describe_schedulers() -> str:
    from ..collect.cluster import describe_schedulers as describe

    return describe()


def _common(p: argparse.ArgumentParser, *, workload: bool = True, sketch: tuple[str, int] | None = None,
            scheduler: bool = False, batch_size: int | None = 64, factored: bool = False) -> None:
    """The flags every model-running subcommand shares, spelled the same everywhere."""
    if workload:
        p.add_argument("--workload", default="digits", metavar="NAME|MODULE:FACTORY", help=WORKLOAD_HELP)
        p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1, ...")
        p.add_argument("--params", nargs="+", metavar="GLOB", default=None,
                       help="parameters that make up N, by name or glob (default: all trainable)")
        p.add_argument("--batch-size", type=int, default=batch_size,
                       help="examples per batch" + (" (= per Zarr chunk)" if batch_size else " (default: the "
                                                                                            "workload's)"))
    if sketch is not None:
        p.add_argument("--method", default=sketch[0],
                       help="sketch method: dense, dense-otf, fjl, ffd, affd, afjl or qk"
                            + (", or factored (per-layer, gradients only: see --factor)" if factored else ""))
        if sketch[1]:
            p.add_argument("--n-out", type=int, default=sketch[1], metavar="D", help="sketch dimension D")
            p.add_argument("--seed", type=int, default=0, help="seed of the sketch")
    if scheduler:
        p.add_argument("--scheduler", default="threads", help=describe_schedulers())
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages; only errors")


def storage_option(text: str) -> tuple[str, object]:
    """``--storage-option KEY=VALUE`` (see :func:`sketcharray.storage.location.storage_option`) for argparse."""
    from ..storage.location import storage_option as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_option", action="append", type=storage_option, default=None,
                   metavar="KEY=VALUE",
                   help="fsspec option for s3://, gs://, memory:// stores (repeatable; dotted keys nest: "
                        "client_kwargs.endpoint_url=http://127.0.0.1:9000). Credentials are better left to the "
                        "environment variables the filesystem reads (AWS_ACCESS_KEY_ID, ...); none is ever stored "
                        "or printed")


def build_parser() -> argparse.ArgumentParser:
    from . import commands

    parser = argparse.ArgumentParser(
        prog="sketcharray", formatter_class=_Formatter,
        description="Sketch per-example gradients and Hessian-vector products of PyTorch models, and analyse "
                    "them out of core: training data attribution, Hessian spectra, intrinsic dimension.",
        epilog="exit codes: 0 done, 1 unexpected failure, 2 usage error, 3 bad input, 4 out of memory, "
               "130 interrupted (rerun the same command to resume)")
    parser.add_argument("--version", action="version", version=f"sketcharray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text, description, func):
        p = sub.add_parser(name, help=help_text, description=description, formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    p = command("demo", "run the whole story on an embedded workload and write a report",
                "Stream training-gradient sketches to Zarr, attribute a few test predictions, compute the "
                "Hessian spectrum at two checkpoints and run a short intrinsic-dimension search; writes "
                "report.md, report.html and PNG plots into --out. Rerunning resumes.", commands.demo)
    p.add_argument("--out", default=None, help="report folder (default sketcharray-demo, or "
                                               "sketcharray-demo-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="a fraction of the work (for CI and a first look)")
    p.add_argument("--workload", default="digits", metavar="NAME|MODULE:FACTORY", help=WORKLOAD_HELP)
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, ...")
    p.add_argument("--method", default=None, help="gradient sketch method for TDA (default afjl; factored: "
                                                  "per-layer sketches from one batched backward)")
    p.add_argument("--factor", default=None, choices=("afjl", "qk", "dense"),
                   help="with --method factored: the family of the per-layer factors (default afjl)")
    p.add_argument("--n-out", type=int, default=None, metavar="D", help="gradient sketch dimension (default 512)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of every sketch and of the search")
    p.add_argument("--scheduler", default="threads", help=describe_schedulers())
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages; only errors")

    p = command("sketch", "stream sketched per-example gradients (or HVPs) of a model into a Zarr store",
                "Compute Phi g_i for every example of a split and write them to a Zarr store (one chunk per "
                "batch). Rerunning the same command resumes an interrupted run; a store made with another "
                "sketch, model or ids is refused.", commands.sketch)
    p.add_argument("--out", required=True, metavar="STORE", help="the Zarr store to write: a path or a URL "
                                                                   "(s3://bucket/run.zarr)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="which examples")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT examples")
    p.add_argument("--mode", default="explicit", choices=("explicit", "implicit"),
                   help="explicit: per-example gradients then Phi g; implicit: grad_omega L(theta + Phi^T omega)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="storage dtype")
    p.add_argument("--checkpoint", default=None, help="a name for the model's weights, kept in the store")
    p.add_argument("--margin", action="store_true",
                   help="gradients of the classification margin (TRAK's model output) instead of the loss, for "
                        "'attribute --score trak'")
    p.add_argument("--hvps", type=int, default=0, metavar="P",
                   help="instead of gradients: P sketched Hessian-vector products Phi H v of the mean loss")
    p.add_argument("--hvp-space", default="parameters", choices=("parameters", "sketch"),
                   help="with --hvps: random directions v of the parameter space, or v = Phi^T omega for Gaussian "
                        "omega of the sketch space (stores Y = K Omega, Omega regenerated from the seed, for 'spectrum "
                        "--from-hvps')")
    _common(p, sketch=("afjl", 512), scheduler=True, factored=True)
    p.add_argument("--factor", default=None, choices=("afjl", "qk", "dense"),
                   help="with --method factored: the family of the per-layer factors (default afjl)")
    _storage(p)

    p = command("attribute", "score training examples against queries from two gradient stores",
                "Top (proponents) or bottom (opponents) K training examples per query, streamed chunk by "
                "chunk through the training store; both stores must come from the same sketch.",
                commands.attribute)
    p.add_argument("train", metavar="TRAIN_STORE", help="store of training-gradient sketches")
    p.add_argument("queries", metavar="QUERY_STORE", help="store of query-gradient sketches (same sketch)")
    p.add_argument("--score", default="dot", choices=("dot", "cosine", "influence", "trak"),
                   help="similarity (trak: stores made with 'sketch --margin')")
    p.add_argument("--k", type=int, default=10, help="training examples per query")
    p.add_argument("--which", default="top", choices=("top", "bottom"), help="proponents or opponents")
    p.add_argument("--query", nargs="+", metavar="ID", default=None, help="only these query ids")
    p.add_argument("--first", type=int, default=None, help="only the first N queries")
    p.add_argument("--damping", type=float, default=None, help="lambda of the influence score")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="accept queries sketched at other model weights than the training examples (e.g. a "
                        "fine-tuned model against its base); refused otherwise, and recorded when allowed")
    p.add_argument("--out", default=None, help="write the result (Zarr, or netCDF when it ends in .nc): a new path, "
                                               "or an earlier result with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the result --out holds (only a result this command wrote; anything else is refused)")
    _common(p, workload=False)
    _storage(p)

    p = command("spectrum", "top and bottom eigenvalues of the sketched Hessian, over checkpoints",
                "Eigenvalues of K = Phi H Phi^T (sketched HVPs) by Lanczos or a randomized block solver, at "
                "the model's weights or at each --checkpoint, with RNEG and R_n.", commands.spectrum)
    p.add_argument("--k", type=int, default=10, help="eigenvalues at each end")
    p.add_argument("--which", default="both", choices=("both", "top", "bottom"))
    p.add_argument("--solver", default="lanczos", choices=("lanczos", "randomized"))
    p.add_argument("--max-iter", type=int, default=None, metavar="N",
                   help="the solver's budget: Lanczos products (default: until every wanted eigenpair converges, at "
                        "most min(D, 1000)), or randomized blocks (default 30); eigenpairs it leaves unconverged "
                        "are marked NO")
    p.add_argument("--examples", type=int, default=None, help="H of the mean loss over the first N examples")
    p.add_argument("--checkpoint", nargs="+", metavar="NAME=PATH", default=None,
                   help="torch.save'd state_dicts to evaluate at")
    p.add_argument("--workload-checkpoints", action="store_true",
                   help="use the checkpoints the workload provides (the digits training run)")
    p.add_argument("--out", default=None, metavar="FOLDER", help="save each checkpoint's result (resumable)")
    p.add_argument("--plot", default=None, metavar="PNG", help="RNEG and R_n plot (the paper's Figure 2)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="repeat with one independent sketch per seed: eigenvalues as mean and spread")
    p.add_argument("--from-hvps", default=None, metavar="STORE",
                   help="no Hessian-vector products: the eigenvalues from one stored pass Y = K Omega "
                        "('sketch --hvps P --hvp-space sketch'), by the single-pass method of Halko, "
                        "Martinsson & Tropp (exact when rank K <= P - oversampling; see docs/spectrum.md)")
    p.add_argument("--oversampling", type=int, default=None,
                   help="with --from-hvps: probes beyond the model's rank (default min(10, P // 3))")
    _common(p, sketch=("affd", 256), scheduler=True)
    _storage(p)

    p = command("intrinsic-dim", "intrinsic dimension by the doubling search in a sketched subspace",
                "Train omega in theta = theta_0 + Phi^T omega, doubling D whenever the metric stops improving, "
                "until it reaches --target x the metric of full training; reports D* per seed.",
                commands.intrinsic_dim)
    p.add_argument("--target", type=float, default=0.9, help="fraction of the full-training metric to reach")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one projection per seed")
    p.add_argument("--d0", type=int, default=None, help="first D (default: the workload's)")
    p.add_argument("--d-max", type=int, default=None, help="largest D (default: the workload's)")
    p.add_argument("--steps-per-eval", type=int, default=None, help="training steps between evaluations")
    p.add_argument("--min-improvement", type=float, default=None, help="improvement that counts as progress")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate for omega")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the check run at D*/2")
    p.add_argument("--out", default=None, metavar="FOLDER", help="save the search state (resumable)")
    p.add_argument("--plot", default=None, metavar="PNG", help="metric against D")
    _common(p, sketch=("affd", 0), batch_size=None)
    _storage(p)

    p = command("info", "what a store holds: dims, sketch, progress, valid rows; --verify checks every chunk",
                "Describe a gradient/HVP sketch store, a spectrum folder or an intrinsic-dimension folder. With "
                "--verify, read every chunk of a gradient sketch store, check its checksum and its batch's "
                "digest, and list each damaged batch (exit code 3 when there is one); rerunning the sketch "
                "command that wrote the store recomputes exactly those.", commands.info)
    p.add_argument("store", metavar="STORE", help="a path written by sketcharray")
    p.add_argument("--verify", action="store_true", help="read and check every chunk; list the damage")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _storage(p)

    bench = command("bench", "run a benchmark (prints a table, writes JSON)",
                    "Run a benchmark; each prints a table and writes JSON. 'sketcharray bench NAME --help' lists "
                    "its options.", _bench)
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (_, help_text) in BENCHMARKS.items():
        # the benchmark's own options are parsed by its parser, built only when it runs
        bench_sub.add_parser(name, help=help_text, add_help=False)
    return parser


#: set by the first Ctrl-C of a run: whatever fails after it (a library's cleanup cut short) is the interrupt's doing
_INTERRUPTED = []


def _interrupt_once(signum, frame):
    """The first Ctrl-C interrupts; later ones are ignored while the interrupted work unwinds (closing files,
    releasing the store's lock), so a second Ctrl-C cannot cut that short and turn the exit into a traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _INTERRUPTED.append(True)
    raise KeyboardInterrupt


def _interrupted(argv) -> int:
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    command = f"sketcharray {words[0]}" if words else "sketcharray"
    print(f"\n{command}: interrupted; rerun the same command to resume", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is \
            signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, _interrupt_once)
    _INTERRUPTED.clear()
    try:
        code = _main(argv)
        return _interrupted(argv) if _INTERRUPTED and code not in (EXIT_OK, EXIT_INTERRUPTED) else code
    except KeyboardInterrupt:  # before a subcommand was parsed: while the package's modules load
        return _interrupted(argv)
    except Exception:
        if _INTERRUPTED:  # an error raised while the interrupt unwound the work: the interrupt is the news
            return _interrupted(argv)
        raise
    finally:
        # put the caller's handler back (main called from Python); after a real Ctrl-C the process is on its way
        # out, and a second Ctrl-C stays ignored through the interpreter's shutdown too
        if previous is not None and not _INTERRUPTED:
            signal.signal(signal.SIGINT, previous)


class _StdoutHandler(logging.StreamHandler):
    """The package's messages on the current ``sys.stdout`` (read at each message, as ``print`` does)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def _main(argv: list[str] | None) -> int:
    from ..core.localmodules import off_the_path

    saved = list(sys.path)
    off_the_path()  # a file in the current folder never stands in for a module (see localmodules)
    # the library logs (logger "sketcharray"); the command line shows its messages on stdout, as lines
    logger, handler = logging.getLogger("sketcharray"), _StdoutHandler()
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return _run(argv)
    finally:  # called from Python (a test, a notebook): the caller's path and logging as they were
        sys.path[:] = saved
        logger.removeHandler(handler)
        logger.setLevel(level)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nsketcharray {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError as exc:
        print(f"sketcharray {args.command}: out of memory: {exc}", file=sys.stderr)
        return EXIT_MEMORY
    except (ValueError, OSError, ImportError) as exc:  # bad input, a path in the way, a missing module
        print(f"sketcharray {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
