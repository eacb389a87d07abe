"""Shared fixtures: array backends, methods and preconditioners."""

from __future__ import annotations

import importlib.util
import os
import tempfile

import numpy as np
import pytest

from sketcharray.sketches import METHODS

# The suite trains what it uses (the digits MLP) instead of reading a cache a previous run, or another
# version, left in the user's home; subprocesses the tests start inherit the same empty cache.
os.environ["SKETCHARRAY_CACHE"] = tempfile.mkdtemp(prefix="sketcharray-test-cache-")

PRECOND_METHODS = ("fjl", "ffd", "affd", "afjl")


def method_cases():
    """Every (method, options) pair worth testing: each method, each preconditioner."""
    cases = []
    for method in METHODS:
        if method in PRECOND_METHODS:
            cases += [(method, {"precond": p}) for p in ("hadamard", "fft", "kron")]
        else:
            cases.append((method, {}))
    return cases


def case_id(case):
    method, opts = case
    return method + "".join(f"-{v}" for v in opts.values())


METHOD_CASES = method_cases()


def _cuda_torch() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _cupy() -> bool:
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # pragma: no cover - driver without a device
        return False


HAS_CUDA = _cuda_torch()
HAS_CUPY = _cupy()


class Backend:
    """Converts numpy arrays to one array library/device and back."""

    def __init__(self, name: str):
        self.name = name

    def asarray(self, x: np.ndarray, dtype=None):
        if self.name == "numpy":
            return np.asarray(x, dtype=dtype)
        if self.name == "cupy":
            import cupy

            return cupy.asarray(x, dtype=dtype)
        import torch

        dev = "cuda" if self.name == "torch-cuda" else "cpu"
        t = torch.as_tensor(np.asarray(x))
        return t.to(device=dev, dtype=getattr(torch, str(np.dtype(dtype))) if dtype else t.dtype)

    def to_numpy(self, y) -> np.ndarray:
        if self.name == "numpy":
            return np.asarray(y)
        if self.name == "cupy":
            return y.get()
        return y.detach().cpu().numpy()

    def __repr__(self) -> str:
        return self.name


CPU_BACKENDS = [Backend("numpy"), Backend("torch-cpu")]
GPU_BACKENDS = [
    pytest.param(Backend("torch-cuda"), marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]),
    pytest.param(Backend("cupy"), marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUPY, reason="no cupy with a CUDA device")]),
]


@pytest.fixture(params=CPU_BACKENDS, ids=str)
def backend(request):
    return request.param


@pytest.fixture
def rng():
    return np.random.default_rng(20240203)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1 for the whole session, reached through s3fs."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from tests.s3_server import S3Server

    server = S3Server()
    yield server
    server.stop()
