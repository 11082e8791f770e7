#!/usr/bin/env bash
# Runs the shipped router config (deploy/base/router-config.yaml) the way the shipped
# Deployment runs it, in network namespaces (make test-deploy, root, a few seconds):
#
#   - two routers, each with the pod's interfaces vpn-gw-veth0 (gateway network) and
#     vpn-r-veth0 (advert network) on two bridges, plus a client on the gateway network;
#   - the pod's securityContext.sysctls preset, then /proc/sys mounted read-only (as a container
#     runtime does), the capability bounding set cut to NET_ADMIN + NET_RAW, no_new_privs;
#   - checks: both routers become Ready (/readyz), exactly one holds the egress VIP and the
#     ingress VIPs, the client reaches the VIP; SIGTERM to the master (what Kubernetes sends
#     on a rolling update) hands the VIP to the other router, and the daemon exits 0 well
#     within the Deployment's terminationGracePeriodSeconds.
#
# Not covered here: this kernel may lack IPVS. Then the `ingress` section and the
# net.ipv4.vs.* sysctls are left out, and the script says so (the VM tier tests IPVS).
# The root filesystem is not made read-only (the daemon writes no files; not enforced here).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${DEPLOY_VENV:-$repo/.cache/deploy-venv}
bin=${VPN_ROUTER_BIN:-$repo/target/debug/vpn-router}

fail() { echo "deploy/podlike: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (network namespaces, mounts): run make test as root"
for tool in ip setpriv unshare mount ping sysctl; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/install-deps.sh as root"
done
[ -x "$venv/bin/python" ] || fail "$venv is missing: run scripts/install-deps.sh (make deps)"
[ -x "$bin" ] || fail "$bin is missing: cargo build --bin vpn-router"

tag=vpl$$
B=${tag}b C=${tag}c
R=("${tag}r1" "${tag}r2")
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  for ns in "$B" "$C" "${R[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

"$venv/bin/python" "$here/validate.py" "$here" "$work/out" >"$work/validate.log" ||
  { cat "$work/validate.log" >&2; fail "validate.py failed: run deploy/validate.sh first"; }
cfg=$work/out/config.yaml
sysctls=$work/out/pod-sysctls.txt
grace=$(sed -n 's/^ *terminationGracePeriodSeconds: *\([0-9]*\).*/\1/p' "$here/base/router-deployment.yaml")
[ -n "$grace" ] || fail "no terminationGracePeriodSeconds in deploy/base/router-deployment.yaml"

if [ ! -d /proc/sys/net/ipv4/vs ]; then
  echo "deploy/podlike: this kernel has no IPVS: running without the ingress section and net.ipv4.vs.* (the VM tier tests IPVS)"
  "$venv/bin/python" - "$cfg" <<'EOF'
import sys, yaml
path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    cfg = yaml.safe_load(f)
cfg.pop("ingress", None)
with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg, f, sort_keys=False)
EOF
  sed -i '/^net\.ipv4\.vs\./d' "$sysctls"
fi
if [ ! -e /proc/sys/net/ipv4/fib_multipath_hash_seed ]; then
  echo "deploy/podlike: this kernel (< 6.11) has no net.ipv4.fib_multipath_hash_seed: left out, as docs/operations.md says"
  sed -i '/^net\.ipv4\.fib_multipath_hash_seed=/d' "$sysctls"
fi
"$bin" check-config "$cfg" >/dev/null

# Topology: B holds the two bridges (the node's vpn-gw-bridge0 / vpn-r-bridge0).
ip netns add "$B"
ip -n "$B" link add brg type bridge
ip -n "$B" link add brr type bridge
ip -n "$B" link set brg up
ip -n "$B" link set brr up
for i in 0 1; do
  n=$((i + 1))
  ip netns add "${R[$i]}"
  ip link add vpn-gw-veth0 netns "${R[$i]}" type veth peer name "g$n$tag" netns "$B"
  ip link add vpn-r-veth0 netns "${R[$i]}" type veth peer name "a$n$tag" netns "$B"
  ip -n "$B" link set "g$n$tag" master brg up
  ip -n "$B" link set "a$n$tag" master brr up
  ip -n "${R[$i]}" addr add "192.168.26.$n/22" dev vpn-gw-veth0
  ip -n "${R[$i]}" addr add "192.168.28.$n/24" dev vpn-r-veth0
  for l in lo vpn-gw-veth0 vpn-r-veth0; do ip -n "${R[$i]}" link set "$l" up; done
  while IFS= read -r kv; do ip netns exec "${R[$i]}" sysctl -qw "$kv"; done <"$sysctls"
done
ip netns add "$C"
ip link add vpn-gw-veth0 netns "$C" type veth peer name "c$tag" netns "$B"
ip -n "$B" link set "c$tag" master brg up
ip -n "$C" addr add 192.168.24.5/22 dev vpn-gw-veth0
ip -n "$C" link set lo up
ip -n "$C" link set vpn-gw-veth0 up

