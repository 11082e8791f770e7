#!/usr/bin/env bash
# The ingress path on a real IPVS kernel: builds vpn-router, the lab binary and the ingress VM
# test on the host, then runs the test in ONE VM boot (the guest builds the lab's namespaces
# and runs the real daemon there; this host's kernel has no IPVS).
#
#   tests/vm/test-ingress.sh [--timeout SECS] [TEST-BINARY-ARGS...]
#
# Exit status: 0 when the test passed; otherwise non-zero (124: timeout, 125: harness).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

timeout=600
if [[ "${1:-}" == --timeout ]]; then
    timeout=${2:?--timeout needs seconds}
    shift 2
fi

die() { echo "test-ingress: error: $*" >&2; exit 125; }
command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, https://rustup.rs)"
for tool in ip nft ipvsadm; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found on the host (the guest runs the host's binaries): apt-get install ${tool/ip/iproute2}"
done

executable_for() {
    grep -F "\"reason\":\"compiler-artifact\"" | grep -F "\"src_path\":\"$1\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1
}

cd "$repo"
echo "test-ingress: building vpn-router, vpn-router-lab and the ingress VM test on the host" >&2
cargo build -p vpn-router --bin vpn-router >&2 || die "cargo build -p vpn-router failed (see above)"
json=$(cargo test -p vpn-router-tests --test ingress_vm --no-run --message-format=json-render-diagnostics) ||
    die "cargo test -p vpn-router-tests --test ingress_vm --no-run failed (see above)"
test_bin=$(executable_for "$repo/tests/tests/ingress_vm.rs" <<<"$json")
[[ -n "$test_bin" && -x "$test_bin" ]] || die "no test binary for tests/tests/ingress_vm.rs in cargo's output"
[[ -x "$repo/target/debug/vpn-router-lab" && -x "$repo/target/debug/vpn-router" ]] ||
    die "target/debug/vpn-router or vpn-router-lab missing after the build"

cd "$repo/tests"
exec "$here/run.sh" --timeout "$timeout" --mem 1536 \
    --env RUST_BACKTRACE="${RUST_BACKTRACE:-1}" \
    --env VPN_ROUTER_LAB_BIN="$repo/target/debug/vpn-router-lab" -- \
    "$test_bin" --ignored --test-threads=1 --nocapture "$@"
