"""TRAK on sketches against the ``traker`` package (Park et al., *TRAK*, ICML 2023).

On the digits MLP (the trained model, one checkpoint): TRAK scores of every
training example for every test example, computed by ``traker`` itself
(its CPU ``BasicProjector``, Gaussian, two projection seeds) and by
``attribute(..., score="trak")`` on this package's sketches of the same
margin gradients.  The yardstick is TRAK's agreement with itself: the
per-query top-10 overlap between its two seeds.  A sketch is as good as
TRAK's own projection when its overlap with TRAK matches that.  Needs
``pip install traker`` (an optional benchmark and test dependency).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch

from ._util import format_table, write_json


def topk_overlap(scores: np.ndarray, reference: np.ndarray, k: int = 10) -> np.ndarray:
    """Per query (row): the fraction of the reference's top k that is in the top k of ``scores``."""
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    ref = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    return np.array([len(set(a) & set(b)) / k for a, b in zip(top, ref)])


def trak_package_scores(model, train, test, proj_dim: int, seed: int, save_dir=None) -> np.ndarray:
    """(test, train) TRAK scores from the ``traker`` package, on the CPU, in float32, one checkpoint."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    n_params = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim=n_params, proj_dim=proj_dim, seed=seed, proj_type=ProjectionType.normal,
                               device="cpu", dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=model.eval(), task="image_classification", train_set_size=len(train),
                        save_dir=str(save_dir or tmp), device="cpu", proj_dim=proj_dim, use_half_precision=False,
                        projector=projector, logging_level=40)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for batch in torch.utils.data.DataLoader(train, batch_size=100):
            traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="bench", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(test))
        for batch in torch.utils.data.DataLoader(test, batch_size=100):
            traker.score(batch=batch, num_samples=len(batch[0]))
        return np.asarray(traker.finalize_scores(exp_name="bench"), dtype=np.float64).T


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_trak", description=__doc__)
    p.add_argument("--log2d", type=lambda s: [int(v) for v in s.split(",")], default=[8, 9, 10])
    p.add_argument("--methods", type=lambda s: s.split(","), default=["afjl", "affd", "qk"])
    p.add_argument("--k", type=int, default=10, help="top-k overlap")
    p.add_argument("--json", default="bench-out/bench-trak.json")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    try:
        import trak  # noqa: F401
    except ImportError:
        print("bench trak needs the traker package: pip install traker", file=sys.stderr)
        return 3
    from ...analysis import attribute
    from ...collect import sketch_gradients
    from ...workloads import classification_margin, digits

    w = digits()
    rows = []
    for ld in args.log2d:
        d = 1 << ld
        t0 = time.perf_counter()
        ref0, ref1 = (trak_package_scores(w.model(), w.train, w.test, d, seed) for seed in (0, 1))
        yardstick = topk_overlap(ref1, ref0, args.k)
        row = {"D": d, "trak_vs_trak": float(yardstick.mean()),
               "trak_vs_trak_se": float(yardstick.std(ddof=1) / np.sqrt(len(yardstick)))}
        for method in args.methods:
            spec = {"method": method, "n_out": d, "seed": 0}
            tr = sketch_gradients(w.model_factory, classification_margin, w.train, spec, batch_size=100,
                                  execution={"progress": False})
            te = sketch_gradients(w.model_factory, classification_margin, w.test, spec, batch_size=100,
                                  execution={"progress": False})
            ours = attribute(tr, te, score="trak").values
            o0, o1 = topk_overlap(ours, ref0, args.k), topk_overlap(ours, ref1, args.k)
            row[method] = float((o0.mean() + o1.mean()) / 2)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"  D = {d}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "D"), flush=True)
    print(f"\nTop-{args.k} overlap with TRAK (traker, Gaussian projection, seeds 0 and 1) on the digits MLP, "
          f"{len(w.train)} training and {len(w.test)} test examples; '± SE' = standard error over queries")
    print(format_table([{"D": f"2^{int(np.log2(r['D']))}",
                         "t": f"{r['trak_vs_trak']:.3f} ± {r['trak_vs_trak_se']:.3f}",
                         **{m: f"{r[m]:.3f}" for m in args.methods}} for r in rows],
                       [("D", "D"), ("t", "TRAK seed 1 vs seed 0")]
                       + [(m, f"TRAK score on {m} sketches vs TRAK") for m in args.methods]))
    write_json(args.json, {"benchmark": "trak", "k": args.k, "rows": rows})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
