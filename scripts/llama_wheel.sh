#!/usr/bin/env bash
# Prints the path of a llama-cpp-python wheel built with the ggml RPC backend,
# building it first if no cached copy exists.
#
# The build takes 6-8 minutes on 2 cores, so the wheel is cached outside the
# repository, keyed by version, CMake flags and interpreter:
#   ${RPCSERVER_WHEEL_CACHE:-~/.cache/rpcserver/wheels}/llama-cpp-python-<version>-<key>/
# Flags: RPC on; AVX2/FMA/F16C fixed instead of -march=native, because these
# VMs report AMX and a native build's AMX matmul segfaults here.
set -euo pipefail

VERSION=0.3.36
FLAGS="-DGGML_RPC=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
PY=${PYTHON:-python3}
PYTAG=$("$PY" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
KEY=$(printf '%s|%s|%s' "$VERSION" "$FLAGS" "$PYTAG" | sha256sum | cut -c1-12)
ROOT=${RPCSERVER_WHEEL_CACHE:-$HOME/.cache/rpcserver/wheels}
DIR="$ROOT/llama-cpp-python-$VERSION-$PYTAG-$KEY"

shopt -s nullglob
wheels=("$DIR"/llama_cpp_python-*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    echo "${wheels[0]}"
    exit 0
fi

mkdir -p "$ROOT"
TMP=$(mktemp -d "$ROOT/.build-XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "building llama-cpp-python $VERSION with: $FLAGS (cached in $DIR)" >&2
CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel --no-deps --no-binary :all: -w "$TMP/out" "llama-cpp-python==$VERSION" >&2
mkdir -p "$TMP/final"
mv "$TMP"/out/llama_cpp_python-*.whl "$TMP/final/"
if ! mv -T "$TMP/final" "$DIR" 2>/dev/null; then
    echo "another build finished first; using it" >&2
fi
wheels=("$DIR"/llama_cpp_python-*.whl)
echo "${wheels[0]}"
