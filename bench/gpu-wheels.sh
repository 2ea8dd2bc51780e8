#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before bench/gpu.sh on a GPU machine whose python3
# lacks coremerge's pure-Python needs (the lent H200's image has torch, peft, safetensors,
# transformers, pytest and hypothesis, but no pydantic): downloads the missing wheels for
# CPython 3.12 on x86_64 into .whl/ (git-ignored). Carry .whl with the working tree; gpu.sh
# installs them into a private folder before anything imports them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for name in pydantic pydantic_core annotated_types typing_inspection; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$name==$(ver "$name")"
done
ls -l .whl
