#!/usr/bin/env bash
# Builds skymesh's fuzz targets (tests/fuzz) and runs each for SECONDS.
#
#   tests/fuzz.sh SECONDS [TARGET...]   build, then run each target (all by default)
#   tests/fuzz.sh build                 build only
#   tests/fuzz.sh list                  the targets
#   tests/fuzz.sh seeds                 regenerate tests/fuzz/seeds/ (committed)
#
# libFuzzer with SanitizerCoverage on stable Rust: the instrumentation flags
# cargo-fuzz would pass, without a sanitizer (that alone needs nightly), added
# by tests/fuzz/rustc-wrapper.sh to the crates under test only. The build has
# debug assertions and overflow checks on, and its own target dir
# ($SKYMESH_FUZZ_TARGET_DIR, default target/fuzz), so the main build is never
# invalidated.
#
# Each target's corpus grows in $SKYMESH_FUZZ_CORPUS/<target> (default
# target/fuzz/corpus; kept between runs) on top of the committed seeds in
# tests/fuzz/seeds/<target>. Crash inputs and logs go to a scratch dir, named
# at the start and the end ($SKYMESH_FUZZ_SCRATCH to choose it). Exit status:
# non-zero if any target crashed, leaked, timed out or ran out of memory.
set -euo pipefail

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

repo=$(cd "$(dirname "$0")/.." && pwd)
fuzz_dir=$repo/tests/fuzz
target_dir=${SKYMESH_FUZZ_TARGET_DIR:-$repo/target/fuzz}
corpus_root=${SKYMESH_FUZZ_CORPUS:-$target_dir/corpus}
triple=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$target_dir/$triple/fuzz
targets=(control_frame netmap agent_config controller_config packet node_datagram node_inner gateway_request)
rss_limit_mb=${SKYMESH_FUZZ_RSS_MB:-1024}
# Targets run side by side, one per core by default (libFuzzer uses one each).
jobs=${SKYMESH_FUZZ_JOBS:-$(nproc)}

# Largest input per target: configs and netmaps need room, packets less.
max_len() {
    case $1 in
    agent_config | controller_config | netmap | control_frame) echo 16384 ;;
    node_inner | node_datagram) echo 8192 ;;
    *) echo 4096 ;;
    esac
}

cargo_fuzz() {
    # Build scripts and proc-macros are compiled for the host without the
    # instrumentation: hence --target.
    RUSTC_WRAPPER=$fuzz_dir/rustc-wrapper.sh \
        RUSTFLAGS= CARGO_ENCODED_RUSTFLAGS= \
        cargo "$1" --profile fuzz --manifest-path "$fuzz_dir/Cargo.toml" \
        --target "$triple" --target-dir "$target_dir" "${@:2}"
}

build() {
    local start=$SECONDS
    echo "fuzz: building the targets in $target_dir"
    cargo_fuzz build --bins
    echo "fuzz: build took $((SECONDS - start)) s"
}

# The last libFuzzer status line ("#N DONE cov: C ft: F corp: ... exec/s: E")
# and the crash count of one run, as one line.
figures() {
    local name=$1 log=$2 crashes=$3 secs=$4
    local line execs cov ft corp eps
    line=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
    execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$line")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$line")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$line")
    corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$line")
    eps=$(sed -nE 's/.* exec\/s: ([0-9]+).*/\1/p' <<<"$line")
    printf '%-18s %10s execs %8s exec/s  cov %6s  ft %6s  corpus %5s  %4s s  crashes %s\n' \
        "$name" "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$secs" "$crashes"
}

# Runs target $1 for $2 seconds with scratch dir $3; leaves its figures line
# in $3/$1.figures and "ok" or what went wrong in $3/$1.status.
run_one() {
    local t=$1 seconds=$2 scratch=$3
    local corpus=$corpus_root/$t artifacts=$scratch/$t log=$scratch/$t.log
    mkdir -p "$corpus" "$artifacts"
    local start=$SECONDS status=0
    # -max_total_time stops the fuzzing loop; -timeout catches a hang within
    # one input; new inputs go to the first corpus dir, the seeds stay as
    # they are.
    "$bin_dir/$t" "$corpus" "$fuzz_dir/seeds/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb="$rss_limit_mb" \
        -max_len="$(max_len "$t")" -artifact_prefix="$artifacts/" \
        -print_final_stats=1 >"$log" 2>&1 || status=$?
    local crashes
    crashes=$(find "$artifacts" -type f | wc -l)
    figures "$t" "$log" "$crashes" $((SECONDS - start)) | tee "$scratch/$t.figures"
    if [[ $status -ne 0 || $crashes -gt 0 ]]; then
        echo "exit $status, $crashes input(s) saved" >"$scratch/$t.status"
    else
        echo ok >"$scratch/$t.status"
    fi
}

run() {
    local seconds=$1
    shift
    local selected=("$@")
    [[ ${#selected[@]} -gt 0 ]] || selected=("${targets[@]}")
    for t in "${selected[@]}"; do
        [[ " ${targets[*]} " == *" $t "* ]] || {
            echo "fuzz: no target $t (tests/fuzz.sh list)" >&2
            exit 2
        }
    done
    build
    local scratch=${SKYMESH_FUZZ_SCRATCH:-$(mktemp -d "${TMPDIR:-/tmp}/skymesh-fuzz.XXXXXX")}
    mkdir -p "$scratch"
    export SKYMESH_FUZZ_SCRATCH=$scratch
    echo "fuzz: ${seconds} s per target; crash inputs and logs in $scratch"
    echo "fuzz: $jobs target(s) at a time"
    local running=0
    for t in "${selected[@]}"; do
        if [[ $running -ge $jobs ]]; then
            wait -n || true
            running=$((running - 1))
        fi
        run_one "$t" "$seconds" "$scratch" &
        running=$((running + 1))
    done
    wait || true
    local failed=() summary=()
    for t in "${selected[@]}"; do
        summary+=("$(cat "$scratch/$t.figures")")
        if [[ $(cat "$scratch/$t.status") != ok ]]; then
            failed+=("$t")
            echo "fuzz: $t failed ($(cat "$scratch/$t.status")); its log, $scratch/$t.log, ends:" >&2
            grep -v -E '^#[0-9]+' "$scratch/$t.log" | tail -n 40 >&2
            find "$scratch/$t" -type f -exec echo "fuzz: input: {}" \; >&2
            echo "fuzz: reproduce with $bin_dir/$t <input>" >&2
        fi
    done
    echo "fuzz: summary (${seconds} s per target; logs and crash inputs in $scratch)"
    printf '  %s\n' "${summary[@]}"
    if [[ ${#failed[@]} -gt 0 ]]; then
        echo "fuzz: FAILED: ${failed[*]}" >&2
        exit 1
    fi
    echo "fuzz: no crashes"
}

[[ $# -ge 1 ]] || usage
case $1 in
build) build ;;
list) printf '%s\n' "${targets[@]}" ;;
seeds)
    build
    cargo_fuzz run --example make_seeds
    echo "fuzz: seeds written to $fuzz_dir/seeds"
    ;;
-h | --help) usage ;;
*)
    [[ $1 =~ ^[0-9]+$ && $1 -gt 0 ]] || usage
    run "$@"
    ;;
esac
