#!/usr/bin/env bash
# llama.cpp's CUDA build, for the baseline that `benchmarks/bench_cuda.py` compares against.
#
#   benchmarks/llama_cpp_build.sh trim SRC OUT.tar.xz   (here) pack a trimmed copy of the
#       llama.cpp source tree SRC (the one llama-cpp-python 0.3.36 vendors): the CUDA and
#       CPU backends, libllama, common, and the two tools we run; no models, docs, tests,
#       examples, web UI sources or other backends. tools/CMakeLists.txt is replaced by one
#       that adds only llama-bench, quantize and llama-server (with mtmd, which it links, and
#       an empty web UI: the server's API is what we compare against).
#   benchmarks/llama_cpp_build.sh build OUT.tar.xz DIR  (on the GPU machine) unpack into
#       DIR and build llama-bench, llama-quantize and llama-server for sm_90 with ninja.
set -euo pipefail

case "${1:-}" in
trim)
    src=$2 out=$3
    tmp=$(mktemp -d)
    dst=$tmp/llama.cpp
    mkdir -p "$dst/ggml/src" "$dst/tools"
    cp -r "$src"/{CMakeLists.txt,LICENSE,cmake,include,src,common,vendor} "$dst/"
    rm -rf "$dst/vendor/miniaudio"/*.h.gz 2>/dev/null || true
    cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$dst/ggml/"
    # ggml/src: the core files and the CPU + CUDA backends only
    find "$src/ggml/src" -maxdepth 1 -type f -exec cp {} "$dst/ggml/src/" \;
    cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda} "$dst/ggml/src/"
    cp -r "$src"/tools/{llama-bench,quantize,server,mtmd} "$dst/tools/"
    rm -rf "$dst/tools/server/tests" "$dst/tools/server/bench"
    mkdir -p "$dst/tools/ui" "$dst/scripts"
    cp "$src"/tools/ui/{CMakeLists.txt,ui.cpp.in,ui.h.in,sources.cmake} "$dst/tools/ui/"
    cp "$src"/scripts/ui-assets.cmake "$dst/scripts/"
    printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\nadd_subdirectory(quantize)\nadd_subdirectory(mtmd)\nadd_subdirectory(ui)\nadd_subdirectory(server)\n' \
        > "$dst/tools/CMakeLists.txt"
    tar -C "$tmp" -cJf "$out" llama.cpp
    rm -rf "$tmp"
    ls -la "$out"
    ;;
build)
    tarball=$2 dir=$3
    mkdir -p "$dir"
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$tarball" "$dir"  # no xz binary needed
    cd "$dir/llama.cpp"
    cmake -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON >/dev/null
    cmake --build build --target llama-bench llama-quantize llama-server -j "$(nproc)"
    ls -la build/bin
    ;;
*)
    echo "usage: $0 trim SRC OUT.tar.xz | build OUT.tar.xz DIR" >&2
    exit 2
    ;;
esac
