"""TDA reproduction on an embedded workload (issue: TDA): the paper's Tables 6 and 1.

Table 6 analogue: Pearson r between sketched and exact gradient inner products
(test x train pairs) for each sketch method as log2 D grows, and the smallest
log2 D at which r exceeds 0.95, 0.98, 0.99 (median over seeds).
Table 1 analogue: r between the all-parameter exact inner products and those
of a single layer's exact (unsketched) gradients.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import numpy as np
import torch

from ...analysis.tda import compare_with_exact, exact_gradient_scores
from ...storage.outputs import save_figure
from ...sketches import make_sketch
from ...torch import per_example_gradients, select_params
from ...torch.grads import to_device
from ...workloads import WORKLOADS
from ._util import format_table, sketch_spec, write_json

THRESHOLDS = (0.95, 0.98, 0.99)
METHODS = ("dense", "fjl", "ffd", "affd", "afjl", "qk")


def exact_gradients(w, dataset, n, batch, device, params=None):
    model = w.model().to(device)
    ps = select_params(model, params)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch)
    rows = [per_example_gradients(model, w.loss_fn, to_device(b, device), ps, forward=w.forward)[0].float().cpu()
            for b in loader]
    return torch.cat(rows).numpy(), ps


def sketch_rows(op, g, rows: int = 8):
    """Phi g for many long rows, a few rows at a time (bounds the transform's working memory)."""
    return np.concatenate([op.apply(g[s : s + rows]) for s in range(0, len(g), rows)])


def layer_groups(ps) -> dict[str, list[slice]]:
    """Parameter tensors grouped by module (weight with its bias), as slices of the flat vector."""
    groups, start = defaultdict(list), 0
    for name, size in zip(ps.names, ps.sizes):
        groups[name.rsplit(".", 1)[0]].append(slice(start, start + size))
        start += size
    return dict(groups)


def smallest_log2d(rs: dict[int, float], threshold: float):
    hits = [ld for ld, r in sorted(rs.items()) if r > threshold]
    return hits[0] if hits else None


def operator(w, method: str, ps, d: int, seed: int, params=None):
    """The sketch a method name stands for: ``make_sketch``, or ``factored-<factor>`` of the workload's model
    (its ``apply`` on exact gradients gives the numbers its hooks give: tests/torch/test_factored.py)."""
    spec = sketch_spec(method, d, seed)
    if spec["method"] == "factored":
        from ...torch.factored import factored_sketch

        return factored_sketch(w.model(), d, factor=spec["factor"], seed=seed, params=params)
    return make_sketch(method, ps.n, d, seed=seed)


def run(workload: str, n_train: int, n_query: int, log2ds, seeds: int, device: str, batch: int,
        methods=METHODS, params=None, topk: int = 10) -> dict:
    w = WORKLOADS[workload]()
    g_train, ps = exact_gradients(w, w.train, min(n_train, len(w.train)), batch, device, params)
    g_query, _ = exact_gradients(w, w.test, min(n_query, len(w.test)), batch, device, params)
    exact = exact_gradient_scores(g_train, g_query)
    pearson: dict[str, dict[int, float]] = {}
    overlap: dict[str, dict[int, float]] = {}
    for method in methods:
        pearson[method], overlap[method] = {}, {}
        for ld in log2ds:
            rs, ov = [], []
            for seed in range(seeds):
                try:
                    op = operator(w, method, ps, 1 << ld, seed, params)
                except (ValueError, MemoryError):
                    break  # D not admissible for this N and method, or its state does not fit
                s = exact_gradient_scores(sketch_rows(op, g_train), sketch_rows(op, g_query))
                cmp = compare_with_exact(s, exact, k=topk)
                rs.append(float(cmp.pearson))
                ov.append(float(cmp.topk_overlap.mean()))
            if rs:
                pearson[method][ld] = float(np.median(rs))
                overlap[method][ld] = float(np.median(ov))
        print(f"  {workload} {method}: " + " ".join(f"2^{ld}:{r:.3f}" for ld, r in pearson[method].items()), flush=True)
    layers = {}
    for name, slices in layer_groups(ps).items():
        idx = np.concatenate([np.arange(s.start, s.stop) for s in slices])
        sub = exact_gradient_scores(g_train[:, idx], g_query[:, idx])
        layers[name] = {"n_params": int(idx.size), "pearson": float(compare_with_exact(sub, exact).pearson)}
    return {"workload": workload, "N": ps.n, "params": params, "pairs": int(exact.size), "pearson": pearson,
            "topk_overlap": overlap, "topk": topk, "layers": layers,
            "table6": {m: {str(t): smallest_log2d(pearson[m], t) for t in THRESHOLDS} for m in methods}}


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        for method, rs in res["pearson"].items():
            if rs:
                ax.plot(list(rs), list(rs.values()), marker="o", label=method)
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", lw=0.6, ls=":")
        ax.set_xlabel("log2 D")
        ax.set_ylabel("Pearson r, sketched vs exact <g_query, g_train>")
        ax.set_title(f"{res['workload']} (N = {res['N']:,}, {res['pairs']:,} pairs)")
        ax.set_ylim(min(0.5, ax.get_ylim()[0]), 1.0)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="bench_tda", description=__doc__)
    p.add_argument("--workloads", type=lambda s: s.split(","), default=["digits"])
    p.add_argument("--n-train", type=int, default=256)
    p.add_argument("--n-query", type=int, default=16)
    p.add_argument("--log2d", type=lambda s: [int(v) for v in s.split(",")], default=list(range(4, 13)))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                   help="whole-vector methods, and factored-afjl, factored-qk, factored-dense (per-layer)")
    p.add_argument("--params", nargs="+", default=None, metavar="GLOB",
                   help="the parameters that make up N (e.g. MiniLM's top layers); default all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="bench-out/bench-tda.json")
    p.add_argument("--plot", default="bench-out/bench-tda.png")
    return p


def main(argv=None, args=None) -> int:
    args = args or build_parser().parse_args(argv)
    results = [run(wl, args.n_train, args.n_query, args.log2d, args.seeds, args.device, args.batch, args.methods,
                   args.params) for wl in args.workloads]
    for res in results:
        print(f"\nTable 6 analogue ({res['workload']}, N={res['N']:,}, {res['pairs']:,} pairs, median of "
              f"{args.seeds} seeds): smallest log2 D with Pearson r > threshold ('-' = never up to 2^{max(args.log2d)})")
        rows = [{"method": m, **{str(t): "-" if v is None else str(v) for t, v in res["table6"][m].items()}}
                for m in res["table6"]]
        print(format_table(rows, [("method", "method")] + [(str(t), f"r > {t}") for t in THRESHOLDS]))
        lds = sorted({ld for m in res["pearson"].values() for ld in m})
        print(f"\nPearson r / top-{res['topk']} overlap with the exact scores, per log2 D (median over seeds)")
        rows = [{"method": m, **{str(ld): (f"{res['pearson'][m][ld]:.3f} / {res['topk_overlap'][m][ld]:.2f}"
                                           if ld in res["pearson"][m] else "-") for ld in lds}}
                for m in res["pearson"]]
        print(format_table(rows, [("method", "method")] + [(str(ld), f"2^{ld}") for ld in lds]))
        print(f"\nTable 1 analogue ({res['workload']}): one layer's exact gradients vs all parameters")
        rows = [{"layer": k, "n": f"{v['n_params']:,}", "r": f"{v['pearson']:.3f}"} for k, v in res["layers"].items()]
        print(format_table(rows, [("layer", "layer"), ("n", "parameters"), ("r", "Pearson r")]))
    write_json(args.json, {"benchmark": "tda", "results": results})
    plot(results, args.plot)
    print(f"\nwrote {args.json} and {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
