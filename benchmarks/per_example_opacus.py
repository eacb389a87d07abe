#!/usr/bin/env python
"""Per-example gradients of MiniLM batches: sketcharray's torch.func vmap against Opacus' GradSampleModule.

The measurement behind the choice of vmap (docs/benchmarks.md, "Streaming"): 32 training sentences in
batches of 8, best of 3, against a plain batched forward and backward of the mean loss in the same run;
then both per-example gradients of one batch compared parameter by parameter.  Needs the 'workloads'
extra and ``pip install opacus`` (not a dependency of sketcharray).

Opacus records activations only in training mode, so its copy of the model runs in training mode with
dropout set to 0 (the same function as evaluation mode).  The pooler takes no part in the classifier and
is frozen in both.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sketcharray  # noqa: E402,F401  (before torch: huge pages for torch's allocations)
import torch  # noqa: E402

from sketcharray.app.bench._util import best_time  # noqa: E402
from sketcharray.torch import per_example_gradients, select_params  # noqa: E402
from sketcharray.workloads import WORKLOADS  # noqa: E402


def _freeze_pooler(model):
    for name, p in model.named_parameters():
        if "pooler" in name:
            p.requires_grad_(False)
    return model


def main() -> int:
    from opacus import GradSampleModule

    w = WORKLOADS["minilm"]()
    batches = list(torch.utils.data.DataLoader(torch.utils.data.Subset(w.train, range(32)), batch_size=8))
    forward = w.forward or (lambda m, b: m(b[0]))
    model = _freeze_pooler(w.model())
    paramset = select_params(model)
    hooked = _freeze_pooler(w.model()).train()
    for module in hooked.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    gsm = GradSampleModule(hooked, batch_first=True, loss_reduction="sum", strict=False)

    def step():
        model.zero_grad(set_to_none=True)
        for b in batches:
            w.loss_fn(forward(model, b), b).mean().backward()

    def with_vmap():
        for b in batches:
            per_example_gradients(model, w.loss_fn, b, paramset, forward=w.forward)

    def with_opacus(batch_list=batches):
        for b in batch_list:
            gsm.zero_grad(set_to_none=True)
            for p in hooked.parameters():
                p.grad_sample = None
            w.loss_fn(forward(gsm, b), b).sum().backward()

    t_step, t_vmap, t_opacus = best_time(step), best_time(with_vmap), best_time(with_opacus)
    print(f"training step {t_step:.3f} s; vmap {t_vmap:.3f} s ({t_vmap / t_step:.2f}x); "
          f"Opacus {t_opacus:.3f} s ({t_opacus / t_step:.2f}x)")
    g, _ = per_example_gradients(model, w.loss_fn, batches[0], paramset, forward=w.forward)
    with_opacus(batches[:1])
    ours = paramset.unflatten(g)
    for name, p in hooked.named_parameters():
        if not p.requires_grad:
            continue
        if tuple(p.grad_sample.shape) != tuple(ours[name].shape):
            print(f"  {name}: Opacus gives {tuple(p.grad_sample.shape)}, not per example {tuple(ours[name].shape)}")
            continue
        scale = float(ours[name].abs().max())
        diff = float((p.grad_sample - ours[name]).abs().max())
        if diff > 1e-3 * scale:  # the attention key bias: its gradient is 0 (softmax ignores a constant shift)
            print(f"  {name}: max |difference| {diff:.2e} against max |gradient| {scale:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
