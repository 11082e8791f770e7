#!/bin/bash
# The bare idle-master rig of docs/benchmarks.md (VRRP, "Idle CPU, where it goes"): one VRRP
# master with 10 ms adverts in a namespace of its own, a veth to a second, silent namespace,
# nothing else. Prints the CPU of every thread of the process (schedstat) over SECS seconds and
# the adverts the peer received; with PSTAT=1 also `perf stat -e task-clock` of the thread that
# sends the adverts over 10 s.
#
#   as root:  bash scripts/vrrp-idle-rig.sh vpn-router [SECS]   # BIN=... picks the binary
#             bash scripts/vrrp-idle-rig.sh keepalived [SECS]
set -euo pipefail

IMPL=${1:?usage: vrrp-idle-rig.sh vpn-router|keepalived [SECS]}
SECS=${2:-20}
BIN=${BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/vpn-router}
A=vrig-a B=vrig-b
DIR=$(mktemp -d)
PID=""   # the process measured
MAIN=""  # the process started (keepalived's parent)

cleanup() {
    if [ -n "$MAIN" ]; then
        kill "$MAIN" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$MAIN" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$MAIN" 2>/dev/null || true
    fi
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

ip netns del "$A" 2>/dev/null || true
ip netns del "$B" 2>/dev/null || true
ip netns add "$A"
ip netns add "$B"
ip link add va0 netns "$A" type veth peer name vb0 netns "$B"
ip -n "$A" addr add 192.168.77.1/24 dev va0
ip -n "$A" link set va0 up
ip -n "$A" link set lo up
ip -n "$B" addr add 192.168.77.2/24 dev vb0
ip -n "$B" link set vb0 up

case "$IMPL" in
vpn-router)
    [ -x "$BIN" ] || { echo "no $BIN: run 'cargo build --release' first" >&2; exit 1; }
    cat > "$DIR/cfg.yaml" <<EOF
api:
  listen: 127.0.0.1:9901
log: { level: info, format: text }
vrrp:
  - name: router
    interface: va0
    vrid: 77
    version: 3
    priority: 150
    advert_interval: 10ms
    vmac: true
    virtual_ips:
      - { address: 192.168.77.254/24, interface: va0 }
EOF
    ip netns exec "$A" "$BIN" run --config "$DIR/cfg.yaml" > "$DIR/daemon.log" 2>&1 &
    MAIN=$!
    PID=$MAIN
    sleep 3
    SENDER=$(grep -l '^vrrp$' /proc/"$PID"/task/*/comm | head -1 | cut -d/ -f5)
    ;;
keepalived)
    command -v keepalived > /dev/null || { echo "install keepalived (apt-get install keepalived)" >&2; exit 1; }
    cat > "$DIR/ka.conf" <<EOF
global_defs {
  router_id rig
}
vrrp_instance router {
  state BACKUP
  interface va0
  use_vmac vrrp.77
  virtual_router_id 77
  version 3
  priority 150
  advert_int 0.01
  virtual_ipaddress {
    192.168.77.254/24
  }
}
EOF
    ip netns exec "$A" keepalived --dont-fork --log-console --no-syslog --vrrp \
        --use-file "$DIR/ka.conf" --pid "$DIR/ka.pid" --vrrp_pid "$DIR/ka.vrrp.pid" \
        > "$DIR/ka.log" 2>&1 &
    MAIN=$!
    sleep 3
    # The VRRP child sends the adverts; report it, not the parent.
    PID=$(cat "$DIR/ka.vrrp.pid")
    SENDER=$PID
    ;;
*)
    echo "unknown implementation $IMPL (vpn-router, keepalived)" >&2
    exit 1
    ;;
esac

snap() {
    for t in /proc/"$PID"/task/*; do
        echo "$(basename "$t") $(cat "$t/comm") $(awk '{print $1, $3}' "$t/schedstat")"
    done | sort
}
rx() { ip netns exec "$B" cat /sys/class/net/vb0/statistics/rx_packets; }

R0=$(rx)
snap > "$DIR/t0"
sleep "$SECS"
snap > "$DIR/t1"
R1=$(rx)
echo "$IMPL: packets at the peer: $((R1 - R0)) in $SECS s"
join "$DIR/t0" "$DIR/t1" | awk -v s="$SECS" '{
    printf "  thread %-8s %-16s schedstat %6.3f%% of a core, %d switches/s\n",
        $1, $2, ($6 - $3) / s / 1e7, ($7 - $4) / s }'
grep VmRSS /proc/"$PID"/status | sed 's/^/  /'
if [ -n "${PSTAT:-}" ]; then
    perf stat -e task-clock -t "$SENDER" -- sleep 10 2>&1 | grep task-clock | sed 's/^ */  10 s: /'
fi
