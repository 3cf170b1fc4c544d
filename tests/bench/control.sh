#!/usr/bin/env bash
# Control-plane benchmark (issue 15): N simulated agents (the real agent control
# client, in one process, on loopback) enroll with the real skymesh-controller,
# hold netmaps and report their links as real agents do (random RTT jitter, the
# occasional link down; 3 of them are transit nodes); then K new nodes join one
# after another and the delay until each agent has the new node's peer entry is
# measured. See controller/examples/control_bench.rs for the model and what is
# measured.
#
# Usage: tests/bench/control.sh          N = 100, 300, 1000, 3000 in turn, 20 changes each
#        tests/bench/control.sh N [K]    one size (K defaults to 20)
#        CONTROL_BENCH_SIZES="100 300" tests/bench/control.sh    chosen sizes
# Each size runs against a fresh controller. Prints one markdown table, the
# figures beside issue 15's targets (PASS/MISS), and how the netmap bytes per
# change grow from one size to the next. A missed target is not a failure; the
# script exits non-zero only when a run broke (the controller exited, the agents
# did not converge, a change was not delivered).
# Extra options go to the bench through CONTROL_BENCH_ARGS, e.g.
#   CONTROL_BENCH_ARGS="--concurrency 64 --keep" tests/bench/control.sh 1000 20
# The per-run output and JSON lines are kept in $CONTROL_BENCH_OUT (default: a
# temp dir, printed at the end).
# Needs: cargo, python3. No root. Honours CARGO_TARGET_DIR.
set -euo pipefail

if [ $# -gt 0 ]; then
  SIZES=$1
  K=${2:-20}
else
  SIZES=${CONTROL_BENCH_SIZES:-100 300 1000 3000}
  K=20
fi
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
OUT=${CONTROL_BENCH_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/skymesh-control-bench-out.XXXXXX")}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

echo "== building skymesh-controller and the bench (release)" >&2
(cd "$ROOT" && cargo build --release -q -p skymesh-controller --bins --examples)

broken=0
for N in $SIZES; do
  echo "== $N agents, $K changes" >&2
  status=0
  # shellcheck disable=SC2086 # CONTROL_BENCH_ARGS is a list of options
  "$TARGET/release/examples/control_bench" \
    --controller "$TARGET/release/skymesh-controller" \
    --agents "$N" --changes "$K" ${CONTROL_BENCH_ARGS:-} \
    | tee "$OUT/run-$N.txt" || status=$?
  line=$(grep '^{.*"bench":"control"' "$OUT/run-$N.txt" | tail -n 1 || true)
  if [ -z "$line" ]; then
    line="{\"bench\":\"control\",\"agents\":$N,\"error\":\"the bench exited ($status) without a result\"}"
  fi
  printf '%s\n' "$line" >>"$RESULTS"
  if [ "$status" -ne 0 ]; then
    broken=1
    echo "== $N agents: the run broke (exit $status); going on with the next size" >&2
  fi
done

python3 - "$RESULTS" <<'PY'
import json, sys

runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]

def dur(s):
    if s is None:
        return "—"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.0f} ms"

def mib(b):
    return "—" if b is None else f"{b / 2**20:.0f} MiB"

def pct(c):
    return "—" if c is None else f"{c * 100:.1f}%"

def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d

def judged(value, target, verdict):
    if target is None:
        return value
    return f"{value} (< {target}: {verdict or '—'})"

print()
print("Control plane, agents reporting links, on loopback; targets of issue 15 (a size is held to the target of the next larger one)")
print()
print("| agents | cold start | change → all agents p50 / p99 | controller CPU idle (bench) | controller CPU changing (bench) | controller peak RSS | netmap bytes per change: all / net of link-report updates | sessions dropped for slowness (agent / 'not keeping up') |")
print("|---|---|---|---|---|---|---|---|")
for r in runs:
    n = r["agents"]
    if r.get("error") and r.get("cold_start_s") is None:
        print(f"| {n:,} | **broken:** {r['error'].splitlines()[0]} | | | | | | |")
        continue
    t = r.get("target") or {}
    v = r.get("verdict") or {}
    tgt = lambda key, fmt: fmt(t[key]) if key in t else None
    cold = judged(dur(r["cold_start_s"]), tgt("cold_start_s", dur), v.get("cold_start"))
    p99 = judged(f"{dur(get(r, 'delay_s', 'p50'))} / {dur(get(r, 'delay_s', 'p99'))}",
                 tgt("p99_s", dur), v.get("p99"))
    idle = judged(f"{pct(get(r, 'idle_cpu_cores', 'controller'))} ({pct(get(r, 'idle_cpu_cores', 'bench'))})",
                  tgt("idle_cpu_cores", lambda c: f"{c * 100:.0f}%"), v.get("idle_cpu"))
    busy = f"{pct(get(r, 'changes_cpu_cores', 'controller'))} ({pct(get(r, 'changes_cpu_cores', 'bench'))})"
    rss = judged(mib(get(r, "controller_rss_bytes", "hwm")), tgt("rss_bytes", mib), v.get("rss"))
    b = r.get("netmap_bytes_per_change")
    nb = r.get("netmap_net_bytes_per_change")
    kib = lambda x: "n/a" if x is None else f"{x / 1024:.1f} KiB"
    bytes_ = f"{kib(b)} / {kib(nb)}"
    dropped = f"{r.get('disconnects')} / {r.get('dropped_slow')} (0: {v.get('dropped', '—')})"
    if r.get("error"):
        dropped += f" — **broken:** {r['error'].splitlines()[0]}"
    print(f"| {n:,} | {cold} | {p99} | {idle} | {busy} | {rss} | {bytes_} | {dropped} |")

pairs = [(a, b) for a, b in zip(runs, runs[1:])]
if pairs:
    print()
    print("Netmap bytes per change from one size to the next (at most linear: the bytes grow by no more than the agents). The figure includes the path updates link reports cause during the changes, which grow with the pairs and with how long the changes take; the net figure subtracts the rate measured while idle, a noisy estimate, so the check uses the whole one:")
    print()
    for a, b in pairs:
        ba, bb = a.get("netmap_bytes_per_change"), b.get("netmap_bytes_per_change")
        grow_n = b["agents"] / a["agents"]
        if not ba or bb is None:
            print(f"- {a['agents']:,} → {b['agents']:,} agents (×{grow_n:.1f}): n/a")
            continue
        grow_b = bb / ba
        verdict = "PASS" if grow_b <= grow_n * 1.05 else "MISS"
        per = f"{ba / a['agents']:.0f} → {bb / b['agents']:.0f} bytes per agent"
        print(f"- {a['agents']:,} → {b['agents']:,} agents (×{grow_n:.1f}): bytes ×{grow_b:.2f} ({per}): {verdict}")
PY
echo "== per-run output and JSON lines in $OUT" >&2
exit "$broken"
