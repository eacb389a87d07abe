"""Stores on object storage: every promise of docs/reliability.md on a real S3 endpoint (moto's server on
127.0.0.1, reached through s3fs as a user would), beside the same promise on a local disk.

Resume, integrity (damage named and repaired), one writer (the lease), creation all-or-nothing for readers,
provenance, lazy reads that fetch only the chunks a query needs, and credentials that never show.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sketcharray.app.cli import main
from sketcharray.collect import gradients as collect
from sketcharray.collect import sketch_gradients
from sketcharray.storage import lock as storage_lock
from sketcharray.storage.location import Location, LocationError, locate
from sketcharray.storage.store import (StoreDamaged, StoreError, StoreLocked, open_sketches, verify_store,
                                       write_batch, writer_lock)

from .s3_server import ACCESS_KEY, SECRET_KEY
from .workload_fixture import tiny

SPEC = {"method": "afjl", "n_out": 8, "seed": 0}
BATCH = 10  # 48 examples: batches 0..3 of 10 and batch 4 of 8


@pytest.fixture(scope="module")
def w():
    return tiny()


@pytest.fixture(scope="module")
def reference(w, tmp_path_factory):
    """The uninterrupted local-disk run every other store is compared with, bit for bit."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    write(w, path)
    return path


def write(w, store, options=None, *, spec=SPEC, progress=False):
    return sketch_gradients(w.model_factory, w.loss_fn, w.train, spec, batch_size=BATCH, ids=w.train_ids,
                            store=store, storage_options=options, execution={"progress": progress})


def values(store, options=None):
    ds = open_sketches(store, storage_options=options)
    return {name: ds[name].values for name in ("grad", "loss", "valid", "label")}


def assert_same(store, options, reference):
    expected = values(reference)
    for name, got in values(store, options).items():
        np.testing.assert_array_equal(got, expected[name])


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path):
    """(a new store's path or URL, its storage options) on each backend."""
    if request.param == "local":
        return str(tmp_path / "run.zarr"), None
    server = request.getfixturevalue("s3_server")
    return server.url(), server.options


def chunk(store, options, name, batch):
    return locate(store, options).child(name, "c", str(batch), *(["0"] if name == "grad" else []))


