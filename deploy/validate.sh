#!/usr/bin/env bash
# Validates everything under deploy/ (make test-deploy; offline, about 80 s with the self-test):
#
#   1. yamllint (deploy/.yamllint.yaml, warnings are errors) on every YAML file;
#   2. kubernetes-validate --strict on every manifest, against the oldest and the newest
#      Kubernetes version we support. It has schemas for core kinds only: its "no schema"
#      warning is accepted solely for the CRD kinds that validate.py checks with a reduced
#      schema (NetworkAttachmentDefinition, ServiceMonitor); any other warning fails;
#   3. validate.py: the reduced CRD checks, the CNI configs, the kustomize layout, references
#      between objects, the router Deployment against its config, the DNS path (the resolver
#      attachment and Corefile against the router's local_route virtual server, the client
#      attachments' route to it), addresses enough for every rolling update; it extracts the config,
#      the example Secret's files and the shell scripts embedded in containers;
#      It also reads deploy/Dockerfile: entrypoint, nft, port, and a toolchain new enough for
#      the locked dependencies (cargo metadata --locked --offline);
#   4. `vpn-router check-config` on the config from the ConfigMap, with the secrets written to
#      a temporary directory (the mount path in the config is rewritten to it) and the env the
#      container gives it (POD_IP); validate.py compares the pod's sysctls and the NADs' tuning
#      plugin with `vpn-router check-config --sysctls`;
#   4b. the monitoring component (check-monitoring.sh: promtool checks and tests of the alerts,
#      the dashboard's queries, metric names against docs/metrics.md; its own self-test runs
#      once, at the end);
#   5. shellcheck on the scripts containers run (embedded or mounted from ConfigMaps), and the
#      gateway pod's setup and port-forwarding scripts run against stub `ip`/`iptables`
#      commands: each gateway address must DNAT to its own ingress VIP;
#   6. a self-test: known defects put into copies of deploy/ must each be caught, so none
#      of the checks above can pass by doing nothing (skip with --no-selftest).
#
# Needs: yamllint, shellcheck, the venv with kubernetes-validate (scripts/install-deps.sh puts
# it in .cache/deploy-venv) and a built vpn-router (VPN_ROUTER_BIN, default target/debug).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
venv=${DEPLOY_VENV:-$repo/.cache/deploy-venv}
bin=${VPN_ROUTER_BIN:-$repo/target/debug/vpn-router}
# Oldest Kubernetes the manifests are written for, and the newest kubernetes-validate knows.
k8s_versions=(1.29.0 1.37.0)
# The only "no schema" warnings accepted: kinds validate.py checks itself.
crd_ok='Couldn'"'"'t find schema for kind (NetworkAttachmentDefinition with api version k8s\.cni\.cncf\.io/v1|(ServiceMonitor|PrometheusRule) with api version monitoring\.coreos\.com/v1) '

selftest=1
case "${1:-}" in
  --no-selftest) selftest=0 ;;
  "") ;;
  *) echo "usage: $0 [--no-selftest]" >&2; exit 2 ;;
esac

fail() { echo "deploy: $*" >&2; exit 1; }
for tool in yamllint shellcheck; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/install-deps.sh (make deps) as root"
done
[ -x "$venv/bin/kubernetes-validate" ] ||
  fail "kubernetes-validate is missing in $venv: run scripts/install-deps.sh (make deps)"
