"""Issue 21, items 8 and 9: messages where tracebacks were, and settings checked when made."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sketcharray.app import cli
from sketcharray.collect import sketch_gradients
from sketcharray.core.settings import Execution

from .workload_fixture import tiny

TINY = "tests.workload_fixture:tiny"
ROOT = Path(__file__).resolve().parent.parent


def test_float64_data_is_sketched_in_the_models_precision():
    w = tiny()
    x, y = w.train.tensors
    spec = {"method": "afjl", "n_out": 8, "seed": 0}
    as_given = sketch_gradients(w.model_factory, w.loss_fn, torch.utils.data.TensorDataset(x.double(), y), spec,
                                batch_size=12, execution={"progress": False}).compute()
    float32 = sketch_gradients(w.model_factory, w.loss_fn, w.train, spec, batch_size=12,
                               execution={"progress": False}).compute()
    # float64 copies of float32 values convert back exactly: the same sketches, bit for bit
    np.testing.assert_array_equal(as_given.grad.values, float32.grad.values)


def test_float64_data_through_the_hessian():
    from sketcharray.analysis import hessian_spectrum

    w = tiny()
    x, y = w.train.tensors
    data = torch.utils.data.TensorDataset(x.double(), y)
    res = hessian_spectrum(w.model_factory, w.loss_fn, data, {"method": "affd", "n_out": 8}, k=2, batch_size=16,
                           execution={"progress": False})
    ref = hessian_spectrum(w.model_factory, w.loss_fn, w.train, {"method": "affd", "n_out": 8}, k=2, batch_size=16,
                           execution={"progress": False})
    np.testing.assert_allclose(res.eigenvalue.values, ref.eigenvalue.values, rtol=1e-6, atol=1e-9)


def test_a_raw_pickle_as_checkpoint_is_one_line(tmp_path, capfd):
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"0.weight": [1.0, 2.0]}, protocol=4))
    assert cli.main(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--checkpoint", f"x={raw}",
                     "--quiet"]) == cli.EXIT_INPUT
    captured = capfd.readouterr()
    assert "not a torch.save archive" in captured.err and "UserWarning" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1, captured.err


@pytest.mark.parametrize("delay", [0.15, 0.4, 1.0, 2.0])
def test_ctrl_c_at_any_point_of_sketch_exits_130_with_one_line(tmp_path, delay):
    """SIGINT while the package and torch load, while batches are computed, and near the end: exit 130 and
    'interrupted; rerun', never a traceback or death by the signal."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from sketcharray.app.cli import main; "
                             "sys.exit(main())", "sketch", "--workload", TINY, "--n-out", "8", "--batch-size", "4",
                             "--out", str(tmp_path / "s.zarr"), "--quiet"], env=env, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    if proc.returncode == 0:  # it finished before the signal came: nothing to check
        return
    assert proc.returncode == cli.EXIT_INTERRUPTED, err
    assert "Traceback" not in err and err.strip().endswith("interrupted; rerun the same command to resume"), err


def test_the_parser_and_imports_are_inside_the_interrupt_handler(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["sketch", "--out", "x.zarr"]) == cli.EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "sketcharray sketch: interrupted; rerun the same command to resume"


def test_an_execution_scheduler_is_checked_when_made():
    with pytest.raises(ValueError, match=r"Execution.scheduler must be .*got 'local-cluster' .*cluster.scheduler"):
        Execution(scheduler="local-cluster")
    with pytest.raises(ValueError, match=r"got 'tcp://h:8786' \(a scheduler's address is a distributed.Client"):
        Execution(scheduler="tcp://h:8786")
    assert Execution(scheduler="sync").scheduler == "sync"


def test_an_execution_scheduler_is_refused_before_a_store_is_written(tmp_path):
    w = tiny()
    with pytest.raises(ValueError, match="Execution.scheduler"):
        sketch_gradients(w.model_factory, w.loss_fn, w.train, {"method": "afjl", "n_out": 8}, batch_size=12,
                         store=tmp_path / "s.zarr", execution={"scheduler": "local-cluster", "progress": False})
    assert not (tmp_path / "s.zarr").exists()


def test_spectrum_plot_with_seeds_draws_the_mean_and_spread(tmp_path, capsys):
    png = tmp_path / "seeds.png"
    assert cli.main(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--seeds", "0", "1", "--plot",
                     str(png), "--quiet"]) == 0
    assert png.stat().st_size > 10_000 and b"sketcharray" in png.read_bytes()[:4096]


@pytest.mark.parametrize("argv, message", [
    (["--which", "bottom", "--plot", "{tmp}/p.png"], "--plot shows RNEG and R_n"),
    (["--from-hvps", "{tmp}/h.zarr", "--seeds", "0", "1"], "--seeds would have no effect there"),
    (["--from-hvps", "{tmp}/h.zarr", "--out", "{tmp}/o"], "--out would have no effect there"),
])
def test_spectrum_flags_that_would_be_ignored_are_refused(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--quiet", *argv]) == cli.EXIT_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
