#!/usr/bin/env bash
# AI gateway overhead (issue 6): the same sample backend (skymesh-ai-backend)
# called directly, through nginx as a plain reverse proxy (Debian's package,
# keep-alive upstream, 2 workers), and through skymesh-controller's AI gateway
# (key check, rate limit, route, residency, breaker, credential injection,
# streaming relay), side by side in one run on loopback.
#
# For each target: open-loop runs at fixed rates (latency measured from each
# request's scheduled time, so queueing counts) and a closed-loop saturation run.
# Reported: p50/p99 per target, the added p50/p99 of each proxy over direct, max
# throughput, and the gateway/nginx throughput ratio.
# Targets: gateway p99 overhead < 1 ms at 1,000 req/s; throughput >= 0.8x nginx.
#
# Usage: tests/bench/ai_gateway.sh [SECONDS_PER_RUN]     (default 10)
#   ROUNDS=3 RATES="500 1000 2000" CONNS=32 SAT_CONNS=64 ACCESS_LOG=0 tests/bench/ai_gateway.sh
# Every cell (target x load) runs ROUNDS times, interleaved; the report gives
# medians and the hypervisor's steal time in each cell. ACCESS_LOG=1 turns on a
# line per request in both proxies: nginx's access log and the gateway's audit
# line (SKYMESH_LOG=info), each to a file.
# Needs: cargo, nginx (installed with apt-get if missing), python3. No root
# needed except for that install. Honours CARGO_TARGET_DIR.
set -euo pipefail

SECS=${1:-10}
ROUNDS=${ROUNDS:-3}
if [ "${ACCESS_LOG:-0}" = 1 ]; then GATEWAY_LOG=info; else GATEWAY_LOG=warn; fi
RATES=${RATES:-"500 1000 2000"}
CONNS=${CONNS:-32}
SAT_CONNS=${SAT_CONNS:-64}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BACKEND_PORT=18100
NGINX_PORT=18180
GATEWAY_PORT=18190
API_PORT=18170

if ! command -v nginx >/dev/null; then
  echo "== installing nginx (Debian package)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
fi

echo "== building the controller, the sample backend and the load generator (release)" >&2
(cd "$ROOT" && cargo build --release -q -p skymesh-controller --bin skymesh-controller \
  && cargo build --release -q -p skymesh-tests --bin skymesh-ai-backend --bin skymesh-loadgen)
BIN=$TARGET/release

WORK=$(mktemp -d /tmp/skymesh-ai-bench.XXXXXX)
NGINX_ACCESS_LOG=off
[ "$GATEWAY_LOG" = info ] && NGINX_ACCESS_LOG=$WORK/nginx-access.log
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  exit 1
}

# The backend, with a credential the gateway injects.
umask 077
echo "sk-upstream-bench-$RANDOM$RANDOM" >"$WORK/upstream.key"
UPSTREAM_KEY=$(cat "$WORK/upstream.key")
"$BIN/skymesh-ai-backend" --listen 127.0.0.1:$BACKEND_PORT --name bench \
  --api-key-file "$WORK/upstream.key" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)

# nginx: a plain keep-alive reverse proxy, as many workers as the gateway's threads.
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log $NGINX_ACCESS_LOG;
  client_body_temp_path $WORK/nginx;
  proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx;
  scgi_temp_path $WORK/nginx;
  upstream backend { server 127.0.0.1:$BACKEND_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
}
EOF
nginx -c "$WORK/nginx.conf" -g 'daemon off;' &
PIDS+=($!)
NGINX_PID=$!

# The gateway (skymesh-controller with [ai_gateway]), one route, one key.
CLIENT_ENTRY=$("$BIN/skymesh-controller" ai-key create --name bench --out "$WORK/client.key" --rpm 1000000)
CLIENT_KEY=$(cat "$WORK/client.key")
cat >"$WORK/controller.toml" <<EOF
[control]
listen = "127.0.0.1:0"
advertise = ["127.0.0.1:7443"]

