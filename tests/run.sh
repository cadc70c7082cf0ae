#!/usr/bin/env bash
# The whole test suite from a fresh clone: creates .venv (Python 3.11 unless $PYTHON says otherwise),
# installs hpc-reid with its test extras, then runs the ruff lint and format checks and pytest.
# Arguments are passed to pytest (e.g. `bash tests/run.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
# The SLURM integration tests run real daemons: install Debian's where we can (root with apt-get);
# skipped when they are already there, so a second run does nothing here.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null; then
    echo "tests/run.sh: installing slurmctld slurmd slurm-client for the SLURM tests" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client >/dev/null
fi
# DeepSpeed (test extra): no op is compiled at install; its run-time op builds go to a cache
export DS_BUILD_OPS=0
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
# A fresh .venv with the test extras takes about 7.2 GiB (torch's CUDA build alone 5.5); pip's cache
# is off so that nothing is kept twice. Say so up front when the disk cannot hold it.
python=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
    free_kib=$(df -Pk . | awk 'NR == 2 {print $4}')
    if [ "${free_kib:-0}" -lt $((9 * 1024 * 1024)) ]; then
        echo "tests/run.sh: only $((free_kib / 1024)) MiB free under $PWD; a new .venv needs about" \
            "7.2 GiB (torch, DALI, DeepSpeed, Ray): the install below may fail for lack of space" >&2
    fi
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --no-cache-dir -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
