"""The sharded train step: 8 devices == 1 device, FSDP == replicated, 2 processes == 1 process,
non-finite updates never applied; the splash attention kernel per device under the step's mesh."""

import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import train_fixtures as tf_
from yolos_jax import attention_tpu, data, matcher, sharding, train_step

HERE = os.path.dirname(__file__)


def _run(devices, fsdp=1, steps=3, nan_at=None, policy="stop", batch_size=8, **step_options):
    state, step, mesh = tf_.build_step(devices, fsdp=fsdp, policy=policy, global_batch=batch_size, **step_options)
    history = []
    for i in range(steps):
        host = tf_.fake_batch(batch_size, seed=i)
        if nan_at == i:
            host["image"][0, 0, 0, 0] = np.nan
        batch = data.to_global_batch(train_step.select_train_batch(host), sharding.batch_sharding(mesh))
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def single_device_run():
    return _run(jax.devices()[:1])


def _assert_close(a, b, atol=1e-5):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], rtol=0, atol=atol, err_msg=k)


def test_eight_devices_equal_one(single_device_run):
    assert len(jax.devices()) == 8
    state1, hist1 = single_device_run
    state8, hist8 = _run(jax.devices())
    _assert_close(state8["params"], state1["params"])
    _assert_close(state8["opt_state"], state1["opt_state"])
    for m1, m8 in zip(hist1, hist8):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert int(state8["step"]) == 3
    # Training does something: the loss terms are finite and the parameters moved.
    assert all(h["finite"] == 1.0 for h in hist1)


def test_fsdp_equals_replicated(single_device_run):
    state1, _ = single_device_run
    state_f, _ = _run(jax.devices(), fsdp=4)
    _assert_close(state_f["params"], state1["params"])


