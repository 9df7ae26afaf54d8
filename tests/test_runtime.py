"""runtime.maybe_initialize_distributed starts jax.distributed only for a multi-process launch."""

import pytest


@pytest.mark.parametrize("env,expect", [({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "4"}, True),
                                        ({"TPU_WORKER_HOSTNAMES": "a"}, False), ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),
                                        ({"OMPI_COMM_WORLD_SIZE": "2"}, True), ({"JAX_COORDINATOR_ADDRESS": "h:1"}, True)])
def test_maybe_initialize_distributed_only_for_several_processes(monkeypatch, env, expect):
    import jax

    from yolos_jax import run_config, runtime

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in runtime.MULTIPROCESS_ENV:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runtime.maybe_initialize_distributed(run_config.default_distributed_config())
    # The heartbeat bound (config.distributed.heartbeat_timeout_s) is passed on: a dead peer ends the run.
    assert calls == ([{"heartbeat_timeout_seconds": 60}] if expect else [])
