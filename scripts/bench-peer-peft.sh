#!/usr/bin/env bash
# The PEFT (torch CPU) peer of `benches/training.rs`: builds a venv outside the repo on first
# use (PyPI only: torch, transformers, peft, gguf; large wheels, minutes) and runs
# benches/peft_peer.py on the same model, data shape and thread count.
# Environment: TUNEGATE_PEFT_VENV (default /tmp/peftvenv), TUNEGATE_BENCH_MODEL,
# TUNEGATE_BENCH_THREADS (2), TUNEGATE_BENCH_STEPS (4), TUNEGATE_BENCH_SETTINGS (all16,qv8).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TUNEGATE_PEFT_VENV:-/tmp/peftvenv}"
if ! "$venv/bin/python" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check torch transformers peft gguf
fi
exec "$venv/bin/python" benches/peft_peer.py \
    --gguf "${TUNEGATE_BENCH_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}" \
    --threads "${TUNEGATE_BENCH_THREADS:-2}" \
    --steps "${TUNEGATE_BENCH_STEPS:-4}" \
    --settings "${TUNEGATE_BENCH_SETTINGS:-all16,qv8}"
