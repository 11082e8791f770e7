#!/usr/bin/env bash
# Build the busybox-static initramfs for the test VM and print its path on stdout.
#
# Contents: /bin/busybox (+ applet links), /init (guest-init), the modules from modules.list with
# their dependencies and soft dependencies, plus every module under AUTOLOAD_DIRS so the kernel
# can request_module() them later. Debian ships modules as .ko.xz; they are decompressed here
# (busybox insmod/modprobe cannot read all of them), and depmod is rerun on the result.
#
# The image is cached in $VM_CACHE as initramfs-<kver>-<hash>.cpio.gz, the hash covering this
# script, guest-init, modules.list, busybox and the kernel version; an unchanged input set is
# not rebuilt.
#
# Environment:
#   VM_CACHE    cache directory (default: <repo>/.cache/vm)
#   VM_BUSYBOX  a static busybox to use instead of /bin/busybox from busybox-static
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${VM_CACHE:-$repo/.cache/vm}

# Module directories (relative to lib/modules/<kver>/kernel) copied whole for autoloading.
AUTOLOAD_DIRS=(
    net/netfilter
    net/ipv4/netfilter
    net/ipv6/netfilter
    net/bridge
    net/sched
    net/8021q
)
# Single extra modules copied for autoloading (links a namespace test may create).
AUTOLOAD_MODULES=(veth macvlan ipvlan dummy tun ifb vxlan)
# Module options (modprobe.d syntax), used at boot and by autoloading: no devices that the tests
# did not ask for (dummy would create dummy0, ifb ifb0/ifb1).
MODULE_OPTIONS='options dummy numdummies=0
options ifb numifbs=0'

die() { echo "build-initramfs: error: $*" >&2; exit 1; }
log() { echo "build-initramfs: $*" >&2; }
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' not found; install the Debian package '$2' (apt-get install $2)"
}
need cpio cpio
need gzip gzip
need xz xz-utils
need depmod kmod
need modprobe kmod
need flock util-linux
need sha256sum coreutils

