"""``--scheduler``: the local threads, a LocalCluster with its dashboard, or a scheduler address."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

from sketcharray.collect.cluster import scheduler

pytest.importorskip("distributed")
pytest.importorskip("bokeh")  # the dashboard is served by bokeh


#: end-to-end (a LocalCluster, the whole quick demo): in the slow subset, run by CI
pytestmark = pytest.mark.slow


def test_threads_is_the_default_and_needs_no_cluster():
    with scheduler("threads") as client:
        assert client is None


def test_an_unknown_scheduler_names_the_choices():
    with pytest.raises(ValueError, match="'threads'.*'local-cluster'.*got 'mpi'"):
        with scheduler("mpi"):
            pass


def test_dashboard_answers_while_a_local_cluster_job_runs_and_shows_named_tasks(tmp_path, caplog):
    from sketcharray.collect import sketch_gradients
    from sketcharray.workloads import digits

    w = digits()
    with caplog.at_level("INFO", logger="sketcharray"), scheduler("local-cluster", n_workers=1) as client:
        assert f"dashboard: {client.dashboard_link}" in caplog.text
        job = threading.Thread(target=sketch_gradients, args=(w.model_factory, w.loss_fn, w.train,
                                                              {"method": "affd", "n_out": 256}),
                               kwargs=dict(batch_size=10, ids=w.train_ids, store=str(tmp_path / "s.zarr"),
                                           execution={"progress": False}))
        job.start()
        pages, prefixes = [], set()
        try:
            while job.is_alive():
                prefixes |= set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes)))
                if prefixes & {"sketch-gradients"}:
                    for path in ("status", "info/main/workers.html"):
                        with urllib.request.urlopen(client.dashboard_link.replace("status", path), timeout=10) as r:
                            pages.append((r.status, r.read().decode()))
                    break
                time.sleep(0.05)
        finally:
            job.join()
    assert "sketch-gradients" in prefixes  # named tasks, not anonymous lambdas
    assert [status for status, _ in pages] == [200, 200]
    assert "Dask" in pages[0][1] and "Worker" in pages[1][1]


def test_spectrum_on_a_local_cluster_prints_the_threaded_eigenvalues(capsys):
    """'spectrum --scheduler local-cluster' shards each product over the workers; the table is the one
    the threaded run prints (4 significant digits; the float32 products differ by rounding only)."""
    from sketcharray.app import cli

    common = ["spectrum", "--workload", "tests.workload_fixture:tiny", "--n-out", "16", "--k", "2"]
    assert cli.main(common) == 0
    threaded = capsys.readouterr().out
    assert cli.main([*common, "--scheduler", "local-cluster"]) == 0
    clustered = capsys.readouterr().out
    assert "LocalCluster with" in clustered

    def table(text):
        return [line for line in text.splitlines() if line.startswith("| - |")]

    assert table(clustered) == table(threaded) and len(table(threaded)) == 4


def test_the_cluster_benchmark_measures_products_and_a_single_pass(tmp_path):
    """bench spectrum --scheduler local-cluster, its two measurements at toy size."""
    from sketcharray.app.bench.spectrum import cluster_scaling, single_pass_against_lanczos

    (row,) = cluster_scaling("digits", "afjl", 64, 2, 50, 25, 4, workers=(1,))
    assert row["workers"] == 1 and row["hvps"] == 4 and row["hvps_per_s"] > 0 and row["speedup"] == 1.0
    one = single_pass_against_lanczos("digits", "affd", 16, 2, 50, 25, 1, tmp_path)
    # 16 probes span the 16-dimensional sketch space: the single pass agrees with Lanczos to float32 rounding
    # amplified by cond(Q^T Omega) (see tests/analysis/test_eigen.py)
    assert one["probes"] == 16 and one["max_difference"] < 1e-3 and (tmp_path / "digits-y.zarr").is_dir()


def test_local_cluster_workers_keep_glibcs_adaptive_mmap_threshold():
    """dask's nanny exports MALLOC_TRIM_THRESHOLD_, which made every N-sized temporary of an HVP a fresh mmap
    (MiniLM: 6.2 s an HVP instead of 4.4 s on one worker thread); sketcharray's LocalCluster starts its
    workers without it, keeping one thread for torch and BLAS (OMP_NUM_THREADS=1), which the sketch kernels'
    pool follows."""
    import os

    from distributed import Client

    from sketcharray.collect.cluster import local_cluster

    def environment():
        from sketcharray.sketches import backend

        return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"), backend.cores()

    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # what an earlier dask LocalCluster leaves in this process
    try:
        with local_cluster(1) as cluster, Client(cluster) as client:
            (trim, omp, cores), = client.run(environment).values()
    finally:
        del os.environ["MALLOC_TRIM_THRESHOLD_"]
    assert trim is None and omp == "1" and cores == 1
