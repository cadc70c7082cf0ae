#!/usr/bin/env bash
# Train any experiment config on a SLURM allocation: one task per GPU (per node's tasks on CPU).
#
#   CONFIG=configs/market/bot_r50.yaml DATA_ROOT=/data DATA=Market-1501-v15.09.15 \
#       sbatch -N 2 --gpus-per-node 8 slurm/train.sh
#   CONFIG=configs/synthetic/bot.yaml EXTRA="--set schedule.epochs=10" sbatch slurm/train.sh
#   CONFIG=configs/market/bot_r50.yaml THEN=configs/market/anchor_r50_stage2.yaml \
#       DATA_ROOT=/data DATA=Market-1501-v15.09.15 sbatch -N 2 --gpus-per-node 8 slurm/train.sh
#
# Variables (all optional except CONFIG):
#   CONFIG     experiment YAML (relative to the submit folder or to the repository)
#   DATA_ROOT  folder holding the data sets; with DATA, adds --set data.root=$DATA_ROOT/$DATA
#   DATA       the data set's folder under DATA_ROOT
#   EXTRA      more CLI arguments, e.g. EXTRA="--set optimizer.lr=1e-4 --set engine.device=cpu"
#              (with THEN, every stage gets them)
#   THEN       later stages, space-separated configs (same lookup as CONFIG): `hpc-reid train
#              --config CONFIG --then S2 ...` trains them one after another in this job, each
#              from the previous stage's final checkpoint unless its model.init_from names one
#   PYTHON     interpreter (default: the repository's .venv/bin/python, else python3)
#   HPC_REID_REPO  the repository (default: found from the submitted script's path)
# The run folder is runs/job-$SLURM_JOB_ID (logging.output_dir/logging.run_name): stable when the
# job is requeued, so --resume auto continues at the exact next batch after a pre-emption. With
# THEN each stage keeps its own run name (its logging.run_name, else its name) under
# runs/job-$SLURM_JOB_ID/ (logging.output_dir); a requeued job skips the stages already finished
# and resumes the one that was running.
#SBATCH --job-name=hpc-reid
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of the script from the spool folder: find the repository from the submitted
# path that scontrol records (Command=...), else from this file's own path.
if [ -z "${HPC_REID_REPO:-}" ]; then
    script=$0
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
        if [ -f "${submitted:-}" ]; then script=$submitted; fi
    fi
    HPC_REID_REPO=$(cd "$(dirname "$script")/.." && pwd)
fi
export HPC_REID_REPO
repo=$HPC_REID_REPO
: "${CONFIG:?set CONFIG to an experiment YAML, e.g. CONFIG=configs/market/bot_r50.yaml}"
[ -f "$CONFIG" ] || CONFIG=$repo/$CONFIG
# PYTHON, tasks per node, MASTER_ADDR/PORT: shared with slurm/eval.sh
# shellcheck source=slurm/_common.sh
source "$repo/slurm/_common.sh"

args=(--config "$CONFIG")
if [ -n "${THEN:-}" ]; then
    # THEN is split on spaces on purpose: one config per stage.
    for stage in $THEN; do
        [ -f "$stage" ] || stage=$repo/$stage
        args+=(--then "$stage")
    done
    # a --set reaches every stage: one folder per job, holding a run folder per stage
    args+=(--set "logging.output_dir=runs/job-$SLURM_JOB_ID")
else
    args+=(--set "logging.run_name=job-$SLURM_JOB_ID")
fi
args+=(--resume auto)
if [ -n "${DATA:-}" ]; then
    args+=(--set "data.root=${DATA_ROOT:?DATA is set: set DATA_ROOT too}/$DATA")
fi
# EXTRA is split on spaces on purpose: it holds several --set KEY=VALUE arguments.
# shellcheck disable=SC2206
args+=(${EXTRA:-})

echo "hpc-reid: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$nodes node(s) x $tasks_per_node task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "hpc-reid: $PYTHON -m hpc_reid.cli train ${args[*]}"
# srun forwards SIGUSR1 (from --signal or scancel --signal=USR1) to every task; the trainer
# checkpoints and rank 0 runs `scontrol requeue`. A real error exits non-zero and is not requeued.
srun --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --ntasks=$(( nodes * tasks_per_node )) \
    --cpus-per-task="$cpus_per_task" --kill-on-bad-exit=1 \
    "$PYTHON" -m hpc_reid.cli train "${args[@]}"
