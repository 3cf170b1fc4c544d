#!/usr/bin/env bash
# Failover benchmark, on the four-cloud lab (configs/lab.toml) in controller mode:
# 1. Probe overhead: on the idle lab, the WireGuard bytes and packets each agent
#    sends to each peer over OVERHEAD_SECS (from its Prometheus endpoint), as
#    UDP payload and on the wire (+28 B of IPv4 and UDP headers per packet).
# 2. Failover: a 10 ms ping stream from aws's VPC host to gcp's; the aws-gcp WAN
#    link is cut CUTS times, for CUT_SECS each, then restored, and the script waits
#    until both agents route over the direct link again. For each cut, the outage is the largest run of lost pings that starts
#    around the cut: from the send time of the last ping answered before it to
#    that of the first answered after it, less one interval (= lost pings x 10 ms
#    when ping keeps its schedule; on a busy machine it sends less often, so the
#    count alone would understate the outage). The failback gap is the same
#    measure after the restore; it should be 0. Also shown: the reply gap (longest
#    time without a reply, which adds the backup path's extra RTT) and when each
#    agent moved back to the direct path after the restore.
#
# Usage: sudo tests/bench/failover.sh [CUTS]      (default: 20 cuts)
# Settings (environment): OVERHEAD_SECS=30, CUT_SECS=3, FAILBACK_TIMEOUT=30 (s).
# Needs: iproute2 iputils-ping, cargo. Runs the lab with id "fobench" and removes
# it on every exit. Honours CARGO_TARGET_DIR.
set -euo pipefail

CUTS=${1:-20}
OVERHEAD_SECS=${OVERHEAD_SECS:-30}
CUT_SECS=${CUT_SECS:-3}
FAILBACK_TIMEOUT=${FAILBACK_TIMEOUT:-30}
PING_INTERVAL=0.01 # s; ping's -i, as root
INTERVAL_MS=10     # the same in ms
ID=fobench
SRC=aws
DST=gcp
TRANSIT=azure
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
LAB=$TARGET/release/skymesh-lab
WORK=$(mktemp -d /tmp/skymesh-failover.XXXXXX)

case $CUTS in '' | *[!0-9]* | 0) echo "usage: $0 [CUTS]   (CUTS: a positive number, default 20)" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "run as root: the lab creates network namespaces" >&2; exit 1; }
for tool in ip ping awk sort; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install -y --no-install-recommends iproute2 iputils-ping)" >&2; exit 1; }
done

