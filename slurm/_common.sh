# Shared by the slurm/ scripts (sourced, not run): the interpreter, the tasks per node and the
# rendezvous of a job's srun'ed tasks. Expects $repo (the repository) and a SLURM job; sets
# PYTHON, gpus (per node), nodes, tasks_per_node, cpus_per_task, MASTER_ADDR, MASTER_PORT and
# exports PYTHONPATH and OMP_NUM_THREADS. The caller runs with `set -euo pipefail`.
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
: "${SLURM_JOB_ID:?run this script with sbatch (or inside salloc)}"

# Tasks per node: one per GPU when the job asked for GPUs (--gpus-per-node 8 or a100:8), else the
# allocation's --ntasks-per-node. Each task then picks cuda:$SLURM_LOCALID.
gpus=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
gpus=${gpus##*:}
if [ "$gpus" -gt 0 ] 2>/dev/null; then
    tasks_per_node=$gpus
else
    tasks_per_node=${SLURM_NTASKS_PER_NODE:-1}
    tasks_per_node=${tasks_per_node%%(*}
fi
nodes=${SLURM_JOB_NUM_NODES:-1}
cpus_per_task=$(( ${SLURM_CPUS_ON_NODE:-$tasks_per_node} / tasks_per_node ))
[ "$cpus_per_task" -ge 1 ] || cpus_per_task=1

# Rendezvous on the allocation's first node. Its name may not resolve (several slurmd on one
# machine, clusters without DNS for compute names): then use the address slurmd registered.
first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
if getent hosts "$first" >/dev/null 2>&1; then
    MASTER_ADDR=$first
else
    MASTER_ADDR=$(scontrol show node "$first" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
    MASTER_ADDR=${MASTER_ADDR:-$(hostname -I | awk '{print $1}')}
fi
# A port derived from the job id: stable across requeue, different for jobs sharing a node.
MASTER_PORT=$(( 15000 + SLURM_JOB_ID % 20000 ))
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}
