"""Training for the intrinsic-dimension search: Adam on a subspace omega (or on all parameters, the reference).

What drives a model lives here, in the torch layer; the search itself
(:mod:`sketcharray.analysis.intrinsic`) only calls ``train`` and
``evaluate`` and keeps its state as plain arrays.
"""

from __future__ import annotations

import copy
import json
import math
from functools import cached_property

import numpy as np
import torch

from ..core.settings import ModelSettings, TrainingSettings
from .grads import default_forward, to_device
from .subspace import SubspaceModel

#: learning-rate halvings before :func:`train_to_convergence` stops (lr / 64 at the end)
DECAYS = 6


class PlateauRule:
    """When training has converged: the one rule of the check runs, the grid and every D of the search.

    After each evaluation ``update(tau)`` says ``"improved"`` (tau beat the
    best by ``min_improvement / 10``), ``"halve"`` (it did not: halve the
    learning rate) or ``"converged"`` (it did not, for the ``DECAYS + 1``-th
    time).  ``new_best`` is True when tau is the best so far, by any margin:
    the weights worth keeping.
    """

    def __init__(self, min_improvement: float, best: float = -math.inf, halvings: int = 0):
        self.tol, self.best, self.halvings, self.new_best = min_improvement / 10, best, halvings, False

    def update(self, tau: float) -> str:
        self.new_best = tau > self.best
        if tau > self.best + self.tol:
            self.best = tau
            return "improved"
        self.best = max(self.best, tau)
        self.halvings += 1
        return "converged" if self.halvings > DECAYS else "halve"


