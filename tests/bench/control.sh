#!/usr/bin/env bash
# Control-plane benchmark (issue 4): N simulated agents (the real agent control
# client, in one process, on loopback) enroll with the real skymesh-controller
# and hold netmaps; then K new nodes join one after another, and the delay until
# each of the N agents has the new node's peer entry is measured (p50/p90/p99/max),
# with the time to converge and the controller's RSS.
# Targets at N = 1,000 on a 2-core machine: p99 < 1 s, controller RSS < 200 MB.
#
# Usage: tests/bench/control.sh [N] [K]      (defaults: 1000 agents, 20 changes)
# Extra options go to the bench through CONTROL_BENCH_ARGS, e.g.
#   CONTROL_BENCH_ARGS="--concurrency 64 --keep" tests/bench/control.sh 1000 20
# Needs: cargo. No root. Honours CARGO_TARGET_DIR.
set -euo pipefail

N=${1:-1000}
K=${2:-20}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac

echo "== building skymesh-controller and the bench (release)" >&2
(cd "$ROOT" && cargo build --release -q -p skymesh-controller --bins --examples)

echo "== $N agents, $K changes" >&2
# shellcheck disable=SC2086 # CONTROL_BENCH_ARGS is a list of options
"$TARGET/release/examples/control_bench" \
  --controller "$TARGET/release/skymesh-controller" \
  --agents "$N" --changes "$K" ${CONTROL_BENCH_ARGS:-}
