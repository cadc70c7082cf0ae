#!/usr/bin/env bash
# Hyperparameter search (Ray Tune + Ax) on a SLURM allocation: a Ray cluster on its nodes (the
# head on the first, a worker on each other node), then `hpc-reid tune --address HEAD:PORT` in
# this batch shell, then the cluster is stopped.
#
#   CONFIG=configs/synthetic/bot.yaml SPACE=configs/search/bot_synthetic.yaml TRIALS=20 \
#       CONCURRENT=4 sbatch -N 2 slurm/tune.sh
#   CONFIG=configs/market/bot_r50.yaml SPACE=configs/search/bot_market.yaml TRIALS=40 \
#       CONCURRENT=16 EXTRA="--set data.root=/data/Market-1501-v15.09.15" \
#       sbatch -N 4 --gpus-per-node 4 slurm/tune.sh
#
# Variables:
#   CONFIG      experiment YAML to search over (relative to the submit folder or the repository)
#   SPACE       search space YAML, e.g. configs/search/bot_synthetic.yaml (same lookup)
#   TRIALS      trials in all (default 20)
#   CONCURRENT  trials at once (default: the number of nodes)
#   EXTRA       more `hpc-reid tune` arguments, split on spaces: --set KEY=VALUE, --name NAME,
#               --objective mean, --cpus-per-trial C, --resume, ...
#   PYTHON      interpreter (default: the repository's .venv/bin/python, else python3)
#   HPC_REID_REPO  the repository (default: found from the submitted script's path)
# The search folder is <logging.output_dir>/tune/<name> under the submit folder (runs/tune/...):
# on a cluster it must be on storage every node sees. Submitting again with EXTRA="--resume"
# continues an interrupted search. Ray listens on port 20000 + job id % 20000 of the first node;
# the cluster's token (RAY_AUTH_TOKEN, Ray's token authentication) is made per job.
#SBATCH --job-name=hpc-reid-tune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

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
: "${CONFIG:?set CONFIG to an experiment YAML, e.g. CONFIG=configs/synthetic/bot.yaml}"
: "${SPACE:?set SPACE to a search space YAML, e.g. SPACE=configs/search/bot_synthetic.yaml}"
[ -f "$CONFIG" ] || CONFIG=$repo/$CONFIG
[ -f "$SPACE" ] || SPACE=$repo/$SPACE
# PYTHON, nodes, MASTER_ADDR (the first node, or its NodeAddr when the name does not resolve)
# shellcheck source=slurm/_common.sh
source "$repo/slurm/_common.sh"
# Ray sets each trial's OMP_NUM_THREADS to its CPUs (--cpus-per-trial); _common.sh's would win
unset OMP_NUM_THREADS
ray=${RAY:-$(dirname "$PYTHON")/ray}
[ -x "$ray" ] || ray=ray
TRIALS=${TRIALS:-20}
CONCURRENT=${CONCURRENT:-$nodes}
port=$(( 20000 + SLURM_JOB_ID % 20000 ))

# Ray wants IP addresses: a node's own when its name resolves (not a loopback alias), else the
# NodeAddr slurmd registered (several slurmd on one machine, clusters without DNS for nodes).
node_ip() {
    local ip
    ip=$(getent ahostsv4 "$1" 2>/dev/null | awk '$1 !~ /^127\./ {print $1; exit}')
    if [ -z "$ip" ]; then
        ip=$(scontrol show node "$1" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
        ip=$(getent ahostsv4 "$ip" 2>/dev/null | awk '{print $1; exit}')
    fi
    echo "${ip:-$(hostname -I | awk '{print $1}')}"
}
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
head_ip=$(node_ip "${hosts[0]}")
cpus=${SLURM_CPUS_ON_NODE:-1}
[ "$gpus" -gt 0 ] 2>/dev/null || gpus=0  # GPUs per node, read by _common.sh
# one token per job, in the environment of every step (srun exports it to all nodes)
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')
export RAY_AUTH_TOKEN
export RAY_USAGE_STATS_ENABLED=0
# at the end the search is over: nothing to drain (the step's SIGTERM reaches the GCS as well, so
# a drain would only time out)
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
node_args=(--num-cpus="$cpus" --num-gpus="$gpus" --block)

# Each `ray start --block` is a job step in the background (steps 0, 1, ... in launch order): on
# SIGTERM it stops its node's Ray processes. At the end they get SIGTERM through scancel (killing
# srun itself would SIGKILL the step). No `ray stop`: it kills every Ray process on the machine,
# other jobs' included.
steps=()
stop_ray() {
    local i
    for (( i = ${#steps[@]} - 1; i >= 0; i-- )); do  # the workers, then the head
        scancel --signal=TERM "$SLURM_JOB_ID.$i" 2>/dev/null || true
        wait "${steps[$i]}" 2>/dev/null || true
    done
    echo "hpc-reid tune: Ray cluster stopped"
}
trap stop_ray EXIT

echo "hpc-reid tune: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: Ray head ${hosts[0]}" \
    "($head_ip:$port), $nodes node(s) x $cpus CPU(s), $gpus GPU(s)"
srun --nodes=1 --ntasks=1 --nodelist="${hosts[0]}" --cpus-per-task="$cpus" --overlap \
    "$ray" start --head --node-ip-address="$head_ip" --port="$port" \
    --ray-client-server-port=$(( port + 1 )) --include-dashboard=false \
    --temp-dir="/tmp/ray-$SLURM_JOB_ID" "${node_args[@]}" &
steps+=($!)
for host in "${hosts[@]:1}"; do
    until "$ray" status --address="$head_ip:$port" >/dev/null 2>&1; do sleep 1; done
    srun --nodes=1 --ntasks=1 --nodelist="$host" --cpus-per-task="$cpus" --overlap \
        "$ray" start --address="$head_ip:$port" --node-ip-address="$(node_ip "$host")" \
        "${node_args[@]}" &
    steps+=($!)
done

# wait until every node has joined (or a step died)
deadline=$(( SECONDS + ${RAY_START_TIMEOUT:-180} ))
while :; do
    joined=$("$ray" status --address="$head_ip:$port" 2>/dev/null | grep -c '^ *1 node_' || true)
    [ "$joined" -ge "$nodes" ] && break
    for pid in "${steps[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "hpc-reid tune: a ray start step exited" >&2; exit 1; }
    done
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "hpc-reid tune: only $joined of $nodes Ray node(s) joined" >&2
        exit 1
    fi
    sleep 1
done
"$ray" status --address="$head_ip:$port"

args=(--config "$CONFIG" --space "$SPACE" --trials "$TRIALS" --concurrent "$CONCURRENT")
args+=(--address "$head_ip:$port")
# EXTRA is split on spaces on purpose: it holds several arguments.
# shellcheck disable=SC2206
args+=(${EXTRA:-})
echo "hpc-reid tune: $PYTHON -m hpc_reid.cli tune ${args[*]}"
"$PYTHON" -m hpc_reid.cli tune "${args[@]}"