[ -x "$bin" ] || fail "$bin is missing: cargo build --bin vpn-router"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# validate_tree DIR OUT: every check on the deploy tree DIR; scratch files in OUT. Prints what
# failed and returns non-zero at the first failing stage.
validate_tree() {
  local dir=$1 out=$2 files kv rc line n_core
  mkdir -p "$out"
  yamllint -s -c "$here/.yamllint.yaml" "$dir" || { echo "FAILED: yamllint"; return 1; }

  # components' tests/ hold promtool unit tests (check-monitoring.sh), not manifests
  mapfile -t files < <(find "$dir" -name tests -prune -o -name '*.yaml' ! -name kustomization.yaml ! -name .yamllint.yaml -print | sort)
  local kargs=()
  for v in "${k8s_versions[@]}"; do kargs+=(-k "$v"); done
  rc=0
  kv=$("$venv/bin/kubernetes-validate" --strict "${kargs[@]}" "${files[@]}" 2>&1) || rc=$?
  n_core=0
  while IFS= read -r line; do
    case "$line" in
      INFO*) n_core=$((n_core + 1)) ;;
      WARN*) if ! [[ $line =~ $crd_ok ]]; then echo "$line"; rc=1; fi ;;
      "") ;;
      *) echo "$line" ;;
    esac
  done <<<"$kv"
  [ "$rc" = 0 ] || { echo "FAILED: kubernetes-validate --strict"; return 1; }
  [ "$n_core" -gt 0 ] || { echo "FAILED: kubernetes-validate validated no object"; return 1; }

  VPN_ROUTER_BIN=$bin "$venv/bin/python" "$here/validate.py" "$dir" "$out" "$work/cargo-metadata.json" || { echo "FAILED: validate.py"; return 1; }

  yamllint -s -c "$here/.yamllint.yaml" "$out/config.yaml" || { echo "FAILED: yamllint of the ConfigMap's config.yaml"; return 1; }
  # The config's ${ENV} references, with the values the container's env gives them.
  # shellcheck source=/dev/null # written by validate.py above
  (set -a; . "$out/config.env"; exec "$bin" check-config "$out/config.yaml") || { echo "FAILED: vpn-router check-config"; return 1; }
  METRICS_DOC=$repo/docs/metrics.md bash "$here/check-monitoring.sh" --no-selftest "$dir" >"$out/monitoring.log" 2>&1 || { cat "$out/monitoring.log"; echo "FAILED: check-monitoring.sh"; return 1; }

  shellcheck -s sh "$out"/scripts/*.sh || { echo "FAILED: shellcheck of the embedded scripts"; return 1; }
  gateway_scripts_test "$out" || { echo "FAILED: the gateway pod's scripts"; return 1; }
  echo "deploy: ok ($((n_core / ${#k8s_versions[@]})) core objects valid for Kubernetes ${k8s_versions[*]})"
}

# The gateway pod's scripts (commands.tsv from validate.py: the init container's setup script
# and gluetun's port-forwarding commands) run against stub `ip`/`iptables` commands, for every
# gateway address of the router config: each gateway must DNAT its fixed forwarded ports and
# the ports gluetun hands its UP command to its own ingress VIP, remove them on DOWN, ignore a
# port that is not one, and refuse an address that is not a gateway's. (The lab runs the same
# files for real behind gluetun's firewall: tests/src/gluetun_pod.rs.)
gateway_scripts_test() {
  local out=$1 stubs setup setup_env up up_args down down_args pf_env addr vip log port_map fwd state
  stubs=$out/stubs
  mkdir -p "$stubs"
  setup=$(awk -F'\t' '$1 == "command" && $3 != "gluetun" && $4 ~ /gateway/ { print $4; exit }' "$out/commands.tsv")
  up=$(awk -F'\t' '$1 == "pf-up" { print $4; exit }' "$out/commands.tsv")
  up_args=$(awk -F'\t' '$1 == "pf-up" { print $5; exit }' "$out/commands.tsv")
  down=$(awk -F'\t' '$1 == "pf-down" { print $4; exit }' "$out/commands.tsv")
  down_args=$(awk -F'\t' '$1 == "pf-down" { print $5; exit }' "$out/commands.tsv")
  [ -n "$setup" ] || { echo "no gateway setup init container (commands.tsv)"; return 1; }
  if [ -z "$up" ] || [ -z "$down" ]; then
    echo "no VPN_PORT_FORWARDING_UP_COMMAND/_DOWN_COMMAND running a mounted script"
    return 1
  fi
  setup_env=$out/scripts/${setup%.sh}.env
  pf_env=$out/scripts/${up%.sh}.env
  setup=$out/scripts/$setup up=$out/scripts/$up down=$out/scripts/$down
  # shellcheck disable=SC2016 # the stubs expand their variables when they run
  printf '#!/bin/sh\necho "2: vpn-gw-veth0: <BROADCAST,MULTICAST,UP> mtu 1420"\necho "    inet $STUB_ADDR/22 brd 192.168.27.255 scope global vpn-gw-veth0"\n' >"$stubs/ip"
  # iptables: log every call; -C (check) and -D (delete) find nothing.
  # shellcheck disable=SC2016
  printf '#!/bin/sh\necho "$*" >>"$STUB_LOG"\ncase " $* " in *" -C "*|*" -D "*) exit 1 ;; esac\n' >"$stubs/iptables"
  chmod +x "$stubs/ip" "$stubs/iptables"
  # run SCRIPT ENV ADDR LOG STATE ARGS...: a script with a container's env, seeing ADDR on its
  # interface, STATE as its state directory.
  run() (
    local script=$1 envf=$2
    while IFS='=' read -r k v; do export "$k=$v"; done <"$envf"
    STUB_ADDR=$3 STUB_LOG=$4 STATE_DIR=$5 PATH="$stubs:$PATH"
    export STUB_ADDR STUB_LOG STATE_DIR PATH
    shift 5
    exec sh "$script" "$@"
  )
  port_map=$(sed -n 's/^PORT_MAPPINGS=//p' "$setup_env")
  fwd=$(sed -n 's/^FORWARD_TO_PORT=//p' "$pf_env")
  [ -n "$fwd" ] || { echo "gluetun's env has no FORWARD_TO_PORT"; return 1; }
  while IFS=$'\t' read -r addr vip; do
    log=$out/iptables.$addr state=$out/state.$addr
    : >"$log"
    mkdir -p "$state"
    if ! run "$setup" "$setup_env" "$addr" "$log" "$state" >"$out/setup.out" 2>&1; then
      cat "$out/setup.out"; echo "gateway setup failed for gateway $addr"; return 1
    fi
    for m in $port_map; do
      for proto in tcp udp; do
        grep -qxF -- "-t nat -A PREROUTING -i tun0 -p $proto --dport ${m%%:*} -j DNAT --to-destination $vip:${m#*:}" "$log" ||
          { cat "$log"; echo "gateway $addr: no $proto DNAT of port ${m%%:*} to $vip:${m#*:}"; return 1; }
      done
    done
    : >"$log"
    # gluetun fills {{PORTS}} with the ports, comma-separated
    # shellcheck disable=SC2086 # the arguments are words on purpose
    run "$up" "$pf_env" "$addr" "$log" "$state" ${up_args//\{\{PORTS\}\}/40000,40001,x0} >"$out/pf.out" 2>&1 ||
      { cat "$out/pf.out"; echo "gateway $addr: the UP command failed"; return 1; }
    for p in 40000 40001; do
      grep -qxF -- "-t nat -A PREROUTING -i tun0 -p tcp --dport $p -j DNAT --to-destination $vip:$fwd" "$log" ||
        { cat "$log" "$out/pf.out"; echo "gateway $addr: the UP command made no tcp DNAT of port $p to $vip:$fwd"; return 1; }
    done
    grep -q -- "x0" "$log" && { cat "$log"; echo "gateway $addr: the UP command used the port 'x0'"; return 1; }
    : >"$log"
    # shellcheck disable=SC2086
    run "$down" "$pf_env" "$addr" "$log" "$state" ${down_args//\{\{PORTS\}\}/40000} >"$out/pf.out" 2>&1 ||
      { cat "$out/pf.out"; echo "gateway $addr: the DOWN command failed"; return 1; }
    grep -qxF -- "-t nat -D PREROUTING -i tun0 -p udp --dport 40000 -j DNAT --to-destination $vip:$fwd" "$log" ||
      { cat "$log"; echo "gateway $addr: the DOWN command removed no udp DNAT of port 40000"; return 1; }
  done <"$out/gateways.tsv"
  if run "$setup" "$setup_env" 192.168.24.5 /dev/null "$out/state.none" >/dev/null 2>&1; then
    echo "gateway setup accepted 192.168.24.5, which is no gateway address"; return 1
  fi
}

# The image is built with `cargo build --locked`: the lock file must be in step, and the
# toolchain in deploy/Dockerfile new enough for every locked package (validate.py).
(cd "$repo" && cargo metadata --format-version 1 --locked --offline --filter-platform x86_64-unknown-linux-gnu) \
  >"$work/cargo-metadata.json" ||
  fail "cargo metadata --locked failed: Cargo.lock is not in step with Cargo.toml, so the image build (cargo build --locked) would fail too"

echo "deploy: validating $here"
validate_tree "$here" "$work/main" || fail "validation failed (above)"

[ "$selftest" = 1 ] || exit 0

# The defects below do not depend on the Kubernetes version: one version keeps this quick.
k8s_versions=("${k8s_versions[-1]}")

# mutate FILE SED_EXPR EXPECTED_TEXT: a copy of deploy/ with one defect must fail with a
# message containing EXPECTED_TEXT.
n=0
caught=0
mutate() {
  local file=$1 expr=$2 expect=$3 copy out
  n=$((n + 1))
  copy=$work/m$n/deploy
  mkdir -p "$copy"
  cp -r "$here/." "$copy/"
  sed -i -e "$expr" "$copy/$file"
  if cmp -s "$here/$file" "$copy/$file"; then
    fail "self-test $n: '$expr' changed nothing in $file (update the self-test)"
  fi
  if out=$(validate_tree "$copy" "$work/m$n/out" 2>&1); then
    echo "$out" >&2
    fail "self-test $n: a defect in $file ('$expr') was not caught"
  fi
  grep -qF -- "$expect" <<<"$out" ||
    { echo "$out" >&2; fail "self-test $n: $file ('$expr') failed, but without '$expect'"; }
  caught=$((caught + 1))
}
mutate base/namespace.yaml 's/^kind: Namespace$/kind: Namespace  /' "trailing spaces"
mutate base/router-deployment.yaml 's/^  minReadySeconds: 10$/  minReadySeconds: 10\n  minReadySecond: 10/' "'minReadySecond' was unexpected"
mutate components/monitoring/servicemonitor.yaml 's/^      interval: 15s$/      intervall: 15s/' "reduced ServiceMonitor schema"
mutate base/networks.yaml 's/"range_end": "192.168.25.131"/"range_end": "192.168.25.135"/' "allocates exactly gateways.addresses"
mutate base/router-deployment.yaml 's/vpn-net-vrrp@vpn-r-veth0/vpn-net-vrp@vpn-r-veth0/' "no such NetworkAttachmentDefinition"
mutate base/router-deployment.yaml 's/value: "1"                 # ingress.sloppy_tcp/value: "0"/' "net.ipv4.vs.sloppy_tcp=0, the config needs 1"
mutate base/router-deployment.yaml '/name: net.ipv4.conf.default.arp_ignore/,+1d' "net.ipv4.conf.default.arp_ignore=(unset)"
mutate base/router-deployment.yaml 's/name: net.ipv4.ip_forward/name: net.ipv4.fib_multipath_hash_seed/' "which the config does not need"
mutate base/networks.yaml '/"net.ipv4.conf.IFNAME.arp_announce": "2"/d; s/"net.ipv4.conf.IFNAME.arp_filter": "1",/"net.ipv4.conf.IFNAME.arp_filter": "1"/' "net.ipv4.conf.vpn-gw-veth0.arp_announce=2"
mutate base/router-deployment.yaml 's/- name: POD_IP/- name: POD_ADDR/' "the container sets no env POD_IP"
# shellcheck disable=SC2016 # ${POD_IP} is text in the config, not for the shell
mutate base/router-config.yaml 's/listen: "${POD_IP}:9090"/listen: 0.0.0.0:9090/' "bind the api to the pod's own address"
mutate base/router-deployment.yaml '/^      nodeSelector:/,+1d' "no nodeSelector"
mutate Dockerfile 's/ nftables libgcc-s1/ libgcc-s1/' "does not get nftables"
mutate components/monitoring/kustomization.yaml 's/^kind: Component$/kind: Kustomization/' "components/ holds Components"
mutate base/router-deployment.yaml 's/add: \["NET_ADMIN", "NET_RAW"\]/add: ["NET_ADMIN", "NET_RAW", "SYS_ADMIN"]/' "capabilities must be"
mutate base/router-config.yaml 's/^        vrid: 51$/        vrid: 300/' "vrrp[0].vrid"
mutate overlays/example/secrets.example.yaml 's/^  tsig: /  tsig-key: /' "has no key tsig"
mutate base/kustomization.yaml '/router-pdb.yaml/d' "not listed in its directory's kustomization.yaml"
mutate components/ecmp-hash-seed/kustomization.yaml 's/name: vpn-router$/name: vpn-routr/' "patch target Deployment/vpn-routr matches no object"
mutate base/namespace.yaml 's/enforce: privileged/enforce: baseline/' "refused by PodSecurity baseline"
mutate Dockerfile 's/^ARG RUST_VERSION=.*/ARG RUST_VERSION=1.85/' "RUST_VERSION 1.85 is older than"
mutate examples/gateways/gateway-setup.yaml 's/+ i ))"$/+ i + 1 ))"/' "no tcp DNAT of port 51413"
# shellcheck disable=SC2016 # $vip and $FORWARD_TO_PORT are text in the script, not for this shell
mutate examples/gateways/gateway-setup.yaml 's/--to-destination $vip:$FORWARD_TO_PORT"/--to-destination $vip"/' "the UP command made no tcp DNAT of port 40000"
mutate examples/gateways/gateway-setup.yaml 's/^    iptables -A FORWARD -i vpn-gw-veth0 -o tun0 -j ACCEPT$/    iptables -A FORWARD -i vpn-gw-veth1 -o tun0 -j ACCEPT/' "interface vpn-gw-veth1 is none of the pod's"
mutate examples/gateways/gateway-setup.yaml 's/^    iptables -t nat -A POSTROUTING/     iptables -t nat -A POSTROUTING/' "gluetun skips it silently"
mutate examples/gateways/gateway-setup.yaml '/^    iptables -A FORWARD/d' "accepts nothing in FORWARD"
mutate examples/gateways/gluetun-statefulset.yaml '/name: net.ipv4.ip_forward$/{n;s/value: "1"/value: "0"/}' "gluetun never sets net.ipv4.ip_forward"
mutate examples/gateways/gluetun-statefulset.yaml 's/value: "6666"$/value: "6667"/' "FORWARD_TO_PORT 6667 is no virtual server port"
mutate examples/gateways/gateway-setup.yaml '/-j TCPMSS/d' "post-rules.txt clamps no TCP MSS"
mutate examples/gateways/gateway-setup.yaml 's/--set-mss 1280$/--set-mss 1300/' "--set-mss 1300 does not fit the tunnel: WIREGUARD_MTU 1320"
mutate base/router-config.yaml 's/^      tunnel_mtu: 1320 /      tunnel_mtu: 1420 /' "gateways.tunnel_mtu 1420 is larger than the gateways' WIREGUARD_MTU 1320"
# the client attachments' routes are exactly `vpn-router nad-routes` for the config's exclusions
# (the backquotes are text in the expected message, not for this shell)
# shellcheck disable=SC2016
mutate base/networks.yaml '0,/{"dst": "11.0.0.0\/8"},/{/{"dst": "11.0.0.0\/8"},/d}' 'vpn-net-clients: ipam routes differ from `vpn-router nad-routes --exclude 10.0.0.0/8 --exclude-reserved --extra 10.33.0.10/32` (the router config'"'"'s gateways.egress exclusions and its local_route addresses; 103 routes, expected 104: missing {"dst": "11.0.0.0/8"}'
# shellcheck disable=SC2016
mutate base/router-config.yaml 's/^        exclude: \[10.0.0.0\/8\] /        exclude_reserved: false\n&/' 'vpn-net-ingress-port-1: ipam routes differ from `vpn-router nad-routes --exclude 10.0.0.0/8 --extra 10.33.0.10/32`'
# DNS through the VPN (the router's local_route virtual server `dns`, examples/resolver): the
# client attachments send the cluster DNS service IP to the egress VIP (nad-routes --extra) ...
# shellcheck disable=SC2016
mutate base/networks.yaml '0,/{"dst": "10.33.0.10\/32"},/{/{"dst": "10.33.0.10\/32"},/d}' 'vpn-net-clients: ipam routes differ from `vpn-router nad-routes --exclude 10.0.0.0/8 --exclude-reserved --extra 10.33.0.10/32` (the router config'"'"'s gateways.egress exclusions and its local_route addresses; 103 routes, expected 104: missing {"dst": "10.33.0.10/32"}'
# ... the resolvers' attachment allocates inside the real servers, routes every client range
# back via the VIP (NAT mode), the Internet via the VIP, neither the cluster DNS nor the
# intranet nor a non-client pod via the VIP, and takes no ICMP redirect ...
mutate examples/resolver/network.yaml 's/"range_end": "192.168.27.130"/"range_end": "192.168.27.131"/' "allocates 192.168.27.131, outside the real_servers of virtual server dns"
mutate examples/resolver/network.yaml '/"dst": "192.168.24.0\/25"/d' "vpn-net-dns: does not route 192.168.24.1-192.168.24.127 (vpn-net-clients) via the egress VIP"
mutate examples/resolver/network.yaml 's|{"dst": "8.0.0.0/7", "gw": "192.168.26.254"},|&\n              {"dst": "10.33.0.10/32", "gw": "192.168.26.254"},|' "vpn-net-dns: routes 10.33.0.10 via the egress VIP: the resolvers' own queries to it would come back into the router's virtual server dns (local_route), a loop"
mutate examples/resolver/network.yaml 's|{"dst": "8.0.0.0/7", "gw": "192.168.26.254"},|&\n              {"dst": "10.96.0.0/12", "gw": "192.168.26.254"},|' "vpn-net-dns: routes 10.96.0.0/12 via the egress VIP, inside 10.0.0.0/8 that the router keeps off the VPN"
mutate examples/resolver/network.yaml 's|{"dst": "192.168.27.0/25", "gw": "192.168.26.254"},|&\n              {"dst": "192.168.26.0/25", "gw": "192.168.26.254"},|' "vpn-net-dns: routes 192.168.26.1 (vpn-net-routers) via the egress VIP: only client ranges belong there"
mutate examples/resolver/network.yaml '/{"dst": "1.0.0.0\/8", "gw": "192.168.26.254"},/d' "vpn-net-dns: does not route 1.0.0.0/8 via the egress VIP: the resolvers' queries to public resolvers there would leave through the pod's own network"
mutate examples/resolver/network.yaml '/"net.ipv4.conf.all.accept_redirects": "0",/d' "vpn-net-dns: accepts ICMP redirects"
mutate examples/resolver/coredns-deployment.yaml 's/maxSurge: 1$/maxSurge: 2/' "allocates 3 addresses (192.168.27.128-192.168.27.130), but Deployment/vpn-resolver (replicas 2 + maxSurge 2) can run 4 pods at once"
# ... and the Corefile forwards cluster.local to the cluster DNS (the local_route address) on
# the pod's own network, everything else through the VPN, on the virtual server's real_port.
mutate examples/resolver/corefile.yaml 's/forward \. 10\.33\.0\.10$/forward . 1.1.1.1/' "Corefile: cluster.local forwards to 1.1.1.1, which vpn-net-dns sends to the egress VIP"
mutate base/router-config.yaml 's/addresses: \[10.33.0.10\]/addresses: [10.33.0.11]/' "Corefile: cluster.local forwards to 10.33.0.10, but the router's local_route virtual server serves 10.33.0.11"
mutate examples/resolver/corefile.yaml 's/forward \. 1\.1\.1\.1 9\.9\.9\.9$/forward . 10.0.0.53/' "Corefile: . forwards to 10.0.0.53, which no attachment of the pod routes via the egress VIP"
mutate examples/resolver/corefile.yaml 's/^    \.:1053 {$/    .:53 {/' "Corefile: server block .:53 listens on port 53, but virtual server dns sends the queries to port 1053 (real_port)"
mutate examples/resolver/corefile.yaml 's/^    cluster.local:1053 10.in-addr.arpa:1053 {$/    10.in-addr.arpa:1053 {/' "Corefile: no server block for cluster.local"
mutate base/router-config.yaml 's/^        exclude: \[10.0.0.0\/8\] /        exclude: [10.0.0.1\/8] /' '"10.0.0.1/8" has host bits set'
mutate base/router-config.yaml 's/^        exclude: \[10.0.0.0\/8\] /        destinations: [0.0.0.0\/1]\n&/' "gateways.egress.destinations ['0.0.0.0/1']"
echo "deploy: self-test ok ($caught defects caught)"
bash "$here/check-monitoring.sh" "$here" | tail -n 2
