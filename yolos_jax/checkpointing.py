"""Training checkpoints with orbax `CheckpointManager`: save, resume, and reading a step's params and config.

A training checkpoint is `WORKDIR/checkpoints/<step>/` with five items:
  params/     the Flax params tree (StandardSave; restorable alone, which eval and inference do)
  train/      {'step', 'opt_state', 'rng'} (StandardSave)
  data/       the input iterator's position (JSON), so a resumed run sees the same batches
  config/     the full run config (JSON), so a checkpoint says what model it holds
  meta/       the run's metadata (JSON): 'label_names' (class names by label) and 'label_map' (a
              `LabelMap.to_dict()` of the dataset). Checkpoints written before it existed have no meta/ item and
              hold both in config/ instead; `restore_params` reads either.
Orbax writes each step into a temporary directory and renames it when complete, so a crash or SIGKILL in
the middle of a (possibly asynchronous) save never damages the previous checkpoints.

What a long run meets beyond that (README "Faults"):
* A step that does not restore (a truncated or missing file, broken metadata, no commit marker): resume takes
  the newest step that does, moves the bad ones to WORKDIR/checkpoints_unrestorable/ (renamed, never deleted)
  and says so in one line per step; if none restores, one `CheckpointError` lists each step and why.
  Readers (`restore_params_from`: eval.py, `Detector`, figures) skip bad steps of a workdir the same way
  without moving anything (a live run may own it), and name the bad step when it was asked for explicitly.
* A save that fails (disk full, permission, I/O error): the checkpoints already written stay intact and
  restorable (orbax finalises a step, and only then deletes the oldest), the partial temporary directory is
  removed, and `checkpoint.on_save_error` decides: 'stop' raises `CheckpointSaveError`, 'warn' logs one line
  and the next interval tries again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from yolos_jax import atomic
from yolos_jax.errors import UserError, describe_error

log = logging.getLogger("yolos_jax")

CHECKPOINT_SUBDIR = "checkpoints"
UNRESTORABLE_SUBDIR = "checkpoints_unrestorable"  # beside checkpoints/: steps resume could not read
SUPERSEDED_SUBDIR = "checkpoints_superseded"  # beside checkpoints/: steps newer than an explicit restore_step
RESTORED_MARKER = "restore_step_applied.json"  # in checkpoints/: restore_step=N was applied (so a re-run resumes)
# Failures of the storage, not of the checkpoint: never a reason to move a step aside (it may read fine later).
_STORAGE_TROUBLE = re.compile(r"PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|ABORTED|RESOURCE_EXHAUSTED|"
                              r"Permission denied|Input/output error|Stale file handle|Connection")
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step directory just before renaming it into place
ON_SAVE_ERROR = ("stop", "warn")
ITEM_NAMES = ("params", "train", "data", "config", "meta", "ema")
BEST_DIR = "best"  # checkpoints/best: the evaluated step with the best `checkpoint.keep_best_by` metric
META_KEYS = ("label_names", "label_map")  # the run metadata; older checkpoints hold them in config/


def default_checkpoint_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            every_steps=1000,  # periodic save interval (also saved at the end and on SIGTERM/SIGINT)
            keep=3,  # keep the last k checkpoints
            async_save=True,  # write in a background thread while training continues
            # -1: resume from the newest step that restores; N: resume from step N (newer steps are moved to
            # WORKDIR/checkpoints_superseded/, once: a re-run of the same command resumes from the newest step).
            restore_step=-1,
            on_save_error="stop",  # a failed save: 'stop' the run (one message) or 'warn' and retry next interval
            # A metric of metrics.json (e.g. 'AP'): checkpoints/best keeps the evaluated weights where it was best
            # (besides the last `keep`); '' = off. best_mode: 'max' (AP, AR) or 'min' (a loss).
            keep_best_by="",
            best_mode="max",
        )
    )


def validate_checkpoint_config(ckpt_cfg: ml_collections.ConfigDict) -> None:
    """Checks `config.checkpoint`; raises ValueError naming the field."""
    if ckpt_cfg.every_steps <= 0 or ckpt_cfg.keep <= 0:
        raise ValueError("config.checkpoint.every_steps: every_steps and keep must be > 0")
    if ckpt_cfg.get("on_save_error", "stop") not in ON_SAVE_ERROR:
        raise ValueError(f"config.checkpoint.on_save_error: {ckpt_cfg.on_save_error!r}; expected one of {ON_SAVE_ERROR}")
    if ckpt_cfg.get("best_mode", "max") not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode: 'max' or 'min', got {ckpt_cfg.best_mode!r}")
    if int(ckpt_cfg.get("restore_step", -1)) < -1:
        raise ValueError("config.checkpoint.restore_step: -1 (the newest step that restores) or a step >= 0")


class CheckpointError(UserError):
    """No checkpoint of a workdir restores, or the one asked for does not; the message names each and why."""


class CheckpointSaveError(UserError):
    """Writing a checkpoint failed under on_save_error='stop'; the earlier checkpoints are intact."""


def step_dirs(directory: str) -> list[int]:
    """The steps with a directory in `directory` (a checkpoints/ directory), newest first; orbax's temporary
    '<step>.orbax-checkpoint-tmp-*' directories are not steps."""
    if not os.path.isdir(directory):
        return []
    return sorted((int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d))),
                  reverse=True)


def check_committed(step_dir: str) -> None:
    """Raises CheckpointError if `step_dir` is not a finished orbax step: no commit marker (the save did not
    finish, or the directory was copied in part) or unreadable step metadata."""
    if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
        raise CheckpointError(f"no {COMMIT_MARKER} (an unfinished save or a partial copy)")
    metadata = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    if os.path.exists(metadata):
        try:
            with open(metadata) as f:
                json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"_CHECKPOINT_METADATA does not parse ({describe_error(e)})") from None


def set_aside(directory: str, step: int, why: str, subdir: str = UNRESTORABLE_SUBDIR) -> str:
    """Moves `directory`/`step` to WORKDIR/<subdir>/<step>[.k] with a WHY.txt; returns the new path. Never
    deletes: a user may still recover what it holds."""
    target_parent = os.path.join(os.path.dirname(directory), subdir)
    os.makedirs(target_parent, exist_ok=True)
    target, k = os.path.join(target_parent, str(step)), 1
    while os.path.exists(target):
        target, k = os.path.join(target_parent, f"{step}.{k}"), k + 1
    os.rename(os.path.join(directory, str(step)), target)
    try:
        with open(os.path.join(target, "WHY.txt"), "w") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}: set aside from {directory}: {why}\n")
    except OSError:  # the move is what matters; the note is a courtesy
        pass
    return target


def _all_processes_ok(ok: bool) -> bool:
    """Whether `ok` holds on every process (one collective), so all processes take the same step."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


