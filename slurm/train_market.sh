#!/usr/bin/env bash
# The strong baseline (configs/market/bot_r50.yaml) on Market-1501 under $DATA_ROOT.
#
#   DATA_ROOT=/data sbatch slurm/train_market.sh                    # one node, its own tasks
#   DATA_ROOT=/data sbatch -N 4 --gpus-per-node 8 slurm/train_market.sh    # 32 GPUs, 32 tasks
#   DATA_ROOT=/data EXTRA="--set schedule.epochs=60" sbatch slurm/train_market.sh
#
# Market-1501 is expected at $DATA_ROOT/Market-1501-v15.09.15 (the folder holding
# bounding_box_train/); DATA=... names another folder. Every other variable (CONFIG, EXTRA,
# THEN, PYTHON, HPC_REID_REPO) is documented in slurm/train.sh, which this script runs.
#SBATCH --job-name=bot-market
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from the spool folder: find the repository from the submitted
# path (scontrol's Command=...), else from this file's own path.
if [ -z "${HPC_REID_REPO:-}" ]; then
    script=$0
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
        if [ -f "${submitted:-}" ]; then script=$submitted; fi
    fi
    HPC_REID_REPO=$(cd "$(dirname "$script")/.." && pwd)
fi
export HPC_REID_REPO
export CONFIG=${CONFIG:-configs/market/bot_r50.yaml}
export DATA=${DATA:-Market-1501-v15.09.15}
export DATA_ROOT=${DATA_ROOT:?set DATA_ROOT to the folder holding Market-1501-v15.09.15}
exec bash "$HPC_REID_REPO/slurm/train.sh"