[api]
listen = "127.0.0.1:$API_PORT"
admin_token_file = "$WORK/admin.token"

[state]
data_dir = "$WORK/data"

[ai_gateway]
listen = "127.0.0.1:$GATEWAY_PORT"

[[ai_gateway.upstreams]]
name = "bench"
site = "local"
region = "local"
base_url = "http://127.0.0.1:$BACKEND_PORT/v1"
public = true
credential_file = "$WORK/upstream.key"

[[ai_gateway.routes]]
name = "chat"
path_prefix = "/v1"
upstreams = ["bench"]

$CLIENT_ENTRY
EOF
SKYMESH_LOG=$GATEWAY_LOG "$BIN/skymesh-controller" run --config "$WORK/controller.toml" >"$WORK/controller.log" 2>&1 &
PIDS+=($!)
GATEWAY_PID=$!

wait_port $BACKEND_PORT
wait_port $NGINX_PORT
wait_port $GATEWAY_PORT

BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello from the benchmark"}]}'
# Time the hypervisor gave other guests (steal) and all time, in USER_HZ ticks
# summed over the CPUs, from /proc/stat.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat; }
# CPU time (user + system ticks, all threads) of a proxy: nginx's master and
# workers, or the controller; 0 for direct.
proxy_ticks() {
  local pids=""
  case $1 in
    nginx) pids="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')" ;;
    gateway) pids=$GATEWAY_PID ;;
  esac
  local t=0 p
  for p in $pids; do
    t=$((t + $(sed 's/^.*) //' "/proc/$p/stat" | awk '{ print $12 + $13 }')))
  done
  echo "$t"
}
run() { # name url key rate conns round
  local before after p0 p1
  before=$(cpu_ticks)
  p0=$(proxy_ticks "$1")
  "$BIN/skymesh-loadgen" --url "$2/v1/chat/completions" --method POST \
    --header "authorization: Bearer $3" --header "content-type: application/json" \
    --body "$BODY" --rate "$4" --connections "$5" --duration "${SECS}s" --warmup 2s \
    >"$WORK/$1-$4-$6.json"
  after=$(cpu_ticks)
  p1=$(proxy_ticks "$1")
  echo "$before $after $p0 $p1" >"$WORK/$1-$4-$6.steal"
}
targets=("direct http://127.0.0.1:$BACKEND_PORT $UPSTREAM_KEY"
  "nginx http://127.0.0.1:$NGINX_PORT $UPSTREAM_KEY"
  "gateway http://127.0.0.1:$GATEWAY_PORT $CLIENT_KEY")

# Sanity: every target answers the same request with the backend's answer.
for t in "${targets[@]}"; do
  read -r name url key <<<"$t"
  out=$(curl -sS --fail -H "authorization: Bearer $key" -H 'content-type: application/json' \
    -d "$BODY" "$url/v1/chat/completions")
  grep -q 'echo: hello from the benchmark' <<<"$out" || { echo "$name answered: $out" >&2; exit 1; }
done

# Rounds interleave the targets, and each round starts with a different one, so
# a noisy minute on this shared machine hits all three alike; medians per cell.
for round in $(seq "$ROUNDS"); do
  for rate in $RATES 0; do
    conns=$CONNS
    [ "$rate" = 0 ] && conns=$SAT_CONNS
    for i in 0 1 2; do
      read -r name url key <<<"${targets[$(( (i + round - 1) % 3 ))]}"
      echo "== round $round/$ROUNDS: $name, $([ "$rate" = 0 ] && echo "saturation ($conns connections)" || echo "$rate req/s")" >&2
      run "$name" "$url" "$key" "$rate" "$conns" "$round"
    done
  done
done