def test_state_is_sharded_under_fsdp():
    state, _, mesh = tf_.build_step(jax.devices(), fsdp=4)
    kernel = state["params"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert sharding.FSDP_AXIS in tuple(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.shape[0] * kernel.addressable_shards[0].data.shape[1] == kernel.size // 4


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_update_is_dropped(policy):
    clean, _ = _run(jax.devices()[:1], steps=1)
    state, hist = _run(jax.devices()[:1], steps=2, nan_at=1, policy=policy)
    assert hist[0]["finite"] == 1.0 and hist[1]["finite"] == 0.0
    assert not np.isfinite(hist[1]["loss"])
    # The bad step left parameters and optimiser state exactly as after step 1.
    fa, fb = _flat(state["params"]), _flat(clean["params"])
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_two_processes_equal_one(tmp_path, single_device_run):
    out = str(tmp_path / "mp.npz")
    port = tf_.free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port), out],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    multi = np.load(out)
    state1, hist1 = single_device_run
    flat1 = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
             for path, v in jax.tree_util.tree_flatten_with_path(state1["params"])[0]}
    for k, v in flat1.items():
        np.testing.assert_allclose(multi[k], v, rtol=0, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(multi["loss"], hist1[-1]["loss"], rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Gradient accumulation and the EMA of the parameters (issue 17)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ce_normalization, k, num_devices, fsdp", [("batch", 4, 1, 1), ("per_image", 2, 4, 2)])
def test_accumulated_steps_equal_the_whole_batch_step(ce_normalization, k, num_devices, fsdp):
    from yolos_jax import losses

    loss_cfg = losses.default_loss_config()
    loss_cfg.ce_normalization = ce_normalization
    whole, whole_hist = _run(jax.devices()[:1], loss_cfg=loss_cfg, steps=2)
    for devices in (jax.devices()[:num_devices],):  # several devices (FSDP too): each keeps its rows
        acc, acc_hist = _run(devices, fsdp=fsdp, grad_accum_steps=k, loss_cfg=loss_cfg, steps=2)
        _assert_close(acc["params"], whole["params"], atol=1e-6)  # fp32: one update from the same gradient
        _assert_close(acc["opt_state"], whole["opt_state"], atol=1e-6)
        for mw, ma in zip(whole_hist, acc_hist):
            for term in ("loss", "loss_ce", "loss_bbox", "loss_giou", "num_boxes"):
                np.testing.assert_allclose(ma[term], mw[term], rtol=2e-6, err_msg=f"k={k} {term}")
    # The micro-batches really differ from the whole batch: a k that does not divide a device's rows is refused.
    with pytest.raises(ValueError, match="grad_accum_steps=3 must divide"):
        _run(jax.devices()[:1], grad_accum_steps=3, steps=1)


def test_ema_follows_the_numpy_reference_with_warm_up():
    decay = 0.9
    state, step, mesh = tf_.build_step(jax.devices()[:1], ema_decay=decay)
    params = [_flat(jax.device_get(state["params"]))]
    emas = []
    for i in range(4):
        batch = data.to_global_batch(train_step.select_train_batch(tf_.fake_batch(8, seed=i)),
                                     sharding.batch_sharding(mesh))
        state, _ = step(state, batch)
        params.append(_flat(jax.device_get(state["params"])))
        emas.append(_flat(jax.device_get(state["ema_params"])))
    expected = {k: v.astype(np.float64) for k, v in params[0].items()}  # the average starts at the init
    for t in range(1, 5):
        d = min(decay, (1 + t) / (10 + t))  # t-th update: warm-up (1+t)/(10+t) until it reaches `decay`
        expected = {k: d * expected[k] + (1 - d) * params[t][k] for k in expected}
        for k in expected:
            np.testing.assert_allclose(emas[t - 1][k], expected[k], rtol=0, atol=1e-6, err_msg=f"update {t} {k}")
    moved = max(float(np.max(np.abs(emas[-1][k] - params[-1][k]))) for k in expected)
    assert moved > 1e-4  # the average lags the parameters: it is not a copy


# --------------------------------------------------------------------------------------------------
# The splash attention kernel in the sharded step (`sharding.mesh_jit` puts the mesh in context)
# --------------------------------------------------------------------------------------------------


def _splash_model(monkeypatch, impl):
    """Makes `tf_.build_step` build the tiny model with attention_impl=impl."""
    tiny = tf_.tiny_model
    monkeypatch.setattr(tf_, "tiny_model", lambda: tiny().clone(attention_impl=impl))


def test_splash_step_runs_the_kernel_per_device_and_equals_einsum(monkeypatch, splash_calls):
    """attention_impl='splash' (Pallas interpret mode on CPU) on a ('data', 'fsdp') = (4, 2) mesh: the step's
    attention is `shard_map`ped, each device running the kernel on its own image (8 images, one each), and two
    steps give einsum's losses, parameters and optimiser state within 1e-5."""
    calls = splash_calls  # (images, the mesh axes manual there) of each kernel call traced
    _splash_model(monkeypatch, "splash")
    state_s, hist_s = _run(jax.devices(), fsdp=2, steps=2)
    # Every call (the step's, and the fixture's state init, also a mesh_jit) runs inside the shard_map over
    # both axes; none sees the whole batch.
    assert (1, ("data", "fsdp")) in calls and all(b == 1 for b, _ in calls), calls
    _splash_model(monkeypatch, "einsum")
    state_e, hist_e = _run(jax.devices(), fsdp=2, steps=2)
    for ms, me in zip(hist_s, hist_e):
        assert ms["finite"] == 1.0
        np.testing.assert_allclose(ms["loss"], me["loss"], rtol=0, atol=1e-5)
    _assert_close(state_s["params"], state_e["params"])
    _assert_close(state_s["opt_state"], state_e["opt_state"])


def test_splash_step_lowers_for_tpu_with_the_kernel_per_device(monkeypatch):
    """The real (not interpreted) kernel: the step over an 8-device mesh lowers for TPU from this CPU host with
    the forward and both backward kernels, and without the no-mesh fallback's warning (which would mean the
    xla path); the same step's plain `jax.jit` (no mesh in context) takes the fallback."""
    _splash_model(monkeypatch, "splash")
    # The on-device matcher: the host one's callback cannot be lowered for TPU from a CPU host.
    on_device = matcher.default_matcher_config()
    on_device.implementation = "device"
    monkeypatch.setattr(matcher, "default_matcher_config", lambda: on_device)
    state, step, mesh = tf_.build_step(jax.devices(), fsdp=2)
    batch = data.to_global_batch(train_step.select_train_batch(tf_.fake_batch(8, seed=0)),
                                 sharding.batch_sharding(mesh))
    monkeypatch.setattr(attention_tpu, "INTERPRET", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's warning would fail the test
        text = step.trace(state, batch).lower(lowering_platforms=("tpu",)).as_text()  # no compile: no TPU here
    # forward, dq and dk/dv: the two blocks' identical calls share one lowered function per kernel.
    assert text.count("tpu_custom_call") == 3
    with pytest.warns(UserWarning, match="without a mesh in context"):
        step.jitted.trace(state, batch)
