"""One training run per workdir: WORKDIR/run.lock names the run that holds it.

Two runs writing one workdir would interleave checkpoints and logs and ruin both. `WorkdirLock` is taken by
process 0 of a run before anything is written and released when the run ends (normally, on an error, on
SIGTERM/Ctrl-C). A second run on the workdir refuses at once, naming the holder's host and pid.

A lock whose holder died without releasing it (SIGKILL, a crash of the machine) is stale and is taken over
with a warning. Stale means:
* the holder ran on this host, and the host has rebooted since (another /proc boot id), or its pid is gone, or
  the pid now belongs to a later process (another start time);
* the holder ran on another host (a shared filesystem), or in another pid namespace (a container with this
  host's name), and has not refreshed its heartbeat (the lock file's 'heartbeat' time, rewritten every
  `heartbeat_s` by a daemon thread) for `stale_after_s` (hosts' clocks are assumed to agree within minutes).
Checking and taking over happen under a POSIX record lock on WORKDIR/run.lock.guard (held for milliseconds),
so two runs that start together cannot both take a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Iterator, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from yolos_jax import atomic, runtime
from yolos_jax.errors import UserError

log = logging.getLogger("yolos_jax")

LOCK_FILE = "run.lock"
GUARD_FILE = "run.lock.guard"


class WorkdirLockedError(UserError):
    """Another live run holds the workdir."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:  # not Linux: reboots are then seen through the pid check only
        return ""


def process_start_ticks(pid: int) -> Optional[int]:
    """The start time of process `pid` in clock ticks since boot (/proc/<pid>/stat field 22); None when the
    process does not exist (or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: count fields after its closing one.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> str:
    """This process's pid namespace (containers sharing a hostname may each have their own)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def this_process() -> dict[str, Any]:
    """What the lock file records about the run holding it."""
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(), "pid_ns": _pid_namespace(),
            "start_ticks": process_start_ticks(os.getpid()), "started": now, "heartbeat": now}


def stale_reason(holder: dict[str, Any], stale_after_s: float, now: Optional[float] = None) -> Optional[str]:
    """Why the run recorded in `holder` (a lock file's content) no longer holds the lock; None if it may be alive."""
    now = time.time() if now is None else now
    pid = int(holder.get("pid", -1))
    same_pids = holder.get("pid_ns", "") == _pid_namespace()  # another container's pids mean nothing here
    if holder.get("host") == socket.gethostname() and same_pids:
        if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
            return "this machine has rebooted since"
        if pid <= 0 or not _pid_alive(pid):
            return f"process {pid} is gone"
        ticks = holder.get("start_ticks")
        if ticks is not None and process_start_ticks(pid) not in (None, ticks):
            return f"pid {pid} now belongs to a later process"
        return None
    age = now - float(holder.get("heartbeat", 0.0))
    if age > stale_after_s:
        return f"no heartbeat from host {holder.get('host')!r} for {age:.0f} s (> {stale_after_s:.0f} s)"
    return None


def describe_holder(holder: dict[str, Any], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0.0))))
    return (f"pid {holder.get('pid')} on host {holder.get('host')} (started {started}, heartbeat "
            f"{now - float(holder.get('heartbeat', 0.0)):.0f} s ago)")


@contextlib.contextmanager
def _guard(workdir: str) -> Iterator[None]:
    with open(os.path.join(workdir, GUARD_FILE), "a") as f:
        fcntl.lockf(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def read_lock(workdir: str) -> Optional[dict[str, Any]]:
    """The lock file's content; None if there is none; {} if it does not parse (treated as stale)."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            content = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds WORKDIR/run.lock for the block (see the module docstring)."""

    def __init__(self, workdir: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        if stale_after_s <= 2 * heartbeat_s:
            raise ValueError(f"stale_after_s ({stale_after_s}) must exceed two heartbeats ({heartbeat_s} s each)")
        self.workdir = os.path.abspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._mine: Optional[dict[str, Any]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live holder. A stale lock is taken over with
        one warning line."""
        os.makedirs(self.workdir, exist_ok=True)
        mine = this_process()
        with _guard(self.workdir):
            holder = read_lock(self.workdir)
            if holder is not None and not (holder.get("host") == mine["host"] and holder.get("pid") == mine["pid"]):
                why = "the lock file does not parse" if not holder else stale_reason(holder, self.stale_after_s)
                if why is None:
                    raise WorkdirLockedError(
                        f"{self.workdir} is in use by another training run: {describe_holder(holder)}. Wait for it to "
                        f"end or stop it, or train in another --workdir. If that run is certainly dead (e.g. on a "
                        f"host that is gone), delete {self.path}")
                log.warning("taking over %s from a run that ended without releasing it (%s; %s)", self.path, why,
                            describe_holder(holder) if holder else "unreadable")
            atomic.write_json_atomic(self.path, mine, indent=1)
        self._mine = mine
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with _guard(self.workdir):
                    holder = read_lock(self.workdir) or {}
                    if holder.get("pid") != self._mine["pid"] or holder.get("host") != self._mine["host"]:
                        log.error("%s was taken over by %s; this run no longer holds its workdir", self.path,
                                  describe_holder(holder) if holder else "another run")
                        return
                    self._mine["heartbeat"] = time.time()
                    atomic.write_json_atomic(self.path, self._mine, indent=1)
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again (never die silently)
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._mine is None:
            return
        try:
            with _guard(self.workdir):
                holder = read_lock(self.workdir) or {}
                if holder.get("pid") == self._mine["pid"] and holder.get("host") == self._mine["host"]:
                    os.remove(self.path)
        except OSError as e:
            log.warning("could not release %s: %s", self.path, e)
        self._mine = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.release()
        return False


@contextlib.contextmanager
def exclusive_workdir(workdir: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0) -> Iterator[None]:
    """Holds `workdir` for one run: process 0 takes the `WorkdirLock`, and every process of a multi-host run
    learns whether it did (one collective), so all of them refuse together instead of waiting on process 0."""

    lock = WorkdirLock(workdir, heartbeat_s, stale_after_s) if jax.process_index() == 0 else None
    refused: Optional[WorkdirLockedError] = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            refused = e
    if jax.process_count() > 1:
        if not bool(multihost_utils.broadcast_one_to_all(np.int32(refused is None))) and refused is None:
            raise WorkdirLockedError(f"process 0 could not take {os.path.join(workdir, LOCK_FILE)}; its log says why")
    if refused is not None:
        raise refused
    if lock is not None:
        runtime.ABANDON_HOOKS.append(lock.release)  # a peer died: the watchdog releases it before exiting
    try:
        yield
    finally:
        if lock is not None:
            runtime.ABANDON_HOOKS.remove(lock.release)
            lock.release()