# ----------------------------------------------------------------- the promises, on both backends
def test_an_interrupted_run_is_refused_by_readers_and_resumes_bit_identically(w, backend, reference, monkeypatch):
    store, options = backend
    real, calls = collect._gradient_task, []

    def killed_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(collect, "_gradient_task", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        sketch_gradients(w.model_factory, w.loss_fn, w.train, SPEC, batch_size=BATCH, ids=w.train_ids, store=store,
                         storage_options=options, execution={"progress": False, "scheduler": "sync"})
    monkeypatch.setattr(collect, "_gradient_task", real)
    with pytest.raises(StoreError, match="incomplete: 3 of 5 batches not written"):
        open_sketches(store, storage_options=options)
    write(w, store, options)
    assert_same(store, options, reference)
    assert verify_store(store, storage_options=options).ok


@pytest.mark.parametrize("action", ["delete", "overwrite"])
def test_a_damaged_or_deleted_object_is_named_and_repaired_by_rerunning(w, backend, reference, action):
    store, options = backend
    write(w, store, options)
    target = chunk(store, options, "grad", 2)
    if action == "delete":
        target.delete()
    else:
        other = chunk(store, options, "grad", 1).read_bytes()
        target.write_bytes(other)  # a well-formed chunk of another batch: only the digest tells
    with pytest.raises(StoreDamaged, match=r"grad of batch 2 \(examples 20..29\)"):
        open_sketches(store, storage_options=options).grad.values
    report = verify_store(store, storage_options=options)
    assert report.damaged_batches == [2] and "grad of batch 2" in str(report)
    if action == "delete":
        assert "missing" in str(report)
    write(w, store, options)
    assert_same(store, options, reference)


def test_a_second_writer_is_refused_naming_the_holder(backend):
    store, options = backend
    with writer_lock(locate(store, options)):
        with pytest.raises(StoreLocked, match=rf"being written by process {os.getpid()} on {socket.gethostname()}"):
            with writer_lock(locate(store, options)):
                pass
    with writer_lock(locate(store, options)):  # released on exit: the next writer proceeds
        pass


def test_resuming_with_another_sketch_is_refused_naming_both(w, backend):
    store, options = backend
    write(w, store, options)
    with pytest.raises(ValueError, match=r'sketch_spec=.*"seed": 0.*this run has sketch_spec=.*"seed": 5'):
        write(w, store, options, spec={**SPEC, "seed": 5})


# ----------------------------------------------------------------- object storage alone
def test_a_store_on_s3_equals_the_local_store_bit_for_bit(w, s3_server, reference):
    url = s3_server.url()
    ds = write(w, url, s3_server.options)
    assert ds.attrs["sketch_spec"] == open_sketches(reference).attrs["sketch_spec"]
    assert_same(url, s3_server.options, reference)
    # the lease is gone once the writer is done
    assert not locate(url, s3_server.options).sibling(".lease.json").exists()


def test_a_memory_url_works_too(w, reference):
    url = "memory://sketcharray-tests/run.zarr"
    write(w, url)
    assert_same(url, None, reference)
    with writer_lock(url):
        with pytest.raises(StoreLocked):
            with writer_lock(url):
                pass
    locate(url).remove_tree()


def test_creation_is_all_or_nothing_for_readers(w, s3_server, reference, monkeypatch):
    """The skeleton is uploaded with its root metadata last: a creator stopped before that leaves nothing a
    reader takes for a store, and the next run replaces the partial skeleton."""
    url, options = s3_server.url(), s3_server.options
    real = Location.write_bytes

    def stopped_at_the_root(self, data):
        if self.url == f"{url}/zarr.json":
            raise KeyboardInterrupt
        return real(self, data)

    monkeypatch.setattr(Location, "write_bytes", stopped_at_the_root)
    with pytest.raises(KeyboardInterrupt):
        write(w, url, options)
    monkeypatch.setattr(Location, "write_bytes", real)
    assert locate(url, options).objects()  # the arrays' metadata and coordinates were uploaded ...
    with pytest.raises(StoreError, match="is not a sketcharray store"):  # ... but no reader sees a store
        open_sketches(url, storage_options=options)
    write(w, url, options)
    assert_same(url, options, reference)


def test_objects_that_are_not_a_store_are_never_replaced(w, s3_server):
    url, options = s3_server.url(), s3_server.options
    locate(url, options).child("notes.txt").write_bytes(b"mine")
    with pytest.raises(StoreError, match="not part of a sketcharray store.*notes.txt"):
        write(w, url, options)
    assert locate(url, options).objects() == ["notes.txt"]
    inside = f"{s3_server.url()}"
    write(w, inside, options)
    with pytest.raises(StoreError, match="lies inside the Zarr store"):
        write(w, f"{inside}/nested.zarr", options)


def _writers_at_once(url, options, n: int, *, quiet: bool = False) -> list[str]:
    """``n`` threads take the writer lock of ``url`` at the same moment; each outcome: "held" (kept until all have
    answered) or the StoreLocked message."""
    barrier, outcomes, release = threading.Barrier(n), [], threading.Event()

    def writer():
        barrier.wait()
        try:
            with writer_lock(locate(url, options), quiet=quiet):
                outcomes.append("held")
                release.wait(10)
        except StoreLocked as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=writer) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.time() + 20
    while len(outcomes) < n and time.time() < deadline:
        time.sleep(0.05)
    release.set()
    for t in threads:
        t.join()
    return outcomes


def test_two_writers_starting_at_once_exactly_one_proceeds(s3_server):
    url, options = s3_server.url(), s3_server.options
    outcomes = _writers_at_once(url, options, 4)
    assert outcomes.count("held") == 1, outcomes
    assert all("being written by" in o or "took over" in o for o in outcomes if o != "held")


def _lease_of(url, options, **holder):
    body = {"token": "someone-else", "pid": 4242, "host": "worker-7.cluster", "since": "2026-01-01T00:00:00",
            "expires": time.time() + 60, "seconds": 60, **holder}
    locate(url, options).sibling(".lease.json").write_bytes(json.dumps(body).encode())


def test_a_live_lease_of_another_machine_is_refused_with_its_holder_and_expiry(s3_server):
    url, options = s3_server.url(), s3_server.options
    _lease_of(url, options)
    with pytest.raises(StoreLocked, match=r"process 4242 on worker-7.cluster .*runs until"):
        with writer_lock(locate(url, options)):
            pass


