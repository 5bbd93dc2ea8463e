#!/usr/bin/env bash
# tunegate's test command (the README's, and CI's through .ci/run).
#
# Installs what the suite needs when it is absent, then runs every test in one build profile:
#   - .venv with the `openai` SDK and `schemathesis` (the Python end-to-end checks),
#   - the default model in models/ (one slow test serves the real SmolLM2 file),
#   - redis-server (apt) for the Redis log-store tests,
#   - prometheus (apt: `prometheus` and `promtool`) for the metrics tests, which then require it,
# then `cargo nextest run` (or `cargo test` where nextest is not installed).
# Extra arguments go to the test runner, e.g. `scripts/test.sh api::chat`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Redis log-store tests start their own redis-server on a loopback port.
if ! command -v redis-server >/dev/null 2>&1; then
    echo "== installing redis-server"
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq redis-server >/dev/null
fi

# The metrics tests check a scrape with promtool and query a real Prometheus server. They
# fail, not skip, without them when TUNEGATE_REQUIRE_PROMETHEUS (or CI) is set.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "== installing prometheus"
    if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
    $apt_get update -qq && DEBIAN_FRONTEND=noninteractive $apt_get install -y -qq --no-install-recommends prometheus >/dev/null
fi
export TUNEGATE_REQUIRE_PROMETHEUS=1

venv="${TUNEGATE_VENV:-.venv}"
requirements=tests/python/requirements.txt
if ! cmp -s "$requirements" "$venv/.tunegate-requirements"; then
    echo "== preparing $venv ($(tr '\n' ' ' < "$requirements"))"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/.tunegate-requirements"
fi
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

exec "${runner[@]}" --no-fail-fast "$@"
