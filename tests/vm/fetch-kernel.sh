#!/usr/bin/env bash
# Download Debian's stock kernel (with IPVS modules) into the VM cache and unpack it.
#
# The kernel package is only unpacked (dpkg -x), never installed: the host keeps its own kernel.
# Writes $VM_CACHE/kernel.env (KVER, KERNEL_ROOT, VMLINUZ, KERNEL_PKG, KERNEL_PKG_VERSION) for
# build-initramfs.sh and run.sh. Idempotent: nothing is downloaded when the same package version
# is already unpacked.
#
# Environment:
#   VM_CACHE        cache directory (default: <repo>/.cache/vm)
#   VM_KERNEL_META  the meta package to resolve (default: linux-image-6.12-amd64)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VM_CACHE:-$repo/.cache/vm}
meta=${VM_KERNEL_META:-linux-image-6.12-amd64}

die() { echo "fetch-kernel: error: $*" >&2; exit 1; }
log() { echo "fetch-kernel: $*" >&2; }

# Tools the whole harness needs; name the Debian package that provides each one.
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' not found; install the Debian package '$2' (apt-get install $2)"
}
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need depmod kmod
need modprobe kmod
need xz xz-utils

need flock util-linux

mkdir -p "$cache/debs" "$cache/kernel"
exec 9>"$cache/.kernel.lock"
flock 9

# Fast path: the kernel resolved last time is unpacked and apt's lists have not changed since
# (apt-get update rewrites /var/lib/apt/lists), so resolving again would give the same answer.
lists_mtime=$(stat -c %Y /var/lib/apt/lists 2>/dev/null || echo 0)
if [[ -f "$cache/kernel.env" ]]; then
    prev=$(
        # shellcheck source=/dev/null
        . "$cache/kernel.env"
        if [[ "${KERNEL_META:-}" == "$meta" && "${APT_LISTS_MTIME:-}" == "$lists_mtime" &&
            -f "${KERNEL_ROOT:-/nonexistent}/.unpacked" && -f "${VMLINUZ:-/nonexistent}" ]]; then
            echo fresh
        fi
    )
    [[ "$prev" == fresh ]] && exit 0
fi

# 1. Resolve the meta package to the versioned image package it depends on
#    (linux-image-6.12-amd64 -> linux-image-6.12.117+deb12-amd64, signed or -unsigned).
if ! apt-cache show "$meta" >/dev/null 2>&1; then
    die "apt knows no package '$meta'. Run 'apt-get update' (the package comes from Debian's" \
        "bookworm-backports/security or trixie archive), then retry."
fi
pkg=$(apt-cache depends "$meta" 2>/dev/null |
    sed -n 's/^ *|\{0,1\}Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n1)
[[ -n "$pkg" ]] || die "could not find the versioned linux-image-* dependency of '$meta' in" \
    "'apt-cache depends $meta'; run 'apt-get update' and check the package"
version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
[[ -n "$version" && "$version" != "(none)" ]] ||
    die "apt has no installable candidate for '$pkg' (dependency of '$meta'); run 'apt-get update'"

root="$cache/kernel/${pkg}_${version}"
stamp="$root/.unpacked"

# 2. Download + unpack unless this exact version is already there.
if [[ -f "$stamp" ]]; then
    : # already unpacked
else
    # apt-get download names the file <pkg>_<version, ':' as %3a>_<arch>.deb
    deb="$cache/debs/${pkg}_${version//:/%3a}_amd64.deb"
    if [[ ! -s "$deb" ]]; then
        log "downloading $pkg $version (about 100 MB) into $cache/debs"
        (cd "$cache/debs" && apt-get -q -o APT::Sandbox::User=root download "$pkg=$version") ||
            die "apt-get download $pkg=$version failed; run 'apt-get update' and check network access"
        [[ -s "$deb" ]] || die "apt-get download reported success but $deb is not there"
    fi
    log "unpacking $deb"
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp"
    dpkg-deb -x "$deb" "$root.tmp" || die "dpkg-deb -x $deb failed (corrupt download? delete it)"
    rm -rf "$root"
    mv "$root.tmp" "$root"
fi

# 3. Work out the kernel release and generate modules.dep (Debian's postinst normally runs depmod).
mapfile -t kvers < <(ls "$root/lib/modules" 2>/dev/null)
[[ ${#kvers[@]} -eq 1 ]] || die "expected one kernel release under $root/lib/modules, found: ${kvers[*]:-none}"
kver=${kvers[0]}
vmlinuz="$root/boot/vmlinuz-$kver"
[[ -f "$vmlinuz" ]] || die "no kernel image at $vmlinuz inside $pkg"

if [[ ! -f "$stamp" ]]; then
    depmod -b "$root" "$kver" || die "depmod -b $root $kver failed"
    [[ -s "$root/lib/modules/$kver/modules.dep" ]] || die "depmod produced no modules.dep for $kver"
    touch "$stamp"
fi

cat >"$cache/kernel.env.tmp" <<EOF
KVER=$kver
KERNEL_ROOT=$root
VMLINUZ=$vmlinuz
KERNEL_PKG=$pkg
KERNEL_PKG_VERSION=$version
KERNEL_META=$meta
APT_LISTS_MTIME=$lists_mtime
EOF
mv "$cache/kernel.env.tmp" "$cache/kernel.env"
[[ -n "${VM_VERBOSE:-}" ]] && log "kernel $kver ready: $vmlinuz"
exit 0
