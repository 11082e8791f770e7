#!/usr/bin/env bash
# make image: builds the container image vpn-router:dev from deploy/Dockerfile with podman,
# on a machine that reaches Debian's package archive but no container registry.
#
#   1. `cargo build --release --locked` of vpn-router on the host;
#   2. the stand-in for debian:bookworm-slim: `mmdebstrap --variant=minbase bookworm`,
#      imported as localhost/vpn-router-debian:bookworm (kept in podman's storage; built once);
#   3. `podman build -f deploy/Dockerfile` with BINARY=prebuilt (the context holds only the
#      binary) and DEBIAN_IMAGE set to that import: every stage of the recipe but the Rust
#      build runs, the runtime's packages come from Debian's archive (--network host);
#   4. a smoke test: `vpn-router version` and `nft --version` in the image, run as the
#      Deployment runs it (read-only root, every capability dropped but NET_ADMIN, NET_RAW);
#   5. the image's size.
#
# IMAGE (default vpn-router:dev) names the result. podman reads scripts/containers.conf
# (runc, no rlimits) unless CONTAINERS_CONF says otherwise.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/scripts/containers.conf}
image=${IMAGE:-vpn-router:dev}
base=localhost/vpn-router-debian:bookworm
cache=$repo/.cache/image
CARGO=${CARGO:-cargo}

fail() { echo "image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (podman with runc, mmdebstrap): run as root"
for tool in podman mmdebstrap runc; do
  command -v "$tool" >/dev/null || fail "$tool is missing: run scripts/install-deps.sh (make deps) as root"
done

echo "image: cargo build --release --locked -p vpn-router --bin vpn-router"
(cd "$repo" && "$CARGO" build --release --locked -p vpn-router --bin vpn-router)

mkdir -p "$cache"
if ! podman image exists "$base"; then
  echo "image: $base from mmdebstrap --variant=minbase bookworm (once)"
  rm -f "$cache/debian-bookworm.tar"
  mmdebstrap --quiet --variant=minbase bookworm "$cache/debian-bookworm.tar"
  # podman import sets no PATH; apt-get and dpkg-deb in the rootfs stage need one.
  podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    "$cache/debian-bookworm.tar" "$base" >/dev/null
  rm -f "$cache/debian-bookworm.tar"
fi

ctx=$cache/context
rm -rf "$ctx"
mkdir -p "$ctx"
cp "$repo/target/release/vpn-router" "$ctx/vpn-router"
echo "image: podman build -f deploy/Dockerfile --build-arg BINARY=prebuilt --build-arg DEBIAN_IMAGE=$base -t $image"
podman build --quiet --network host -f "$repo/deploy/Dockerfile" \
  --build-arg BINARY=prebuilt --build-arg "DEBIAN_IMAGE=$base" \
  --label "org.opencontainers.image.revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)" \
  -t "$image" "$ctx" >/dev/null

run=(podman run --rm --read-only --cap-drop=all --cap-add=NET_ADMIN --cap-add=NET_RAW --network none)
version=$("${run[@]}" "$image" version) || fail "the image does not run: ${run[*]} $image version"
nft=$("${run[@]}" --entrypoint /usr/sbin/nft "$image" --version) || fail "nft does not run in the image"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "image: $image built: $version, $nft, $((size / 1000000)) MB ($size bytes)"
echo "image: try it: CONTAINERS_CONF=$CONTAINERS_CONF podman run --rm --read-only --cap-drop=all --cap-add=NET_ADMIN --cap-add=NET_RAW $image version"
