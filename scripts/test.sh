#!/usr/bin/env bash
# Installs everything the tests need into .venv and runs them.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k protocol`).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ".[cpu,metal,test]" ./plugins/cpu ./plugins/metal "mlx[cpu]" ./tests/thirdparty_plugin
# CuPy and NVRTC (no GPU needed): the CUDA plugin's enumeration reasons and kernel compilation are
# tested here; its tests install and remove the plugin itself.
python -m pip install --quiet cupy-cuda12x nvidia-cuda-nvrtc-cu12

# llama.cpp itself, with its RPC backend: the client and the reference server the tests check us against.
WHEEL=$(PYTHON=python bash scripts/llama_wheel.sh)
python -m pip install --quiet "$WHEEL"

python -m pytest "$@"
