"""A user's own workload, reached by import path (``tests.workload_fixture:tiny``) as the CLI's users do."""

from __future__ import annotations

import functools

import torch
from torch import nn

from sketcharray.workloads import Workload, cross_entropy_per_example


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def tiny() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return Workload(name="tiny", model_factory=functools.partial(_model, 0), loss_fn=cross_entropy_per_example,
                    train=torch.utils.data.TensorDataset(x[:48], y[:48]),
                    test=torch.utils.data.TensorDataset(x[48:], y[48:]),
                    train_ids=[f"a{i}" for i in range(48)], test_ids=[f"b{i}" for i in range(12)],
                    classes=["low", "mid", "high"], info={"n_params": 83},
                    search_settings=dict(d0=2, d_max=64, steps_per_eval=20, lr=5e-2, batch_size=16))


def not_a_workload():
    return 42
