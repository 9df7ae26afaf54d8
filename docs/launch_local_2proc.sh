#!/usr/bin/env bash
# A multi-host rehearsal on one machine: two train.py processes on localhost, joined by --config.distributed.*
# exactly as the project's own two-process test launches them (tests/test_train_e2e.py), on the CPU. Run it
# before a SLURM or TPU pod job: it goes through what those do (the dataset prepared once beforehand, each
# process reading its half of every batch, one workdir and one checkpoint for both, evaluation, resume) in a
# few minutes.
#
#   docs/launch_local_2proc.sh                                 # from anywhere; about 2 minutes on 2 cores
#   docs/launch_local_2proc.sh --config.train.num_steps=24     # arguments are added to both processes' flags
#
# Run it again: both processes resume from the last checkpoint (with more steps asked for, they train on).
# Each process writes its log to WORKDIR/process_I.log; process 0 prints the training lines.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root
# EDIT: the interpreter with yolos_jax installed (pip install -e .), the run's directory and a free port.
PYTHON=${PYTHON:-python}
WORKDIR=${WORKDIR:-/tmp/yolos_jax_2proc}
PORT=${PORT:-29517}
# CPU devices per process: 1 as in the CLI test; 2 rehearses hosts with several local devices (e.g. GPUs),
# as tests/multihost_worker.py does. The config's global batch (4) must be a multiple of all devices.
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-1}
# The few-step miniature of the demo (configs/demo.py:smoke: 16 images, 16 steps, 2 blocks of 32 wide).
CONFIG=${CONFIG:-configs/demo.py:smoke}

# Both processes on the CPU, even on a machine with a GPU (two processes would compete for it), each with
# DEVICES_PER_PROCESS devices; the same clean XLA_FLAGS as the tests.
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
export TF_CPP_MIN_LOG_LEVEL=3

DATA="$WORKDIR/data"
mkdir -p "$WORKDIR"
# 1. The data, once, in one process: a multi-process run never prepares a dataset itself (on a cluster, this
#    is `python -m yolos_jax.data.prepare` on your COCO folder). The synthetic set is the one the smoke config
#    would generate (4 shapes, up to 6 per image, 64 x 96 images).
{
    if [[ ! -d "$DATA/synthetic" ]]; then
        "$PYTHON" -m yolos_jax.data.synthetic --out="$DATA/synthetic" --num_train=16 --num_val=8 \
            --height=64 --width=96 --num_classes=4 --max_objects=6
    fi
    "$PYTHON" -m yolos_jax.data.prepare --data_dir="$DATA/tfds" --name=rehearsal --coco_dir="$DATA/synthetic"
} >"$WORKDIR/prepare.log" 2>&1 || { cat "$WORKDIR/prepare.log" >&2; exit 1; }

# 2. The same command in both processes but for --config.distributed.process_id (a cluster sets these from
#    its environment instead: docs/launch_slurm.sh, docs/launch_tpu_pod.sh). Process 0 hosts the coordinator
#    on PORT; heartbeat_timeout_s bounds how long one waits for the other should it die.
pids=()
for i in 0 1; do
    "$PYTHON" train.py --config="$CONFIG" --workdir="$WORKDIR/run" \
        --config.input.source_dir="$DATA/synthetic" --config.input.data_dir="$DATA/tfds" \
        --config.input.dataset_name=rehearsal \
        --config.distributed.coordinator_address="127.0.0.1:$PORT" \
        --config.distributed.num_processes=2 --config.distributed.process_id="$i" \
        --config.distributed.heartbeat_timeout_s=20 \
        "$@" >"$WORKDIR/process_$i.log" 2>&1 &
    pids+=("$!")
done
echo "processes ${pids[*]} started; logs: $WORKDIR/process_0.log, $WORKDIR/process_1.log"
tail -n +1 -f "$WORKDIR/process_0.log" --pid="${pids[0]}" &
status=0
for i in 0 1; do
    wait "${pids[$i]}" || { status=$?; echo "process $i failed ($status): $WORKDIR/process_$i.log" >&2; }
done
wait  # the tail
exit "$status"
