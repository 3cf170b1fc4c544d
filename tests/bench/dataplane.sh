#!/usr/bin/env bash
# Data-plane benchmark: single-stream TCP throughput (iperf3) and ping RTT through
# skymesh-agent, wireguard-go and boringtun-cli, on one pair of network namespaces,
# alternating implementations round by round so they share the machine's state.
# boringtun-cli runs twice: as installed (a connected UDP socket per peer besides
# the listening one) and with --disable-connected-udp, the one-socket design that
# skymesh-agent and wireguard-go share, for a like-for-like RTT comparison.
# Also measures skymesh-agent's RSS with 10 peers under traffic.
#
# Usage: sudo tests/bench/dataplane.sh [ROUNDS] [SECONDS]      (defaults: 5 rounds, 5 s)
# Needs: iperf3 wireguard-go wireguard-tools iproute2 iputils-ping, cargo.
set -euo pipefail

ROUNDS=${1:-5}
SECS=${2:-5}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d /tmp/skymesh-bench.XXXXXX)
ID=smb$$
NA=$ID-a
NB=$ID-b
AGENT=$ROOT/target/release/skymesh-agent
BTCLI=${BORINGTUN_CLI:-$WORK/boringtun/bin/boringtun-cli}

for tool in iperf3 wireguard-go wg ip ping python3 shuf; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install -y --no-install-recommends iperf3 wireguard-go wireguard-tools iproute2 iputils-ping)" >&2; exit 1; }
done

