#!/usr/bin/env bash
# RUSTC_WRAPPER for the fuzz build (see tests/fuzz.sh): adds libFuzzer's
# SanitizerCoverage instrumentation to the crates whose code the fuzzers explore
# (ours and the parsers they call) and to nothing else, which keeps the build
# within CI's budget. Build scripts and proc-macros (compiled without --target)
# are never instrumented. Changing the list below needs `cargo clean` of the
# fuzz target dir: cargo does not see what a wrapper adds.
set -euo pipefail
rustc=$1
shift
crate=
for_target=0
prev=
for arg in "$@"; do
    [[ $prev == --crate-name ]] && crate=$arg
    [[ $arg == --target || $arg == --target=* ]] && for_target=1
    prev=$arg
done
case "$crate" in
skymesh_wire | skymesh_agent | skymesh_controller | skymesh_fuzz | \
    agent_config | controller_config | control_frame | gateway_request | \
    netmap | node_datagram | node_inner | packet | \
    serde_json | toml | toml_edit | toml_parser | toml_datetime | winnow | \
    ipnet | humantime | base64)
    if [[ $for_target == 1 ]]; then
        exec "$rustc" "$@" \
            -Cpasses=sancov-module \
            -Cllvm-args=-sanitizer-coverage-level=4 \
            -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
            -Cllvm-args=-sanitizer-coverage-pc-table \
            -Cllvm-args=-sanitizer-coverage-trace-compares \
            -Cllvm-args=-sanitizer-coverage-stack-depth \
            -Cllvm-args=-simplifycfg-branch-fold-threshold=0 \
            --cfg fuzzing
    fi
    ;;
esac
exec "$rustc" "$@"
