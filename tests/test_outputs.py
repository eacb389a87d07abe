"""Issue 21, item 1: ``--out`` and ``store=`` never delete or overwrite what the package did not write.

Each case gives a path that holds someone else's things (a folder with notes, a file, the inside of a
store) and checks that the command refuses with one line and exit 3 and that every byte is still there;
a result the package wrote is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from sketcharray.app import cli
from sketcharray.storage.outputs import RESULT_ATTR, OutputError, check_result_path, write_result

TINY = "tests.workload_fixture:tiny"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    common = ["--workload", TINY, "--n-out", "8", "--batch-size", "12", "--quiet"]
    assert cli.main(["sketch", "--out", str(root / "train.zarr"), *common]) == 0
    assert cli.main(["sketch", "--out", str(root / "test.zarr"), "--split", "test", *common]) == 0
    return root


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv, capsys, message):
    assert cli.main([str(a) for a in argv]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_attribute_out_refuses_a_folder_it_did_not_write(stores, tmp_path, capsys):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("x")
    before = _snapshot(victim)
    _refused(["attribute", stores / "train.zarr", stores / "test.zarr", "--k", "2", "--out", victim, "--quiet"],
             capsys, "is a folder that is not a result of sketcharray")
    # --overwrite replaces only results: someone else's folder stays refused
    _refused(["attribute", stores / "train.zarr", stores / "test.zarr", "--k", "2", "--out", victim, "--overwrite",
              "--quiet"], capsys, "not a result of sketcharray")
    assert _snapshot(victim) == before and (victim / "sub").is_dir()


@pytest.mark.parametrize("inside", ["test.zarr/grad", "test.zarr/grad/new", "test.zarr/top.zarr", "test.zarr/r.nc"])
def test_attribute_out_inside_a_store_is_refused_and_the_store_still_reads(stores, inside, capsys):
    before = _snapshot(stores / "test.zarr")
    _refused(["attribute", stores / "train.zarr", stores / "test.zarr", "--k", "2", "--out", stores / inside,
              "--quiet"], capsys, "lies inside the Zarr store")
    assert _snapshot(stores / "test.zarr") == before
    assert cli.main(["info", str(stores / "test.zarr"), "--verify"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name", ["train.zarr", "other.nc"])
def test_attribute_out_refuses_a_store_or_a_file_it_did_not_write(stores, tmp_path, name, capsys):
    target = stores / name if name.endswith(".zarr") else tmp_path / name
    if not target.exists():
        target.write_bytes(b"someone's netCDF")
    before = _snapshot(target) if target.is_dir() else target.read_bytes()
    _refused(["attribute", stores / "train.zarr", stores / "test.zarr", "--k", "2", "--out", target, "--overwrite",
              "--quiet"], capsys, "is a sketch store" if target.is_dir() else "is a file that is not a result")
    assert (_snapshot(target) if target.is_dir() else target.read_bytes()) == before


@pytest.mark.parametrize("suffix", [".zarr", ".nc"])
def test_a_result_is_replaced_only_with_overwrite(stores, tmp_path, suffix, capsys):
    out = tmp_path / f"top{suffix}"
    argv = ["attribute", stores / "train.zarr", stores / "test.zarr", "--k", "2", "--out", out, "--quiet"]
    assert cli.main([str(a) for a in argv]) == 0
    first = _open(out)
    assert first.attrs[RESULT_ATTR] == "attribution"
    _refused(argv, capsys, "holds an earlier result (attribution); pass --overwrite")
    argv[argv.index("--k") + 1] = "3"
    assert cli.main([str(a) for a in [*argv, "--overwrite"]]) == 0
    second = _open(out)
    assert second.sizes["rank"] == 3 and first.sizes["rank"] == 2
    assert not list(tmp_path.glob(".top*"))  # no temporary or old copy left


def _open(path):
    if path.suffix == ".nc":
        return xr.open_dataset(path).load()
    return xr.open_zarr(path, consolidated=False).load()


def test_an_empty_folder_is_free(tmp_path):
    (tmp_path / "empty").mkdir()
    ds = xr.Dataset({"a": ("x", np.arange(3))})
    write_result(ds, tmp_path / "empty", "test")
    assert xr.open_zarr(tmp_path / "empty", consolidated=False).attrs[RESULT_ATTR] == "test"
    with pytest.raises(OutputError, match="pass --overwrite"):
        check_result_path(tmp_path / "empty", "test")


def test_sketch_store_spectrum_search_and_plots_refuse_the_inside_of_a_store(stores, tmp_path, capsys):
    before = _snapshot(stores / "test.zarr")
    _refused(["sketch", "--out", stores / "test.zarr" / "inner.zarr", "--workload", TINY, "--n-out", "8",
              "--quiet"], capsys, "lies inside the Zarr store")
    _refused(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--out", stores / "test.zarr" / "spec",
              "--quiet"], capsys, "lies inside the Zarr store")
    _refused(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--plot", stores / "test.zarr" / "p.png",
              "--quiet"], capsys, "lies inside the Zarr store")
    _refused(["intrinsic-dim", "--workload", TINY, "--out", stores / "test.zarr" / "id", "--no-check", "--quiet"],
             capsys, "lies inside the Zarr store")
    _refused(["demo", "--quick", "--out", stores / "test.zarr" / "demo", "--quiet"], capsys,
             "lies inside the Zarr store")
    assert _snapshot(stores / "test.zarr") == before


def test_a_plot_or_benchmark_json_never_replaces_a_file_it_did_not_write(tmp_path, capsys):
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"\x89PNG someone's picture")
    _refused(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--plot", notes, "--quiet"], capsys,
             "exists and was not written by sketcharray")
    assert notes.read_bytes() == b"\x89PNG someone's picture"
    # a plot this package wrote is replaced on the next run
    png = tmp_path / "spectrum.png"
    for _ in range(2):
        assert cli.main(["spectrum", "--workload", TINY, "--n-out", "8", "--k", "2", "--plot", str(png),
                         "--quiet"]) == 0
    data = tmp_path / "data.json"
    data.write_text(json.dumps({"mine": 1}))
    _refused(["bench", "sketch", "--n", "2^10", "--d", "2^4", "--methods", "afjl", "--preconds", "hadamard",
              "--repeat", "1", "--json", data], capsys, "exists and was not written by sketcharray")
    assert json.loads(data.read_text()) == {"mine": 1}


def test_the_demo_refuses_a_folder_that_holds_other_things(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my own report")
    _refused(["demo", "--quick", "--out", tmp_path / "mine", "--quiet"], capsys, "holds other things than a "
             "sketcharray demo")
    assert (tmp_path / "mine" / "report.md").read_text() == "my own report"


def test_a_solver_state_folder_that_is_not_one_is_left_alone(tmp_path):
    from sketcharray.analysis.eigen import lanczos

    state = tmp_path / "state"
    state.mkdir()
    (state / "notes.txt").write_text("mine")
    a = np.diag(np.arange(1.0, 21.0))
    with pytest.raises(ValueError, match="not a solver state of sketcharray"):
        lanczos(lambda x: x @ a, 20, 2, progress=False, state=state)
    assert (state / "notes.txt").read_text() == "mine"


def test_only_this_packages_leftovers_are_removed(tmp_path):
    """A killed creator's temporary sibling goes; a user's file that merely starts with the same name stays."""
    from sketcharray.storage import store as st

    mine = tmp_path / ".s.zarr.tmp-123-abcdef01"
    mine.mkdir()
    users = [tmp_path / ".s.zarr.tmp-notes", tmp_path / ".s.zarr.tmp-123-abcdef01x"]
    for p in users:
        p.mkdir()
    st.create_store(tmp_path / "s.zarr", variable="grad", row_dim="example", n_rows=4, n_out=2, chunk=4,
                    ids=list(range(4)), has_label=False, attrs={"sketch_spec": {"method": "afjl", "n_out": 2}})
    assert not mine.exists() and all(p.is_dir() for p in users)
