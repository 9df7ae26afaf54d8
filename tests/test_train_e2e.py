"""End to end through `train.py` on the generated dataset (configs/demo.py:smoke), as a user runs it.

* train (with a periodic eval midway) -> checkpoint -> restore -> eval -> annotated image, and the loss goes down;
* SIGKILL midway, SIGTERM (preemption) on the resumed run, Ctrl-C (SIGINT) on the next, resume again:
  parameters bit-identical to an uninterrupted run of the same length;
* an injected NaN stops the run naming the step, and the last checkpoint stays loadable.
All runs share one persistent compilation cache so that only the first one pays for XLA compilation.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 900


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xla_cache")
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e.update(YOLOS_JAX_COMPILATION_CACHE=str(cache), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return e


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One generated + prepared dataset shared by every run (each workdir links to it)."""
    return tmp_path_factory.mktemp("shared_data")


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
    from yolos_jax import weights

    params, _, _ = weights.load_any(str(workdir))
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _losses(stdout):
    return [float(x) for x in re.findall(r"\] loss=([0-9.]+)", stdout)]


def test_train_checkpoint_restore_eval_image(tmp_path, env, data_root):
    """Also: a head with more logits than the dataset has labels (6 vs the 4 shapes, as a 91-way COCO head on
    a smaller dataset) trains, draws, restores and infers, and eval refuses a dataset whose labels mean
    something else."""
    workdir = tmp_path / "run"
    # periodic eval at 8, final at 16
    proc = _train(workdir, data_root, env, "--config.train.eval_every=8", "--config.model.num_classes=6")
    losses = _losses(proc.stdout)
    assert len(losses) == 4, proc.stdout
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


def test_a_wrong_split_name_fails_before_training(tmp_path, env, data_root):
    workdir = tmp_path / "run"
    for key in ("train_split", "val_split"):
        proc = _train(workdir, data_root, env, f"--config.input.{key}=validation", check=False)
        assert proc.returncode != 0
        assert f"config.input.{key}: 'validation' is not a split" in proc.stderr, proc.stderr[-3000:]
        assert "['train', 'val']" in proc.stderr
        assert not (workdir / "checkpoints").exists() or not os.listdir(workdir / "checkpoints")


def _wait_for(predicate, proc, what, timeout=TIMEOUT):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {what}: {proc.stdout.read()[-3000:] if proc.stdout else ''}")
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_sigkill_sigterm_ctrl_c_resume_bit_identical(tmp_path, env, data_root):
    overrides = ("--config.train.eval_at_end=False", "--config.checkpoint.every_steps=4")
    reference = tmp_path / "uninterrupted"
    _train(reference, data_root, env, *overrides)

    workdir = tmp_path / "interrupted"
    # 1) SIGKILL as soon as the step-4 checkpoint is finalised (orbax renames it into place when complete).
    proc = subprocess.Popen(_cmd(workdir, data_root, *overrides), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (workdir / "checkpoints" / "4").is_dir(), proc, "checkpoint 4")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # 2) Resume; SIGTERM (preemption) once it has logged a step past the checkpoint: it must save and exit 0.
    # 3) Resume; Ctrl-C (SIGINT, what the README tells demo users to do) the same way.
    for sig, step_pattern in ((signal.SIGTERM, r"\[\s*8/16"), (signal.SIGINT, r"\[\s*12/16")):
        proc = subprocess.Popen(_cmd(workdir, data_root, *overrides), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        lines, sent = [], False
        for line in proc.stdout:
            lines.append(line)
            if re.search(step_pattern, line):
                proc.send_signal(sig)
                sent = True
                break
        rest = proc.communicate(timeout=TIMEOUT)[0]
        output = "".join(lines) + rest
        assert sent, f"never saw {step_pattern!r} to send {sig.name} on:\n" + output[-4000:]
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
