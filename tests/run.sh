#!/usr/bin/env bash
# The whole test suite from a fresh clone: creates .venv (Python 3.11 unless $PYTHON says otherwise),
# installs hpc-reid with its test extras, then runs the ruff lint and format checks and pytest.
# Arguments are passed to pytest (e.g. `bash tests/run.sh -k config`).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
