#!/usr/bin/env bash
# The steps of a GPU session (the device machine: torch + triton, no network, $OUT comes
# back). Run from the repository root: benchmarks/gpu_run.sh PHASE [PHASE ...]
#
# Expects (carried into the ignored folder .dev/):
#   .dev/llama.cpp.tar.xz      benchmarks/llama_cpp_build.sh trim ...
#   .dev/site/llama_cpp/       llama-cpp-python's package with lib/libggml-base.so (test oracle)
#   .dev/cache/                the tiny test models (GGUFLM_TEST_CACHE)
#   .dev/shared/vocab/         ggml-vocab-llama-spm.gguf (GGUFLM_SHARED)
#   .whl/*.whl                 gguf-py (make_tinyllama.py); fastapi, uvicorn, pydantic & co (the server)
#   .dev/smol.part-*           SmolLM2-135M-Instruct.Q4_1.gguf in pieces (for `accuracy`)
# Work files go to .dev/work (kept while the machine stays warm).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:/tmp/site:$PWD/.dev/site PYTHONUNBUFFERED=1
export GGUFLM_TEST_CACHE=$PWD/.dev/cache GGUFLM_SHARED=$PWD/.dev/shared
OUT=${OUT:-/tmp/out}
W=$PWD/.dev/work
BIN=$W/llama.cpp/build/bin
CUDA_BIN=$W/llama.cpp/build/bin   # llama-bench (the CUDA build; BIN may point at the CPU-only llama-quantize)
mkdir -p "$W" "$OUT"
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/site .whl/*.whl

stamp() { echo "=== $1 $(date +%T)"; }

for phase in "$@"; do
    stamp "$phase"
    case $phase in
    info)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
        ;;
    build)  # in the background; `wait_build` joins it
        (benchmarks/llama_cpp_build.sh build .dev/llama.cpp.tar.xz "$W" > "$OUT/llama_build.log" 2>&1
         echo "EXIT $?" >> "$OUT/llama_build.log") &
        ;;
    build_quantize_cpu)  # llama-quantize alone, CPU-only build (about a minute)
        mkdir -p "$W/q" && tar -C "$W/q" -xJf .dev/llama.cpp.tar.xz
        (cd "$W/q/llama.cpp" && cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF \
            -DLLAMA_OPENSSL=OFF > /dev/null && cmake --build build --target llama-quantize -j "$(nproc)" > /dev/null)
        BIN=$W/q/llama.cpp/build/bin
        ls "$BIN"
        ;;
    tests)
        timeout 420 python3 -m pytest -q tests/cuda -p no:cacheprovider 2>&1 | tail -25
        ;;
    tests_bg)  # in the background (the GPU is otherwise idle while llama-quantize builds); `wait_tests` joins
        (timeout 420 python3 -m pytest -q tests/cuda -p no:cacheprovider > "$OUT/tests.log" 2>&1) &
        TESTS_PID=$!
        ;;
    wait_tests)
        wait "$TESTS_PID"
        tail -5 "$OUT/tests.log"
        ;;
    tinyllama)
        [ -f "$W/tinyllama-f16.gguf" ] || python3 benchmarks/make_tinyllama.py "$W/tinyllama-f16.gguf" \
            --vocab .dev/shared/vocab/ggml-vocab-llama-spm.gguf
        ;;
    wait_build)
        wait
        tail -3 "$OUT/llama_build.log"
        ;;
    quantize)
        for q in Q4_K_M Q4_0; do
            [ -f "$W/tinyllama-$q.gguf" ] || "$BIN/llama-quantize" "$W/tinyllama-f16.gguf" "$W/tinyllama-$q.gguf" $q \
                > "$OUT/quantize-$q.log" 2>&1 || echo "quantize $q failed"
        done
        ls -la "$W"
        ;;
    bench)
        timeout 420 python3 benchmarks/bench_cuda.py --models Q4_K_M="$W/tinyllama-Q4_K_M.gguf" Q4_0="$W/tinyllama-Q4_0.gguf" \
            --llama-bench "$CUDA_BIN/llama-bench" --out "$OUT/bench.json" 2> "$OUT/bench.err" | tail -12
        ;;
    bench_ours)
        timeout 300 python3 benchmarks/bench_cuda.py --models Q4_K_M="$W/tinyllama-Q4_K_M.gguf" Q4_0="$W/tinyllama-Q4_0.gguf" \
            --ours-only --out "$OUT/bench_ours.json" 2> "$OUT/bench_ours.err" | tail -6
        ;;
    server)  # continuous batching: batched decode steps in process, then 32 streams over HTTP
        timeout 300 python3 benchmarks/bench_server_cuda.py -m "$W/tinyllama-Q4_K_M.gguf" --streams 32 --tokens 256 \
            --rounds 3 --json "$OUT/server_cuda.json" 2>&1 | grep -v Warn | tail -14
        ;;
    profile)
        timeout 180 python3 benchmarks/profile_cuda.py "$W/tinyllama-Q4_K_M.gguf" 2>&1 | grep -v Warn | tail -40
        timeout 120 python3 benchmarks/profile_cuda.py "$W/tinyllama-Q4_0.gguf" > "$OUT/profile_q4_0.txt" 2>&1
        ;;
    gemm)  # the fused GEMM: its tests, per-shape times against dequantization + cuBLAS, then the
           # prefill / batched-step profile with each many-token path (needs `tinyllama` + `quantize`)
        timeout 200 python3 -m pytest -q tests/cuda/test_gemm.py -p no:cacheprovider 2>&1 | tail -4
        timeout 240 python3 benchmarks/gemm_bench.py --m 1,2,8,16,32,64,128,512 --alt --json "$OUT/gemm_bench.json" \
            2>&1 | grep -v Warn | tee "$OUT/gemm_bench.txt" | tail -40
        for q in Q4_K_M Q4_0; do
            for mm in cublas gemm; do
                GGUFLM_MATMUL=$mm timeout 150 python3 benchmarks/prefill_profile.py "$W/tinyllama-$q.gguf" \
                    > "$OUT/prefill-$q-$mm.txt" 2>&1
                echo "-- $q $mm"; grep -E "^pp|^eager|^batched|GPU kernel|^one cold" "$OUT/prefill-$q-$mm.txt"
            done
        done
        ;;
    sweep)
        timeout 200 python3 benchmarks/gemv_sweep.py --json "$OUT/gemv_sweep.json" > "$OUT/gemv_sweep.txt" 2>&1
        tail -4 "$OUT/gemv_sweep.txt"
        ;;
    accuracy)  # SmolLM2 Q4_1 and llama.cpp's requantizations of it, against the float64 reference
        S=$W/SmolLM2-135M-Instruct.Q4_1.gguf
        [ -f "$S" ] || cat .dev/smol.part-* > "$S"
        sha256sum "$S"
        models=("$S")
        for q in Q4_0 Q4_K_M Q5_K_M Q6_K Q8_0 Q3_K_M IQ4_NL; do
            [ -f "$W/smol-$q.gguf" ] || "$BIN/llama-quantize" --allow-requantize "$S" "$W/smol-$q.gguf" $q \
                > "$OUT/smol-quantize-$q.log" 2>&1 || echo "quantize $q failed"
            models+=("$W/smol-$q.gguf")
        done
        timeout 420 python3 benchmarks/accuracy_cuda.py "${models[@]}" --json "$OUT/accuracy.json" 2>&1 | grep -v Warn
        ;;
    *)
        echo "unknown phase $phase"
        ;;
    esac
done
stamp end
