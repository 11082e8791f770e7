#!/usr/bin/env bash
# Installs what `make test` and `make demo` need on a Debian machine, or — when not root —
# says exactly what is missing. Idempotent: a machine that has everything is left alone.
set -euo pipefail

# command → Debian package that provides it
declare -A NEED=(
  [ip]=iproute2
  [nft]=nftables
  # the lab's gateways run gluetun's firewall (iptables, nft backend) and the example's scripts
  [iptables]=iptables
  [keepalived]=keepalived
  [named]=bind9
  [tsig-keygen]=bind9-utils
  [dig]=dnsutils
  # the VM tier's resolver pods and cluster DNS (dnsmasq-base: the binary, no service)
  [dnsmasq]=dnsmasq-base
  [promtool]=prometheus
  [ipvsadm]=ipvsadm
  [qemu-system-x86_64]=qemu-system-x86
  [tcpdump]=tcpdump
  [yamllint]=yamllint
  [modprobe]=kmod
  [ping]=iputils-ping
  [cpio]=cpio
  [xz]=xz-utils
  [sysctl]=procps
  [shellcheck]=shellcheck
  [python3]=python3
  # make image and the kubelet-like test (tests/src/kube/): podman with runc, and mmdebstrap
  # for the offline base layer; settings in scripts/containers.conf
  [podman]=podman
  [runc]=runc
  [mmdebstrap]=mmdebstrap
)
# files → package (no command to probe for)
declare -A NEED_FILES=(
  [/bin/busybox]=busybox-static
)

missing=()
for cmd in "${!NEED[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
    missing+=("${NEED[$cmd]}")
  fi
done
for f in "${!NEED_FILES[@]}"; do
  # busybox (dynamic) may exist without busybox-static; the VM initramfs needs the static one.
  if ! dpkg-query -W -f='${Status}' "${NEED_FILES[$f]}" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("${NEED_FILES[$f]}")
  fi
done
# make test-deploy runs kubernetes-validate from a venv: Debian's python3 needs python3-venv.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

# kubernetes-validate (PyPI) for make test-deploy, pinned, in a venv under .cache (no root
# needed). Its Kubernetes schemas ship inside the package, so validating needs no network.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KUBERNETES_VALIDATE_VERSION=1.37.0
deploy_venv() {
  local venv=$repo/.cache/deploy-venv
  if [ -x "$venv/bin/kubernetes-validate" ] &&
    [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null)" = "$KUBERNETES_VALIDATE_VERSION" ]; then
    return 0
  fi
  echo "deps: installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
}

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if [ ${#missing[@]} -eq 0 ]; then
  deploy_venv
  echo "deps: everything is installed"
  exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" != 0 ]; then
  echo "deps: missing Debian packages: ${missing[*]}" >&2
  echo "deps: run as root (make test installs them), or: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# The test tiers start keepalived and named themselves, inside namespaces; the packages'
# services must not start on the host. policy-rc.d tells invoke-rc.d so during this install.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT
# Lists may be stale or absent on a fresh machine; an install of a missing package needs them.
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
deploy_venv
echo "deps: installed"
