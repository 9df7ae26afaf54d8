#!/usr/bin/env bash
# Training on a Cloud TPU VM pod slice: the same train.py command on every worker at once (--worker=all).
#
#   docs/launch_tpu_pod.sh setup    # once: clone the code and make a virtualenv with jax[tpu] on every worker
#   docs/launch_tpu_pod.sh check    # every worker joins the run and prints its process index and devices
#   docs/launch_tpu_pod.sh train [--config.optim.ema_decay=0.9998 ...]   # start or resume the run; arguments
#                                   # after `train` are added to train.py's flags
#
# Run it where gcloud is authenticated for the slice's project (your machine, Cloud Shell), after `ssh-add` of
# your Compute Engine key (gcloud's ~/.ssh/google_compute_engine): gcloud connects to all workers at once.
# The run stops when this command ends (the workers' processes end with the ssh sessions); for a long run,
# run this script inside tmux or screen. Re-running `train` resumes from WORKDIR's latest checkpoint.
#
# How the processes find each other (no --config.distributed.* flags): jax.distributed.initialize() reads each
# worker's index and the slice's worker list from the TPU VM metadata. train.py (yolos_jax/runtime.py) calls
# it when the environment names a multi-process run: TPU_WORKER_HOSTNAMES (set by GKE, not on TPU VMs) or
# JAX_COORDINATOR_ADDRESS. So each worker exports JAX_COORDINATOR_ADDRESS as jax would choose it itself: the
# first worker of the metadata's list, port 8476.
set -euo pipefail

# EDIT: the slice (created beforehand: gcloud compute tpus tpu-vm create NAME --zone=... --accelerator-type=...
# --version=...) and its project ('' = gcloud's configured project).
TPU_NAME=${TPU_NAME:-my-tpu-pod}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
# EDIT: where each worker gets the code, and where it goes (relative to the ssh user's home on the worker).
REPO_URL=${REPO_URL:-https://github.com/YOUR_ORG/yolos_jax.git}
REMOTE_DIR=${REMOTE_DIR:-yolos_jax}
# Python >= 3.11 on the workers (jax 0.10 requires it). An image whose python3 is older (Ubuntu 22.04: 3.10)
# needs a newer interpreter installed first: set PYTHON to it, e.g. python3.11.
PYTHON=${PYTHON:-python3}
# EDIT: the run. WORKDIR and DATA_DIR must be one shared filesystem mounted at the same path on every worker
# (e.g. a Filestore NFS share at /mnt/shared): each process reads its shard of the prepared dataset there, and
# WORKDIR holds the run's lock and the checkpoints every process writes. Prepare the dataset once beforehand
# (README, Data preparation): a multi-process run never prepares it.
CONFIG=${CONFIG:-configs/yolos_s.py}         # any configs/*.py[:arg]
WORKDIR=${WORKDIR:-/mnt/shared/runs/yolos_s}
INIT_FROM=${INIT_FROM-/mnt/shared/ckpt/deit_s}  # convert_torch_weights.py --output; '' trains from scratch
DATA_DIR=${DATA_DIR:-/mnt/shared/tensorflow_datasets}
DATASET=${DATASET:-coco2017}                 # the prepared dataset's name (its splits: train2017 / val2017)
# The global batch: a multiple of the slice's device count (`check` prints it; train.py checks). The learning
# rate follows it (optim.lr_scaling='linear': base_lr x batch / base_batch_size).
BATCH=${BATCH:-64}

q() { printf '%q' "$1"; }  # one word, quoted for the workers' shell

# On every worker: this repository's virtualenv and the coordinator's address (worker 0, as jax picks it).
ENTER=$(cat <<EOF
set -e
cd $(q "$REMOTE_DIR")
. .venv/bin/activate
endpoints=\$(curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/worker-network-endpoints)
first=\${endpoints%%,*}
export JAX_COORDINATOR_ADDRESS=\${first##*:}:8476
EOF
)

stage=${1:-}
shift || true
case "$stage" in
    setup)
        REMOTE=$(cat <<EOF
set -e
if [ -d $(q "$REMOTE_DIR")/.git ]; then git -C $(q "$REMOTE_DIR") pull --ff-only
else git clone $(q "$REPO_URL") $(q "$REMOTE_DIR"); fi
cd $(q "$REMOTE_DIR")
[ -d .venv ] || $(q "$PYTHON") -m venv .venv
. .venv/bin/activate
pip install -q -U pip
pip install -q -e '.[tpu]'
EOF
)
        ;;
    check)
        REMOTE="$ENTER
python -c 'import jax; from yolos_jax import runtime; from yolos_jax.run_config import default_distributed_config
runtime.maybe_initialize_distributed(default_distributed_config())
print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"devices\", jax.device_count(), jax.local_devices())'"
        ;;
    train)
        extra=""
        for arg in "$@"; do extra+=" $(q "$arg")"; done
        REMOTE="$ENTER
python train.py --config=$(q "$CONFIG") --workdir=$(q "$WORKDIR") \
    --config.init_from=$(q "$INIT_FROM") \
    --config.input.data_dir=$(q "$DATA_DIR") --config.input.dataset_name=$(q "$DATASET") \
    --config.input.batch_size=$BATCH --config.input.eval_batch_size=$BATCH$extra"
        ;;
    *)
        echo "usage: $0 setup | check | train [train.py flags ...]" >&2
        exit 2
        ;;
esac

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker=all --command="$REMOTE"