@pytest.mark.parametrize("holder,why", [({"expires": time.time() - 3600}, "its lease expired"),
                                        ({"host": socket.gethostname(), "pid": 2 ** 22 + 17}, "no longer running")])
def test_a_stale_lease_is_taken_over_with_a_message(s3_server, caplog, holder, why):
    url, options = s3_server.url(), s3_server.options
    _lease_of(url, options, **holder)
    with caplog.at_level(logging.WARNING, logger="sketcharray"):
        with writer_lock(locate(url, options)) as held:
            assert json.loads(locate(url, options).sibling(".lease.json").read_bytes())["token"] == held.lease
    assert f"taking over the lease of store {url}" in caplog.text and why in caplog.text


def test_two_writers_taking_over_a_stale_lease_at_once_exactly_one_wins(s3_server):
    url, options = s3_server.url(), s3_server.options
    _lease_of(url, options, expires=time.time() - 3600)
    outcomes = _writers_at_once(url, options, 3, quiet=True)
    assert outcomes.count("held") == 1, outcomes


def test_a_writer_whose_lease_was_taken_over_writes_nothing(w, s3_server):
    url, options = s3_server.url(), s3_server.options
    write(w, url, options)
    with writer_lock(locate(url, options)) as held:
        assert held.lease is not None
        before = chunk(url, options, "grad", 0).read_bytes()
        _lease_of(url, options)  # another writer's lease now (taken over while this one was paused)
        with pytest.raises(StoreLocked, match="no longer holds its lease.*worker-7.cluster"):
            write_batch(held, 0, 0, BATCH, {"grad": np.zeros((BATCH, 8), np.float32),
                                            "loss": np.zeros(BATCH, np.float32), "valid": np.ones(BATCH, bool),
                                            "label": np.zeros(BATCH, np.int64)}, list(range(BATCH)))
        assert chunk(url, options, "grad", 0).read_bytes() == before


def test_the_lease_is_renewed_while_the_writer_runs(s3_server, monkeypatch):
    # renewed every 1 s; the check needs 1 s left, so it fails only if the renewing thread starves for 2 s
    monkeypatch.setattr(storage_lock, "LEASE_SECONDS", 4.0)
    url, options = s3_server.url(), s3_server.options
    lease = locate(url, options).sibling(".lease.json")
    with writer_lock(locate(url, options)) as held:
        first = json.loads(lease.read_bytes())["expires"]
        time.sleep(5.0)  # longer than the lease: it must have been renewed to still hold
        storage_lock.check_lease(held)
        assert json.loads(lease.read_bytes())["expires"] > first + 3.0
    assert not lease.exists()


def test_a_lazy_query_fetches_only_the_chunks_it_needs(w, s3_server):
    url, options = s3_server.url(), s3_server.options
    write(w, url, options)
    ds = open_sketches(url, storage_options=options)
    mark = s3_server.mark()
    rows = ds.grad.isel(example=slice(22, 27)).values  # inside batch 2
    assert rows.shape == (5, 8)
    key = f"/{url.split('://')[1]}/grad/c/2/0"
    # one GET, of that chunk alone (s3fs asks its size first, a HEAD, to split large objects into ranged GETs)
    assert s3_server.since(mark, "GET") == [key] and set(s3_server.since(mark)) == {key}
    mark = s3_server.mark()
    ds.grad.isel(example=slice(5, 35)).values  # batches 0..3
    assert sorted(s3_server.since(mark, "GET")) == [f"/{url.split('://')[1]}/grad/c/{b}/0" for b in range(4)]