busybox=${VM_BUSYBOX:-/bin/busybox}
if [[ -z "${VM_BUSYBOX:-}" ]]; then
    [[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null || true)" == "install ok installed" ]] ||
        die "the Debian package 'busybox-static' is not installed (apt-get install busybox-static);" \
            "the initramfs needs its statically linked /bin/busybox"
fi
[[ -x "$busybox" ]] || die "no busybox at $busybox (install the Debian package 'busybox-static')"

mkdir -p "$cache"
"$here/fetch-kernel.sh" >&2
# shellcheck source=/dev/null
. "$cache/kernel.env"
src="$KERNEL_ROOT/lib/modules/$KVER"
[[ -s "$src/modules.dep" ]] || die "no modules.dep in $src; delete $KERNEL_ROOT and rerun fetch-kernel.sh"

hash=$(
    {
        cat "$here/build-initramfs.sh" "$here/guest-init" "$here/modules.list" "$busybox"
        echo "$KVER $KERNEL_PKG_VERSION"
    } | sha256sum | cut -c1-16
)
out="$cache/initramfs-$KVER-$hash.cpio.gz"

exec 9>"$cache/.initramfs.lock"
flock 9
if [[ -s "$out" ]]; then
    echo "$out"
    exit 0
fi

log "building $out"
stage=$(mktemp -d "$cache/initramfs-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,etc,proc,sys,dev,mnt,tmp,root,lib/modules/"$KVER"}
ln -s bin "$stage/sbin"
cp "$busybox" "$stage/bin/busybox"
for applet in $("$busybox" --list); do
    [[ "$applet" == busybox || -e "$stage/bin/$applet" ]] || ln -s busybox "$stage/bin/$applet"
done
mknod -m 600 "$stage/dev/console" c 5 1
mknod -m 666 "$stage/dev/null" c 1 3
install -m 755 "$here/guest-init" "$stage/init"
echo "$KVER" >"$stage/etc/vm-kver"

# Boot load order: modprobe --show-depends gives dependencies and soft dependencies first.
declare -A seen=()
load_order=()
required=()
while read -r mod; do
    mod=${mod%%#*}
    mod=${mod//[[:space:]]/}
    [[ -n "$mod" ]] || continue
    lines=$(modprobe -d "$KERNEL_ROOT" -S "$KVER" --show-depends "$mod" 2>&1) ||
        die "module '$mod' (modules.list) is not in kernel $KVER: $lines"
    while read -r kind path _; do
        case "$kind" in
        builtin) continue ;;
        insmod) ;;
        *) die "unexpected modprobe --show-depends output for '$mod': $kind $path" ;;
        esac
        rel=${path#"$src/"}
        [[ "$rel" != "$path" ]] || die "module path $path is outside $src"
        if [[ -z "${seen[$rel]:-}" ]]; then
            seen[$rel]=1
            load_order+=("$rel")
        fi
    done <<<"$lines"
    if ! grep -q "^builtin " <<<"$lines"; then
        required+=("${mod//-/_}")
    fi
done <"$here/modules.list"

# Everything to copy: the boot set, the autoload set, and their dependencies from modules.dep.
declare -A want=()
for rel in "${load_order[@]}"; do want[$rel]=1; done
for d in "${AUTOLOAD_DIRS[@]}"; do
    [[ -d "$src/kernel/$d" ]] || continue
    while IFS= read -r f; do want[${f#"$src/"}]=1; done < <(find "$src/kernel/$d" -name '*.ko*' -type f)
done
for m in "${AUTOLOAD_MODULES[@]}"; do
    if p=$(modprobe -d "$KERNEL_ROOT" -S "$KVER" --show-depends "$m" 2>/dev/null); then
        while read -r kind path _; do
            [[ "$kind" == insmod ]] && want[${path#"$src/"}]=1
        done <<<"$p"
    fi
done
# modules.dep lists the full (transitive) dependency set of each module.
declare -A deps=()
while IFS=: read -r m d; do deps[$m]=$d; done <"$src/modules.dep"
for rel in "${!want[@]}"; do
    for dep in ${deps[$rel]:-}; do want[$dep]=1; done
done

n=0
for rel in "${!want[@]}"; do
    dst="$stage/lib/modules/$KVER/${rel%.xz}"
    mkdir -p "$(dirname "$dst")"
    case "$rel" in
    *.ko.xz) xz -dc "$src/$rel" >"$dst" ;;
    *.ko) cp "$src/$rel" "$dst" ;;
    *) die "unexpected module file $rel" ;;
    esac
    n=$((n + 1))
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [[ -f "$src/$f" ]] && cp "$src/$f" "$stage/lib/modules/$KVER/$f"
done
sed -i 's/\.ko\.xz$/.ko/' "$stage/lib/modules/$KVER/modules.order"
depmod -b "$stage" "$KVER" || die "depmod on the initramfs module tree failed"

mkdir -p "$stage/etc/modprobe.d"
echo "$MODULE_OPTIONS" >"$stage/etc/modprobe.d/vm.conf"
# One line per module to insmod at boot: path, name as in /sys/module, options.
for rel in "${load_order[@]}"; do
    rel=${rel%.xz}
    name=$(basename "$rel" .ko)
    name=${name//-/_}
    opts=$(sed -n "s/^options $name //p" <<<"$MODULE_OPTIONS")
    echo "$rel $name $opts"
done >"$stage/etc/vm-modules.load"
printf '%s\n' "${required[@]}" >"$stage/etc/vm-modules.required"
log "$n modules ($(du -sh "$stage/lib/modules" | cut -f1) uncompressed), ${#load_order[@]} loaded at boot"

(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"$out.tmp"
mv "$out.tmp" "$out"
# Older images (other hashes) are stale.
for old in "$cache"/initramfs-*.cpio.gz; do
    [[ "$old" == "$out" ]] || rm -f "$old"
done
log "done: $out ($(du -h "$out" | cut -f1))"
echo "$out"
