"""One process of a 2-process run on localhost (launched by test_train_step.py).

usage: python multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_NPZ
Each process owns 2 CPU devices and feeds only its half of every global batch.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main():
    pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    sys.path.insert(0, os.path.dirname(__file__))
    import numpy as np
    import train_fixtures as tf_

    from yolos_jax import data, sharding, train_step

    state, step, mesh = tf_.build_step(jax.devices())
    per_process = 8 // nproc
    for i in range(3):
        full = tf_.fake_batch(8, seed=i)
        local = {k: v[pid * per_process:(pid + 1) * per_process] for k, v in full.items()}
        batch = data.to_global_batch(train_step.select_train_batch(local), sharding.batch_sharding(mesh))
        state, metrics = step(state, batch)
    params = jax.device_get(state["params"])
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if pid == 0:
        np.savez(out, loss=np.asarray(jax.device_get(metrics["loss"])), **flat)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
