#!/usr/bin/env bash
# Runs the coverage-guided fuzz targets (fuzz/, cargo-fuzz + libFuzzer) and appends one line
# per target to fuzz/RESULTS.md. Usage: scripts/fuzz.sh [seconds per target] [target ...]
# (default: 600 s each, every target; two run at a time). Needs `cargo install cargo-fuzz`;
# RUSTC_BOOTSTRAP=1 lets the stable toolchain take the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request chat_template gguf peft_adapter jsonl spool)
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
# Run the built binaries directly: `cargo fuzz run` would rebuild whenever a source changed.
bin="target/$(rustc -vV | sed -n 's/^host: //p')/release"
mkdir -p logs
run() {
    local t="$1"
    mkdir -p "corpus/$t" "artifacts/$t"
    local status=clean
    if ! "$bin/$t" "corpus/$t" -max_total_time="$secs" -rss_limit_mb=3072 -max_len=65536 -timeout=10 \
        -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1; then
        status="FINDING (see fuzz/artifacts/$t and fuzz/logs/$t.log)"
    fi
    local runs
    runs=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "logs/$t.log" | tail -1 || true)
    echo "| $(date -u +%F) | $t | ${secs} s | ${runs:-no summary} | $(ls "corpus/$t" | wc -l) | $status |" >> RESULTS.md
}
[ -f RESULTS.md ] || printf '# Fuzzing results\n\nOne line per run of `scripts/fuzz.sh` (libFuzzer, AddressSanitizer, release build with debug assertions).\n\n| date | target | time | runs | corpus files | result |\n|---|---|---|---|---|---|\n' > RESULTS.md
i=0
for t in "${targets[@]}"; do
    run "$t" &
    i=$((i + 1))
    if [ $((i % 2)) -eq 0 ]; then wait; fi
done
wait
cat RESULTS.md