class MinibatchStream:
    """A deterministic stream of shuffled minibatches: batch i depends only on (seed, i)."""

    def __init__(self, dataset, batch_size: int, seed: int):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.n = len(dataset)

    def batch(self, i: int):
        per_epoch = max(1, self.n // self.batch_size)
        epoch, j = divmod(i, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        idx = order[j * self.batch_size : (j + 1) * self.batch_size]
        return torch.utils.data.default_collate([self.dataset[int(k)] for k in idx])


def train_steps(module, opt, stream: MinibatchStream, start: int, n: int, loss_fn, forward, device) -> None:
    """Steps ``start .. start + n - 1`` of the stream: one optimizer step on the mean loss of each minibatch."""
    module.train(False)
    for i in range(start, start + n):
        batch = to_device(stream.batch(i), device, module)
        opt.zero_grad()
        loss_fn(forward(module, batch), batch).mean().backward()
        opt.step()


def evaluate(module, eval_fn) -> float:
    """``eval_fn(module)`` without autograd, as a float."""
    with torch.no_grad():
        return float(eval_fn(module))


def train_to_convergence(module, trainable, data, loss_fn, eval_fn, *, training: TrainingSettings, seed: int = 0,
                         forward=None, device=None, progress: bool = False, label: str = "training") -> float:
    """Adam on ``trainable`` to convergence; returns the best metric seen.

    Every ``training.steps_per_eval`` steps the metric is evaluated; when it
    has not improved on the best by ``min_improvement / 10`` the learning
    rate is halved, and after :data:`DECAYS` halvings (or ``max_steps``)
    training stops.  A constant learning rate leaves Adam circling the
    optimum at a distance set by the rate; halving it at each plateau lets
    it settle.  Validated on a least-squares toy
    (tests/analysis/test_intrinsic.py): a subspace that holds the solution
    reaches the least-squares metric within 0.01, where the plateau rule
    alone (stop at the first improvement below ``min_improvement``) left it
    0.1-0.2 short.

    With ``progress``, a bar labelled ``label`` counts steps up to
    ``max_steps`` and ends with a line saying where it stopped and why.
    """
    from ..core.progress import Progress

    opt = torch.optim.Adam(trainable, lr=training.lr)
    stream, step, rule = MinibatchStream(data, training.batch_size, seed), 0, PlateauRule(training.min_improvement)
    bar = Progress(label, training.max_steps, enabled=progress, unit="steps")
    stopped = "max_steps reached"
    while step < training.max_steps:
        train_steps(module, opt, stream, step, training.steps_per_eval, loss_fn, forward or default_forward, device)
        step += training.steps_per_eval
        action = rule.update(evaluate(module, eval_fn))
        bar.update(step, f"best metric {rule.best:.4f}")
        if action == "converged":
            stopped = "converged"
            break
        if action == "halve":
            for group in opt.param_groups:
                group["lr"] /= 2
    bar.close(f"{stopped}, best metric {rule.best:.4f}")
    return rule.best


def full_finetune_metric(model, loss_fn, data, eval_fn, *, training: TrainingSettings, seed: int = 0, forward=None,
                         device=None, progress: bool = False) -> float:
    """The reference: all parameters of a copy of ``model`` trained by :func:`train_to_convergence`."""
    model = copy.deepcopy(model).to(device or "cpu")
    for p in model.parameters():
        p.requires_grad_(True)
    return train_to_convergence(model, list(model.parameters()), data, loss_fn, eval_fn, training=training,
                                seed=seed, forward=forward, device=device, progress=progress,
                                label="reference (full fine-tuning)")


def start_metric(model, eval_fn, device=None) -> float:
    """The metric of ``model``'s own weights (theta_0), on a copy (the model is not moved)."""
    return evaluate(copy.deepcopy(model).to(device or "cpu"), eval_fn)


class SubspaceTrainer:
    """Adam on omega of ``theta = theta_0 + Phi^T omega`` for the doubling search, one projection ``op``.

    ``train(d, start, n)`` continues training with the first ``d``
    coordinates of omega active, on minibatches ``start ..`` of a stream
    seeded by ``seed``; ``evaluate(eval_fn)`` measures the reparametrised
    model.  ``arrays()`` / ``restore(arrays, groups)`` give and take its
    state (omega and Adam's moments) as plain named arrays and JSON-able
    parameter groups, so a saved search holds nothing that can run code.
    ``check_run(d, ...)`` trains a *fresh* omega at dimension d only, to
    convergence (the check at D*/2, and the grid mode).
    """

    def __init__(self, base, op, data, loss_fn, *, training: TrainingSettings, seed: int,
                 model_settings: ModelSettings, device=None):
        self.base, self.op, self.data, self.loss_fn = base, op, data, loss_fn
        self.training, self.seed, self.device = training, seed, device
        self.params, self.forward = model_settings.params, model_settings.forward or default_forward
        self.stream = MinibatchStream(data, training.batch_size, seed)

    @cached_property
    def sub(self) -> SubspaceModel:
        """The search's reparametrised model (a copy of ``base``), built when the search first needs it: the
        grid mode only makes check runs, which build their own."""
        return SubspaceModel(copy.deepcopy(self.base), self.op, self.params).to(self.device or "cpu")

    @cached_property
    def opt(self) -> torch.optim.Adam:
        return torch.optim.Adam([self.sub.omega], lr=self.training.lr)

    def train(self, d: int, start: int, n: int) -> None:
        self.sub.active = d
        train_steps(self.sub, self.opt, self.stream, start, n, self.loss_fn, self.forward, self.device)

    # what the search's convergence rule does between evaluations (see PlateauRule)
    def keep_best(self) -> None:
        """Remember omega as the best weights so far."""
        self.best_omega = self.sub.omega.detach().clone()

    def back_to_best(self) -> None:
        """Put the best weights back (the start of the next D: nested subspaces hold them)."""
        if getattr(self, "best_omega", None) is not None:
            with torch.no_grad():
                self.sub.omega.copy_(self.best_omega)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def evaluate(self, eval_fn) -> float:
        return evaluate(self.sub, eval_fn)

    def arrays(self) -> tuple[dict[str, np.ndarray], list]:
        """omega and the optimizer's state as named arrays (``omega``, ``state/<param>/<key>``), and the
        optimizer's parameter groups (JSON-able)."""
        state_dict = self.opt.state_dict()
        arrays = {f"state/{pid}/{key}": (value.detach().cpu().numpy() if isinstance(value, torch.Tensor)
                                         else np.asarray(value))
                  for pid, entries in state_dict["state"].items() for key, value in entries.items()}
        arrays["omega"] = self.sub.omega.detach().cpu().numpy()
        if getattr(self, "best_omega", None) is not None:
            arrays["best_omega"] = self.best_omega.cpu().numpy()
        return arrays, json.loads(json.dumps(state_dict["param_groups"]))

    def restore(self, arrays: dict[str, np.ndarray], groups: list) -> None:
        """The inverse of :meth:`arrays`."""
        arrays = dict(arrays)
        with torch.no_grad():
            self.sub.omega.copy_(torch.from_numpy(arrays.pop("omega")))
        best = arrays.pop("best_omega", None)
        self.best_omega = None if best is None else torch.from_numpy(np.array(best)).to(self.sub.omega.device)
        state: dict = {}
        for name, value in arrays.items():
            _, pid, key = name.split("/", 2)
            state.setdefault(int(pid), {})[key] = torch.from_numpy(np.array(value))
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        self.opt.load_state_dict({"state": state, "param_groups": groups})

    def check_run(self, d: int, eval_fn, progress: bool = False) -> float:
        """A fresh omega trained to convergence at dimension ``d`` only (the check at D*/2, and the grid
        mode); the best metric.  The search's own omega is untouched."""
        sub = SubspaceModel(copy.deepcopy(self.base), self.op, self.params).to(self.device or "cpu")
        sub.active = d
        return train_to_convergence(sub, [sub.omega], self.data, self.loss_fn, eval_fn, training=self.training,
                                    seed=self.seed, forward=self.forward, device=self.device, progress=progress,
                                    label=f"check run at d={d} (seed {self.seed})")
