#!/usr/bin/env bash
# Create .venv at the repository root and install coremerge with its test extras.
# torch is pinned to the CPU build that lies on these machines (/opt/wheels); elsewhere pip
# fetches the same version from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ls /opt/wheels/torch-2.13.0* >/dev/null 2>&1; then
  .venv/bin/pip install -q /opt/wheels/torch-2.13.0*.whl
else
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
