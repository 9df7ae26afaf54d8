"""Process set-up shared by the entry scripts: logging, TensorFlow kept off accelerators, caches, malloc's settings
(`yolos_jax/malloc.py`), and the multi-process start-up (`maybe_initialize_distributed`)."""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
from typing import Any, Callable, NoReturn, Optional

from yolos_jax import malloc
from yolos_jax.errors import ConfigError


def setup_host(compilation_cache: bool = True) -> None:
    """Call first thing in an entry script (before TensorFlow or jax are used).

    * TensorFlow (the input pipeline) must not grab GPU/TPU memory or all CPU cores: it sees no
      accelerators and few threads, so it does not fight XLA.
    * jax's persistent compilation cache makes re-runs (resume, eval) skip recompiling what it keeps: jax keeps
      no program with a host callback, so the train step with the default scipy matcher compiles on every start
      (`config.matcher.implementation='device'` has no callback).
    * glibc keeps freed memory mapped (`malloc.keep_freed_memory`), so XLA:CPU steps stop page-faulting; a no-op
      where the entry script's `malloc.use_scalable_malloc` replaced glibc's malloc; the log names the allocator.
    """
    malloc.keep_freed_memory()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # orbax and absl log every checkpoint file operation at INFO: keep our own INFO lines only.
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(drop_storage_error_records)
    sys.unraisablehook = _quiet_storage_leftovers(sys.unraisablehook)
    logging.getLogger("yolos_jax").setLevel(logging.INFO)
    logging.getLogger("yolos_jax").info("malloc: %s", malloc.describe())
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        tf.config.set_visible_devices([], "TPU")
    except Exception:  # noqa: BLE001 - TF absent or already initialised: nothing to hide
        pass
    if compilation_cache:
        import jax

        cache = os.environ.get("YOLOS_JAX_COMPILATION_CACHE", os.path.expanduser("~/.cache/yolos_jax/xla"))
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _from_storage(tb: Any) -> bool:
    """Whether a traceback passes through orbax (a checkpoint read or write)."""
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def drop_storage_error_records(record: logging.LogRecord) -> bool:
    """A logging filter (on the 'absl' and 'asyncio' loggers): False for the ERROR records of a failed orbax save
    or restore — orbax's own, logged with a traceback from its background threads, and asyncio's "Task exception
    was never retrieved" for its other writes still in flight. Every such failure also reaches our code as an
    exception, which the checkpointing module reports in one line with what to do; the storage library's
    tracebacks would only bury that line."""
    if record.levelno < logging.ERROR:
        return True
    if f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
        return False
    return not (record.exc_info and _from_storage(record.exc_info[2]))


def _quiet_storage_leftovers(hook: Any) -> Any:
    """Wraps sys.unraisablehook to drop what a failed orbax read or write leaves behind: the other reads of the
    same restore still in flight ("Exception ignored in: <coroutine ...>" with a TensorStore spec dump) and a
    TensorStore callback that fires after orbax closed its event loop ("Event loop is closed"). The failure
    itself reaches our code as an exception and is reported in one line; every other unraisable exception goes
    to `hook`."""

    def from_storage(unraisable: Any) -> bool:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return True
        return _from_storage(unraisable.exc_traceback)

    def quiet(unraisable: Any) -> None:
        if not from_storage(unraisable):
            hook(unraisable)

    return quiet