def test_credentials_never_appear_in_attributes_logs_or_errors(w, s3_server, caplog, capsys):
    url, options = s3_server.url(), s3_server.options
    with caplog.at_level(logging.DEBUG, logger="sketcharray"):
        write(w, url, options, progress=True)
        verify_store(url, storage_options=options, progress=True)
    loc = locate(url, options)
    stored = b"".join(loc.child(*k.split("/")).read_bytes() for k in loc.objects())
    seen = [caplog.text, *capsys.readouterr(), repr(loc), str(loc), stored.decode("latin-1"),
            json.dumps(open_sketches(url, storage_options=options).attrs, default=str)]
    errors = []
    for call in (lambda: open_sketches("s3://no-such-bucket-here/run.zarr", storage_options=options),
                 lambda: write(w, "s3://no-such-bucket-here/run.zarr", options),
                 lambda: locate(str(loc.path or "run.zarr"), options)):
        with pytest.raises(Exception) as exc:
            call()
        errors.append(f"{exc.value!r} {exc.value}")
    code = main(["info", url, "--storage-option", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET_KEY}",
                 "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint}"])
    out = capsys.readouterr()
    assert code == 0 and "sketch store" in out.out
    code = main(["info", "s3://no-such-bucket-here/run.zarr", "--storage-option", f"secret={SECRET_KEY}",
                 "--storage-option", f"key={ACCESS_KEY}",
                 "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint}"])
    cli = capsys.readouterr()
    assert code == 3
    for text in [*seen, *errors, out.out, out.err, cli.out, cli.err]:
        assert SECRET_KEY not in text
        assert ACCESS_KEY not in text


def test_storage_options_for_a_local_path_are_refused(tmp_path):
    with pytest.raises(LocationError, match="storage options apply to URLs"):
        locate(str(tmp_path / "run.zarr"), {"anon": True})
    assert main(["info", str(tmp_path), "--storage-option", "anon=true"]) == 3


def test_writing_is_refused_where_conditional_writes_are_not_used(w):
    with pytest.raises(LocationError, match=r"gs:// stores can be read, not written"):
        Location("gs://bucket/run.zarr").put_if(b"{}", None)


def test_a_codec_outside_the_allowed_list_is_refused_on_s3_too(w, s3_server):
    url, options = s3_server.url(), s3_server.options
    write(w, url, options)
    meta_loc = locate(url, options).child("loss", "zarr.json")
    meta = json.loads(meta_loc.read_bytes())
    meta["codecs"].insert(1, {"name": "numcodecs.pickle", "configuration": {}})
    meta_loc.write_bytes(json.dumps(meta).encode())
    with pytest.raises(StoreError, match=r"loss uses codec\(s\) \['numcodecs.pickle'\]"):
        open_sketches(url, storage_options=options)


@pytest.mark.parametrize("solver", ["lanczos", "randomized"])
def test_an_interrupted_solve_resumes_from_its_state_on_s3_to_the_same_numbers(s3_server, solver):
    from sketcharray.analysis import lanczos, randomized

    from .analysis.test_eigen import _assert_same_pairs, _interrupted_at

    rng = np.random.default_rng(2)
    d = 120
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (q * np.concatenate([[40.0, 25.0, 9.0], rng.uniform(-1, 1, d - 6), [-2.0, -6.0, -15.0]])) @ q.T
    solve, options = ((lanczos, {"tol": 1e-10}) if solver == "lanczos" else
                      (randomized, {"tol": 1e-12, "n_iter": 8, "block": 6}))
    whole = solve(lambda x: x @ a, d, 3, solver=options, progress=False)
    state = locate(s3_server.url("solver.zarr"), s3_server.options)
    interrupted, calls = _interrupted_at(5, a)
    with pytest.raises(KeyboardInterrupt):
        solve(interrupted, d, 3, solver=options, progress=False, state=state, identity={"op": "a"})
    assert state.child("zarr.json").is_file()
    calls.clear()
    resumed = solve(lambda x: calls.append(1) or x @ a, d, 3, solver=options, progress=False, state=state,
                    identity={"op": "a"})
    assert len(calls) == whole["iterations"] - 4 and resumed["iterations"] == whole["iterations"]
    _assert_same_pairs(resumed, whole)
    with pytest.raises(ValueError, match="another solve"):
        solve(lambda x: x @ a, d, 3, solver=options, progress=False, state=state, identity={"op": "b"})


