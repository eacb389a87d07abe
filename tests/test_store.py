"""What a store promises: checksummed chunks, per-batch digests, repair by resume, one writer, atomic creation.

Fault injection: every variable of a real store is damaged in every way a
disk, a copy or a person can damage it (chunk deleted, truncated,
overwritten, swapped with another batch's, replaced by another store's);
each must be detected and named when read, listed by ``verify_store``, and
repaired by rerunning the call that wrote the store, recomputing exactly
the damaged batch, to a store bit-identical to an undamaged one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from sketcharray.collect import gradients as collect
from sketcharray.storage import store as st
from sketcharray.storage import write as storage_write
from sketcharray.collect import sketch_gradients
from sketcharray.storage.store import StoreDamaged, StoreError, StoreLocked, open_sketches, verify_store

from .workload_fixture import _model, tiny

BATCH = 10  # 48 examples: batches 0..3 of 10 and batch 4 of 8
DAMAGED = 2  # the batch the tests damage: examples 20..29


@pytest.fixture(scope="module")
def w():
    return tiny()


def write(w, path, *, seed=0, method="afjl", n_out=8, progress=False, params=None, model=None):
    return sketch_gradients(model or w.model_factory, w.loss_fn, w.train,
                            {"method": method, "n_out": n_out, "seed": seed}, batch_size=BATCH, ids=w.train_ids,
                            store=path, model_settings={"params": params}, execution={"progress": progress})


@pytest.fixture(scope="module")
def reference(w, tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    write(w, root / "ref.zarr")
    # another model and sketch over the same examples: the source of foreign chunks
    write(w, root / "other.zarr", seed=7, model=functools.partial(_model, 1))
    return root


def values(path):
    ds = open_sketches(path)
    return {name: ds[name].values for name in ("grad", "loss", "valid", "label")}


def assert_same_values(path, expected_path):
    """Every variable of the store at ``path`` equal, bit for bit, to the one at ``expected_path``."""
    expected = values(expected_path)
    for key, got in values(path).items():
        np.testing.assert_array_equal(got, expected[key])


def chunk_file(path, name, batch):
    arr = zarr.open_group(str(path), mode="r")[name]
    return path / name / arr.metadata.encode_chunk_key((batch,) + (0,) * (arr.ndim - 1))


def damage(path, name, action, reference):
    f = chunk_file(path, name, DAMAGED)
    if action == "delete":
        f.unlink()
    elif action == "truncate":
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif action == "overwrite":
        f.write_bytes(np.random.default_rng(0).bytes(len(f.read_bytes())))
    elif action == "swap":  # another batch's chunk, intact and correctly checksummed
        shutil.copyfile(chunk_file(path, name, DAMAGED + 1), f)
    elif action == "foreign":  # the same batch from a store of another sketch
        shutil.copyfile(chunk_file(reference / "other.zarr", name, DAMAGED), f)


def count_batches(monkeypatch) -> list[int]:
    """Record which batches the next sketch_gradients call computes."""
    computed = []
    task = collect._gradient_task

    def counting(*args, **kwargs):
        computed.append(args[3])  # (model, loss_fn, data, index, ...)
        return task(*args, **kwargs)

    monkeypatch.setattr(collect, "_gradient_task", counting)
    return computed


def test_every_array_of_a_store_is_checksummed(reference):
    metas = [json.loads(p.read_text()) for p in (reference / "ref.zarr").glob("*/zarr.json")]
    arrays = [m for m in metas if m["node_type"] == "array"]
    assert len(arrays) >= 8  # grad, loss, valid, label, batch_done, batch_digest, example, sketch
    for m in arrays:
        assert m["codecs"][-1]["name"] == "crc32c", m


# Left out, because the bytes put in place are the right ones (nothing is wrong to find): a foreign
# valid or label chunk of the same examples, and a swap of two all-True valid chunks.
CASES = [(name, action) for name in ("grad", "loss", "valid", "label")
         for action in ("delete", "truncate", "overwrite", "swap", "foreign")
         if not (action == "foreign" and name in ("valid", "label")) and (name, action) != ("valid", "swap")]


@pytest.mark.parametrize("name, action", CASES)
def test_a_damaged_chunk_is_named_listed_and_repaired_exactly(w, reference, tmp_path, monkeypatch, name, action):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    damage(path, name, action, reference)
    ds = open_sketches(path)  # opening reads only metadata, ids and digests
    with pytest.raises(StoreDamaged, match=rf"{name} of batch {DAMAGED} \(examples 20\.\.29\)"):
        ds[name].values
    report = verify_store(path)
    assert not report.ok and report.damaged_batches == [DAMAGED]
    assert [(d.variable, d.batch) for d in report.damage] == [(name, DAMAGED)]
    if action == "delete":
        assert "chunk file is missing" in report.damage[0].reason
    computed = count_batches(monkeypatch)
    write(w, path)
    assert computed == [DAMAGED]
    assert verify_store(path).ok
    assert_same_values(path, reference / "ref.zarr")


def test_damaged_ids_are_detected_and_restored_from_the_same_run(w, reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    for f in (path / "example" / "c").iterdir():
        f.unlink()  # the id coordinate's chunks: ids would read as ''
    with pytest.raises(StoreDamaged, match=r"example of batch 0 \(examples 0\.\.9\): the ids do not match"):
        open_sketches(path)
    assert {d.variable for d in verify_store(path).damage} == {"example"}
    with pytest.raises(ValueError, match="holds different example ids than this run"):
        sketch_gradients(w.model_factory, w.loss_fn, w.train, {"method": "afjl", "n_out": 8, "seed": 0},
                         batch_size=BATCH, ids=[f"z{i}" for i in range(48)], store=path, execution={"progress": False})
    write(w, path)
    assert list(open_sketches(path).example.values) == w.train_ids


@pytest.mark.parametrize("name", ["grad", "valid", "batch_done", "batch_digest", "example"])
def test_missing_array_metadata_is_named_and_restored(w, reference, tmp_path, name):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    (path / name / "zarr.json").unlink()
    with pytest.raises(StoreDamaged, match=rf"{name}: its metadata {name}/zarr.json is missing"):
        open_sketches(path)
    assert name in verify_store(path).damaged_arrays
    write(w, path)
    assert verify_store(path).ok
    assert_same_values(path, reference / "ref.zarr")


def test_a_lost_progress_flag_or_digest_recomputes_that_batch(w, reference, tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    chunk_file(path, "batch_done", 1).unlink()  # reads as not done
    chunk_file(path, "batch_digest", 3).unlink()  # done, but nothing to check it against
    with pytest.raises(ValueError, match="incomplete: 1 of 5 batches not written"):
        open_sketches(path)
    assert [(d.variable, d.batch) for d in verify_store(path).damage] == [("batch_digest", 3)]
    computed = count_batches(monkeypatch)
    write(w, path)
    assert sorted(computed) == [1, 3] and verify_store(path).ok


@pytest.mark.parametrize("parts", [("grad",), ("grad", "loss", "valid", "label")])
def test_a_chunk_copied_with_its_digest_from_another_store_is_named(w, reference, tmp_path, monkeypatch, parts):
    """Issue 21, item 5b: digests are keyed on the store's identity, so a foreign batch brings a foreign digest."""
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    other = reference / "other.zarr"  # another seed and model over the same examples, ids and shapes
    for name in (*parts, "batch_digest"):
        shutil.copyfile(chunk_file(other, name, DAMAGED), chunk_file(path, name, DAMAGED))
    report = verify_store(path)
    assert report.damaged_batches == [DAMAGED], str(report)
    assert [d.variable for d in report.damage] == ["batch_digest"] and "copied from another store" in str(report)
    with pytest.raises(StoreDamaged, match=rf"of batch {DAMAGED}"):
        open_sketches(path).grad.values
    computed = count_batches(monkeypatch)
    write(w, path)
    assert computed == [DAMAGED] and verify_store(path).ok
    assert_same_values(path, reference / "ref.zarr")


