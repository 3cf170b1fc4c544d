#!/usr/bin/env python3
"""Interleaved single pings for A/B latency comparisons between tunnels.

Usage (inside the client namespace, with ICMP datagram sockets allowed there:
`sysctl net.ipv4.ping_group_range="0 2147483647"`):

    interleaved_ping.py N name=addr [name=addr ...]

Each round pings every target once, in a fresh random order, 10 ms apart, so no
target always follows another and all see the same machine state. Prints the
p10 / p50 / p90 RTT per target (microseconds, including this script's own
overhead, which is the same for every target) and each median relative to the
first target's.
"""
import random
import socket
import statistics
import struct
import sys
import time

GAP_S = 0.01
TIMEOUT_S = 0.2


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit(__doc__)
    rounds = int(sys.argv[1])
    bad = [arg for arg in sys.argv[2:] if "=" not in arg]
    if bad:
        sys.exit(f"target {bad[0]!r}: expected name=addr, e.g. skymesh=100.96.0.2")
    targets = [arg.split("=", 1) for arg in sys.argv[2:]]
    socks = {}
    for name, addr in targets:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            s.connect((addr, 0))
        except OSError as e:
            sys.exit(f"target {name}={addr}: {e} (is the tunnel up, and are ICMP datagram "
                     "sockets allowed: sysctl net.ipv4.ping_group_range?)")
        s.settimeout(TIMEOUT_S)
        socks[name] = s
    rtts = {name: [] for name, _ in targets}
    payload = b"x" * 56
    for seq in range(rounds):
        order = list(socks.items())
        random.shuffle(order)
        for name, s in order:
            time.sleep(GAP_S)
            echo = struct.pack("!BBHHH", 8, 0, 0, 0, seq & 0xFFFF) + payload
            start = time.perf_counter_ns()
            s.send(echo)
            try:
                while struct.unpack("!H", s.recv(2048)[6:8])[0] != seq & 0xFFFF:
                    pass
                rtts[name].append((time.perf_counter_ns() - start) / 1e3)
            except socket.timeout:
                pass
    first = None
    for name, values in rtts.items():
        if not values:
            print(f"{name}: no replies")
            continue
        values.sort()
        median = statistics.median(values)
        first = first or median
        n = len(values)
        print(f"{name:<14} n={n} p10 {values[n // 10]:.0f} p50 {median:.0f} "
              f"p90 {values[9 * n // 10]:.0f} us  median/first {median / first:.3f}")


if __name__ == "__main__":
    main()
