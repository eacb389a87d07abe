"""The ``sketcharray`` command and the sketch benchmark it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sketcharray.app import cli
from sketcharray.app.bench import sketch as bench_sketch
from sketcharray.app.bench._util import Device
from sketcharray.sketches import base


SUBCOMMANDS = {
    "demo": "--quick", "sketch": "--out STORE", "attribute": "TRAIN_STORE", "spectrum": "--checkpoint",
    "intrinsic-dim": "--target", "info": "STORE", "bench": "BENCHMARK",
}


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_explains_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"] if command is None else [command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sketcharray" + ("" if command is None else f" {command}"))
    if command is None:
        assert all(name in out for name in SUBCOMMANDS) and "exit codes" in out
    else:
        assert SUBCOMMANDS[command] in out
        if command not in ("info", "bench", "attribute"):
            assert "--workload" in out and "module:factory" in out.replace("\n", " ")


def test_unknown_subcommand_exits_with_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_bench_sketch_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = cli.main(["bench", "sketch", "--n", "2^12,3000", "--d", "2^6,2^8", "--methods", "afjl,qk,dense",
                   "--preconds", "hadamard", "--repeat", "1", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "x memcpy" in text and "afjl" in text
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert {r["method"] for r in rows} == {"memcpy", "fwht", "afjl", "qk", "dense"}
    # the transform alone, against fht-cpu (a test requirement), for the power-of-two N only
    fwht = [r for r in rows if r["method"] == "fwht"]
    assert {(r["N"], r["precond"]) for r in fwht} == {(4096, "sketcharray"), (4096, "fht-cpu")}
    assert all(r["status"] == "ok" and r["ratio"] > 0 for r in fwht)
    assert any(t.startswith("target CPU FWHT N=2^12:") for t in payload["targets"])
    ok = [r for r in rows if r["method"] not in ("memcpy", "fwht")]
    assert len(ok) == 2 * 2 * 3 and all(r["status"] == "ok" for r in ok)
    assert all(r["ms_per_example"] > 0 and r["ratio"] > 0 and r["peak_bytes"] >= 0 for r in ok)


def test_bench_records_operators_that_cannot_be_built(monkeypatch):
    monkeypatch.setattr(base, "available_memory", lambda device=None: 1000)
    args = bench_sketch.build_parser().parse_args(["--dense-budget", "2^40"])
    x = Device("cpu").random((2, 4096))
    row = bench_sketch.run_case("fjl", "hadamard", 4096, 256, x, Device("cpu"), args)
    assert row["status"].startswith("out of memory: sketch 'fjl'")
    assert "bytes of state" in row["status"]


def test_console_script_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "sketcharray.app.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("sketcharray ")


def test_bench_tda_writes_tables_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "tda.json", tmp_path / "tda.png"
    assert cli.main(["bench", "tda", "--seeds", "1", "--log2d", "5,8", "--n-train", "64", "--n-query", "8",
                     "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "Table 6 analogue" in text and "Table 1 analogue" in text
    res = json.loads(out.read_text())["results"][0]
    assert set(res["pearson"]) == {"dense", "fjl", "ffd", "affd", "afjl", "qk"}
    assert all(-1 <= r <= 1 for rs in res["pearson"].values() for r in rs.values())
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_bench_tda_scale_small(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert cli.main(["bench", "tda-scale", "--gb", "0.02", "--d", "64", "--chunk-rows", "2048",
                     "--dir", str(tmp_path / "stores"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 and all(r["topk_rows_per_s"] > 0 and r["peak_rss_topk"] > 0 for r in results)
    assert "of read" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_spectrum_small(tmp_path, capsys):
    out, png = tmp_path / "sp.json", tmp_path / "sp.png"
    assert cli.main(["bench", "spectrum", "--n-examples", "50", "--log2d", "5", "--seeds", "1",
                     "--perf-methods", "afjl", "--perf-workloads", "digits", "--json", str(out),
                     "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "Table 7 analogue" in text and "Figure 2 analogue" in text and "HVP/s" in text
    payload = json.loads(out.read_text())
    assert len(payload["exact_top10"]) == 10 and payload["performance"][0]["hvps"] > 0
    assert png.stat().st_size > 10_000


def test_bench_intrinsic_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "intrinsic", "--help"])
    assert "--seeds" in capsys.readouterr().out


# ------------------------------------------------------------- a user's workload through the CLI
TINY = "tests.workload_fixture:tiny"


def test_sketch_attribute_and_info_on_a_users_own_workload(tmp_path, capsys):
    from sketcharray.analysis import attribute
    from sketcharray.storage.store import open_sketches

    train, test = tmp_path / "train.zarr", tmp_path / "test.zarr"
    common = ["--workload", TINY, "--n-out", "16", "--batch-size", "10", "--quiet"]
    assert cli.main(["sketch", "--out", str(train), *common]) == 0
    assert cli.main(["sketch", "--out", str(test), "--split", "test", *common]) == 0
    result = tmp_path / "top.nc"
    assert cli.main(["attribute", str(train), str(test), "--score", "cosine", "--k", "3", "--first", "4",
                     "--out", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "| b0 | 1 | a" in printed
    import xarray as xr

    saved = xr.open_dataset(result).load()
    tr, q = open_sketches(train), open_sketches(test)
    direct = attribute(tr, q.grad.isel(example=slice(0, 4)), score="cosine", k=3).compute()
    np.testing.assert_array_equal(saved.example.values.astype(str), direct.example.values.astype(str))
    np.testing.assert_allclose(saved.score.values, direct.score.values)

    assert cli.main(["info", str(train), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dims"] == {"example": 48, "sketch": 16} and info["n_params"] == 83
    assert (info["batches_done"], info["batches"], info["rows_done"], info["valid"]) == (5, 5, 48, 48)
    assert info["sketch_spec"]["method"] == "afjl" and info["complete"]


def test_info_reports_an_interrupted_store_and_how_to_resume(tmp_path, capsys):
    import zarr

    store = tmp_path / "train.zarr"
    assert cli.main(["sketch", "--out", str(store), "--workload", TINY, "--n-out", "8", "--batch-size", "10",
                     "--quiet"]) == 0
    zarr.open_group(str(store), mode="r+")["batch_done"][4] = 0  # as if killed before the last batch
    assert cli.main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "4 of 5 batches, 40 rows; INCOMPLETE (rerun the same command to resume)" in out
    assert "valid rows (finite gradient and loss): 40" in out


def test_spectrum_and_intrinsic_dim_on_a_users_own_workload(tmp_path, capsys):
    from sketcharray.analysis import hessian_spectrum
    from sketcharray.workloads import load_workload

    folder, png = tmp_path / "spectrum", tmp_path / "spectrum.png"
    assert cli.main(["spectrum", "--workload", TINY, "--n-out", "16", "--k", "3", "--checkpoint",
                     f"init={_save_state(tmp_path)}", "--out", str(folder), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| init | positive | 1 |" in out and "RNEG" in out and png.stat().st_size > 10_000
    w = load_workload(TINY)
    direct = hessian_spectrum(w.model_factory, w.loss_fn, w.train, {"method": "affd", "n_out": 16, "seed": 0}, k=3,
                              batch_size=64, execution={"progress": False})
    import xarray as xr

    stored = xr.open_zarr(str(folder / "checkpoint-init.zarr"), consolidated=False)
    np.testing.assert_allclose(stored.eigenvalue.values[0], direct.eigenvalue.values, rtol=1e-4, atol=1e-6)

    search = tmp_path / "search"
    assert cli.main(["intrinsic-dim", "--workload", TINY, "--out", str(search), "--no-check", "--plot",
                     str(tmp_path / "id.png")]) == 0
    assert "D*" in capsys.readouterr().out
    assert cli.main(["info", str(search), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "intrinsic-dimension folder" and info["searches"]["affd-seed0"]["done"]


def _save_state(tmp_path):
    import torch

    from sketcharray.workloads import load_workload

    path = tmp_path / "init.pt"
    torch.save(load_workload(TINY).model().state_dict(), path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["sketch", "--out", "{tmp}/s.zarr", "--workload", "nosuch"], "neither an embedded workload"),
    (["sketch", "--out", "{tmp}/s.zarr", "--workload", "tests.workload_fixture:not_a_workload"],
     "returned int, expected a sketcharray.workloads.Workload"),
    (["sketch", "--out", "{tmp}/s.zarr", "--workload", "tests.nowhere:tiny"], "cannot import module"),
    (["sketch", "--out", "{tmp}/s.zarr", "--workload", TINY, "--n-out", "1000"], "exceeds the padded input length"),
    (["attribute", "{tmp}/none.zarr", "{tmp}/none.zarr"], "is not a sketcharray store"),
    (["info", "{tmp}"], "is not a sketcharray store, spectrum folder or intrinsic-dimension folder"),
    (["spectrum", "--workload", TINY, "--checkpoint", "x={tmp}/missing.pt"], "no file"),
    (["sketch", "--out", "{tmp}/s.zarr", "--workload", TINY, "--limit", "0", "--n-out", "8"],
     "data holds no examples (expected at least one; got an empty dataset)"),
    (["spectrum", "--workload", TINY, "--examples", "0", "--n-out", "8"], "data holds no examples"),
    (["sketch", "--out", "{tmp}/file/s.zarr", "--workload", TINY, "--n-out", "8"], "file is a file, not a folder"),
    (["sketch", "--out", "{tmp}/file", "--workload", TINY, "--n-out", "8"], "cannot create store"),
    (["sketch", "--out", "{tmp}/folder", "--workload", TINY, "--n-out", "8"], "the folder exists and is not a sketcharray store"),
    (["info", "{tmp}/file", "--verify"], "is not a sketcharray store"),
    (["sketch", "--out", "{tmp}/h.zarr", "--workload", TINY, "--n-out", "8", "--hvps", "-1"],
     "probes must be a positive int"),
    (["spectrum", "--workload", TINY, "--n-out", "8", "--k", "0"], "k (eigenvalues at each end) must be an int >= 1"),
    (["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--checkpoint", "x={tmp}/file"],
     "checkpoint {tmp}/file cannot be loaded as weights only"),
    (["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--checkpoint", "x={tmp}/crafted.pt"],
     "cannot be loaded as weights only (UnpicklingError)"),
    (["intrinsic-dim", "--workload", TINY, "--target", "0"], "target (a fraction of the reference metric) must be > 0"),
])
def test_bad_input_exits_3_with_a_message_naming_it(argv, message, tmp_path, capsys):
    (tmp_path / "file").write_text("a file where a folder is expected")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("someone else's")
    import torch

    from .analysis.test_intrinsic import _Crafted

    torch.save({"w": _Crafted(tmp_path / "code-ran")}, tmp_path / "crafted.pt")  # a checkpoint that runs code
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.startswith(f"sketcharray {argv[0]}: error: ") and message.replace("{tmp}", str(tmp_path)) in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert (tmp_path / "folder" / "notes.txt").read_text() == "someone else's"
    assert not (tmp_path / "code-ran").exists()


def test_attribution_across_sketches_or_models_exits_3_unless_allowed(tmp_path, capsys):
    common = ["--workload", TINY, "--n-out", "8", "--batch-size", "12", "--quiet"]
    stores = {name: str(tmp_path / f"{name}.zarr") for name in ("train", "test", "seed", "method", "params")}
    assert cli.main(["sketch", "--out", stores["train"], *common]) == 0
    assert cli.main(["sketch", "--out", stores["test"], "--split", "test", *common]) == 0
    assert cli.main(["sketch", "--out", stores["seed"], "--split", "test", *common, "--seed", "1"]) == 0
    assert cli.main(["sketch", "--out", stores["method"], "--split", "test", *common, "--method", "qk"]) == 0
    assert cli.main(["sketch", "--out", stores["params"], "--split", "test", *common, "--params", "2.*"]) == 0
    capsys.readouterr()
    for other, key in (("seed", "sketch_spec"), ("method", "sketch_spec"), ("params", "param_names")):
        assert cli.main(["attribute", stores["train"], stores[other], "--k", "3", "--quiet"]) == cli.EXIT_INPUT
        err = capsys.readouterr().err
        assert f"train has {key}=" in err and f"queries has {key}=" in err, err
    # queries from other weights at the same checkpoint: refused, then allowed and said so
    from sketcharray.collect import sketch_gradients
    from sketcharray.workloads import load_workload

    from .workload_fixture import _model

    w = load_workload(TINY)
    import functools

    sketch_gradients(functools.partial(_model, 3), w.loss_fn, w.test, {"method": "afjl", "n_out": 8, "seed": 0},
                     batch_size=12, ids=w.test_ids, store=tmp_path / "tuned.zarr", execution={"progress": False})
    args = ["attribute", stores["train"], str(tmp_path / "tuned.zarr"), "--k", "2", "--first", "1"]
    assert cli.main(args) == cli.EXIT_INPUT
    assert "come from different model weights" in capsys.readouterr().err
    assert cli.main([*args, "--allow-model-mismatch"]) == 0
    assert "note: model mismatch allowed: train model" in capsys.readouterr().out
    assert cli.main(["attribute", stores["train"], stores["test"], "--out", stores["test"]]) == cli.EXIT_INPUT
    assert "is a sketch store; it would be replaced" in capsys.readouterr().err


def test_a_damaged_store_exits_3_is_listed_by_verify_and_repaired_by_sketch(tmp_path, capsys):
    store = tmp_path / "train.zarr"
    args = ["sketch", "--out", str(store), "--workload", TINY, "--n-out", "8", "--batch-size", "10", "--quiet"]
    assert cli.main(args) == 0
    assert cli.main(["info", str(store), "--verify"]) == 0
    assert "5 finished batches of 5 verified, no damage" in capsys.readouterr().out
    (store / "grad" / "c" / "3" / "0").write_bytes(b"garbage")
    (store / "valid" / "c" / "1").unlink()
    assert cli.main(["info", str(store)]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert "valid of batch 1 (examples 10..19): its chunk file is missing" in err and len(err.splitlines()) == 1
    assert cli.main(["attribute", str(store), str(store), "--k", "2", "--quiet"]) == cli.EXIT_INPUT
    assert "of batch" in capsys.readouterr().err
    assert cli.main(["info", str(store), "--verify"]) == cli.EXIT_INPUT
    out = capsys.readouterr().out
    assert "2 damaged batch(es)" in out and "grad of batch 3 (examples 30..39): the chunk is corrupt" in out
    assert "valid of batch 1 (examples 10..19): its chunk file is missing" in out
    assert cli.main(args[:-1]) == 0
    assert "recomputing 2 damaged batch(es) [1, 3]" in capsys.readouterr().out
    assert cli.main(["info", str(store), "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    (store / "grad" / "zarr.json").unlink()
    assert cli.main(["info", str(store)]) == cli.EXIT_INPUT
    assert "grad: its metadata grad/zarr.json is missing" in capsys.readouterr().err


def test_a_store_held_by_another_writer_exits_3_naming_it(tmp_path, capsys):
    import os

    from sketcharray.storage.store import writer_lock

    store = tmp_path / "s.zarr"
    with writer_lock(store):
        assert cli.main(["sketch", "--out", str(store), "--workload", TINY, "--n-out", "8", "--quiet"]) == 3
    assert f"is being written by process {os.getpid()}" in capsys.readouterr().err
    assert cli.main(["sketch", "--out", str(store), "--workload", TINY, "--n-out", "8", "--quiet"]) == 0


SHADOW = "import pathlib; pathlib.Path({marker!r}).touch()\nraise SystemExit('the shadowing module ran')\n"


# ``python -m`` itself puts the current folder first while it imports the package (Python's rule; ``python -P``
# turns it off), so that launcher is tested with a module the package imports only once the command runs.
@pytest.mark.parametrize("launcher, shadows", [("script", ("sklearn", "torch", "numpy", "dask", "zarr")),
                                               ("module", ("sklearn",))])
@pytest.mark.slow
def test_the_current_folder_never_shadows_an_installed_module(tmp_path, launcher, shadows):
    import os
    import shutil

    marker = tmp_path / "code-ran"
    for name in shadows:
        (tmp_path / f"{name}.py").write_text(SHADOW.format(marker=str(marker)))
    # a user's workload module in the current folder still loads, after everything installed
    (tmp_path / "myload.py").write_text("from tests.workload_fixture import tiny as factory\n")
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent)}
    script = __import__("pathlib").Path(sys.executable).parent / "sketcharray"
    script = str(script) if script.exists() else shutil.which("sketcharray")
    head = ([sys.executable, "-m", "sketcharray.app.cli"] if launcher == "module"
            else [script or pytest.skip("the sketcharray console script is not installed")])
    for workload in ("digits", "myload:factory"):
        done = subprocess.run([*head, "sketch", "--workload", workload, "--limit", "20", "--n-out", "8", "--out",
                               f"{workload.replace(':', '-')}.zarr", "--quiet"], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert not marker.exists()


#: optional dependencies some library may try to import; a file of that name in the current folder must never run
OPTIONAL = ("cupy", "pytz", "xxhash", "pyarrow", "zstandard", "lz4", "numexpr", "cftime", "sparse", "pint", "dill",
            "bottleneck", "numbagg", "flox", "h5netcdf", "netCDF4", "fsspec", "s3fs", "cytoolz", "crick", "sklearn")


@pytest.mark.slow
def test_the_current_folder_serves_only_the_workload_module(tmp_path):
    """Issue 21, item 3: with files named after optional dependencies that are not installed, nothing of the
    current folder runs but the --workload module named (and what it imports while it is imported)."""
    import importlib.util
    import os
    import shutil

    marker = tmp_path / "code-ran"
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    for name in (*OPTIONAL, "helper"):
        (tmp_path / f"{name}.py").write_text(SHADOW.format(marker=str(marker)))
    (tmp_path / "helper.py").write_text("SCALE = 1\n")
    (tmp_path / "myload.py").write_text("import helper\nfrom tests.workload_fixture import tiny as factory\n")
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent)}
    script = __import__("pathlib").Path(sys.executable).parent / "sketcharray"
    script = str(script) if script.exists() else shutil.which("sketcharray")
    if script is None:
        pytest.skip("the sketcharray console script is not installed")

    def run(*argv):
        return subprocess.run([script, *argv], cwd=tmp_path, env=env, capture_output=True, text=True)

    done = run("sketch", "--workload", "myload:factory", "--n-out", "8", "--out", "s.zarr", "--quiet")
    assert done.returncode == 0, done.stderr
    for argv in (("info", "s.zarr"), ("info", "s.zarr", "--verify"), ("info", "s.zarr", "--json"),
                 ("attribute", "s.zarr", "s.zarr", "--k", "2", "--score", "cosine", "--out", "r.nc")):
        done = run(*argv)
        assert done.returncode == 0, (argv, done.stderr)
    assert not marker.exists() and len(missing) >= 3, missing
    done = run("sketch", "--workload", ".myload:factory", "--n-out", "8", "--out", "t.zarr", "--quiet")
    assert done.returncode == 3 and "is not an absolute module name" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_workload_from_the_current_folder_runs_on_a_local_cluster(tmp_path):
    """The workers of a LocalCluster import the --workload module by name, as the client does (a preload)."""
    import os
    import shutil

    marker = tmp_path / "code-ran"
    (tmp_path / "cupy.py").write_text(SHADOW.format(marker=str(marker)))
    (tmp_path / "myload.py").write_text("from tests.workload_fixture import tiny as factory\n")
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parent.parent)}
    script = shutil.which("sketcharray", path=str(__import__("pathlib").Path(sys.executable).parent))
    if script is None:
        pytest.skip("the sketcharray console script is not installed")
    done = subprocess.run([script, "sketch", "--workload", "myload:factory", "--n-out", "8", "--out", "s.zarr",
                           "--scheduler", "local-cluster", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()


def test_a_store_from_another_sketch_is_refused(tmp_path, capsys):
    store = str(tmp_path / "s.zarr")
    args = ["sketch", "--out", store, "--workload", TINY, "--batch-size", "10", "--quiet"]
    assert cli.main([*args, "--n-out", "8"]) == 0
    assert cli.main([*args, "--n-out", "16"]) == cli.EXIT_INPUT
    assert "was written with sketch_spec" in capsys.readouterr().err


def test_out_of_memory_exits_4_before_allocating(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(base, "available_memory", lambda device=None: 1000)
    assert cli.main(["sketch", "--out", str(tmp_path / "s.zarr"), "--workload", TINY, "--method", "dense",
                     "--n-out", "16", "--quiet"]) == cli.EXIT_MEMORY
    assert "out of memory" in capsys.readouterr().err and not (tmp_path / "s.zarr").exists()


def test_interrupt_exits_130_and_says_how_to_resume(monkeypatch, capsys):
    from sketcharray.app import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "info", interrupted)
    assert cli.main(["info", "x"]) == cli.EXIT_INTERRUPTED
    assert "interrupted; rerun the same command to resume" in capsys.readouterr().err


def test_sketch_hvps_writes_the_lazy_dataset_once(tmp_path, capsys):
    import xarray as xr

    from sketcharray.collect import sketch_hvps
    from sketcharray.workloads import load_workload

    out = tmp_path / "hvp.zarr"
    args = ["sketch", "--out", str(out), "--workload", TINY, "--hvps", "3", "--n-out", "8", "--quiet"]
    assert cli.main(args) == 0
    stored = xr.open_zarr(str(out), consolidated=False)
    w = load_workload(TINY)
    direct = sketch_hvps(w.model_factory, w.loss_fn, w.train, {"method": "afjl", "n_out": 8, "seed": 0}, probes=3,
                         batch_size=64).compute()
    np.testing.assert_allclose(stored.hvp.values, direct.hvp.values, rtol=1e-5, atol=1e-7)
    assert cli.main(args) == 0  # a finished store: the rerun resumes, with nothing left to compute
    np.testing.assert_array_equal(xr.open_zarr(str(out), consolidated=False).hvp.values, stored.hvp.values)
    assert cli.main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "HVP sketch store" and info["dims"] == {"probe": 3, "sketch": 8} and info["finite"]


def test_spectrum_over_several_sketches_prints_mean_and_spread(capsys):
    from sketcharray.analysis import hessian_spectrum
    from sketcharray.workloads import load_workload

    assert cli.main(["spectrum", "--workload", TINY, "--n-out", "16", "--k", "2", "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "eigenvalue of K (mean of 2 sketches)" in out and "(mean ± spread over sketches)" in out
    w = load_workload(TINY)
    runs = [hessian_spectrum(w.model_factory, w.loss_fn, w.train, {"method": "affd", "n_out": 16, "seed": s}, k=2,
                             batch_size=64, execution={"progress": False}) for s in (0, 1)]
    top = float(np.mean([r.eigenvalue.sel(sign="positive", rank=1) for r in runs]))
    assert f"| - | positive | 1 | {top:.4g} |" in out


def test_trak_scores_from_margin_stores_and_a_refusal_for_loss_stores(tmp_path, capsys):
    common = ["--workload", TINY, "--n-out", "8", "--batch-size", "12", "--quiet"]
    for name, extra in (("train", []), ("test", ["--split", "test"])):
        assert cli.main(["sketch", "--out", str(tmp_path / f"{name}-m.zarr"), "--margin", *extra, *common]) == 0
        assert cli.main(["sketch", "--out", str(tmp_path / f"{name}-l.zarr"), *extra, *common]) == 0
    assert cli.main(["attribute", str(tmp_path / "train-m.zarr"), str(tmp_path / "test-m.zarr"), "--score", "trak",
                     "--k", "3", "--first", "2"]) == 0
    assert "3 training examples by trak score" in capsys.readouterr().out
    assert cli.main(["attribute", str(tmp_path / "train-l.zarr"), str(tmp_path / "test-l.zarr"), "--score", "trak",
                     "--k", "3"]) == cli.EXIT_INPUT
    assert "needs gradients of the model output f" in capsys.readouterr().err
    assert cli.main(["attribute", str(tmp_path / "train-m.zarr"), str(tmp_path / "test-l.zarr"), "--k", "3"]) == 3
    assert "are gradients of different functions" in capsys.readouterr().err


def test_spectrum_out_without_checkpoints_stores_the_current_weights(tmp_path, capsys):
    folder = tmp_path / "spectrum"
    args = ["spectrum", "--workload", TINY, "--n-out", "16", "--k", "2", "--out", str(folder)]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert (folder / "checkpoint-current.zarr").is_dir()
    assert cli.main(args) == 0  # reused, the same table
    assert capsys.readouterr().out.split("| - |")[1:] == first.split("| - |")[1:]
    assert cli.main(["info", str(folder), "--json"]) == 0
    assert "current" in json.loads(capsys.readouterr().out)["checkpoints"]


def test_bench_stream_measures_gradients_sketch_and_store_against_a_training_step(tmp_path, capsys):
    out = tmp_path / "s.json"
    rc = cli.main(["bench", "stream", "--workloads", "digits", "--methods", "afjl", "--batches", "2",
                   "--e2e-examples", "64", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "(sketch+store)/grad" in text and "grads / step" in text
    payload = json.loads(out.read_text())
    (row,) = payload["rows"]
    assert row["method"] == "afjl" and row["examples"] == 128
    assert row["grad_ms"] > 0 and row["sketch_ms"] > 0 and row["overhead"] > 0
    (e2e,) = payload["end_to_end"]
    assert e2e["train_step_s"] > 0 and e2e["grads_s"] > 0 and e2e["sketch_call_s"] > 0
    assert e2e["grads_ratio"] == e2e["grads_s"] / e2e["train_step_s"]


def test_spectrum_from_a_stored_k_omega_pass_matches_lanczos(tmp_path, capsys):
    """'sketch --hvps D --hvp-space sketch' stores Y = K Omega for D test vectors: they span the sketch space,
    so the single pass (no oversampling) gives Lanczos's eigenvalues (same sketch, same examples)."""
    store = tmp_path / "y.zarr"
    common = ["--workload", TINY, "--n-out", "16", "--method", "affd"]
    assert cli.main(["sketch", *common, "--hvps", "16", "--hvp-space", "sketch", "--limit", "100",
                     "--out", str(store), "--quiet"]) == 0
    assert cli.main(["spectrum", "--from-hvps", str(store), "--k", "2", "--oversampling", "0"]) == 0
    single = capsys.readouterr().out
    assert "single pass over 16 stored products (oversampling 0): no oversampling, so no check" in single
    assert cli.main(["spectrum", *common, "--k", "2", "--examples", "100"]) == 0
    lanczos = capsys.readouterr().out

    def values(text):
        lines = [line.strip(" |").split("|") for line in text.splitlines() if line.startswith("|")]
        column = [c.strip() for c in lines[0]].index("eigenvalue of K")
        return [float(cells[column]) for cells in lines if {c.strip() for c in cells} & {"positive", "negative"}]

    # the printed tables carry 4 significant digits; float32 storage of Y is far below that
    np.testing.assert_allclose(values(single), values(lanczos), rtol=1e-3, atol=1e-6)
    assert cli.main(["spectrum", "--from-hvps", str(tmp_path)]) != 0
    assert "not a store of sketched HVPs" in capsys.readouterr().err


def test_bench_tda_scale_on_a_local_s3_server(tmp_path, capsys):
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    out = tmp_path / "scale.json"
    assert cli.main(["bench", "tda-scale", "--url", "s3://bench/tda", "--local-s3", "--gb", "0.004", "--d", "64",
                     "--chunk-rows", "2048", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    results = payload["results"]
    assert payload["storage"] == "object" and len(results) == 2
    for r in results:
        assert r["topk_rows_per_s"] > 0 and 0 < r["fraction_of_read"]
        # one batch is one object per variable the top-k reads (grad, valid, and label or loss): one GET each
        assert r["requests_per_chunk_topk"]["get_object"] >= 2
    assert "requests per chunk" in capsys.readouterr().out
    assert "AWS_ENDPOINT_URL" not in os.environ  # the server's settings stayed with the run
