"""``sketcharray demo``: the main job on the embedded default workload."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .collect import sketch_gradients
from .workloads import WORKLOADS


def run_demo(out="sketcharray-demo", *, workload: str = "digits", device: str = "cpu", method: str = "afjl",
             n_out: int = 512, batch_size: int = 64, seed: int = 0) -> Path:
    """Stream the workload's training-gradient sketches to ``out/<workload>-train-grad.zarr``.

    Rerunning resumes (or, when complete, just reopens) the store.  Returns its path.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; expected one of {sorted(WORKLOADS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"building the {workload!r} workload ...", flush=True)
    w = WORKLOADS[workload]()
    print(f"  {len(w.train)} training examples, {w.info.get('n_params', '?')} parameters, "
          f"test accuracy {w.info.get('test_accuracy', float('nan')):.3f}", flush=True)
    store = out / f"{w.name}-train-grad.zarr"
    ds = sketch_gradients(
        w.model_factory, w.loss_fn, w.train, {"method": method, "n_out": n_out, "seed": seed},
        batch_size=batch_size, ids=w.train_ids, store=store, device=device, checkpoint="final",
        forward=w.forward,
    )
    norms = np.sqrt((ds.grad.where(ds.valid) ** 2).sum("sketch")).compute()
    print(f"\nstore: {store.resolve()}")
    print(ds)
    print(f"\n{int(ds.valid.sum())} of {ds.sizes['example']} examples valid; sketched gradient norm "
          f"median {float(norms.median()):.3g}, largest {float(norms.max()):.3g} "
          f"(example {norms.idxmax().item()!r}); {time.perf_counter() - t0:.1f} s in all")
    print(f"open it lazily with: sketcharray.store.open_sketches({str(store)!r})")
    return store
