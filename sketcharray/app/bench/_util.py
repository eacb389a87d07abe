"""Timing, memory and table helpers shared by the benchmarks."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import tracemalloc
from contextlib import contextmanager


class Device:
    """Where a benchmark runs: numpy on the CPU, or torch/cupy arrays on a CUDA device."""

    def __init__(self, name: str = "cpu", array: str | None = None):
        self.name = name
        self.array = array or ("numpy" if name == "cpu" else "torch")
        if self.name != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise SystemExit(f"--device {name}: no CUDA device is visible to torch")

    def random(self, shape, seed: int = 0):
        import numpy as np

        if self.array == "numpy":
            return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        import torch

        g = torch.Generator(device=self.name).manual_seed(seed)
        x = torch.randn(shape, generator=g, device=self.name, dtype=torch.float32)
        if self.array == "cupy":
            import cupy

            return cupy.from_dlpack(x)
        return x

    def copy_into(self, dst, src):
        if self.array == "numpy":
            import numpy as np

            np.copyto(dst, src)
        elif self.array == "cupy":
            dst[...] = src
        else:
            dst.copy_(src)

    def empty_like(self, x):
        if self.array == "numpy":
            import numpy as np

            return np.empty_like(x)
        if self.array == "cupy":
            import cupy

            return cupy.empty_like(x)
        import torch

        return torch.empty_like(x)

    def sync(self):
        if self.name != "cpu":
            import torch

            torch.cuda.synchronize()

    def describe(self) -> str:
        if self.name == "cpu":
            return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), numpy"
        import torch

        return f"{torch.cuda.get_device_name(self.name)}, {self.array}"

    @contextmanager
    def peak_memory(self, out: dict):
        """Peak bytes allocated above the level at entry, into ``out['peak']``."""
        if self.name == "cpu":
            tracemalloc.start()
            try:
                yield
            finally:
                out["peak"] = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        elif self.array == "cupy":
            import cupy

            pool = cupy.get_default_memory_pool()
            base = pool.used_bytes()
            yield
            self.sync()
            out["peak"] = max(0, pool.total_bytes() - base)
        else:
            import torch

            self.sync()
            base = torch.cuda.memory_allocated(self.name)
            torch.cuda.reset_peak_memory_stats(self.name)
            yield
            self.sync()
            out["peak"] = torch.cuda.max_memory_allocated(self.name) - base


def median_time(fn, device: Device, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    device.sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        device.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best_time(fn, repeats: int = 3, warmup: int = 1) -> float:
    """Shortest of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones (fn synchronises itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f}"


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table; ``columns`` = [(key, header)]."""
    cells = [[str(r.get(k, "")) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write a benchmark's results (marked as sketcharray's: a file that is not is never replaced)."""
    from ...storage.outputs import RESULT_ATTR, check_file

    path = check_file(path, suffixes=(".json",), marker=b'"benchmark"', what="--json")
    payload = {RESULT_ATTR: "benchmark", **payload}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def sketch_spec(method: str, n_out: int, seed: int = 0) -> dict:
    """The spec of a benchmark's method name: a whole-vector method, or ``factored-<factor>`` (afjl, qk, dense)."""
    from ..demo import gradient_spec

    if method.startswith("factored"):
        return gradient_spec("factored", n_out, seed, method.partition("-")[2] or None)
    return gradient_spec(method, n_out, seed, None)
