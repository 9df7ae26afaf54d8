"""End to end through `train.py` on the generated dataset (configs/demo.py:smoke), as a user runs it.

* train (with a periodic eval midway) -> checkpoint -> restore -> eval -> annotated image, and the loss goes down;
* SIGKILL midway, SIGTERM (preemption) on the resumed run, Ctrl-C (SIGINT) on the next, resume again:
  parameters bit-identical to an uninterrupted run of the same length;
* an injected NaN stops the run naming the step, and the last checkpoint stays loadable;
* the faults of README "Faults": a corrupt latest checkpoint (resume from the one before, bit-identical to an
  uninterrupted run), none restorable, a workdir held by a live run, a lock left by a killed run, a save that
  fails (a file-size limit: EFBIG, as on a full disk), a process of a two-process run killed.
All runs share one persistent compilation cache so that only the first one pays for XLA compilation.
"""

import glob
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import train_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900
# Under `pytest -n 2 --dist loadgroup` (README, .ci/run) these tests share one worker, so the module's fixtures
# (the prepared dataset, the uninterrupted reference run) are made once rather than once per worker.
pytestmark = pytest.mark.xdist_group("train_e2e")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    # The runs choose their malloc themselves (`malloc.use_scalable_malloc`), whatever the shell running the tests set.
    e = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "LD_PRELOAD", "YOLOS_JAX_MALLOC", "YOLOS_JAX_MALLOC_REEXEC",
                      "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD")}
    e.update(YOLOS_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return e


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One generated + prepared dataset shared by every run (each workdir links to it)."""
    root = tmp_path_factory.mktemp("shared_data")
    train_fixtures.generate_demo_data(str(root / "synthetic"))
    return root


def _cmd(workdir, data_root, *overrides):
    return [
        sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/demo.py:smoke"),
        "--workdir", str(workdir),
        f"--config.input.source_dir={data_root}/synthetic", f"--config.input.data_dir={data_root}/tfds",
        *overrides,
    ]


def _train(workdir, data_root, env, *overrides, check=True):
    proc = subprocess.run(_cmd(workdir, data_root, *overrides), env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def _final_params(workdir):
    """The newest checkpoint's weights as loaders see them (the EMA when the run keeps one), and then also its
    raw parameters (keys prefixed 'raw')."""
    import jax
    import orbax.checkpoint as ocp

    from yolos_jax import checkpoint_reading, weights

    def flat(tree, prefix=""):
        return {prefix + jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    params, _, meta = weights.load_any(str(workdir))
    out = flat(params)
    if meta.get("weights") == "ema":
        step_dir = os.path.join(str(workdir), "checkpoints", str(meta["step"]))
        out.update(flat(checkpoint_reading.read_items(step_dir, params=ocp.args.StandardRestore())["params"], "raw"))
    return out


def _losses(stdout):
    return [float(x) for x in re.findall(r"\] loss=([0-9.]+)", stdout)]


def test_train_checkpoint_restore_eval_image(tmp_path, env, data_root):
    """Also: a head with more logits than the dataset has labels (6 vs the 4 shapes, as a 91-way COCO head on
    a smaller dataset) trains, draws, restores and infers, and eval refuses a dataset whose labels mean
    something else."""
    workdir = tmp_path / "run"
    # periodic eval at 8, final at 16; compiled as users' runs are (conftest lowers XLA's optimisation elsewhere)
    env = dict(env, JAX_DISABLE_MOST_OPTIMIZATIONS="0")
    proc = _train(workdir, data_root, env, "--config.train.eval_every=8", "--config.model.num_classes=6")
    losses = _losses(proc.stdout)
    assert len(losses) == 4, proc.stdout
    if _tbb_installed():  # train.py re-ran itself on oneTBB's malloc
        assert "malloc: oneTBB's scalable malloc" in proc.stderr, proc.stderr[-3000:]
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps[-1] == 16 and len(steps) <= 3  # keep-last-k
    assert sorted(os.listdir(workdir / "eval")) == ["step_16", "step_8"]  # train.eval_every and eval_at_end
    assert (workdir / "eval" / "step_8" / "metrics.json").is_file()
    metrics = json.load(open(workdir / "eval" / "step_16" / "metrics.json"))
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"} <= set(metrics)
    pngs = [os.path.join(r, f) for r, _, fs in os.walk(workdir / "eval") for f in fs if f.endswith(".png")]
    assert pngs, "no annotated val image written"
    assert (workdir / "tensorboard").is_dir()

    # Restore: the checkpoint loads as a Detector and eval.py re-evaluates it.
    from yolos_jax import Detector

    detector = Detector.from_checkpoint(str(workdir))
    assert detector.label_names == ["circle", "square", "triangle", "ellipse", "N/A", "N/A"]
    image = np.zeros((64, 96, 3), np.uint8)
    (result,) = detector.predict([image], threshold=0.0, top_k=5)
    assert result["boxes"].shape == (5, 4)
    # infer.py's loader on the training workdir: class names recorded by the run (no --config needed).
    from PIL import Image

    from yolos_jax import inference

    Image.fromarray(image).save(tmp_path / "blank.png")
    (record,) = inference.run_inference(str(workdir), [str(tmp_path / "blank.png")], str(tmp_path / "infer"),
                                        threshold=0.0, top_k=3)
    assert len(record["detections"]) == 3
    names = dict(zip(["circle", "square", "triangle", "ellipse", "N/A", "N/A"], [1, 2, 3, 4, None, None]))
    for d in record["detections"]:  # the dataset's category id, recorded by the run, comes with each label
        assert d["name"] in names and d["category_id"] == names[d["name"]]
        assert d["category_id"] == (d["label"] + 1 if d["label"] < 4 else None)

    def evaluate(out, *overrides):
        return subprocess.run(
            [sys.executable, os.path.join(ROOT, "eval.py"), "--config", os.path.join(ROOT, "configs/demo.py:smoke"),
             "--workdir", str(workdir), "--out", str(out), "--config.model.num_classes=6",
             f"--config.input.source_dir={data_root}/synthetic", f"--config.input.data_dir={data_root}/tfds",
             *overrides], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)

    proc = evaluate(tmp_path / "eval_again")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    again = json.load(open(tmp_path / "eval_again" / "metrics.json"))
    assert again["AP"] == pytest.approx(metrics["AP"], abs=1e-9)
    # The same images read with other label meanings (category id = label): refused, naming the fix.
    proc = evaluate(tmp_path / "eval_identity", "--config.input.label_mode=identity")
    assert proc.returncode != 0 and "cannot be evaluated on this dataset" in proc.stderr, proc.stderr[-3000:]
    assert "label_mode='contiguous'" in proc.stderr and not (tmp_path / "eval_identity" / "metrics.json").exists()


def test_config_mistakes_fail_before_training_in_one_line(tmp_path, env, data_root):
    """A misspelt split, too few classes for the dataset, a missing init_from, an override naming no field: each
    ends the run before any step with one 'error:' line that names the field and what to set, no traceback."""
    workdir = tmp_path / "run"
    cases = [("--config.input.train_split=validation",
              "error: config.input.train_split: 'validation' is not a split of dataset 'synthetic_smoke'"),
             ("--config.input.val_split=validation", "error: config.input.val_split: 'validation' is not a split"),
             ("--config.model.num_classes=2",  # the smoke data has 4 categories, numbered 0..3 (contiguous)
              "error: config.model.num_classes: 2 < 4 classes in the dataset's label map (input.label_mode="
              "'contiguous'): set --config.model.num_classes=4"),
             (f"--config.init_from={tmp_path / 'no_such_checkpoint'}", "error: config.init_from: "),
             ("--config.input.batchsize=2", "error: --config.input.batchsize=2: config.input has no field 'batchsize'; "
                                           "did you mean 'batch_size'"),
             ("--config.distributed.heartbeat_timeout_s=1",
              "error: config.distributed.heartbeat_timeout_s=1: must be a number of seconds >= 4")]
    for override, expected in cases:
        proc = _train(workdir, data_root, env, override, check=False)
        assert proc.returncode != 0, override
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(expected) and "Traceback" not in proc.stderr, (override, proc.stderr[-3000:])
        if "split" in override:
            assert last.endswith("it has ['train', 'val'] (the <split> of each instances_<split>.json)"), last
        assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")
    # eval.py on a path without a checkpoint: the same one line (it printed the whole flag help before).
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--config", os.path.join(ROOT, "configs/demo.py:smoke"),
                           "--checkpoint", str(workdir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "--checkpoint:" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: no checkpoint found at {workdir}"), proc.stderr[-3000:]


def _wait_for(predicate, proc, what, timeout=TIMEOUT):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# With an EMA of the parameters (issue 17): resume restores it bit-identically too (`_final_params` reads the EMA,
# the run's weights). With the on-device matcher: jax never writes a program with a host callback (the default
# scipy matcher's) to its persistent cache, so with the default each of the ~12 runs below would compile the step
# again (~9 s each here); with this one the first run compiles it for all. The default matcher trains, restores
# and evaluates in the tests above and below this group.
RESUME_OVERRIDES = ("--config.train.eval_at_end=False", "--config.checkpoint.every_steps=4",
                    "--config.optim.ema_decay=0.9", "--config.matcher.implementation=device")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, env, data_root):
    """16 steps without interruption, checkpoints at 8, 12 and 16 (keep 3): the reference of the resume tests."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _train(workdir, data_root, env, *RESUME_OVERRIDES)
    (workdir.parent / "train.log").write_text(proc.stderr)  # which malloc it ran on: the allocator test reads it
    return workdir


def _tbb_installed():
    from yolos_jax import malloc

    return sys.platform.startswith("linux") and malloc.scalable_malloc_libraries() is not None


@pytest.mark.skipif(not _tbb_installed(), reason="oneTBB's wheel (a dependency on Linux x86-64) is not installed")
def test_the_allocator_changes_no_result(tmp_path, env, data_root, uninterrupted):
    """train.py on glibc's malloc ($YOLOS_JAX_MALLOC=system) ends with the same weights, bit for bit, as on
    oneTBB's (the default where its wheel is installed, `malloc.use_scalable_malloc`)."""
    reference_log = (uninterrupted.parent / "train.log").read_text()
    assert "malloc: oneTBB's scalable malloc" in reference_log, reference_log[-3000:]
    workdir = tmp_path / "glibc"
    proc = _train(workdir, data_root, dict(env, YOLOS_JAX_MALLOC="system"), *RESUME_OVERRIDES)
    assert "malloc: glibc's" in proc.stderr, proc.stderr[-3000:]
    ours, ref = _final_params(workdir), _final_params(uninterrupted)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_sigkill_sigterm_ctrl_c_resume_bit_identical(tmp_path, env, data_root, uninterrupted):
    overrides = RESUME_OVERRIDES
    reference = uninterrupted

    workdir = tmp_path / "interrupted"
    # 1) SIGKILL as soon as the step-4 checkpoint is finalised (orbax renames it into place when complete).
    proc = subprocess.Popen(_cmd(workdir, data_root, *overrides), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc, "checkpoint 4")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2) Resume; SIGTERM (preemption) once it has logged a step past the checkpoint: it must save and exit 0.
    # 3) Resume; Ctrl-C (SIGINT, what the README tells demo users to do) the same way.
    # (Past whichever checkpoint it resumed from: an async save may have landed step 8 before the SIGKILL did.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        resumed_from = _steps(workdir)[-1]
        assert resumed_from < 15, _steps(workdir)
        proc = subprocess.Popen(_cmd(workdir, data_root, *overrides), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines, sent = [], False
        for line in proc.stdout:
            lines.append(line)
            step = re.search(r"\[\s*(\d+)/16", line)
            if step and int(step.group(1)) > resumed_from:
                proc.send_signal(sig)
                sent = True
                break
        rest = proc.communicate(timeout=TIMEOUT)[0]
        output = "".join(lines) + rest
        assert sent, f"never saw a step past {resumed_from} to send {sig.name} on:\n" + output[-4000:]
        assert proc.returncode == 0, output[-4000:]
        assert f"{sig.name}: saved a checkpoint at step" in output, output[-4000:]
    # 4) Resume to the end.
    _train(workdir, data_root, env, *overrides)

    ours, ref = _final_params(workdir), _final_params(reference)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, env, data_root):
    workdir = tmp_path / "nan"
    proc = _train(workdir, data_root, env, "--config.train.inject_nan_at_step=5", "--config.train.eval_at_end=False",
                  check=False)
    assert proc.returncode != 0
    assert "non-finite loss or gradient at step 6" in proc.stderr + proc.stdout
    params = _final_params(workdir)  # the step-4 checkpoint loads and is finite
    assert all(np.isfinite(v).all() for v in params.values())
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps == [4]

    skipped = _train(tmp_path / "skip", data_root, env, "--config.train.inject_nan_at_step=5",
                     "--config.train.nonfinite_policy=skip", "--config.train.eval_at_end=False")
    assert "skipping update" in skipped.stderr + skipped.stdout
    assert all(np.isfinite(v).all() for v in _final_params(tmp_path / "skip").values())