cleanup() {
  set +e
  for ns in "$NA" "$NB"; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  rm -f /var/run/wireguard/${ID}*.sock
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== building skymesh-agent (release)" >&2
(cd "$ROOT" && cargo build --release -q -p skymesh-agent)
if [ ! -x "$BTCLI" ]; then
  echo "== installing boringtun-cli into $WORK/boringtun" >&2
  cargo install -q boringtun-cli --root "$WORK/boringtun" >&2
fi

ip netns add "$NA"; ip netns add "$NB"
ip link add "${ID}va" netns "$NA" type veth peer name "${ID}vb" netns "$NB"
ip -n "$NA" addr add 192.0.2.1/24 dev "${ID}va"; ip -n "$NB" addr add 192.0.2.2/24 dev "${ID}vb"
for ns in "$NA" "$NB"; do ip -n "$ns" link set lo up; done
ip -n "$NA" link set "${ID}va" up; ip -n "$NB" link set "${ID}vb" up

umask 077
"$AGENT" genkey > "$WORK/a.key"; "$AGENT" genkey > "$WORK/b.key"
PA=$("$AGENT" pubkey < "$WORK/a.key"); PB=$("$AGENT" pubkey < "$WORK/b.key")

# Nine extra peers for the RSS measurement (keys only; never reachable).
extra_peers() {
  for i in $(seq 3 11); do
    k=$("$AGENT" genkey | "$AGENT" pubkey)
    printf '[[peers]]\nname = "idle-%s"\npublic_key = "%s"\nendpoint = "198.51.100.%s:51820"\nallowed_ips = ["100.96.0.%s/32", "10.%s.0.0/16"]\n' "$i" "$k" "$i" "$i" "$((100 + i))"
  done
}

agent_conf() { # side own-key peer-name peer-key own-ip peer-ip [endpoint] [extra]
  local ep=""
  [ -n "${7:-}" ] && ep="endpoint = \"$7\""
  cat <<T
[interface]
name = "${ID}s$1"
private_key_file = "$WORK/$2"
listen_port = 51820
address = "$5/32"
mtu = 1420
[metrics]
listen = "127.0.0.1:9586"
[admin]
socket = "$WORK/$1.sock"
[state]
dir = "$WORK/$1-state"
[[peers]]
name = "$3"
public_key = "$4"
allowed_ips = ["$6/32"]
$ep
T
  [ -n "${8:-}" ] && extra_peers
  true
}

start_skymesh() { # [with_extra_peers]
  agent_conf a a.key b "$PB" 100.96.0.1 100.96.0.2 192.0.2.2:51820 "${1:-}" > "$WORK/a.toml"
  agent_conf b b.key a "$PA" 100.96.0.2 100.96.0.1 "" > "$WORK/b.toml"
  # The responder first: a handshake the initiator sends before the responder's
  # socket exists is lost, and WireGuard retries only after 5 s.
  ip netns exec "$NB" "$AGENT" run --config "$WORK/b.toml" 2> "$WORK/b.log" & echo $! > "$WORK/b.pid"
  for _ in $(seq 100); do [ -S "$WORK/b.sock" ] && break; sleep 0.05; done
  ip netns exec "$NA" "$AGENT" run --config "$WORK/a.toml" 2> "$WORK/a.log" & echo $! > "$WORK/a.pid"
  for _ in $(seq 100); do [ -S "$WORK/a.sock" ] && break; sleep 0.05; done
  TARGET=100.96.0.2
}

start_userspace_wg() { # wggo|boringtun|boringtun1 — each kind has its own names, port and overlay
  local bin=$1 tag port net flags=()
  case $bin in
    wggo) tag=g; port=51821; net=100.97.0 ;;
    boringtun) tag=t; port=51822; net=100.98.0 ;;
    boringtun1) tag=u; port=51823; net=100.99.0; flags=(--disable-connected-udp) ;;
  esac
  for side in a b; do
    local ns=$NA; [ $side = b ] && ns=$NB
    if [ "$bin" = wggo ]; then
      ip netns exec "$ns" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f "${ID}$tag$side" > "$WORK/$tag$side.log" 2>&1 &
    else
      ip netns exec "$ns" env WG_SUDO=1 "$BTCLI" -f --disable-drop-privileges "${flags[@]}" "${ID}$tag$side" > "$WORK/$tag$side.log" 2>&1 &
    fi
    echo $! > "$WORK/$tag$side.pid"
  done
  for _ in $(seq 100); do [ -S "/var/run/wireguard/${ID}${tag}a.sock" ] && [ -S "/var/run/wireguard/${ID}${tag}b.sock" ] && break; sleep 0.05; done
  ip netns exec "$NA" wg set "${ID}${tag}a" private-key "$WORK/a.key" listen-port $port peer "$PB" endpoint 192.0.2.2:$port allowed-ips $net.2/32
  ip netns exec "$NB" wg set "${ID}${tag}b" private-key "$WORK/b.key" listen-port $port peer "$PA" allowed-ips $net.1/32
  ip -n "$NA" addr add $net.1/32 peer $net.2/32 dev "${ID}${tag}a"; ip -n "$NA" link set "${ID}${tag}a" mtu 1420 up
  ip -n "$NB" addr add $net.2/32 peer $net.1/32 dev "${ID}${tag}b"; ip -n "$NB" link set "${ID}${tag}b" mtu 1420 up
  TARGET=$net.2
}

stop_all() {
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; rm -f "$f"; done
  sleep 0.5
  rm -f /var/run/wireguard/${ID}*.sock
}