def test_an_intrinsic_dimension_search_resumes_from_s3(s3_server):
    from sketcharray.analysis.intrinsic import intrinsic_dimension

    from .analysis.test_intrinsic import TOY_DATA, Projected, _toy_loss, _toy_metric, interrupt_search

    kwargs = dict(search={"reference": 1.0, "d0": 4, "d_max": 256, "seeds": (0,), "check": False},
                  training={"steps_per_eval": 50, "min_improvement": 0.01, "lr": 0.05, "batch_size": 8},
                  execution={"progress": False})
    full = intrinsic_dimension(Projected(), _toy_loss, TOY_DATA, _toy_metric, "affd", **kwargs)
    store = locate(s3_server.url("search"), s3_server.options)
    interrupt_search(store, 5, **kwargs)
    assert store.child("affd-seed0", "state.json").is_file() and store.child("affd-seed0", "weights.npz").is_file()
    resumed = intrinsic_dimension(Projected(), _toy_loss, TOY_DATA, _toy_metric, "affd", store=store, **kwargs)
    np.testing.assert_array_equal(resumed.d.values, full.d.values)
    np.testing.assert_allclose(resumed.metric.values, full.metric.values, rtol=1e-12)
    assert resumed.d_star.values.tolist() == full.d_star.values.tolist()
    from sketcharray.app.commands import store_info

    info = store_info(store)
    assert info["kind"] == "intrinsic-dimension folder" and info["searches"]["affd-seed0"]["done"]


# ----------------------------------------------------------------- the command line
def test_attribute_and_spectrum_read_and_write_on_s3_as_on_disk(s3_server, tmp_path, capsys):
    opts = ["--storage-option", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET_KEY}",
            "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint}"]
    common = ["--workload", "tests.workload_fixture:tiny", "--n-out", "16", "--batch-size", "10", "--quiet"]
    runs = {}
    for where, root in (("local", str(tmp_path)), ("s3", s3_server.url("run"))):
        extra = opts if where == "s3" else []
        assert main(["sketch", "--out", f"{root}/train.zarr", *common, *extra]) == 0
        assert main(["sketch", "--out", f"{root}/test.zarr", "--split", "test", *common, *extra]) == 0
        capsys.readouterr()
        assert main(["attribute", f"{root}/train.zarr", f"{root}/test.zarr", "--k", "5", "--out",
                     f"{root}/scores.zarr", *extra]) == 0
        table = capsys.readouterr().out
        runs[where] = [line for line in table.splitlines() if line.startswith("|")]
        assert main(["spectrum", "--workload", "tests.workload_fixture:tiny", "--k", "2", "--n-out", "16",
                     "--out", f"{root}/spectra", "--quiet", *extra]) == 0
        assert main(["info", f"{root}/spectra", "--json", *extra]) == 0
        runs[where + "-spectrum"] = json.loads(capsys.readouterr().out)["checkpoints"]
        # a rerun reads the stored spectrum back instead of solving again
        assert main(["spectrum", "--workload", "tests.workload_fixture:tiny", "--k", "2", "--n-out", "16",
                     "--out", f"{root}/spectra", "--quiet", *extra]) == 0
        # an earlier result is replaced only when asked
        assert main(["attribute", f"{root}/train.zarr", f"{root}/test.zarr", "--out", f"{root}/scores.zarr",
                     "--quiet", *extra]) == 3
        assert "pass --overwrite" in capsys.readouterr().err
    assert runs["s3"] == runs["local"] and len(runs["local"]) == 2 + 12 * 5
    assert runs["s3-spectrum"] == runs["local-spectrum"]
    from sketcharray.storage.outputs import result_kind

    assert result_kind(locate(s3_server.url("run").rsplit("/", 2)[0], s3_server.options)) is None
    assert result_kind(str(tmp_path / "scores.zarr")) == "attribution"


def test_hvp_sketches_stream_to_s3_as_to_disk_and_feed_the_single_pass_spectrum(s3_server, tmp_path, capsys):
    opts = ["--storage-option", f"key={ACCESS_KEY}", "--storage-option", f"secret={SECRET_KEY}",
            "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint}"]
    args = ["--workload", "tests.workload_fixture:tiny", "--hvps", "8", "--hvp-space", "sketch", "--n-out", "16",
            "--quiet"]
    url = s3_server.url("hvps.zarr")
    assert main(["sketch", "--out", str(tmp_path / "hvps.zarr"), *args]) == 0
    assert main(["sketch", "--out", url, *args, *opts]) == 0
    local, remote = open_sketches(tmp_path / "hvps.zarr"), open_sketches(url, storage_options=s3_server.options)
    np.testing.assert_array_equal(remote.hvp.values, local.hvp.values)
    capsys.readouterr()
    assert main(["spectrum", "--from-hvps", str(tmp_path / "hvps.zarr"), "--k", "2"]) == 0
    on_disk = capsys.readouterr().out
    assert main(["spectrum", "--from-hvps", url, "--k", "2", *opts]) == 0
    assert capsys.readouterr().out == on_disk


