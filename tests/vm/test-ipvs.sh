#!/usr/bin/env bash
# Build the ipvs crate's kernel tests and smoke example on the host, then run both in ONE VM boot
# (Debian's kernel has IPVS; this host's kernel does not).
#
#   tests/vm/test-ipvs.sh [--timeout SECS] [TEST-BINARY-ARGS...]
#
# Extra arguments go to the kernel test binary (e.g. a test name filter). Exit status: 0 when the
# smoke example and every kernel test passed; otherwise non-zero (124: timeout, 125: harness).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

timeout=900
if [[ "${1:-}" == --timeout ]]; then
    timeout=${2:?--timeout needs seconds}
    shift 2
fi

die() { echo "test-ipvs: error: $*" >&2; exit 125; }
command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust, https://rustup.rs)"

# executable_for SRC_PATH: the artifact cargo built from that source file (JSON on stdin).
executable_for() {
    grep -F "\"reason\":\"compiler-artifact\"" | grep -F "\"src_path\":\"$1\"" |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1
}

cd "$repo"
echo "test-ipvs: building the ipvs kernel tests and ipvs-smoke on the host" >&2
json=$(cargo test -p ipvs --test kernel --no-run --message-format=json-render-diagnostics) ||
    die "cargo test -p ipvs --test kernel --no-run failed (see above)"
kernel_tests=$(executable_for "$repo/ipvs/tests/kernel.rs" <<<"$json")
[[ -n "$kernel_tests" && -x "$kernel_tests" ]] || die "no test binary for ipvs/tests/kernel.rs in cargo's output"

json=$(cargo build -p ipvs --example ipvs-smoke --message-format=json-render-diagnostics) ||
    die "cargo build -p ipvs --example ipvs-smoke failed (see above)"
smoke=$(executable_for "$repo/ipvs/examples/ipvs-smoke.rs" <<<"$json")
[[ -n "$smoke" && -x "$smoke" ]] || die "no binary for ipvs/examples/ipvs-smoke.rs in cargo's output"

# In the guest: the smoke example first, then the kernel tests one at a time (they share the one
# kernel IPVS table unless they isolate themselves), all in the ipvs package directory as
# `cargo test` would. Both always run; the status says whether either failed.
# shellcheck disable=SC2016 # expanded by the guest's shell
guest='
rc=0
echo "=== ipvs-smoke: $1"
if "$1"; then echo "=== ipvs-smoke: ok"; else s=$?; echo "=== ipvs-smoke: FAILED (exit $s)"; rc=1; fi
smoke=$1 tests=$2
shift 2
echo "=== ipvs kernel tests: $tests --ignored --test-threads=1 $*"
if "$tests" --ignored --test-threads=1 "$@"; then echo "=== ipvs kernel tests: ok"
else s=$?; echo "=== ipvs kernel tests: FAILED (exit $s)"; rc=1; fi
exit $rc
'
cd "$repo/ipvs"
exec "$here/run.sh" --timeout "$timeout" --env RUST_BACKTRACE="${RUST_BACKTRACE:-1}" -- \
    sh -c "$guest" sh "$smoke" "$kernel_tests" "$@"
