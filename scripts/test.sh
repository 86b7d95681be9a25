#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs them.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k protocol`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ".[cpu,test]" ./plugins/cpu ./tests/thirdparty_plugin

# llama.cpp itself, with its RPC backend: the client and the reference server the tests check us against.
WHEEL=$(PYTHON=python bash scripts/llama_wheel.sh)
python -m pip install --quiet "$WHEEL"

python -m pytest "$@"
