#!/usr/bin/env bash
# The VM harness's own checks (four boots, about 30 s):
#  1. IPVS works in the guest: ipvsadm creates an mh service with both scheduler flags and reads
#     it back as `mh (mh-fallback,mh-port)`; the guest's host root is read-only, /tmp shows the
#     host's files and takes writes that stay in the guest, the working directory and --env reach
#     the command, the exit status comes back.
#  2. --timeout kills a command that does not finish, with status 124.
#  3. A guest kernel that panics while booting (forced: the first boot gets no init) is booted
#     once more and the command runs; the retry says so.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
fail=0
check() { # check DESCRIPTION CONDITION...
    local what=$1
    shift
    if "$@"; then echo "selftest: ok: $what"; else echo "selftest: FAIL: $what" >&2; fail=1; fi
}

cd "$repo"
out=$(mktemp)
probe=$(mktemp -d /tmp/vm-selftest.XXXXXX)
echo "from the host" >"$probe/host-file"
trap 'rm -rf "$out" "$probe"' EXIT

set +e
# shellcheck disable=SC2016 # expanded by the guest's shell
"$here/run.sh" --timeout 300 --env SELFTEST_VALUE="a 'quoted' \$value" --env SELFTEST_PROBE="$probe" -- sh -c '
    set -e
    ipvsadm -A -t 10.255.0.1:80 -s mh -b mh-fallback,mh-port
    ipvsadm -a -t 10.255.0.1:80 -r 10.255.1.1:80 -m
    ipvsadm -Ln
    echo "cwd=$(pwd)"
    echo "env=$SELFTEST_VALUE"
    echo "kernel=$(uname -r)"
    if touch /etc/vm-selftest 2>/dev/null; then echo "root=writable"; else echo "root=read-only"; fi
    echo x >/tmp/vm-selftest && echo "tmp=writable"
    echo "probe=$(cat "$SELFTEST_PROBE/host-file")"
    echo guest >"$SELFTEST_PROBE/guest-file"
    exit 3
' | tee "$out"
status=${PIPESTATUS[0]}
set -e
check "exit status of the command comes back (3)" test "$status" -eq 3
check "ipvsadm shows mh with both flags" grep -qF "TCP  10.255.0.1:80 mh (mh-fallback,mh-port)" "$out"
check "destination listed" grep -qE -- "-> 10.255.1.1:80 +Masq +1" "$out"
check "working directory is the caller's" grep -qxF "cwd=$repo" "$out"
check "--env value arrives unchanged" grep -qxF "env=a 'quoted' \$value" "$out"
check "guest runs the Debian kernel" grep -qE "^kernel=6\.12\." "$out"
check "host root is read-only" grep -qxF "root=read-only" "$out"
check "/tmp is writable" grep -qxF "tmp=writable" "$out"
check "the host's /tmp files are visible" grep -qxF "probe=from the host" "$out"
check "guest writes to /tmp stay in the guest" test ! -e "$probe/guest-file"

set +e
start=$SECONDS
"$here/run.sh" --timeout 15 -- sh -c 'echo started; sleep 600'
status=$?
took=$((SECONDS - start))
set -e
check "timeout gives status 124" test "$status" -eq 124
check "timeout stops the VM promptly (${took}s)" test "$took" -lt 30

set +e
retry_err=$(mktemp)
VM_TEST_PANIC_FIRST_BOOT=1 "$here/run.sh" --timeout 120 -- sh -c 'echo after-the-retry; exit 4' 2>"$retry_err" | tee "$out"
status=${PIPESTATUS[0]}
set -e
check "a boot that panicked is retried and the command runs (4)" test "$status" -eq 4
check "the command's output comes once" test "$(grep -cxF after-the-retry "$out")" -eq 1
check "the retry is reported" grep -qF "panicked while booting, before the command ran" "$retry_err"
rm -f "$retry_err"

if [[ $fail -ne 0 ]]; then
    echo "selftest: FAILED" >&2
    exit 1
fi
echo "selftest: all checks passed"