measure_throughput() { # name -> appends "tput name gbps" to results
  local name=$1
  ip netns exec "$NA" ping -c 1 -w 5 "$TARGET" > /dev/null || {
    echo "$name: tunnel did not come up; logs:" >&2
    tail -n 20 "$WORK"/*.log >&2 || true
    return 1
  }
  ip netns exec "$NB" iperf3 -s -1 -D -I "$WORK/iperf.pid" > /dev/null; sleep 0.2
  local gbps
  gbps=$(ip netns exec "$NA" iperf3 -c "$TARGET" -t "$SECS" -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)')
  echo "tput $name $gbps" >> "$WORK/results"
  printf '  %-14s %6.2f Gbit/s\n' "$name" "$gbps" >&2
}

run_one() {
  case $1 in
    raw) TARGET=192.0.2.2; measure_throughput "raw-veth" ;;
    skymesh) start_skymesh; measure_throughput "skymesh-agent"; stop_all ;;
    wggo) start_userspace_wg wggo; measure_throughput "wireguard-go"; stop_all ;;
    boringtun) start_userspace_wg boringtun; measure_throughput "boringtun-cli"; stop_all ;;
    boringtun1) start_userspace_wg boringtun1; measure_throughput "boringtun-cli-1sock"; stop_all ;;
  esac
}

ORDER=(raw skymesh wggo boringtun boringtun1)
for r in $(seq "$ROUNDS"); do
  echo "== throughput round $r/$ROUNDS" >&2
  # One implementation at a time (each saturates the CPUs); the order rotates
  # each round so none always runs first or last.
  for i in "${!ORDER[@]}"; do run_one "${ORDER[$(( (i + r) % ${#ORDER[@]} ))]}"; done
done

# RTT: all tunnels up at once on a quiet machine, pinged in interleaved blocks
# of 25 so that each sees the same conditions; per-packet RTTs are pooled.
# (tests/bench/interleaved_ping.py interleaves single pings instead, for finer
# A/B comparisons.)
echo "== ping RTT, interleaved" >&2
start_skymesh; start_userspace_wg wggo; start_userspace_wg boringtun; start_userspace_wg boringtun1
for t in 192.0.2.2 100.96.0.2 100.97.0.2 100.98.0.2 100.99.0.2; do
  ip netns exec "$NA" ping -c 1 -w 5 "$t" > /dev/null || { echo "tunnel to $t did not come up; logs:" >&2; tail -n 20 "$WORK"/*.log >&2; exit 1; }
done
for cycle in $(seq $((ROUNDS * 4))); do
  # A fresh random order every cycle: no path always follows the same one.
  for pair in $(shuf -e raw-veth:192.0.2.2 skymesh-agent:100.96.0.2 wireguard-go:100.97.0.2 boringtun-cli:100.98.0.2 boringtun-cli-1sock:100.99.0.2); do
    ip netns exec "$NA" ping -c 25 -i 0.01 "${pair#*:}" | sed -n "s/.*time=\([0-9.]*\) ms/rtt ${pair%%:*} \1/p" >> "$WORK/results"
  done
done
stop_all

echo "== skymesh-agent RSS with 10 peers under traffic" >&2
start_skymesh extra
ip netns exec "$NB" iperf3 -s -1 -D > /dev/null; sleep 0.2
ip netns exec "$NA" iperf3 -c 100.96.0.2 -t "$SECS" > /dev/null
PID=$(pgrep -f "skymesh-agent run --config $WORK/a.toml" | head -1)
RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
PEERS=$(ip netns exec "$NA" "$AGENT" status --config "$WORK/a.toml" --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["peers"]))')
stop_all

python3 - "$WORK/results" "$RSS_KB" "$PEERS" "$ROUNDS" "$SECS" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
tput = [r[1:] for r in rows if r[0] == "tput"]
rtts = [r[1:] for r in rows if r[0] == "rtt"]
rss_kb, peers, rounds, secs = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
order = ["raw-veth", "skymesh-agent", "wireguard-go", "boringtun-cli", "boringtun-cli-1sock"]
med = {n: (statistics.median(float(r[1]) for r in tput if r[0] == n),
           statistics.median(float(r[1]) for r in rtts if r[0] == n)) for n in order}
count = {n: sum(1 for r in rtts if r[0] == n) for n in order}
print(f"\nthroughput: median of {rounds} rounds of {secs} s single-stream iperf3;"
      f" RTT: median of {count['skymesh-agent']} pings per path, interleaved\n")
print("| path | throughput | ping RTT |")
print("|---|---|---|")
for n in order:
    print(f"| {n} | {med[n][0]:.2f} Gbit/s | {med[n][1]:.3f} ms |")
sk, wg, bt, bt1 = (med[n] for n in order[1:])
print(f"\nthroughput skymesh / wireguard-go  = {sk[0]/wg[0]:.2f}x   (target >= 1.5x)")
print(f"throughput skymesh / boringtun-cli = {sk[0]/bt[0]:.2f}x")
print(f"RTT skymesh / boringtun-cli        = {sk[1]/bt[1]:.3f}   (target <= 1.00)")
print(f"RTT skymesh / boringtun-cli-1sock  = {sk[1]/bt1[1]:.3f}   (same one-socket design)")
print(f"skymesh-agent peak RSS with {peers} peers = {rss_kb/1024:.1f} MiB   (target <= 40 MB)")
PY