start_router() { # NS LOG: the daemon as the container runs it
  # shellcheck disable=SC2016 # $0 and $1 are the inner shell's arguments
  ip netns exec "$1" unshare -m --propagation private sh -c \
    'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys &&
     exec setpriv --bounding-set=-all,+net_admin,+net_raw --inh-caps=-all --no-new-privs "$0" run --config "$1"' \
    "$bin" "$cfg" >"$2" 2>&1 &
  pids+=($!)
}
readyz() { # NS: the answer of /readyz, as the kubelet's probe sees it
  ip netns exec "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 && printf "GET /readyz HTTP/1.0\r\n\r\n" >&3 && head -n 1 <&3' 2>/dev/null || true
}
holds_vip() { ip -n "$1" -br addr show dev vpn-gw-veth0 | grep -q ' 192\.168\.26\.254/22'; }
logs() { for i in 0 1; do echo "--- router $((i + 1)) log:"; tail -n 15 "$work/r$i.log"; done >&2; }

start_router "${R[0]}" "$work/r0.log"
start_router "${R[1]}" "$work/r1.log"
for _ in $(seq 100); do
  if [[ $(readyz "${R[0]}") == *" 200 "* && $(readyz "${R[1]}") == *" 200 "* ]] &&
    { holds_vip "${R[0]}" || holds_vip "${R[1]}"; }; then
    break
  fi
  sleep 0.1
done
for i in 0 1; do
  [[ $(readyz "${R[$i]}") == *" 200 "* ]] || { logs; fail "router $((i + 1)) is not Ready after 10 s: $(readyz "${R[$i]}")"; }
  grep -q 'Read-only file system' "$work/r$i.log" && { logs; fail "router $((i + 1)) tried to write a sysctl the pod spec does not preset"; }
done
# No component may be degraded (a refused nft or netlink call under the two capabilities).
for i in 0 1; do
  ip netns exec "${R[$i]}" "$bin" status --api 127.0.0.1:9090 --json >"$work/status$i.json" ||
    { logs; fail "router $((i + 1)): vpn-router status failed"; }
  comps=$("$venv/bin/python" -c '
import json, sys
comps = json.load(open(sys.argv[1])).get("components") or {}
print(" ".join(sorted(comps)))
sys.exit(0 if comps and all(c.get("state") == "running" for c in comps.values()) else 1)
' "$work/status$i.json") || { cat "$work/status$i.json" >&2; logs; fail "router $((i + 1)): a component is not running"; }
done
masters=0
for i in 0 1; do if holds_vip "${R[$i]}"; then masters=$((masters + 1)); m=$i; fi; done
[ "$masters" = 1 ] || { logs; fail "$masters routers hold the egress VIP; expected exactly 1"; }
o=$((1 - m))
vips=$(ip -n "${R[$m]}" -br addr show dev vpn-gw-veth0)
for a in 192.168.26.128 192.168.26.129 192.168.26.130 192.168.26.131; do
  [[ $vips == *" $a/22"* ]] || { logs; fail "the master lacks ingress VIP $a: $vips"; }
done
ip netns exec "$C" ping -c 2 -i 0.2 -W 1 -q 192.168.26.254 >/dev/null || { logs; fail "the client cannot reach the egress VIP"; }

# SIGTERM to the master, as on a rolling update.
t0=$(date +%s%N)
kill -TERM "${pids[$m]}"
rc=0
wait "${pids[$m]}" || rc=$?
ms=$((($(date +%s%N) - t0) / 1000000))
[ "$rc" = 0 ] || { logs; fail "the master exited $rc after SIGTERM"; }
[ "$ms" -lt $((grace * 1000 / 2)) ] || { logs; fail "the master took $ms ms to stop; terminationGracePeriodSeconds is $grace s"; }
holds_vip "${R[$o]}" || { logs; fail "after the master's SIGTERM the other router does not hold the VIP"; }
if holds_vip "${R[$m]}"; then logs; fail "the stopped master left the VIP behind"; fi
grep -q '"reason":"shutdown_handed_off"' "$work/r$m.log" ||
  { logs; fail "the master did not log a handoff to the other router (reason shutdown_handed_off)"; }
ip netns exec "$C" ping -c 2 -i 0.2 -W 1 -q 192.168.26.254 >/dev/null || { logs; fail "the client cannot reach the VIP on the new master"; }
echo "deploy/podlike: components running on both routers: $comps"
echo "deploy/podlike: ok (2 routers Ready under read-only /proc/sys with NET_ADMIN+NET_RAW only; SIGTERM handed the VIP over, master stopped in $ms ms of ${grace} s grace)"