def exit_with_error(error: BaseException) -> NoReturn:
    """Ends an entry script on a foreseen error (`errors.UserError`): its message in one line on stderr, exit 1.

    In a multi-process run the error may be the first sign of a lost process (a collective inside a checkpoint
    save fails before the heartbeat says why): the watchdog gets the chance to name it first, and the process
    ends without jax's shutdown barrier, which would wait for the lost process and then abort."""
    await_lost_peer_verdict()
    logging.shutdown()
    print(f"error: {error}", file=sys.stderr, flush=True)
    if WATCHDOG_VERDICT_S:
        sys.stdout.flush()
        os._exit(1)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for an entry script with a `--config` flag: `app.run(main, flags_parser=parse_flags)`.

    Each way a command line can name a config wrongly ends in one `error:` line and exit 2, where ml_collections
    would raise chained tracebacks (absl catches none of them) or absl print one inside its 'FATAL' line:
    a `--config.a.b=V` override naming no field (`error: --config.input.batchsize=4: config.input has no field
    'batchsize'; did you mean 'batch_size'?`) or going below a value, a config file that does not load, a
    `:arg` the file refuses, a value of the wrong type."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
        if config is not None:
            config.keys()  # a file that did not load is an error object that raises on first use
        return rest
    except flags.Error as e:  # absl's: a value of the wrong type, or the file's get_config raised
        text = str(e)
        message = (_last_line(text) if "Error whilst parsing config file" in text else text)
    except OSError as e:  # the config file is missing or unreadable
        message = f"--config: the config file does not load ({_last_line(str(e))})"  # the reason names the file
    except (AttributeError, KeyError, TypeError) as error:  # ml_collections, applying an override
        args = _expanded(argv)
        spec = _config_spec(args)
        message = None
        if spec and "config" in flags.FLAGS and any(a.lstrip("-").startswith("config.") for a in args):
            try:  # the file again, without the overrides: which of them names no field?
                message = unknown_override_message(flags.FLAGS["config"].parser.parse(spec), args)
            except Exception:  # noqa: BLE001 - the file itself fails: its own error, below
                message = None
        if message is None:  # not an override's: an error inside the config file itself, traceback and all
            raise error
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _expanded(argv: list[str]) -> list[str]:
    """argv[1:] with `--flagfile=F` replaced by F's flags, as absl reads them."""
    from absl import flags

    try:
        return flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    except Exception:  # noqa: BLE001 - an unreadable flagfile: the literal arguments
        return list(argv[1:])


def _last_line(text: str) -> str:
    """The exception message that ends an embedded traceback, without its type ('ValueError: x' -> 'x'), its lines
    joined; the last line when there is no such message."""
    lines = [t.strip() for t in text.strip().splitlines() if t.strip()] or [text.strip()]
    starts = [i for i, t in enumerate(lines) if re.match(r"^[A-Za-z_.]*(Error|Exception): ", t)]
    tail = lines[starts[-1]:] if starts else lines[-1:]
    return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", " ".join(tail))


def _config_spec(args: list[str]) -> Optional[str]:
    """The value of the last `--config=FILE[:arg]` (or `--config FILE`, one dash or two) among `args`, the one absl
    keeps; None if absent."""
    spec = None
    for i, arg in enumerate(args):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            spec = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return spec


def unknown_override_message(config: Any, args: list[str]) -> Optional[str]:
    """The one-line report of the first `--config.a.b[=V]` override among `args` (one dash or two) whose path does
    not resolve in `config` (a ConfigDict, before overrides): a field its sub-config lacks (with the nearest names),
    or a path going below a value. None when every override's path resolves."""
    import difflib

    for arg in args:
        name = arg.lstrip("-").partition("=")[0]
        if not arg.startswith("-") or not name.startswith("config."):
            continue
        node, owner = config, "config"
        for part in name.split(".")[1:]:
            if not hasattr(node, "keys"):
                return f"{arg}: {owner} is a value ({type(node).__name__}), not a sub-config with a field {part!r}"
            if part not in node:
                close = difflib.get_close_matches(part, list(node.keys()), n=3)
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                return f"{arg}: {owner} has no field {part!r}{hint}"
            node, owner = node[part], f"{owner}.{part}"
    return None


def await_lost_peer_verdict() -> None:
    """In a multi-process run with the peer watchdog: waits as long as the watchdog needs to find a silent process
    (it then ends this process naming it); returns when every process still answers. No-op otherwise."""
    if WATCHDOG_VERDICT_S:
        time.sleep(WATCHDOG_VERDICT_S)


