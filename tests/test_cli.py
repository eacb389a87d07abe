"""The ``sketcharray`` command and the sketch benchmark it runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sketcharray import cli
from sketcharray.bench import sketch as bench_sketch
from sketcharray.bench._util import Device
from sketcharray.sketches import base


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["bench", "--help"], ["bench", "sketch", "--help"]])
def test_help_explains_each_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sketcharray" in out


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
    assert {r["method"] for r in rows} == {"memcpy", "afjl", "qk", "dense"}
    ok = [r for r in rows if r["method"] != "memcpy"]
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
    done = subprocess.run([sys.executable, "-m", "sketcharray.cli", "--version"], capture_output=True, text=True)
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


def test_bench_tda_scale_small(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert cli.main(["bench", "tda-scale", "--gb", "0.02", "--d", "64", "--chunk-rows", "2048",
                     "--dir", str(tmp_path / "stores"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 and all(r["topk_rows_per_s"] > 0 and r["peak_rss_topk"] > 0 for r in results)
    assert "of read" in capsys.readouterr().out


def test_bench_spectrum_small(tmp_path, capsys):
    out, png = tmp_path / "sp.json", tmp_path / "sp.png"
    assert cli.main(["bench", "spectrum", "--n-examples", "50", "--log2d", "5", "--seeds", "1",
                     "--perf-workloads", "digits", "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "Table 7 analogue" in text and "Figure 2 analogue" in text and "HVP/s" in text
    payload = json.loads(out.read_text())
    assert len(payload["exact_top10"]) == 10 and payload["performance"][0]["hvps"] > 0
    assert png.stat().st_size > 10_000


def test_bench_intrinsic_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "intrinsic", "--help"])
    assert "--seeds" in capsys.readouterr().out