def _steps_seen_by_process_0(directory: str) -> list[int]:
    """`step_dirs` as process 0 lists them, on every process: directory caches of a shared filesystem may
    differ between hosts for a moment, and every process must try the same steps in the same order."""
    steps = step_dirs(directory)
    if jax.process_count() == 1:
        return steps
    padded = np.full(1024, -1, np.int64)
    padded[: min(len(steps), 1024)] = steps[:1024]
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded) if s >= 0]


def _config_to_json(config: Any) -> dict:
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return config


class Checkpointer:
    """Periodic, asynchronous, keep-last-k checkpoints of one training run, with resume that survives bad steps
    and saves whose failure is reported in one line (see the module docstring)."""

    def __init__(self, workdir: str, ckpt_cfg: ml_collections.ConfigDict):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
        self.on_save_error = str(ckpt_cfg.get("on_save_error", "stop"))
        self.restore_step = int(ckpt_cfg.get("restore_step", -1))
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ckpt_cfg.keep),
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=True,
        )
        if self.on_save_error == "warn" and jax.process_count() > 1:
            raise ValueError("config.checkpoint.on_save_error='warn' needs a single-process run: with several "
                             "processes a save that fails on one of them would split the run; use 'stop'")
        self.manager = None
        if os.path.isdir(self.directory):  # a save that died (SIGKILL, a failed write) left a partial step
            self._remove_partial_steps()
        self.manager = self._new_manager()
        self._pending: Optional[int] = None  # the step an asynchronous save is writing

    def _new_manager(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=ITEM_NAMES)

    def _remove_partial_steps(self) -> None:
        try:  # let orbax's other writes of a failed save end first, or they would recreate what is removed
            if self.manager is not None:
                self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failure is being reported already
            pass
        if jax.process_index() == 0:
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:  # a failed save's partial step: never a checkpoint
                    atomic.remove_tree(os.path.join(self.directory, name))

    def _reopen(self) -> None:
        """A fresh manager over what is on disk (after steps were moved aside, or a save failed and the old
        manager's idea of the step list is no longer the directory's). Collective in a multi-process run."""
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - it already reported (or is reporting) its own failure
            pass
        self._remove_partial_steps()
        self.manager = self._new_manager()

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    # ------------------------------------------------------------------ saving

    def save(self, step: int, state: dict, data_state: dict, config: Any, meta: Optional[dict] = None,
             must_land: bool = False) -> bool:
        """Starts saving `state` at `step` (returns before the write ends when async); returns False when a save
        failed under on_save_error='warn' (this one, or the asynchronous one still pending).

        data_state: the input iterator's `get_state()`; config: the run config (ConfigDict or JSON dict);
        meta: the run metadata (`META_KEYS`, JSON-serialisable), {} when None.
        must_land: wait for this save and raise if it fails whatever on_save_error says (the last save of a
        run, or the one before a preemption: nothing comes after it to retry).
        Raises CheckpointSaveError when a save failed under on_save_error='stop' (or with must_land)."""
        ok = self.wait()
        policy = self.on_save_error
        if must_land:
            self.on_save_error = "stop"
        try:
            return self._save(step, state, data_state, config, meta, must_land) and ok
        finally:
            self.on_save_error = policy

    def _save(self, step: int, state: dict, data_state: dict, config: Any, meta: Optional[dict],
              must_land: bool) -> bool:
        try:
            self.manager.save(
                int(step),
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state["params"]),
                    train=ocp.args.StandardSave(
                        {"step": state["step"], "opt_state": state["opt_state"], "rng": state["rng"]}
                    ),
                    data=ocp.args.JsonSave(data_state),
                    config=ocp.args.JsonSave(_config_to_json(config)),
                    meta=ocp.args.JsonSave(dict(meta or {})),
                    **({"ema": ocp.args.StandardSave(state["ema_params"])} if "ema_params" in state else {}),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - a storage failure of any kind: reported by `_save_failed`
            self._save_failed(int(step), e)
            return False
        self._pending = int(step)
        return self.wait() if must_land else True

    def _save_failed(self, step: int, error: BaseException) -> None:
        self._pending = None
        kept = sorted(step_dirs(self.directory))  # a listing, not the manager: no collective on this path
        where = f"checkpoint step {step} could not be written to {self.directory} ({describe_error(error)})"
        intact = (f"the checkpoints already there (steps {', '.join(map(str, kept))}) are intact" if kept
                  else "no earlier checkpoint exists")
        if self.on_save_error == "warn":  # single-process (checked in __init__): reopening is safe
            self._reopen()
            log.warning("%s; %s. Training goes on (checkpoint.on_save_error='warn'); the next interval tries again",
                        where, intact)
            return
        self._remove_partial_steps()
        raise CheckpointSaveError(
            f"{where}; {intact}. Free space or fix the storage, then re-run the same command to resume; or set "
            "--config.checkpoint.on_save_error=warn to keep training and retry at the next interval")

    def wait(self) -> bool:
        """Waits for a pending asynchronous save; False if it failed under on_save_error='warn'."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - see `save`
            if self._pending is None:
                raise
            self._save_failed(self._pending, e)
            return False
        self._pending = None
        return True

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # ------------------------------------------------------------------ resuming

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """Restores (state, data_state) at `step` onto the shardings carried by `abstract_state`. An
        'ema_params' the step lacks (EMA switched on mid-run) starts as a copy of the parameters."""
        wants_ema = "ema_params" in abstract_state
        has_ema = os.path.isdir(os.path.join(self.directory, str(step), "ema"))
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                train=ocp.args.StandardRestore(
                    {
                        "step": abstract_state["step"],
                        "opt_state": abstract_state["opt_state"],
                        "rng": abstract_state["rng"],
                    }
                ),
                data=ocp.args.JsonRestore(),
                **({"ema": ocp.args.StandardRestore(abstract_state["ema_params"])} if wants_ema and has_ema else {}),
            ),
        )
        state = {"params": restored["params"], **restored["train"]}
        if wants_ema:
            if not has_ema and jax.process_index() == 0:
                log.warning("checkpoint step %d has no EMA of the parameters: it starts from them", step)
            state["ema_params"] = restored["ema"] if has_ema else jax.tree.map(lambda p: p.copy(), restored["params"])
        return state, restored["data"]

    def _best_paths(self) -> tuple[str, str, str]:
        return tuple(os.path.join(self.directory, name) for name in (BEST_DIR, f".{BEST_DIR}.new", f".{BEST_DIR}.old"))

    def save_best(self, step: int, params: Any, config: Any, meta: dict, metric: str, value: float,
                  mode: str = "max", weights: str = "params") -> str:
        """Writes the evaluated `params` of `step` to checkpoints/best (params, config, meta with
        meta['best'] = {metric, value, step, mode, weights}: 'weights' says whether they are the run's EMA),
        replacing the previous best only once the new one is complete; returns its path. Collective in a
        multi-process run."""
        best, staging, old = self._best_paths()
        self.recover_best()
        if jax.process_index() == 0:
            for leftover in (staging, old):
                shutil.rmtree(leftover, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("best checkpoint: staging cleared")
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
            checkpointer.save(staging, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                config=ocp.args.JsonSave(_config_to_json(config)),
                meta=ocp.args.JsonSave({**meta, "best": {"metric": metric, "value": float(value), "step": int(step),
                                                         "mode": mode, "weights": weights}}),
            ))
        if jax.process_index() == 0:
            if os.path.isdir(best):
                os.rename(best, old)
            os.rename(staging, best)
            shutil.rmtree(old, ignore_errors=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("best checkpoint: in place")
        return best

    def recover_best(self) -> None:
        """A run killed between `save_best`'s two renames left the previous best at .best.old: put it back."""
        best, _, old = self._best_paths()
        if jax.process_index() == 0 and not os.path.isdir(best) and os.path.isdir(old):
            os.rename(old, best)
            log.warning("restored %s from %s (a replacement of the best checkpoint was interrupted)", best, old)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("best checkpoint: recovered")

    def best_so_far(self, metric: str, mode: str) -> Optional[dict]:
        """checkpoints/best's {'metric', 'value', 'step', ...} when it was kept by `metric` in `mode`; None when
        there is none, it does not read, or it was kept by another rule (a changed keep_best_by starts afresh)."""
        self.recover_best()
        path = os.path.join(self.directory, BEST_DIR, "meta", "metadata")
        try:
            with open(path) as f:
                best = json.load(f).get("best")
        except (OSError, ValueError, AttributeError):
            return None
        if not best or best.get("metric") != metric or best.get("mode", "max") != mode:
            return None
        return best

    def _restore_config(self, step: int) -> dict:
        restored = self.manager.restore(int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return restored["config"]

    def _restore_step_to_apply(self, steps: list[int]) -> Optional[int]:
        """`restore_step`, unless there is none (-1) or an earlier run of this command already applied it (the
        marker): re-running the command after a stop must resume, not rewind again."""
        if self.restore_step < 0:
            return None
        marker = os.path.join(self.directory, RESTORED_MARKER)
        try:
            with open(marker) as f:
                applied = json.load(f).get("restore_step")
        except (OSError, ValueError):
            applied = None
        if applied == self.restore_step and any(s > self.restore_step for s in steps):
            if jax.process_index() == 0:
                log.info("checkpoint.restore_step=%d was applied by an earlier run of this command (%s): resuming "
                         "from the newest step", self.restore_step, marker)
            return None
        if self.restore_step not in steps:
            raise CheckpointError(
                f"config.checkpoint.restore_step={self.restore_step}: {self.directory} has no step "
                f"{self.restore_step}; it holds " + (f"steps {', '.join(map(str, steps))}" if steps else "none"))
        return self.restore_step

    def resume(self, abstract_state: dict, check_config: Optional[Callable[[dict], None]] = None
               ) -> Optional[tuple[int, dict, dict]]:
        """(step, state, data_state) of the step to resume from, None for a fresh workdir.

        The newest step that restores, or `restore_step` (newer steps then move to checkpoints_superseded/, once:
        a re-run of the same command resumes). Each newer step that does not restore is moved to
        WORKDIR/checkpoints_unrestorable/ with one warning line. check_config(stored run config) runs before a
        step's arrays are read and may raise (a different model is the user's mistake, not damage).
        Raises CheckpointError: naming each step and why when none restores; at once when the storage (not the
        checkpoint) fails, as a permission or I/O error, since such a step may read fine later.
        Multi-process: every process tries the same steps (process 0's listing) and agrees on each one before
        orbax reads it; a step that reads on some processes and not others costs orbax's barrier timeout.
        """
        steps = _steps_seen_by_process_0(self.directory)
        restore_step = self._restore_step_to_apply(steps)
        if not steps:
            return None
        failures: list[tuple[int, str]] = []
        result = None
        for step in [restore_step] if restore_step is not None else steps:
            why = ""
            try:
                check_committed(os.path.join(self.directory, str(step)))
            except CheckpointError as e:
                why = str(e)
            if not _all_processes_ok(not why):  # agreed before any orbax call: its restore ends in a barrier
                failures.append((step, why or "not committed as seen from another process"))
                continue
            try:
                stored = self._restore_config(step)
            except Exception as e:  # noqa: BLE001 - any failure to read is reported below
                why = describe_error(e)
            if not why and check_config is not None:
                check_config(stored)  # raises for another model: the user's choice to make, nothing is moved
            if not why:
                try:
                    result = (step, *self.restore(step, abstract_state))
                except Exception as e:  # noqa: BLE001
                    why = describe_error(e)
            if _STORAGE_TROUBLE.search(why):
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} could not be read ({why}): the storage failed, not "
                    "necessarily the checkpoint, so nothing was moved. Fix the storage and re-run")
            if _all_processes_ok(not why):
                break
            failures.append((step, why or "it does not restore on another process"))
            result = None
        if result is None:
            listed = "; ".join(f"step {s}: {w}" for s, w in failures)
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores ({listed}). Nothing was moved. Choices: fix what the "
                "error names and re-run; resume from another step with --config.checkpoint.restore_step=N; or "
                "start afresh with another --workdir")
        if jax.process_index() == 0:
            for s, w in failures:
                log.warning("checkpoint step %d does not restore (%s); moved to %s", s, w,
                            set_aside(self.directory, s, w))
            if restore_step is not None:
                for s in (s for s in steps if s > restore_step):
                    why = f"newer than checkpoint.restore_step={restore_step}"
                    log.warning("checkpoint step %d moved to %s (%s)", s,
                                set_aside(self.directory, s, why, SUPERSEDED_SUBDIR), why)
                with open(os.path.join(self.directory, RESTORED_MARKER), "w") as f:
                    json.dump({"restore_step": restore_step, "time": time.time()}, f)
        if failures or restore_step is not None:
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("checkpoints set aside")
            self._reopen()  # the manager's step list must not name the steps moved away
        if failures and jax.process_index() == 0:
            log.warning("resuming from step %d, the newest checkpoint that restores", result[0])
        return result