def test_root_attributes_edited_to_claim_another_sketch_fail_verification(w, reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    meta = json.loads((path / "zarr.json").read_text())
    spec = json.loads(meta["attributes"]["sketch_spec"])
    meta["attributes"]["sketch_spec"] = json.dumps({**spec, "seed": 1}, sort_keys=True)
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreDamaged, match="the ids do not match the digest"):
        open_sketches(path)
    report = verify_store(path)
    assert report.damaged_batches == [0, 1, 2, 3, 4] and {d.variable for d in report.damage} == {"batch_digest"}
    # the run that the attributes now claim recomputes every batch, and the store then holds what it claims
    write(w, path, seed=1)
    assert verify_store(path).ok
    fresh = tmp_path / "fresh.zarr"
    write(w, fresh, seed=1)
    np.testing.assert_array_equal(values(path)["grad"], values(fresh)["grad"])


def test_swapped_digest_records_are_named_and_recomputed_by_resume(w, reference, tmp_path, monkeypatch, caplog):
    """Issue 21, item 6: a damaged digest record is repaired like any other part, not refused as other ids."""
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    a, b = chunk_file(path, "batch_digest", 1), chunk_file(path, "batch_digest", 3)
    first, second = a.read_bytes(), b.read_bytes()
    a.write_bytes(second)
    b.write_bytes(first)
    with pytest.raises(StoreDamaged, match="batch 1"):
        open_sketches(path)
    report = verify_store(path)
    assert [(d.variable, d.batch) for d in report.damage] == [("batch_digest", 1), ("batch_digest", 3)]
    computed = count_batches(monkeypatch)
    with caplog.at_level("WARNING", logger="sketcharray"):
        write(w, path, progress=True)
    assert sorted(computed) == [1, 3] and verify_store(path).ok
    out = caplog.text
    assert "recomputing 2 damaged batch(es) [1, 3] (batch_digest of batch 1 (examples 10..19): the digest record" in out
    assert_same_values(path, reference / "ref.zarr")


