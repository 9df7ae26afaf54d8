"""One run per workdir (`yolos_jax.workdir_lock`): a live holder refuses the second run; a dead one (killed, a
rebooted machine, a pid reused, another host silent) is taken over; release removes only our own lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from yolos_jax import workdir_lock
from yolos_jax.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLockedError

HOLD = """
import sys, time
from yolos_jax.workdir_lock import WorkdirLock
lock = WorkdirLock(sys.argv[1], heartbeat_s=0.2, stale_after_s=1.0)
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _holder(workdir):
    """A live process holding `workdir`'s lock (the test's other run)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _write_lock(workdir, **fields):
    os.makedirs(workdir, exist_ok=True)
    holder = {**workdir_lock.this_process(), **fields}
    with open(os.path.join(workdir, LOCK_FILE), "w") as f:
        json.dump(holder, f)
    return holder


def test_a_live_run_holds_the_workdir_and_a_second_refuses_naming_it(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(WorkdirLockedError) as e:
            WorkdirLock(str(tmp_path)).acquire()
        assert f"pid {proc.pid} on host {socket.gethostname()}" in str(e.value)
        assert "another --workdir" in str(e.value) and "\n" not in str(e.value)
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        deadline = time.time() + 10  # the holder's heartbeat thread keeps refreshing the lock (every 0.2 s)
        while json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == first:
            assert time.time() < deadline, "the holder's heartbeat did not refresh the lock in 10 s"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_FILE).exists()  # SIGKILL: nothing released it
    with caplog.at_level("WARNING", logger="yolos_jax"), WorkdirLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert lock.path == str(tmp_path / LOCK_FILE)
    assert any(f"process {proc.pid} is gone" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end of the block


@pytest.mark.parametrize("fields, why", [
    (dict(boot_id="another-boot"), "rebooted"),  # a lock from before the machine restarted
    (dict(start_ticks=-5), "now belongs to a later process"),  # a live pid, recorded for an earlier process
    (dict(host="other-host", heartbeat=time.time() - 3600), "no heartbeat from host 'other-host'"),
])
def test_stale_locks_are_recognised(tmp_path, fields, why):
    holder = _write_lock(tmp_path, **fields)  # this (live) process, but for the field changed
    assert why in workdir_lock.stale_reason(holder, stale_after_s=300)
    assert workdir_lock.stale_reason(workdir_lock.this_process(), stale_after_s=300) is None


def test_a_live_holder_on_another_host_is_respected_until_its_heartbeat_stops(tmp_path):
    now = time.time()
    holder = _write_lock(tmp_path, host="other-host", pid=12345, heartbeat=now - 10)
    assert workdir_lock.stale_reason(holder, stale_after_s=300, now=now) is None
    with pytest.raises(WorkdirLockedError, match="pid 12345 on host other-host"):
        WorkdirLock(str(tmp_path)).acquire()
    assert workdir_lock.stale_reason(holder, stale_after_s=300, now=now + 400) is not None


def test_an_unreadable_lock_is_stale_and_release_leaves_anothers_lock_alone(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{half a lock")
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    other = _write_lock(tmp_path, host="other-host", pid=999)  # someone took it over meanwhile
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == other["pid"]
