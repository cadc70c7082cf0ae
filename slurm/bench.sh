#!/usr/bin/env bash
# Benchmark a config over 1..N nodes of one allocation and summarise its scaling.
#
#   sbatch -N 2 slurm/bench.sh                                   # configs/synthetic/bot.yaml
#   CONFIG=configs/market/bot_r50.yaml DATA_ROOT=/data DATA=Market-1501-v15.09.15 \
#       STEPS=50 LOADERS=dali,torch sbatch -N 8 --gpus-per-node 8 slurm/bench.sh
#   SCALING="weak strong" NODE_COUNTS="1 2 4 8" sbatch -N 8 --gpus-per-node 8 slurm/bench.sh
#
# For each node count k (NODE_COUNTS, default 1 2 4 ... and N), one `srun` on the allocation's
# first k nodes (same tasks per node) runs `hpc-reid bench`, writing
# $OUT/nodes-k/bench.json (strong scaling: $OUT/nodes-k-strong/bench.json); then
# `hpc-reid bench summarize` writes $OUT/scaling.json, scaling.md (the table for
# bench/RESULTS.md) and scaling.png. Every run uses the same data, model and per-rank batch
# (weak scaling) or global batch (strong scaling: P divided by the world size).
#
# Variables (all optional):
#   CONFIG       experiment YAML (default configs/synthetic/bot.yaml)
#   STEPS        timed steps per phase (default 20); WARMUP untimed ones (default 2)
#   LOADERS      loader backends, e.g. dali,torch (default: the config's loader.backend)
#   EVAL_SIZE    query,gallery size of the evaluation timing (default 3368,15913; 0,0 skips it)
#   SCALING      weak, strong, or "weak strong" (default weak)
#   NODE_COUNTS  node counts to run, e.g. "1 2 4" (default: powers of two up to N, and N)
#   OUT          output folder (default runs/bench-$SLURM_JOB_ID under the submit folder)
#   DATA_ROOT, DATA, EXTRA, PYTHON, HPC_REID_REPO   as in slurm/train.sh
#SBATCH --job-name=hpc-reid-bench
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
CONFIG=${CONFIG:-configs/synthetic/bot.yaml}
[ -f "$CONFIG" ] || CONFIG=$repo/$CONFIG
# PYTHON, tasks per node, MASTER_ADDR/PORT: shared with slurm/train.sh and slurm/eval.sh
# shellcheck source=slurm/_common.sh
source "$repo/slurm/_common.sh"
OUT=${OUT:-runs/bench-$SLURM_JOB_ID}

if [ -z "${NODE_COUNTS:-}" ]; then
    NODE_COUNTS=""
    for (( k = 1; k < nodes; k *= 2 )); do NODE_COUNTS+="$k "; done
    NODE_COUNTS+="$nodes"
fi
args=(--config "$CONFIG" --steps "${STEPS:-20}" --warmup "${WARMUP:-2}")
args+=(--eval-size "${EVAL_SIZE:-3368,15913}")
if [ -n "${LOADERS:-}" ]; then args+=(--loaders "$LOADERS"); fi
if [ -n "${DATA:-}" ]; then
    args+=(--set "data.root=${DATA_ROOT:?DATA is set: set DATA_ROOT too}/$DATA")
fi
# EXTRA is split on spaces on purpose: it holds several --set KEY=VALUE arguments.
# shellcheck disable=SC2206
args+=(${EXTRA:-})
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")

echo "hpc-reid: bench job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: node counts $NODE_COUNTS," \
    "$tasks_per_node task(s) per node, scaling ${SCALING:-weak}, rendezvous $MASTER_ADDR"
runs=()
port_base=$MASTER_PORT
i=0
for mode in ${SCALING:-weak}; do
    for k in $NODE_COUNTS; do
        if [ "$k" -gt "$nodes" ] || [ "$k" -lt 1 ]; then
            echo "hpc-reid: NODE_COUNTS has $k, the allocation has $nodes node(s)" >&2
            exit 2
        fi
        dir=$OUT/nodes-$k
        if [ "$mode" != weak ]; then dir=$dir-$mode; fi
        # the first k nodes hold MASTER_ADDR; a port per run, away from the last run's sockets
        MASTER_PORT=$(( 15000 + (port_base - 15000 + i) % 20000 ))
        i=$(( i + 1 ))
        nodelist=$(echo "$hosts" | head -n "$k" | paste -sd, -)
        echo "hpc-reid: $k node(s) ($nodelist), $mode scaling -> $dir/bench.json"
        # shellcheck disable=SC2016
        srun --nodes="$k" --nodelist="$nodelist" --ntasks-per-node="$tasks_per_node" \
            --ntasks=$(( k * tasks_per_node )) --cpus-per-task="$cpus_per_task" \
            --kill-on-bad-exit=1 \
            bash -c 'echo "hpc-reid: rank $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME"; exec "$@"' \
            hpc-reid "$PYTHON" -m hpc_reid.cli bench "${args[@]}" --scaling "$mode" --out "$dir"
        runs+=("$dir")
    done
done
"$PYTHON" -m hpc_reid.cli bench summarize "${runs[@]}" --out "$OUT"
