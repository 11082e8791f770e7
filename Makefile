# vpn-router — the two commands of the README, and the pieces they are made of.
#
#   make demo    build, start the netns lab, drive traffic, fail things, print what happened
#   make test    install test dependencies (as root), then fmt, clippy and every test tier
#   make image   build the container image vpn-router:dev (podman, offline from Debian's archive)
#
# Tiers (docs/testing.md): pure and namespace tests run through cargo (root needed for the
# namespace ones: they fail with a message saying so, never skip); the VM tier boots Debian's
# 6.12 kernel in qemu for IPVS, which this kernel may lack.

SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never
# Namespace tests create network namespaces and raw sockets; many of them at once on two cores
# only slows each down, so cargo's test threads are capped.
TEST_THREADS ?= 4

.PHONY: all build deps fmt-check clippy lint test test-cargo test-vm test-deploy test-kubelet image demo bench clean help

all: build

help:
	@grep -E '^#   make' Makefile | sed 's/^#   //'

build:
	$(CARGO) build --workspace --all-targets

deps:
	@bash scripts/install-deps.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

lint: fmt-check clippy

test-cargo:
	@if [ "$$(id -u)" != 0 ]; then echo "make test: the namespace tier needs root (network namespaces, raw sockets, nft); run as root" >&2; exit 1; fi
	$(CARGO) build --bin vpn-router --bin vpn-router-lab
	$(CARGO) test --workspace -- --test-threads=$(TEST_THREADS)

test-vm:
	bash tests/vm/selftest.sh
	bash tests/vm/test-ipvs.sh
	bash tests/vm/test-ingress.sh

# deploy/: yamllint, kubernetes-validate --strict, reduced checks of the CRD kinds, the router
# config inside the ConfigMap through check-config, the monitoring component (promtool), and a
# self-test (deploy/validate.sh).
test-deploy: deps
	$(CARGO) build --bin vpn-router
	shellcheck deploy/validate.sh deploy/check-monitoring.sh scripts/image.sh
	bash deploy/validate.sh

# The image (deploy/Dockerfile) built with podman: the host's release build on a rootfs of
# Debian packages (scripts/image.sh). IMAGE=... names it (default vpn-router:dev).
image: deps
	bash scripts/image.sh

# The shipped Deployment, ConfigMap, Secrets and NADs run as a kubelet runs them, from the
# image (tests/src/kube/, tests/tests/kubelet.rs; root, podman).
test-kubelet: deps image
	$(CARGO) build --bin vpn-router-lab
	$(CARGO) test -p vpn-router-tests --test kubelet -- --ignored --nocapture --test-threads=1

test: deps lint test-cargo test-vm test-deploy test-kubelet
	@echo "make test: all tiers passed"

demo: deps
	$(CARGO) build --bin vpn-router --bin vpn-router-lab
	VPN_ROUTER_BIN=./target/debug/vpn-router ./target/debug/vpn-router-lab demo

# make bench [SCENARIO=ipvs|gateway-loss|flows|vrrp] [BENCH_ARGS="--vrrp-trials 5 ..."]: release
# build, then every scenario (or one) side by side with its reference tool; tables on stdout.
SCENARIO ?= all
BENCH_ARGS ?=
bench: deps
	@if [ "$$(id -u)" != 0 ]; then echo "make bench: needs root (network namespaces, keepalived, the IPVS VM)" >&2; exit 1; fi
	$(CARGO) build --release --bin vpn-router --bin vpn-router-lab --bin vpn-router-bench --example ipvs-bench
	./target/release/vpn-router-bench $(SCENARIO) $(BENCH_ARGS)

clean:
	$(CARGO) clean
	rm -rf .cache
