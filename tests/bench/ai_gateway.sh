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
#   RATES="500 1000 2000" CONNS=32 SAT_CONNS=64 tests/bench/ai_gateway.sh
# Needs: cargo, nginx (installed with apt-get if missing), python3. No root
# needed except for that install. Honours CARGO_TARGET_DIR.
set -euo pipefail

SECS=${1:-10}
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
  access_log off;
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
SKYMESH_LOG=warn "$BIN/skymesh-controller" run --config "$WORK/controller.toml" >"$WORK/controller.log" 2>&1 &
PIDS+=($!)

wait_port $BACKEND_PORT
wait_port $NGINX_PORT
wait_port $GATEWAY_PORT

BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello from the benchmark"}]}'
run() { # name url key rate conns
  "$BIN/skymesh-loadgen" --url "$2/v1/chat/completions" --method POST \
    --header "authorization: Bearer $3" --header "content-type: application/json" \
    --body "$BODY" --rate "$4" --connections "$5" --duration "${SECS}s" --warmup 2s \
    >"$WORK/$1-$4.json"
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

for rate in $RATES 0; do
  conns=$CONNS
  [ "$rate" = 0 ] && conns=$SAT_CONNS
  for t in "${targets[@]}"; do
    read -r name url key <<<"$t"
    echo "== $name, $([ "$rate" = 0 ] && echo "saturation ($conns connections)" || echo "$rate req/s")" >&2
    run "$name" "$url" "$key" "$rate" "$conns"
  done
done

python3 - "$WORK" "$RATES" "$SECS" <<'EOF'
import json, os, sys
work, rates, secs = sys.argv[1], [int(r) for r in sys.argv[2].split()], sys.argv[3]
def load(name, rate):
    with open(os.path.join(work, f"{name}-{rate}.json")) as f:
        return json.load(f)
print(f"\nAI gateway overhead, {secs} s per run, loopback, 2 cores shared by load generator, proxy and backend\n")
print("| load | target | achieved req/s | errors | p50 ms | p99 ms | added p50 ms | added p99 ms |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for rate in rates + [0]:
    d = load("direct", rate)
    for name in ("direct", "nginx", "gateway"):
        r = load(name, rate)
        lat = r["latency_us"]
        add50 = "" if name == "direct" else f"{(lat['p50'] - d['latency_us']['p50']) / 1000:.3f}"
        add99 = "" if name == "direct" else f"{(lat['p99'] - d['latency_us']['p99']) / 1000:.3f}"
        label = "saturation" if rate == 0 else f"{rate} req/s"
        errs = r["errors"] + r["unexpected_status"]
        print(f"| {label} | {name} | {r['achieved_rps']:.0f} | {errs} | {lat['p50'] / 1000:.3f} | {lat['p99'] / 1000:.3f} | {add50} | {add99} |")
sat = {n: load(n, 0)["achieved_rps"] for n in ("direct", "nginx", "gateway")}
print(f"\nmax throughput: direct {sat['direct']:.0f}, nginx {sat['nginx']:.0f}, gateway {sat['gateway']:.0f} req/s; gateway/nginx = {sat['gateway'] / sat['nginx']:.2f}")
if 1000 in rates:
    g, d = load("gateway", 1000)["latency_us"], load("direct", 1000)["latency_us"]
    print(f"gateway p99 overhead at 1000 req/s: {(g['p99'] - d['p99']) / 1000:.3f} ms (target < 1 ms)")
EOF
