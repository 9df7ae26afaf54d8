#!/bin/bash
# Multi-node GPU training under SLURM: one train.py process per GPU, started by srun on every node.
#
#   sbatch docs/launch_slurm.sh            # from the repository root, on a login node
#   sbatch --nodes=4 docs/launch_slurm.sh --config.model.dtype=bfloat16
#                                          # sbatch options override the #SBATCH lines below; arguments after
#                                          # the script are added to train.py's flags
# Submitting the same script again resumes the run from WORKDIR's latest checkpoint.
#
# How the processes find each other (no --config.distributed.* flags): srun sets SLURM_NTASKS, SLURM_PROCID,
# SLURM_LOCALID and SLURM_STEP_NODELIST in every task. train.py (yolos_jax/runtime.py) sees SLURM_NTASKS > 1
# and calls jax.distributed.initialize(), which reads them: the coordinator is the first node of the step, on
# port 61440 + (job id mod 4096) (export JAX_COORDINATOR_PORT=... to choose another), and each process takes
# the one GPU whose index is its SLURM_LOCALID. Hence one task per GPU, each task seeing all of its node's
# GPUs. If your site instead binds one GPU to each task (CUDA_VISIBLE_DEVICES holds a single GPU in each
# task), uncomment `export JAX_LOCAL_DEVICE_IDS=0` below. For one task per node instead, set
# --ntasks-per-node=1 and export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 (all of a node's GPUs): without it
# each process would use GPU 0 only.
#
# EDIT the #SBATCH lines for your cluster (sbatch reads them up to the first command, so keep them here):
#SBATCH --job-name=yolos_jax
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my-account
# (--ntasks-per-node = --gpus-per-node: one process per GPU. --cpus-per-task: the node's cores divided by
# its tasks; each process decodes its own share of the images.)

set -euo pipefail

# EDIT: where the code, the data and the run live. Every node must see them at the same path (a shared
# filesystem: NFS, Lustre, GPFS): each process reads its shard of the prepared dataset from DATA_DIR, and
# WORKDIR holds the run's lock and the checkpoints all processes write.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}      # this repository
# The virtualenv, made once on a login node:
#   python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[cuda12]"   # or ".[cuda13]" (README)
VENV=${VENV:-$REPO/.venv}
CONFIG=${CONFIG:-configs/yolos_s.py}         # any configs/*.py[:arg]
WORKDIR=${WORKDIR:-/shared/runs/yolos_s}
INIT_FROM=${INIT_FROM-/shared/ckpt/deit_s}  # convert_torch_weights.py --output; '' trains from scratch
DATA_DIR=${DATA_DIR:-/shared/tensorflow_datasets}
DATASET=${DATASET:-coco2017}                 # the prepared dataset's name (its splits: train2017 / val2017)
COCO_DIR=${COCO_DIR:-}                       # a COCO-format folder to prepare DATASET from first ('' = prepared)
IMAGES_PER_GPU=${IMAGES_PER_GPU:-1}          # the original trains S and B at 1 image per GPU
# export JAX_LOCAL_DEVICE_IDS=0              # only where each task sees a single GPU (see above)

cd "$REPO"
# shellcheck source=/dev/null
. "$VENV/bin/activate"

# A multi-process run never prepares data itself: prepare it once, in one task (reused once prepared).
if [[ -n "$COCO_DIR" ]]; then
    srun --nodes=1 --ntasks=1 python -m yolos_jax.data.prepare \
        --data_dir="$DATA_DIR" --name="$DATASET" --coco_dir="$COCO_DIR"
fi

: "${SLURM_NTASKS:?submit this script with sbatch}"
# The global batch: a multiple of the device count (train.py checks). The learning rate follows it
# (optim.lr_scaling='linear': base_lr x batch / base_batch_size).
BATCH=$((SLURM_NTASKS * IMAGES_PER_GPU))

# srun, never a bare `python train.py`: jax's SLURM detection needs the step's variables. --kill-on-bad-exit
# ends the job when one process fails (the others also stop by themselves within
# config.distributed.heartbeat_timeout_s).
srun --kill-on-bad-exit=1 python train.py --config="$CONFIG" --workdir="$WORKDIR" \
    --config.init_from="$INIT_FROM" \
    --config.input.data_dir="$DATA_DIR" --config.input.dataset_name="$DATASET" \
    --config.input.batch_size="$BATCH" --config.input.eval_batch_size="$BATCH" \
    "$@"