cleanup() {
  set +e
  [ -n "${PING_PID:-}" ] && kill "$PING_PID" 2>/dev/null
  if [ -n "${UP_PID:-}" ]; then
    "$LAB" down --id "$ID" >/dev/null 2>&1
    wait "$UP_PID" 2>/dev/null
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== building the workspace binaries (release)" >&2
(cd "$ROOT" && cargo build --release -q --workspace --bins)

ns() { echo "sml-$ID-$1"; } # namespace of a lab role, e.g. "gcp-vpc"; see tests/src/lab/build.rs
now() { date +%s.%N; }
metrics() { "$LAB" metrics "$1" --id "$ID" 2>/dev/null; } # node -> its agent's Prometheus text
route_via() { # site dest -> the path the site's agent uses to dest ("direct" or a transit node)
  metrics "$1" | awk -v d="$2" '/^skymesh_route_path\{/ && index($0, "dest=\"" d "\"") && $NF == 1 {
    match($0, /via="[^"]*"/); v = substr($0, RSTART + 5, RLENGTH - 6) } END { print v }'
}
has_backup() { # site dest transit -> success once the site's agent holds a backup path via transit
  metrics "$1" | awk -v d="$2" -v t="$3" '/^skymesh_route_path\{/ && index($0, "dest=\"" d "\"") &&
    index($0, "via=\"" t "\"") { ok = 1 } END { exit !ok }'
}
wait_for() { # seconds description command... -> polls every 0.2 s
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$(($(date +%s) + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "timed out after ${secs} s waiting for $what" >&2; return 1; }
    sleep 0.2
  done
}
both_direct() { [ "$(route_via "$SRC" "$DST")" = direct ] && [ "$(route_via "$DST" "$SRC")" = direct ]; }
wait_failback() { # -> "T_SRC T_DST": when each side was first seen on the direct path again ("-": not within FAILBACK_TIMEOUT)
  local t_src=- t_dst=- deadline=$(($(date +%s) + FAILBACK_TIMEOUT))
  while [ "$t_src" = - ] || [ "$t_dst" = - ]; do
    if [ "$t_src" = - ] && [ "$(route_via "$SRC" "$DST")" = direct ]; then t_src=$(now); fi
    if [ "$t_dst" = - ] && [ "$(route_via "$DST" "$SRC")" = direct ]; then t_dst=$(now); fi
    [ "$(date +%s)" -lt "$deadline" ] || break
    sleep 0.1
  done
  echo "$t_src $t_dst"
}

# An older run's lab of the same id (e.g. after kill -9) would collide.
"$LAB" down --id "$ID" >/dev/null 2>&1 || true
echo "== starting lab $ID" >&2
"$LAB" up --id "$ID" --config "$ROOT/configs/lab.toml" > "$WORK/up.log" 2>&1 &
UP_PID=$!
lab_up() { kill -0 "$UP_PID" 2>/dev/null || { echo "skymesh-lab up exited:" >&2; cat "$WORK/up.log" >&2; exit 1; }; grep -q "lab $ID is up" "$WORK/up.log"; }
wait_for 300 "lab $ID to come up" lab_up || { tail -20 "$WORK/up.log" >&2; exit 1; }
paths_ready() { both_direct && has_backup "$SRC" "$DST" "$TRANSIT" && has_backup "$DST" "$SRC" "$TRANSIT"; }
wait_for 60 "$SRC and $DST to route to each other directly, with a backup via $TRANSIT" paths_ready
DST_IP=$(ip -n "$(ns "$DST-vpc")" -4 -o addr show dev eth0 | awk '{ split($4, a, "/"); print a[1]; exit }')
[ -n "$DST_IP" ] || { echo "no address on eth0 of $(ns "$DST-vpc")" >&2; exit 1; }

# --- 1. probe overhead on the idle lab ---------------------------------------------
# Every agent of the lab: the sites' gateways and the controller host's own agent.
NODES=$(ip netns list | awk -v p="$(ns "")" 'index($1, p) == 1 && $1 ~ /-gw$/ { print substr($1, length(p) + 1, length($1) - length(p) - 3) }
  $1 == p "ctl" { print "controller" }' | sort)
snapshot() { # file -> "node time peer tx_bytes tx_packets" per agent and peer
  local node t
  for node in $NODES; do
    t=$(now)
    metrics "$node" | awk -v n="$node" -v t="$t" '/^skymesh_peer_tx_(bytes|packets)_total\{/ {
      match($0, /peer="[^"]*"/); p = substr($0, RSTART + 6, RLENGTH - 7)
      if ($0 ~ /bytes/) b[p] = $NF; else k[p] = $NF }
      END { for (p in b) print n, t, p, b[p], k[p] }'
  done > "$1"
}
echo "== probe overhead: idle lab, ${OVERHEAD_SECS} s" >&2
snapshot "$WORK/tx0"
sleep "$OVERHEAD_SECS"
snapshot "$WORK/tx1"

# --- 2. failover ---------------------------------------------------------------------
echo "== failover: ping -i $PING_INTERVAL $SRC -> $DST ($DST_IP), $CUTS cuts of ${CUT_SECS} s" >&2
ip netns exec "$(ns "$SRC-vpc")" ping -n -D -i "$PING_INTERVAL" "$DST_IP" > "$WORK/ping.log" 2>&1 &
PING_PID=$!
sleep 2
grep -q icmp_seq "$WORK/ping.log" || { echo "no ping reply from $DST_IP:" >&2; cat "$WORK/ping.log" >&2; exit 1; }
: > "$WORK/events"
for i in $(seq "$CUTS"); do
  t_cut=$(now)
  "$LAB" wan cut "$SRC" "$DST" --id "$ID" >/dev/null
  sleep "$CUT_SECS"
  via=$(route_via "$SRC" "$DST" || true)
  t_restore=$(now)
  "$LAB" wan restore "$SRC" "$DST" --id "$ID" >/dev/null
  back=$(wait_failback)
  sleep 1 # let the last replies over the backup path arrive before the next cut
  echo "$i $t_cut $t_restore $back ${via:--}" >> "$WORK/events"
  printf '  cut %2d/%d: %s routed via %s during the cut\n' "$i" "$CUTS" "$SRC" "${via:--}" >&2
done
kill -INT "$PING_PID"
wait "$PING_PID" || true
PING_PID=

# --- results -------------------------------------------------------------------------
# One line per answered ping: seq, send time (arrival - RTT), arrival time.
awk '/icmp_seq=/ && !/DUP/ {
  t = substr($1, 2, length($1) - 2); match($0, /icmp_seq=[0-9]+/); s = substr($0, RSTART + 9, RLENGTH - 9)
  match($0, /time=[0-9.]+/); r = substr($0, RSTART + 5, RLENGTH - 5)
  printf "%d %.6f %.6f\n", s, t - r / 1000, t }' "$WORK/ping.log" | sort -n -k1,1 -u > "$WORK/replies"
# Gaps in the answered sequence: start (send time of the last answer before), length, lost pings.
awk -v iv="$INTERVAL_MS" 'NR > 1 && $1 > s + 1 { printf "%.6f %.1f %d\n", t, ($2 - t) * 1000 - iv, $1 - s - 1 } { s = $1; t = $2 }' \
  "$WORK/replies" > "$WORK/gaps"
sort -n -k3,3 "$WORK/replies" | awk 'NR > 1 { printf "%.6f %.1f\n", t, ($3 - t) * 1000 } { t = $3 }' > "$WORK/reply_gaps"

awk -v cuts="$CUTS" -v iv="$INTERVAL_MS" '
  FILENAME ~ /events$/ { n++; cut[n] = $2; res[n] = $3; bs[n] = $4; bd[n] = $5; via[n] = $6; next }
  FILENAME ~ /reply_gaps$/ { rg_t[++nr] = $1; rg[nr] = $2; next }
  { g_t[++ng] = $1; g_ms[ng] = $2; g_lost[ng] = $3 }
  END {
    for (i = 1; i <= n; i++) {
      lo = cut[i] - 0.5; mid = res[i]; hi = (i < n ? cut[i + 1] - 0.5 : 1e18)
      fo = 0; fo_lost = 0; fo_at = "-"; fb = 0; fb_lost = 0; rgap = 0
      for (j = 1; j <= ng; j++) {
        if (g_t[j] >= lo && g_t[j] < mid && g_ms[j] > fo) { fo = g_ms[j]; fo_lost = g_lost[j]; x = (g_t[j] - cut[i]) * 1000 + iv; fo_at = sprintf("%+d", x < 0 ? int(x - 0.5) : int(x + 0.5)) }
        if (g_t[j] >= mid && g_t[j] < hi && g_ms[j] > fb) { fb = g_ms[j]; fb_lost = g_lost[j] }
      }
      for (j = 1; j <= nr; j++) if (rg_t[j] >= lo && rg_t[j] < mid && rg[j] > rgap) rgap = rg[j]
      s_back = (bs[i] == "-" ? "-" : sprintf("%.1f", bs[i] - res[i]))
      d_back = (bd[i] == "-" ? "-" : sprintf("%.1f", bd[i] - res[i]))
      printf "%d %.0f %d %s %.0f %s %s %s %.0f %d\n", i, fo, fo_lost, fo_at, rgap, via[i], s_back, d_back, fb, fb_lost
    }
  }' "$WORK/events" "$WORK/reply_gaps" "$WORK/gaps" > "$WORK/cuts"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
maxof() { sort -n | tail -1; }
col() { awk -v c="$1" '$c != "-" { print $c }' "$WORK/cuts"; }

# Overhead per agent and peer: rates over the two snapshots.
awk 'NR == FNR { t0[$1 " " $3] = $2; b0[$1 " " $3] = $4; k0[$1 " " $3] = $5; next }
  ($1 " " $3) in t0 { k = $1 " " $3; dt = $2 - t0[k]; pk = ($5 - k0[k]) / dt; by = ($4 - b0[k]) / dt
    printf "%s %s %.2f %.1f %.1f\n", $1, $3, pk, by, by + 28 * pk }' "$WORK/tx0" "$WORK/tx1" | sort > "$WORK/overhead"

echo
echo "failover: $CUTS cuts of the $SRC-$DST WAN link (${CUT_SECS} s each), ping every ${INTERVAL_MS} ms from VPC $SRC to VPC $DST"
echo
echo "| cut | outage | lost pings | first lost ping sent (vs cut) | reply gap | $SRC routed via | $SRC / $DST back on direct after restore | failback gap |"
echo "|---|---|---|---|---|---|---|---|"
awk '{ printf "| %d | %d ms | %d | %s ms | %d ms | %s | %s / %s s | %d ms (%d lost) |\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 }' "$WORK/cuts"
SPACING=$(awk 'NR > 1 && $1 == s + 1 { print ($2 - t) * 1000 } { s = $1; t = $2 }' "$WORK/replies" | median)
printf '\nping: %s; median %.1f ms between sends\n' "$(grep -m1 'packets transmitted' "$WORK/ping.log" || echo "no summary")" "$SPACING"
echo
echo "probe overhead: idle lab, ${OVERHEAD_SECS} s; WireGuard UDP payload, and on the wire with 28 B of IPv4 + UDP headers per packet"
echo
echo "| from | to | packets/s | payload B/s | wire B/s |"
echo "|---|---|---|---|---|"
awk '{ printf "| %s | %s | %.1f | %.0f | %.0f |\n", $1, $2, $3, $4, $5 }' "$WORK/overhead"

FO_MED=$(col 2 | median); FO_MAX=$(col 2 | maxof)
RG_MED=$(col 5 | median); RG_MAX=$(col 5 | maxof)
FB_MED=$(col 9 | median); FB_MAX=$(col 9 | maxof)
BACK_MED=$( (col 7; col 8) | median); BACK_MAX=$( (col 7; col 8) | maxof)
NOFO=$(awk -v t="$TRANSIT" '$6 != t' "$WORK/cuts" | wc -l)
NOBACK=$(awk '$7 == "-" || $8 == "-"' "$WORK/cuts" | wc -l)
LINKS=$(wc -l < "$WORK/overhead")
OV_PK=$(awk '{ print $3 }' "$WORK/overhead" | median)
OV_PL=$(awk '{ print $4 }' "$WORK/overhead" | median); OV_PL_MAX=$(awk '{ print $4 }' "$WORK/overhead" | maxof)
OV_W=$(awk '{ print $5 }' "$WORK/overhead" | median); OV_W_MAX=$(awk '{ print $5 }' "$WORK/overhead" | maxof)

echo
echo "| | median | max | note |"
echo "|---|---|---|---|"
echo "| skymesh failover outage, $CUTS cuts | **$FO_MED ms** | $FO_MAX ms | measured: longest run of lost pings (send-time span, less one ${INTERVAL_MS} ms interval); $NOFO cut(s) without a switch to $TRANSIT |"
echo "| skymesh reply gap during failover | $RG_MED ms | $RG_MAX ms | measured: outage + the backup path's extra RTT |"
echo "| skymesh failback gap | $FB_MED ms | $FB_MAX ms | measured, after the restore |"
echo "| skymesh back on direct after restore, $SRC and $DST | $BACK_MED s | $BACK_MAX s | measured; failback hold 5 s; $NOBACK cut(s) not back within ${FAILBACK_TIMEOUT} s |"
printf '| skymesh probe overhead, per link and direction (%d) | %s B/s payload, %s B/s wire (%s pkt/s) | %s / %s B/s | measured; expected 640 / 920 B/s |\n' \
  "$LINKS" "$(printf '%.0f' "$OV_PL")" "$(printf '%.0f' "$OV_W")" "$(printf '%.1f' "$OV_PK")" "$(printf '%.0f' "$OV_PL_MAX")" "$(printf '%.0f' "$OV_W_MAX")"
echo "| Tailscale, fallback to a DERP relay | ~6.5 s | | published, not measured |"
echo "| headscale, HA subnet router failover | ~70 s | | published, not measured |"
echo "| Kilo | minutes | | published, not measured |"
echo "| Cisco SD-WAN, BFD defaults (1 s hello x 7) | 7 s | | published, not measured |"
