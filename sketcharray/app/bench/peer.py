"""Factored per-layer sketches against a peer: dattri's LoGra (block-projected gradients, Kronecker factors).

On the digits MLP (three Linear layers: LoGra folds each bias into its weight
as an extra input column, so both cover all 3,466 parameters), at the same
total D (LoGra: ``proj_dim`` per layer, a square, so D = 3 proj_dim), over
seeds: time to sketch the training and test examples and score them, and the
Pearson r and top-10 overlap of the scores against exact gradient inner
products.  LoGra runs with ``hessian="Identity"`` (plain inner products of its
projected gradients), our factored sketches with ``score="dot"``.  Needs the
``dattri`` package (``pip install 'sketcharray[bench]'``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from ._util import format_table, write_json


def _exact_scores(model, w, x, y, xq, yq):
    from ...analysis.tda import exact_gradient_scores
    from ...torch import per_example_gradients, select_params

    ps = select_params(model)
    g, _ = per_example_gradients(model, w.loss_fn, (x, y), ps)
    q, _ = per_example_gradients(model, w.loss_fn, (xq, yq), ps)
    return exact_gradient_scores(g.double().numpy(), q.double().numpy())


def _logra(model, x, y, xq, yq, per_layer: int, seed: int):
    from dattri.algorithm.block_projected_if.block_projected_if import BlockProjectedIFAttributor
    from dattri.task import AttributionTask

    def loss(m, batch, device):
        inputs, targets = batch
        return nn.functional.cross_entropy(m(inputs.to(device)), targets.to(device))

    # dattri reads one example of the first batch as the model's sample input: give each example a leading 1
    wrapped = nn.Sequential(nn.Flatten(), *model).eval()
    task = AttributionTask(model=wrapped, loss_func=loss, checkpoints=wrapped.state_dict())
    side = int(round(per_layer ** 0.5))
    att = BlockProjectedIFAttributor(
        task=task, hessian="Identity", device="cpu", offload="cpu",
        sparsifier_kwargs={"device": "cpu", "proj_dim": side, "proj_max_batch_size": 64, "proj_type": "normal",
                           "proj_seed": seed},
        projector_kwargs={"device": "cpu", "proj_dim": -1, "proj_max_batch_size": 64, "proj_type": "identity"})
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:, None], y), batch_size=64)
    test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xq[:, None], yq), batch_size=64)
    att.cache(train)
    return att.attribute(train, test).T.numpy(), sum(att.layer_dims)


def _factored(model, w, x, y, xq, yq, n_out: int, factor: str, seed: int) -> np.ndarray:
    from ...analysis import attribute
    from ...collect import sketch_gradients

    spec = {"method": "factored", "factor": factor, "n_out": n_out, "seed": seed}
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(y), 64)]
    train = sketch_gradients(model, w.loss_fn, batches, spec, execution={"progress": False})
    queries = sketch_gradients(model, w.loss_fn, [(xq, yq)], spec, execution={"progress": False})
    return attribute(train, queries, score="dot").values


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_peer", description=__doc__)
    p.add_argument("--per-layer", type=lambda s: [int(v) for v in s.split(",")], default=[16, 64, 256],
                   help="LoGra's proj_dim per layer (squares); the total D is 3 times it")
    p.add_argument("--factors", type=lambda s: s.split(","), default=["afjl", "dense"])
    p.add_argument("--n-train", type=int, default=512)
    p.add_argument("--n-query", type=int, default=32)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json", default="bench-out/bench-peer.json")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    try:
        import dattri  # noqa: F401
    except ImportError:
        print("bench peer needs the dattri package: pip install 'sketcharray[bench]'", file=sys.stderr)
        return 3
    from ...analysis.tda import compare_with_exact
    from ...workloads import digits

    w = digits()
    model = w.model()
    x, y = w.train[:args.n_train]
    xq, yq = w.test[:args.n_query]
    exact = _exact_scores(model, w, x, y, xq, yq)
    _logra(model, x, y, xq, yq, args.per_layer[0], 0)  # warm-up: dattri's first call sets itself up
    _factored(model, w, x, y, xq, yq, 3 * args.per_layer[0], args.factors[0], 0)
    rows = []
    for per_layer in args.per_layer:
        cases = [("dattri LoGra", None)] + [(f"factored {f}", f) for f in args.factors]
        for name, factor in cases:
            rs, overlaps, seconds, total = [], [], [], 3 * per_layer
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                if factor is None:
                    scores, total = _logra(model, x, y, xq, yq, per_layer, seed)
                else:
                    scores = _factored(model, w, x, y, xq, yq, total, factor, seed)
                seconds.append(time.perf_counter() - t0)
                agreement = compare_with_exact(scores, exact, k=10)
                rs.append(float(agreement.pearson))
                overlaps.append(float(agreement.topk_overlap.mean()))
            rows.append({"method": name, "D": total, "pearson": float(np.median(rs)),
                         "topk_overlap": float(np.median(overlaps)),
                         "ms_per_example": 1e3 * float(np.median(seconds)) / (len(y) + len(yq))})
            print(f"  {name} D={total}: r {rows[-1]['pearson']:.3f}, top-10 {rows[-1]['topk_overlap']:.2f}, "
                  f"{rows[-1]['ms_per_example']:.3f} ms/example", flush=True)
    print(f"\nFactored sketches and dattri's LoGra on digits ({len(y)} training x {len(yq)} test examples, all "
          f"3,466 parameters), median of {args.seeds} seeds: agreement with exact inner products, and time "
          "per example (sketching train and test, scoring)")
    print(format_table([{**r, "pearson": f"{r['pearson']:.3f}", "topk_overlap": f"{r['topk_overlap']:.2f}",
                         "ms_per_example": f"{r['ms_per_example']:.3f}"} for r in rows],
                       [("method", "method"), ("D", "D"), ("pearson", "Pearson r"), ("topk_overlap", "top-10"),
                        ("ms_per_example", "ms / example")]))
    write_json(args.json, {"benchmark": "peer", "rows": rows, "seeds": args.seeds})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
