#!/usr/bin/env bash
# Evaluate a checkpoint on its data set's test split, sharded across the allocation: each task
# extracts features for its contiguous shard of the query and gallery, and the metrics are computed
# without any rank holding Q x G (exact, the same as on one process).
#
#   CHECKPOINT=runs/job-1234/checkpoints/best.pt sbatch -N 2 --gpus-per-node 8 slurm/eval.sh
#   CHECKPOINT=... CONFIG=configs/market/bot_r50.yaml EXTRA="--set evaluation.rerank.enabled=true" \
#       sbatch slurm/eval.sh
#   CHECKPOINT=... EXTRACT=1 OUT=features/bot sbatch -N 2 slurm/eval.sh   # query.h5, gallery.h5
#
# Variables (all optional except CHECKPOINT):
#   CHECKPOINT  a checkpoint written by train (relative to the submit folder or to the repository)
#   CONFIG      experiment YAML used instead of the config stored in the checkpoint (EXTRA's --set
#               needs it)
#   OUT         output folder for results.json (and plots) or the feature files
#               (default: runs/eval-$SLURM_JOB_ID under the submit folder)
#   EXTRACT     1: run `hpc-reid extract` (query.h5 and gallery.h5 in $OUT) instead of eval
#   EXTRA       more CLI arguments, e.g. EXTRA="--set evaluation.flip_average=true" (with CONFIG)
#   PYTHON, HPC_REID_REPO  as in slurm/train.sh
# Not requeued: an evaluation pre-empted or past its time limit is simply submitted again.
#SBATCH --job-name=hpc-reid-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
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
: "${CHECKPOINT:?set CHECKPOINT to a checkpoint written by train (runs/job-N/checkpoints/...)}"
if [ ! -e "$CHECKPOINT" ]; then
    if [ "${CHECKPOINT#/}" = "$CHECKPOINT" ] && [ -e "$repo/$CHECKPOINT" ]; then
        CHECKPOINT=$repo/$CHECKPOINT
    else
        echo "hpc-reid: CHECKPOINT not found (in $PWD or $repo): $CHECKPOINT" >&2
        exit 2
    fi
fi
if [ -n "${CONFIG:-}" ]; then
    [ -f "$CONFIG" ] || CONFIG=$repo/$CONFIG
fi
# PYTHON, tasks per node, MASTER_ADDR/PORT: shared with slurm/train.sh
# shellcheck source=slurm/_common.sh
source "$repo/slurm/_common.sh"
OUT=${OUT:-runs/eval-$SLURM_JOB_ID}

if [ "${EXTRACT:-0}" = 1 ]; then
    args=(extract --checkpoint "$CHECKPOINT" --out-dir "$OUT")
else
    args=(eval --checkpoint "$CHECKPOINT" --out "$OUT")
fi
if [ -n "${CONFIG:-}" ]; then args+=(--config "$CONFIG"); fi
# EXTRA is split on spaces on purpose: it holds several --set KEY=VALUE arguments.
# shellcheck disable=SC2206
args+=(${EXTRA:-})

echo "hpc-reid: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST:" \
    "$nodes node(s) x $tasks_per_node task(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "hpc-reid: $PYTHON -m hpc_reid.cli ${args[*]}"
# Each task logs its rank and node first (then becomes the Python process), so the log shows
# which ranks took part; any task failing ends the step.
# shellcheck disable=SC2016
srun --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --ntasks=$(( nodes * tasks_per_node )) \
    --cpus-per-task="$cpus_per_task" --kill-on-bad-exit=1 \
    bash -c 'echo "hpc-reid: rank $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"; exec "$@"' \
    hpc-reid "$PYTHON" -m hpc_reid.cli "${args[@]}"
