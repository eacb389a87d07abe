"""Attribution quality measured: the linear datamodeling score (LDS) on the digits workload.

M models are retrained from the digits recipe (same initialisation, Adam,
full batch) on random 50% subsets of the training set; their margins on the
test examples are what attribution scores must predict (see
:mod:`sketcharray.analysis.lds`).  The scores come from the fully trained
model: ``dot``, ``cosine`` and ``influence`` on loss gradients, ``trak`` on
margin gradients, each from exact gradients (no sketch) and from AFJL,
AFFD and QK sketches at several D (or factored per-layer sketches:
``factored-afjl`` ...); random scores give the zero line.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import xarray as xr

from ._util import format_table, sketch_spec, write_json

SCORES = ("dot", "cosine", "influence", "trak")


def retrain_on_subsets(models: int, *, fraction: float = 0.5, seed: int = 0, n_train: int | None = None,
                       n_test: int | None = None, steps: int = 300):
    """(subsets (model, example) bool, outputs (model, query) margins) for digits models trained on random subsets."""
    from ...workloads import _digits_mlp, classification_margin, digits

    w = digits()
    x, y = w.train[:]
    xq, yq = w.test[:]
    x, y = x[:n_train], y[:n_train]
    xq, yq = xq[:n_test], yq[:n_test]
    rng = np.random.default_rng(seed)
    n = len(y)
    subsets = np.zeros((models, n), dtype=bool)
    outputs = np.zeros((models, len(yq)))
    for j in range(models):
        chosen = rng.choice(n, size=int(round(fraction * n)), replace=False)
        subsets[j, chosen] = True
        torch.manual_seed(0)  # the digits recipe's initialisation: only the subset differs
        model = _digits_mlp(32)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        idx = torch.as_tensor(chosen)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        with torch.no_grad():
            outputs[j] = classification_margin(model(xq), (xq, yq)).numpy()
    return subsets, outputs


def exact_gradients(model, loss_fn, data, ids) -> xr.Dataset:
    """Unsketched per-example gradients as a Dataset that ``attribute`` takes (sketch = the N parameters)."""
    from ...torch import per_example_gradients, select_params

    ps = select_params(model)
    grads, losses = [], []
    for batch in torch.utils.data.DataLoader(data, batch_size=250):
        g, loss = per_example_gradients(model, loss_fn, batch, ps)
        grads.append(g.detach().double().numpy())
        losses.append(loss.detach().double().numpy())
    g, loss = np.concatenate(grads), np.concatenate(losses)
    return xr.Dataset({"grad": (("example", "sketch"), g), "loss": ("example", loss),
                       "valid": ("example", np.isfinite(g).all(axis=1))},
                      coords={"example": np.asarray(ids, dtype=object), "sketch": np.arange(g.shape[1])})


def score_matrix(train_sets: dict, test_sets: dict, score: str) -> np.ndarray:
    """(query, example) scores: trak on the margin sketches, the others on the loss sketches."""
    from ...analysis import attribute

    kind = "margin" if score == "trak" else "loss"
    return np.asarray(attribute(train_sets[kind], test_sets[kind], score=score).values, dtype=np.float64)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_lds", description=__doc__)
    p.add_argument("--models", type=int, default=50, help="retrained models (M >= 50 for the documented table)")
    p.add_argument("--methods", type=lambda s: s.split(","), default=["afjl", "affd", "qk"],
                   help="whole-vector methods, or factored-afjl, factored-qk, factored-dense (per-layer)")
    p.add_argument("--log2d", type=lambda s: [int(v) for v in s.split(",")], default=[8, 10])
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets and the sketches")
    p.add_argument("--json", default="bench-out/bench-lds.json")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    from ...analysis.lds import linear_datamodeling_score
    from ...collect import sketch_gradients
    from ...workloads import classification_margin, digits

    w = digits()
    t0 = time.perf_counter()
    print(f"retraining {args.models} digits models on random 50% subsets ...", flush=True)
    subsets, outputs = retrain_on_subsets(args.models, seed=args.seed)
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    model = w.model()
    fns = {"loss": w.loss_fn, "margin": classification_margin}
    variants = {"exact": ({k: exact_gradients(model, f, w.train, w.train_ids) for k, f in fns.items()},
                          {k: exact_gradients(model, f, w.test, w.test_ids) for k, f in fns.items()})}
    for method in args.methods:
        for ld in args.log2d:
            spec = sketch_spec(method, 1 << ld, args.seed)
            variants[f"{method} 2^{ld}"] = tuple(
                {k: sketch_gradients(w.model_factory, f, data, spec, batch_size=250, ids=ids,
                                  execution={"progress": False})
                 for k, f in fns.items()}
                for data, ids in ((w.train, w.train_ids), (w.test, w.test_ids)))
    rows = []
    for name, (train_sets, test_sets) in variants.items():
        row = {"gradients": name}
        for score in SCORES:
            res = linear_datamodeling_score(score_matrix(train_sets, test_sets, score), subsets, outputs)
            row[score] = (res.attrs["mean"], res.attrs["ci_low"], res.attrs["ci_high"])
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{s} {row[s][0]:.3f}" for s in SCORES), flush=True)
    rng = np.random.default_rng(args.seed + 1)
    rand = linear_datamodeling_score(rng.standard_normal((len(w.test), len(w.train))), subsets, outputs)
    rows.append({"gradients": "random scores", **{s: (rand.attrs["mean"], rand.attrs["ci_low"],
                                                      rand.attrs["ci_high"]) for s in SCORES}})

    def cell(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"

    print(f"\nLDS on digits ({args.models} models on 50% subsets, {len(w.test)} test examples; mean over test "
          "examples [95% CI])")
    print(format_table([{"g": r["gradients"], **{s: cell(r[s]) for s in SCORES}} for r in rows],
                       [("g", "gradients")] + [(s, s) for s in SCORES]))
    write_json(args.json, {"benchmark": "lds", "models": args.models, "rows": rows,
                           "seconds": time.perf_counter() - t0})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