def test_damaged_root_metadata_is_refused_not_overwritten(w, reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    (path / "zarr.json").write_text("{garbage")
    with pytest.raises(StoreDamaged, match="the root metadata is unreadable"):
        open_sketches(path)
    with pytest.raises(StoreDamaged):
        write(w, path)
    (path / "zarr.json").unlink()
    with pytest.raises(StoreError, match="the folder exists and is not a sketcharray store"):
        write(w, path)
    assert (path / "grad").is_dir()  # nothing was deleted


def test_a_store_without_digests_opens_with_a_note(reference, tmp_path):
    path = tmp_path / "old.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    group = zarr.open_group(str(path), mode="r+")
    del group.attrs["digest_parts"]
    with pytest.warns(UserWarning, match="has no digests: its chunks cannot be verified"):
        ds = open_sketches(path)
    np.testing.assert_array_equal(ds.grad.values, values(reference / "ref.zarr")["grad"])
    report = verify_store(path)
    assert not report.verifiable and "cannot be verified" in str(report)


def test_a_codec_outside_the_allowed_list_is_refused_before_decoding(reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    meta = json.loads((path / "loss" / "zarr.json").read_text())
    meta["codecs"].insert(1, {"name": "numcodecs.pickle", "configuration": {}})
    (path / "loss" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"loss uses codec\(s\) \['numcodecs.pickle'\]"):
        open_sketches(path)


# ------------------------------------------------------------------ creation
def test_a_store_below_a_file_or_over_other_content_is_refused(w, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match=r"file is a file, not a folder"):
        write(w, tmp_path / "file" / "s.zarr")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="the folder exists and is not a sketcharray store"):
        write(w, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_creation_is_atomic_and_clears_what_a_killed_creator_left(w, tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    (tmp_path / ".s.zarr.tmp-999999-deadbeef").mkdir()  # a creator killed before its rename

    def killed(tmp, **skeleton):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage_write, "_write_skeleton", killed)
    with pytest.raises(KeyboardInterrupt):
        write(w, path)
    assert not path.exists() and not list(tmp_path.glob(".s.zarr.tmp-*"))
    monkeypatch.undo()
    write(w, path)
    assert verify_store(path).ok


# ------------------------------------------------------------------- locking
def test_a_second_writer_is_refused_naming_the_holder(w, tmp_path):
    path = tmp_path / "s.zarr"
    with st.writer_lock(path):
        with pytest.raises(StoreLocked, match=rf"is being written by process {os.getpid()} on "):
            write(w, path)
        assert open_sketches is not None  # readers take no lock: nothing to wait for
    write(w, path)
    assert not (tmp_path / "s.zarr.writer.json").exists()


@pytest.mark.parametrize("alias", ["symlink", "relative", "dotdot"])
def test_the_lock_belongs_to_the_store_not_to_how_its_path_is_spelled(w, tmp_path, monkeypatch, alias):
    """Issue 21, item 7: a symlink or another spelling of a half-finished store's path is the same store."""
    path = tmp_path / "s.zarr"
    write(w, path)
    zarr.open_group(str(path), mode="r+")["batch_done"][3] = 0  # half-finished
    monkeypatch.chdir(tmp_path)
    other = {"symlink": tmp_path / "link.zarr", "relative": "s.zarr", "dotdot": tmp_path / "sub" / ".." / "s.zarr"}
    (tmp_path / "sub").mkdir()
    if alias == "symlink":
        (tmp_path / "link.zarr").symlink_to(path, target_is_directory=True)
    with st.writer_lock(path):
        with pytest.raises(StoreLocked, match=rf"is being written by process {os.getpid()} on "):
            write(w, other[alias])
    write(w, other[alias])
    assert verify_store(path).ok and not st.pending_batches(path).size


def test_a_lock_left_by_a_dead_writer_is_taken_over(w, tmp_path, caplog):
    path = tmp_path / "s.zarr"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = {"pid": int(dead.stdout), "host": __import__("socket").gethostname(), "since": "earlier"}
    (tmp_path / "s.zarr.writer.json").write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="sketcharray"):
        write(w, path, progress=True)
    out = caplog.text
    assert f"taking over the lock of store {path} left by process {record['pid']}" in out and "no longer running" in out


WRITER = textwrap.dedent(
    """
    import sys, time
    from sketcharray.collect import sketch_gradients
    from sketcharray.storage.store import StoreLocked
    from tests.workload_fixture import tiny
    w = tiny()
    def slow(out, batch):
        time.sleep(float(sys.argv[3]))
        return w.loss_fn(out, batch)
    try:
        sketch_gradients(w.model_factory, slow, w.train, {"method": "afjl", "n_out": 8, "seed": int(sys.argv[2])},
                         batch_size=10, ids=w.train_ids, store=sys.argv[1], execution={"progress": False})
    except StoreLocked as exc:
        print(exc)
        sys.exit(3)
    """
)


@pytest.mark.slow
def test_two_writer_processes_on_one_new_path(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    path = tmp_path / "s.zarr"
    first = subprocess.Popen([sys.executable, str(script), str(path), "0", "0.3"], env=env, cwd=os.getcwd())
    deadline = time.time() + 60
    while not (tmp_path / "s.zarr.writer.json").exists():  # the first holds the lock
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.02)
    second = subprocess.run([sys.executable, str(script), str(path), "1", "0"], env=env, capture_output=True,
                            text=True)
    assert first.wait(timeout=120) == 0
    assert second.returncode == 3 and f"is being written by process {first.pid}" in second.stdout
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.zarr"), "0", "0"], env=env)
    assert single.returncode == 0
    got, ref = open_sketches(path), open_sketches(tmp_path / "single.zarr")
    xr.testing.assert_identical(got[["grad", "loss", "valid", "label"]], ref[["grad", "loss", "valid", "label"]])


def test_an_unfinished_run_opens_with_its_missing_rows_marked(w, reference, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    group = zarr.open_group(str(path), mode="r+")
    group["batch_done"][3] = 0  # as a kill leaves it: the batch's chunks half written, no digest
    group["batch_digest"][3] = np.zeros(5, dtype=np.uint64)
    chunk_file(path, "grad", 3).write_bytes(b"half a chunk")
    with pytest.raises(ValueError, match="incomplete: 1 of 5 batches not written"):
        open_sketches(path)
    ds = open_sketches(path, allow_incomplete=True)
    assert np.isnan(ds.grad.values[30:40]).all() and not ds.valid.values[30:40].any()
    np.testing.assert_array_equal(ds.grad.values[:30], values(reference / "ref.zarr")["grad"][:30])
    assert verify_store(path).ok  # only finished batches are checked; the rerun recomputes batch 3


def test_xarray_opens_a_store_with_the_sketcharray_engine_and_its_checks(reference, tmp_path):
    """``xr.open_dataset(path, engine="sketcharray")`` (the installed entry point) is ``open_sketches``: the same
    lazy values and attrs, and a damaged chunk raises StoreDamaged, naming it, when it is read."""
    import xarray as xr

    ds = xr.open_dataset(reference / "ref.zarr", engine="sketcharray")
    ref = open_sketches(reference / "ref.zarr")
    assert ds.attrs["sketch_spec"] == ref.attrs["sketch_spec"]
    assert type(ds.grad.data).__module__.startswith("dask")  # lazy
    np.testing.assert_array_equal(ds.grad.values, ref.grad.values)
    assert "label" not in xr.open_dataset(reference / "ref.zarr", engine="sketcharray", drop_variables=["label"])
    path = tmp_path / "s.zarr"
    shutil.copytree(reference / "ref.zarr", path)
    damage(path, "grad", "overwrite", reference)
    with pytest.raises(StoreDamaged, match=rf"grad of batch {DAMAGED}"):
        xr.open_dataset(path, engine="sketcharray").grad.values
