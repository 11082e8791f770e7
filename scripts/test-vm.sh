#!/usr/bin/env bash
# The VM tier: builds the IPVS kernel tests on the host and runs them, in one boot, inside a
# qemu VM on Debian's 6.12 kernel (tests/vm/run.sh), because this host's kernel may lack IPVS.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
# The kernel/initramfs cache must be visible in the guest too, so not under /tmp.
export VM_CACHE=${VM_CACHE:-/var/cache/vpn-router-vm/cache}

# The test binary's path comes from cargo's JSON messages: it has a hash in its name.
kernel_tests=$($CARGO test -p ipvs --test kernel --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "kernel" and m.get("executable"):
        print(m["executable"])')
[ -n "$kernel_tests" ] || { echo "test-vm: could not build ipvs/tests/kernel.rs" >&2; exit 1; }
$CARGO build -q -p ipvs --example ipvs-smoke
smoke=${CARGO_TARGET_DIR:-target}/debug/examples/ipvs-smoke

# The guest mounts its own tmpfs on /tmp, /run and /var/tmp: a checkout (or target dir) under
# those is invisible there. Stage the two binaries where the guest sees the host's files.
stage=/var/cache/vpn-router-vm/$$
mkdir -p "$stage"
trap 'rm -rf "$stage"' EXIT
cp "$kernel_tests" "$stage/ipvs-kernel-tests"
cp "$smoke" "$stage/ipvs-smoke"
kernel_tests=$stage/ipvs-kernel-tests
smoke=$stage/ipvs-smoke
repo=$(pwd)

echo "test-vm: running the IPVS kernel tests in a VM (Debian linux-image-6.12-amd64, qemu TCG)"
cd "$stage"
bash "$repo/tests/vm/run.sh" --timeout 900 -- sh -c "
  set -e
  echo '== ipvs kernel tests'; '$kernel_tests' --ignored --test-threads=1
  echo '== ipvs-smoke'; '$smoke'
  echo '== ipvsadm -Ln after the tests (expect no services left)'; ipvsadm -Ln
"