# --------------------------------------------------------------------------------------------------
# Faults (README "Faults")
# --------------------------------------------------------------------------------------------------

HOLD_THEN_DIE = """
import sys, time
from yolos_jax.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _truncate_latest_params(step_dir):
    """Truncates the largest array file of the step's parameters and of their EMA (what readers load)."""
    for item in ("params", "ema"):
        files = glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)
        if files:
            largest = max(files, key=os.path.getsize)
            with open(largest, "r+b") as f:
                f.truncate(os.path.getsize(largest) // 2)


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())


def _one_line_error(proc):
    """The run ended with exit code 1 and one 'error: ...' line, without any traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-6000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-4000:]
    return errors[0]


def test_a_corrupt_latest_checkpoint_and_a_stale_lock_resume_from_the_step_before(tmp_path, env, data_root,
                                                                               uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    _truncate_latest_params(workdir / "checkpoints" / "16")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THEN_DIE, str(workdir)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)  # its lock stays behind
    holder.wait()
    # Readers of the workdir skip the bad step (nothing moved); an explicit bad step is refused in one line.
    from yolos_jax import weights

    assert weights.load_any(str(workdir))[2]["step"] == 12
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--config",
                           os.path.join(ROOT, "configs/demo.py:smoke"), "--checkpoint", str(workdir / "checkpoints" / "16"),
                           "--out", str(tmp_path / "eval"), f"--config.input.source_dir={data_root}/synthetic",
                           f"--config.input.data_dir={data_root}/tfds"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert "checkpoints/16 does not restore (OUT_OF_RANGE" in _one_line_error(proc)

    proc = _train(workdir, data_root, env, *RESUME_OVERRIDES)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-6000:]
    assert f"process {holder.pid} is gone" in output  # the stale lock was taken over, with a message
    assert re.search(r"checkpoint step 16 does not restore \(OUT_OF_RANGE[^\n]*moved to \S*checkpoints_unrestorable/16",
                     output), output[-4000:]
    assert "resuming from step 12" in output
    assert (workdir / "checkpoints_unrestorable" / "16" / "params").is_dir()  # set aside, never deleted
    assert not (workdir / "run.lock").exists()  # released at the end
    ours, ref = _final_params(workdir), _final_params(uninterrupted)
    for k in ref:  # 12 -> 16 again: the same parameters as the run that never broke
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_no_restorable_checkpoint_and_a_held_workdir_end_in_one_line(tmp_path, env, data_root, uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    for step in _steps(workdir):
        _truncate_latest_params(workdir / "checkpoints" / str(step))
    line = _one_line_error(_train(workdir, data_root, env, *RESUME_OVERRIDES, check=False))
    assert "no checkpoint in" in line and "step 8: OUT_OF_RANGE" in line
    assert "--config.checkpoint.restore_step=N" in line and "--workdir" in line
    assert _steps(workdir) == [8, 12, 16]  # nothing moved when nothing restores

    from yolos_jax.workdir_lock import WorkdirLock

    with WorkdirLock(str(workdir)):  # this test process is the live run holding it
        line = _one_line_error(_train(workdir, data_root, env, *RESUME_OVERRIDES, check=False))
    assert f"is in use by another training run: pid {os.getpid()} on host {socket.gethostname()}" in line


def _limit_file_size(nbytes):
    def limit():  # in the child, before exec: writes past nbytes fail with EFBIG (SIGXFSZ ignored)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return limit


def test_a_failing_save_keeps_the_previous_checkpoints_and_stops_in_one_line(tmp_path, env, data_root, uninterrupted):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    proc = subprocess.run(_cmd(workdir, data_root, *RESUME_OVERRIDES, "--config.train.num_steps=24"), env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=_limit_file_size(40_000))  # the step-20 checkpoint's array files are larger
    line = _one_line_error(proc)
    assert "checkpoint step 20 could not be written" in line and "File too large" in line, line
    assert "(steps 8, 12, 16) are intact" in line and "on_save_error=warn" in line
    assert _steps(workdir) == [8, 12, 16]
    # A partial step can only be orbax's temporary directory (never read as a step); the re-run removes it.
    assert all(d.isdigit() or ".orbax-checkpoint-tmp" in d for d in os.listdir(workdir / "checkpoints"))
    from yolos_jax import checkpointing

    checkpointing.Checkpointer(str(workdir), checkpointing.default_checkpoint_config()).close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "16", "8"]
    ours, ref = _final_params(workdir), _final_params(uninterrupted)  # step 16 restores as it was written
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_a_killed_process_ends_the_other_within_the_bound_and_the_rerun_resumes(tmp_path, env, data_root,
                                                                              uninterrupted):
    del uninterrupted  # (its run prepared the shared dataset: a multi-process run needs it prepared)
    workdir = tmp_path / "two"
    bound = 20  # config.distributed.heartbeat_timeout_s: the watchdog gives up on a silent peer after half of it

    def launch(port, attempt):
        procs = []
        for i in range(2):
            with open(tmp_path / f"log_{attempt}_{i}.txt", "w") as log:  # files, not pipes: nobody reads them live
                procs.append(subprocess.Popen(
                    _cmd(workdir, data_root, *RESUME_OVERRIDES, "--config.train.num_steps=24",
                         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                         f"--config.distributed.heartbeat_timeout_s={bound}"),
                    env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        return procs

    def output(attempt, i):
        return (tmp_path / f"log_{attempt}_{i}.txt").read_text()

    first, second = launch(train_fixtures.free_port(), 0)
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), first, "checkpoint 4")
    second.send_signal(signal.SIGKILL)
    killed_at = time.time()
    first.wait(timeout=TIMEOUT)
    waited = time.time() - killed_at
    second.wait()
    assert first.returncode == 1, output(0, 0)[-4000:]
    assert waited < bound + 30, waited  # bounded: the heartbeat, not a hang
    assert "error: process 1 of this 2-process run stopped responding" in output(0, 0), output(0, 0)[-4000:]
    assert "Re-run the same command on every host" in output(0, 0)

    procs = launch(train_fixtures.free_port(), 1)  # the same command on both "hosts": resumes and finishes
    for i, p in enumerate(procs):
        p.wait(timeout=TIMEOUT)
        assert p.returncode == 0, output(1, i)[-4000:]
    assert "resumed from" in output(1, 0)
    assert _steps(workdir)[-1] == 24


# --------------------------------------------------------------------------------------------------
# Training options (issue 17): EMA, gradient accumulation, profiling, through the CLI
# --------------------------------------------------------------------------------------------------


def test_ema_grad_accumulation_and_a_profile_through_the_cli(tmp_path, env, data_root):
    workdir = tmp_path / "options"
    proc = _train(workdir, data_root, env, "--config.optim.ema_decay=0.99", "--config.train.grad_accum_steps=2",
                  "--config.train.profile_steps=2:3", "--config.checkpoint.keep_best_by=AP",
                  "--config.train.num_steps=8", "--config.checkpoint.every_steps=4")
    output = proc.stdout + proc.stderr
    assert "evaluating the EMA of the parameters" in output
    traces = [os.path.join(r, f) for r, _, fs in os.walk(workdir / "profile") for f in fs]
    assert traces and all(os.path.getsize(t) > 0 for t in traces), traces  # TensorBoard's xplane.pb
    assert any(t.endswith(".xplane.pb") for t in traces)
    metrics = json.load(open(workdir / "eval" / "step_8" / "metrics.json"))
    assert metrics["weights"] == "ema"
    from yolos_jax import Detector, weights

    assert weights.load_any(str(workdir))[2]["weights"] == "ema"  # the run's weights are its EMA
    best = weights.load_any(str(workdir / "checkpoints" / "best"))[2]
    assert best["best"]["metric"] == "AP" and best["best"]["step"] == 8
    assert Detector.from_checkpoint(str(workdir / "checkpoints" / "best")).label_names[:3] == [
        "circle", "square", "triangle"]
