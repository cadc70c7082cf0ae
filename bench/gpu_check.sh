#!/usr/bin/env bash
# The GPU check: the first thing to run on a GPU machine, in one call of at most 8 minutes.
#
#   bash bench/gpu_check.sh --out DIR [--wheels /tmp/gw] [--site /tmp/site] [--skip-build]
#                           [--budget-s 450] [--only STEP ...]
#
# Installs the wheels carried to --wheels (../shared/tools/gpu-wheels.sh's parts are joined first)
# without the network, builds the Cython and CUDA ranking kernels in place, then runs the gpu tests,
# compute-sanitizer, and the benchmarks, each step under its own timeout (bench/gpu_check.py says
# which and why). Writes DIR/gpu_check.json, DIR/gpu_check.md (a bench/RESULTS.md entry) and
# DIR/logs/. Exits 0 when no step failed, also on a machine without a GPU (the GPU steps are then
# skipped, with the reason); 1 when a step failed or timed out.
#
# It needs no virtual environment: python3 from PATH (or $PYTHON) with torch, run from a working
# tree of the repository (hpc_reid is imported from the tree, not installed).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! command -v "$python" >/dev/null; then
    echo "gpu_check.sh: $python not found on PATH (set PYTHON)" >&2
    exit 2
fi
exec "$python" bench/gpu_check.py --command "bash bench/gpu_check.sh $*" "$@"
