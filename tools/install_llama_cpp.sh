#!/usr/bin/env bash
# Install llama-cpp-python (the test oracle) built portably, once per set of build flags.
#
# llama.cpp's default build uses -march=native, which on Intel Sapphire Rapids turns on its
# AMX matmul path (ggml_backend_amx_mul_mat), which crashes there (llama.cpp #20824). We build
# for x86-64-v3 (AVX2/FMA/F16C) instead. pip's own wheel cache is keyed by the source, not by
# CMAKE_ARGS, so it could hand back a native build made earlier: the wheel is built here with
# --no-cache-dir and kept in our cache under a key of the version and the flags.
set -euo pipefail
PYTHON=${PYTHON:-python3}
SPEC=${LLAMA_CPP_SPEC:-llama-cpp-python==0.3.36}
case "$(uname -m)" in
    x86_64) FLAGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF} ;;
    *) FLAGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF} ;;
esac
KEY=$(printf '%s|%s|%s' "$SPEC" "$FLAGS" "$($PYTHON -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-16)
DIR=${GGUFLM_WHEEL_CACHE:-$HOME/.cache/gguflm/wheels}/$KEY
if ! ls "$DIR"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building $SPEC portably ($FLAGS); a few minutes (about 4 on 2 cores), once" >&2
    mkdir -p "$DIR.tmp"
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        $PYTHON -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python -w "$DIR.tmp" "$SPEC"
    rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
fi
# llama-cpp-python's runtime dependencies come from the index; the library from our wheel.
$PYTHON -m pip install -q "$DIR"/llama_cpp_python-*.whl