python3 - "$WORK" "$RATES" "$SECS" "$ROUNDS" <<'EOF'
import json, os, statistics, sys
work, rates, secs, rounds = sys.argv[1], [int(r) for r in sys.argv[2].split()], sys.argv[3], int(sys.argv[4])
names = ("direct", "nginx", "gateway")
def load(name, rate, rnd):
    with open(os.path.join(work, f"{name}-{rate}-{rnd}.json")) as f:
        r = json.load(f)
    with open(os.path.join(work, f"{name}-{rate}-{rnd}.steal")) as f:
        s0, t0, s1, t1, p0, p1 = map(int, f.read().split())
    r["steal"] = (s1 - s0) / max(t1 - t0, 1)
    # Proxy CPU per request, in µs (ticks are 10 ms); warmup requests
    # included in both, so the ratio holds.
    total = r["achieved_rps"] * (float(secs) + 2)
    r["cpu_us"] = (p1 - p0) * 10_000 / max(total, 1)
    return r
loads = rates + [0]
runs = {(n, rate): [load(n, rate, k) for k in range(1, rounds + 1)] for n in names for rate in loads}
med = statistics.median
def rps(n, rate):
    return med(r["achieved_rps"] for r in runs[(n, rate)])
def q(n, rate, pct):
    return med(r["latency_us"][pct] for r in runs[(n, rate)]) / 1000
print(f"\nAI gateway overhead on loopback: {rounds} interleaved round(s) of {secs} s per cell, medians;"
      f" 2 cores shared by load generator, proxy and backend; a log line per request: {os.environ.get('ACCESS_LOG', '0') == '1'}\n")
print("| load | target | achieved req/s | errors | p50 ms | p99 ms | added p50 ms | added p99 ms | max steal |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for rate in loads:
    label = "saturation" if rate == 0 else f"{rate} req/s"
    for n in names:
        errs = sum(r["errors"] + r["unexpected_status"] for r in runs[(n, rate)])
        add50 = "" if n == "direct" else f"{q(n, rate, 'p50') - q('direct', rate, 'p50'):.3f}"
        add99 = "" if n == "direct" else f"{q(n, rate, 'p99') - q('direct', rate, 'p99'):.3f}"
        steal = max(r["steal"] for r in runs[(n, rate)])
        print(f"| {label} | {n} | {rps(n, rate):.0f} | {errs} | {q(n, rate, 'p50'):.3f} | "
              f"{q(n, rate, 'p99'):.3f} | {add50} | {add99} | {steal:.0%} |")
print("\nmax steal: the largest share of CPU time the hypervisor took from this guest in any round of the cell")
ratios = [g["achieved_rps"] / x["achieved_rps"] for g, x in zip(runs[("gateway", 0)], runs[("nginx", 0)])]
print(f"\nmax throughput (median): direct {rps('direct', 0):.0f}, nginx {rps('nginx', 0):.0f}, gateway {rps('gateway', 0):.0f} req/s;"
      f" gateway/nginx = {rps('gateway', 0) / rps('nginx', 0):.2f}"
      f" (rounds: {', '.join(f'{x:.2f}' for x in ratios)}; target >= 0.8)")
cpu = {n: med(r["cpu_us"] for r in runs[(n, 0)]) for n in ("nginx", "gateway")}
print(f"proxy CPU per request at saturation (median): nginx {cpu['nginx']:.1f} us, gateway {cpu['gateway']:.1f} us;"
      f" gateway/nginx = {cpu['gateway'] / cpu['nginx']:.2f}")
if 1000 in rates:
    per = [(g["latency_us"]["p99"] - d["latency_us"]["p99"]) / 1000
           for g, d in zip(runs[("gateway", 1000)], runs[("direct", 1000)])]
    print(f"gateway p99 overhead at 1000 req/s: {q('gateway', 1000, 'p99') - q('direct', 1000, 'p99'):.3f} ms"
          f" (rounds: {', '.join(f'{x:.3f}' for x in per)}; target < 1 ms)")
EOF
