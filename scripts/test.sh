#!/usr/bin/env bash
# tunegate's test command (the README's, and CI's through .ci/run).
#
# Installs what the suite needs when it is absent, then runs every test in one build profile:
#   - .venv with the `openai` SDK and `schemathesis` (the Python end-to-end checks),
#   - the default model in models/ (one slow test serves the real SmolLM2 file),
# then `cargo nextest run` (or `cargo test` where nextest is not installed).
# Extra arguments go to the test runner, e.g. `scripts/test.sh api::chat`.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${TUNEGATE_VENV:-.venv}"
if ! "$venv/bin/python" -c 'import openai, schemathesis' >/dev/null 2>&1; then
    echo "== creating $venv (openai, schemathesis)"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check openai schemathesis
fi
export TUNEGATE_VENV="$(cd "$venv" && pwd)"

if [ ! -s models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
    echo "== fetching the default model"
    cargo run --quiet -- model fetch
fi

if cargo nextest --version >/dev/null 2>&1; then
    exec cargo nextest run --no-fail-fast "$@"
else
    exec cargo test --no-fail-fast "$@"
fi
