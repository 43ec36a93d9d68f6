"""Atomic writes, records, the run lock and run-directory safety."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsseg.errors import RunFailure, UserError
from wsseg.store import RunLock, RunStore, atomic_path, check_run_dir_is_safe, digest, read_json, remove_temporaries, write_json


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path):
    target = tmp_path / "out" / "a.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise ValueError("boom")
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


def test_disk_full_is_one_clear_error_and_leaves_no_file(tmp_path):
    target = tmp_path / "b.npz"
    with pytest.raises(RunFailure, match=r"b.npz: no space left on the device"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_damaged_json_reads_as_missing(tmp_path):
    path = tmp_path / "stage.json"
    write_json(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    path.write_text('{"a": 1')  # truncated
    assert read_json(path) is None


def test_remove_temporaries(tmp_path):
    (tmp_path / ".tmp-123-x.png").write_text("x")
    (tmp_path / "y.png").write_text("y")
    remove_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["y.png"]


def test_digest_is_canonical():
    assert digest({"a": 1, "b": (1, 2)}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from wsseg.store import RunLock; l = RunLock(sys.argv[1]); l.acquire(); print('ok', flush=True); time.sleep(60)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ok"
        with pytest.raises(UserError, match=rf"another wsseg run \(pid {holder.pid}\) is using this run directory"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # the owner died without releasing: its lock is stale and is taken over
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_run_dir_safety(tmp_path):
    data = tmp_path / "data" / "VOC2012"
    data.mkdir(parents=True)
    with pytest.raises(UserError, match="contains data.root"):
        check_run_dir_is_safe(data, {"data.root": data})
    with pytest.raises(UserError, match="contains data.root"):
        check_run_dir_is_safe(tmp_path / "data", {"data.root": data})
    with pytest.raises(UserError, match="home directory"):
        check_run_dir_is_safe(Path.home(), {})
    check_run_dir_is_safe(tmp_path / "runs" / "x", {"data.root": data})


def test_store_folders_stay_inside_the_run(tmp_path):
    store = RunStore(tmp_path / "run")
    with pytest.raises(ValueError):
        store.folder("../outside")
    store.write_record("cams", {"status": "running"})
    assert store.record("cams") == {"status": "running"}
    store.clear("cams")
    assert store.record("cams") is None