# ----------------------------------------------------------------- a cluster of processes
@pytest.mark.slow
def test_workers_of_a_local_cluster_write_their_own_batches(s3_server, tmp_path, monkeypatch, capsys):
    """`sketch --scheduler local-cluster` to S3 and then `attribute` give the numbers of the local-disk run, and
    the client writes no batch (its write_batch is replaced by one that fails: the workers, other processes,
    have the real one)."""
    pytest.importorskip("distributed")
    import sketcharray.storage.write as storage_write

    common = ["--limit", "300", "--batch-size", "50", "--n-out", "64", "--quiet"]
    url = s3_server.url("run")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert main(["sketch", "--out", str(tmp_path / "train.zarr"), *common]) == 0
    assert main(["sketch", "--out", str(tmp_path / "test.zarr"), "--split", "test", *common]) == 0

    def not_here(*args, **kwargs):
        raise AssertionError("the client wrote a batch")

    monkeypatch.setattr(storage_write, "write_batch", not_here)
    assert main(["sketch", "--out", f"{url}/train.zarr", "--scheduler", "local-cluster", *common]) == 0
    assert main(["sketch", "--out", f"{url}/test.zarr", "--split", "test", "--scheduler", "local-cluster",
                 *common]) == 0
    monkeypatch.undo()
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    assert_same(f"{url}/train.zarr", None, tmp_path / "train.zarr")
    capsys.readouterr()
    assert main(["attribute", str(tmp_path / "train.zarr"), str(tmp_path / "test.zarr"), "--first", "5"]) == 0
    local = capsys.readouterr().out
    assert main(["attribute", f"{url}/train.zarr", f"{url}/test.zarr", "--first", "5"]) == 0
    remote = capsys.readouterr().out
    strip = lambda text: [line for line in text.splitlines() if line.startswith("|")]  # noqa: E731
    assert strip(remote) == strip(local) and len(strip(local)) == 2 + 5 * 10


KILL_SCRIPT = """
import sys
from sketcharray.app.cli import main
if __name__ == "__main__":  # the cluster's worker processes import this file too
    sys.exit(main(["sketch", "--out", sys.argv[1], "--limit", "400", "--batch-size", "25", "--n-out", "64",
                   "--scheduler", "local-cluster", "--quiet"]))
"""


@pytest.mark.slow
def test_kill_9_of_a_worker_and_then_the_client_resumes_bit_identically(s3_server, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    psutil = pytest.importorskip("psutil")
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    url = s3_server.url()
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    client = subprocess.Popen([sys.executable, str(script), url], env=env, start_new_session=True)
    loc = locate(url)

    def done_batches():
        return sum(1 for k in loc.objects() if k.startswith("batch_done/c/"))

    try:
        deadline = time.time() + 240
        while done_batches() < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert done_batches() >= 2, "the run wrote no batch in time"
        # the worker processes (the nannies live in the client; the workers are their spawned children)
        workers = [p for p in psutil.Process(client.pid).children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) >= 2, [p.cmdline() for p in psutil.Process(client.pid).children(recursive=True)]
        workers[0].send_signal(signal.SIGKILL)  # a worker dies mid-run: its tasks go to another worker
        seen = done_batches()
        while done_batches() < seen + 2 and time.time() < deadline:
            time.sleep(0.1)
        os.killpg(client.pid, signal.SIGKILL)  # then the client and all it started
        client.wait(30)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
    assert client.returncode == -9
    assert 0 < done_batches() < 16
    # rerun: the lease of the killed client (this host, no longer running) is taken over, the rest written
    rerun = subprocess.run([sys.executable, str(script), url], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reference = tmp_path / "ref.zarr"
    assert main(["sketch", "--out", str(reference), "--limit", "400", "--batch-size", "25", "--n-out", "64",
                 "--quiet"]) == 0
    assert_same(url, None, reference)
    assert verify_store(url).ok