JAX_HEARTBEAT_FACTOR = 2  # jax's heartbeat timeout, in units of config.distributed.heartbeat_timeout_s
MIN_HEARTBEAT_TIMEOUT_S = 4  # below this the watchdog's 0.25 s polls no longer fit in half of it


def peer_watchdog_supported() -> bool:
    """Whether this jax has what `start_peer_watchdog` uses: jax._src.distributed's global state (its client of
    the coordination service) and the client's key-value calls. Private to jax: checked, never assumed."""
    try:
        from jax._src import distributed
        from jax._src.lib import _jax

        client_type = _jax.DistributedRuntimeClient
    except (ImportError, AttributeError):
        return False
    return hasattr(distributed, "global_state") and all(
        hasattr(client_type, call) for call in ("key_value_set", "key_value_dir_get"))


MULTIPROCESS_ENV = ("TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed(dist_cfg: Any) -> None:
    """`jax.distributed.initialize` when launched as several processes; a no-op for one process.

    dist_cfg: `config.distributed` (`run_config.default_distributed_config`). Explicit settings (coordinator
    address, process count and id) win; otherwise the cluster is detected from the environment (TPU pod slices,
    SLURM, Open MPI). Must run before any other jax call.
    """
    import jax  # not at module level: setup_host() must run before jax is imported and configured

    heartbeat = dist_cfg.get("heartbeat_timeout_s", 60)
    if not isinstance(heartbeat, (int, float)) or heartbeat < MIN_HEARTBEAT_TIMEOUT_S:
        raise ConfigError(f"config.distributed.heartbeat_timeout_s={heartbeat!r}: must be a number of seconds >= "
                          f"{MIN_HEARTBEAT_TIMEOUT_S}: the peer watchdog, which polls at most every 0.25 s, needs that long")
    heartbeat = int(heartbeat)
    # jax's own heartbeat abort is the backstop, at twice the bound when the watchdog can run: jax sends a
    # heartbeat every half of its timeout, so it can abort as early as half its timeout after a process dies
    # (measured: 11-19 s for a 20 s timeout), and the watchdog, which names the lost process, must come first
    # (`PeerWatchdog.verdict_within_s`). Without the watchdog, jax's abort is the bound itself.
    backstop = JAX_HEARTBEAT_FACTOR * heartbeat if peer_watchdog_supported() else heartbeat
    if dist_cfg.coordinator_address:
        count, me = int(dist_cfg.num_processes), int(dist_cfg.process_id)
        if count < 1 or not 0 <= me < count:  # before joining: a peer would wait minutes for this process
            raise ConfigError(
                f"config.distributed.process_id={me}, num_processes={count}: with coordinator_address set, give "
                "every process the same num_processes >= 1 and its own process_id in 0..num_processes-1")
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # noqa: BLE001 - older/newer jax without the option: CPU collectives unavailable
            pass
        jax.distributed.initialize(
            coordinator_address=dist_cfg.coordinator_address,
            num_processes=int(dist_cfg.num_processes),
            process_id=int(dist_cfg.process_id),
            heartbeat_timeout_seconds=backstop,
        )
        start_peer_watchdog(heartbeat)
        return
    env_multi = False
    for var in MULTIPROCESS_ENV:
        value = os.environ.get(var, "")
        if var == "TPU_WORKER_HOSTNAMES":
            env_multi |= len([h for h in value.split(",") if h]) > 1
        elif var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
            env_multi |= value.isdigit() and int(value) > 1
        else:
            env_multi |= bool(value)
    if env_multi:
        jax.distributed.initialize(heartbeat_timeout_seconds=backstop)
        start_peer_watchdog(heartbeat)


ABANDON_HOOKS: list = []  # callables run before the watchdog ends the process (`workdir_lock` adds its release)
WATCHDOG_VERDICT_S = 0.0  # > 0 while the peer watchdog runs: how long to wait for it to name a silent process


def start_peer_watchdog(timeout_s: float) -> bool:
    """In a multi-process run, daemon threads that end this process in one line when another one is lost.

    jax's coordination service already ends every process when one stops sending heartbeats (here between
    `timeout_s` and 2 `timeout_s` after it died: `maybe_initialize_distributed`), but with an abort and a C++ and
    Python stack dump in which the one line that names the lost process is easy to miss. So each process also
    runs a `PeerWatchdog` over jax.distributed's key-value store: a lost peer ends this process with exit code 1
    and a message naming it, after `timeout_s`/2 of silence, within `timeout_s` of its death, before jax's abort.
    One exception: process 0 serves the coordination service, and when it dies jax aborts the others at once
    (measured: 0.1-0.3 s; its first line: "Terminating process because the JAX distributed service detected
    fatal errors ... the leader task was preempted/died"); the watchdog still names a process 0 that hangs.
    (jaxlib's `missed_heartbeat_callback`, which could replace that abort, crashes with std::bad_cast in 0.10.2.)
    Returns whether the watchdog started (it needs jax's distributed client).
    """
    import jax  # not at module level: setup_host() must run before jax is imported and configured

    if not peer_watchdog_supported():  # another jax layout: jax's own heartbeat abort still bounds the wait
        return False
    from jax._src import distributed  # jax's client of the coordination service: no public handle exists

    client = distributed.global_state.client
    if client is None or jax.process_count() < 2:
        return False
    me, count = jax.process_index(), jax.process_count()

    def lost(who: str, why: str) -> None:
        for hook in list(ABANDON_HOOKS):  # e.g. release the workdir lock, so that the re-run can take it at once
            try:
                hook()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        try:
            print(f"error: {who} of this {count}-process run {why}; it died or lost its host, so process {me} "
                  "stops too. Re-run the same command on every host to resume from the last checkpoint.",
                  file=sys.stderr, flush=True)
        finally:
            os._exit(1)  # the run cannot go on: collectives with the lost process would only hang or abort

    watchdog = PeerWatchdog(client, me, count, timeout_s, lost)
    # atexit runs last-registered first: this runs before jax's own clean-up shuts its client down, so a normal
    # exit never looks like a lost coordinator.
    atexit.register(watchdog.finish)
    watchdog.start()
    global WATCHDOG_VERDICT_S
    # Two more polls of slack for a loaded host's thread scheduling; still before jax's earliest abort.
    WATCHDOG_VERDICT_S = watchdog.verdict_within_s + 2 * watchdog.interval
    return True


class PeerWatchdog:
    """Finds a lost process of a multi-process run through a shared key-value store (jax.distributed's).

    Each process bumps its own counter in the store every `timeout_s`/16 s and reads everyone's (counters, not
    clocks: hosts' clocks may differ). A peer whose counter this process has not seen change for `timeout_s`/2 s
    (and which has not said it finished) is lost; so is process 0, which serves the store, when the store stops
    answering other processes for as long. Then `on_lost(who, why)` is called once, e.g. ("process 1",
    "stopped responding 12 s ago").

    Two threads, so that the verdict never waits on the store: the poller makes every store call (a call may
    block: in one run the store's `key_value_set` did not return until jax's own heartbeat aborted the process,
    and the verdict with it); the judge only reads what the poller last saw, with the time it saw it. A judge
    that wakes late (this whole process was paused: a stopped VM, swapping) waits one more poll before judging,
    so that its own pause is not taken for a peer's silence.
    client: has `key_value_set(key, value, allow_overwrite)` and `key_value_dir_get(prefix) -> [(key, value)]`.
    """

    PREFIX = "yolos_jax"

    def __init__(self, client: Any, me: int, count: int, timeout_s: float, on_lost: Callable[[str, str], None],
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.me, self.count, self.on_lost, self.clock = client, me, count, on_lost, clock
        self.interval, self.patience = max(timeout_s / 16.0, 0.25), timeout_s / 2.0
        # The longest from a process's last beat to this one's verdict: its silence, plus a poll, a judge tick and
        # a judge's wait for a fresh poll. 0.69 `timeout_s`: before jax's abort (no sooner than `timeout_s`).
        self.verdict_within_s = self.patience + 3 * self.interval
        self.stopped = threading.Event()  # by a verdict or by `finish`
        self._lock = threading.Lock()
        self._beat = 0
        start = clock()
        self._judged_at = start
        self._store_answered_at = start  # when the last round of store calls completed
        self._store_error: Optional[str] = None  # the last failed call's first line
        # Per peer: (its counter as last read, when it last changed). Never read yet counts as a value (None).
        self._seen: dict[int, tuple[Optional[str], float]] = {j: (None, start) for j in range(count) if j != me}
        self._finished: set[int] = set()

    def start(self) -> None:
        threading.Thread(target=self._run, args=(self.poll,), name="peer-watchdog-poller", daemon=True).start()
        threading.Thread(target=self._run, args=(self.judge,), name="peer-watchdog-judge", daemon=True).start()

    def finish(self) -> None:
        """A normal exit: no verdict from now on, and peers still finishing must not take this process for lost.
        The store call runs aside and is given one poll interval: a store that no longer answers must not hold
        up the exit."""
        with self._lock:
            self.stopped.set()
        mark = threading.Thread(target=self._mark_finished, name="peer-watchdog-finish", daemon=True)
        mark.start()
        mark.join(self.interval)

    def _mark_finished(self) -> None:
        try:
            self.client.key_value_set(f"{self.PREFIX}/done/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass

    def _run(self, once: Callable[[], None]) -> None:
        while not self.stopped.is_set():
            once()
            self.stopped.wait(self.interval)

    @staticmethod
    def _process_of(key: str) -> int:
        """'yolos_jax/alive/3' -> 3 (whether the store returns whole keys or keys below the prefix)."""
        return int(key.rsplit("/", 1)[-1])

    def poll(self) -> None:
        """One round of store calls (may block): beat, then read every counter and finish mark."""
        self._beat += 1
        try:
            self.client.key_value_set(f"{self.PREFIX}/alive/{self.me}", str(self._beat), allow_overwrite=True)
            counters = {self._process_of(k): v for k, v in self.client.key_value_dir_get(f"{self.PREFIX}/alive/")}
            finished = {self._process_of(k) for k, _ in self.client.key_value_dir_get(f"{self.PREFIX}/done/")}
        except Exception as e:  # noqa: BLE001 - the store lives in process 0; one failed call may be a blip
            with self._lock:
                self._store_error = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            return
        now = self.clock()
        with self._lock:
            self._store_answered_at, self._store_error = now, None
            for j, (value, _) in self._seen.items():
                if counters.get(j) != value:
                    self._seen[j] = (counters.get(j), now)
            self._finished = finished

    def verdict(self) -> Optional[tuple[str, str]]:
        """(who, why) when a process is lost, else None; never calls the store."""
        now = self.clock()
        with self._lock:
            store_silent = now - self._store_answered_at
            unanswered = self._store_error or "a call to its key-value store has not returned"
            if self.me != 0 and store_silent > self.patience and 0 not in self._finished:
                return "process 0", f"stopped answering for {store_silent:.0f} s ({unanswered})"
            if self.me == 0 and store_silent > self.patience and self.count > 2:
                # This process serves the store and cannot read it: every peer looks silent, none is named.
                return "a process", (f"may have stopped: the key-value store this process serves has not answered "
                                     f"for {store_silent:.0f} s ({unanswered})")
            for j, (_, changed_at) in sorted(self._seen.items()):
                if j not in self._finished and now - changed_at > self.patience:
                    return f"process {j}", f"stopped responding {now - changed_at:.0f} s ago"
        return None

    def judge(self) -> None:
        now = self.clock()
        late = now - self._judged_at > 2 * self.interval
        self._judged_at = now
        if late:  # this process was paused: the poller's view is stale, not the peers
            return
        lost = self.verdict()
        if lost is None:
            return
        with self._lock:  # a verdict and a normal exit (`finish`) exclude each other
            if self.stopped.is_set():
                return
            self.stopped.set()
        self.on_lost(*lost)
