#!/usr/bin/env bash
# The kind tier (`make kind-e2e`), for machines with Docker and kind: creates the cluster
# of kind-config.yaml (Kubernetes 1.31, so the webhook injects native sidecars), loads the
# image tarballs of `make images`, installs Remora as users do (kubectl apply -k
# config/default, then config/samples), runs the node tier's scenario tests against it
# through REMORA_E2E_KUBECONFIG, and deletes the cluster, also on failure or Ctrl-C.
#
#   REMORA_KIND_CLUSTER=name   cluster name (default remora)
#   REMORA_KIND_KEEP=1         keep the cluster and print its KUBECONFIG
#   REMORA_KIND_TESTS=filter   nextest filter expression (default: the scenario tests that
#                              run against REMORA_E2E_KUBECONFIG, node_mesh and node_lifecycle;
#                              node_smoke and node_accel start a node in a box of their own)
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${REMORA_KIND_CLUSTER:-remora}
TESTS=${REMORA_KIND_TESTS:-binary(node_mesh) | binary(node_lifecycle)}
IMAGES=(remora-operator remora-webhook remora-proxy remora-init remora-demo-app)

die() { echo "kind-e2e: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null || die "$1 is missing: $2"; }
need docker "install Docker: https://docs.docker.com/engine/install/"
need kind "install kind ≥ 0.25: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "install kubectl: https://kubernetes.io/docs/tasks/tools/"
need cargo-nextest "cargo install cargo-nextest --locked"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (docker info failed): start Docker"
for name in "${IMAGES[@]}"; do
  [ -f "target/images/$name.tar" ] || die "target/images/$name.tar is missing: run make images"
done

work=$(mktemp -d)
kubeconfig=$work/kubeconfig
cleanup() {
  status=$?
  if [ -n "${REMORA_KIND_KEEP:-}" ]; then
    echo "kind-e2e: cluster $CLUSTER kept: export KUBECONFIG=$kubeconfig  (kind delete cluster --name $CLUSTER)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
  exit $status
}
trap cleanup EXIT
trap 'exit 130' INT TERM

k() { kubectl --kubeconfig "$kubeconfig" "$@"; }
t0=$SECONDS
kind create cluster --name "$CLUSTER" --config kind-config.yaml --kubeconfig "$kubeconfig" --wait 180s
echo "kind-e2e: cluster up in $((SECONDS - t0)) s"

t=$SECONDS
for name in "${IMAGES[@]}"; do
  kind load image-archive "target/images/$name.tar" --name "$CLUSTER"
done
echo "kind-e2e: images loaded in $((SECONDS - t)) s"

t=$SECONDS
# CRDs and the control plane; the CRDs must be established before anything uses them.
k apply -k config/default
k wait --for condition=established --timeout=60s crd/meshpolicies.remora.dev crd/trafficsplits.remora.dev
k -n remora-system rollout status deploy/remora-operator --timeout=180s
k -n remora-system rollout status deploy/remora-webhook --timeout=180s
# The operator fills the webhooks' caBundles; until then every meshed pod is refused, and
# so is labelling a namespace remora.dev/inject.
ca_bundles_filled() {
  [ -n "$(k get mutatingwebhookconfiguration remora-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ] \
    && [ -n "$(k get validatingwebhookconfiguration remora-webhook -o jsonpath='{.webhooks[0].clientConfig.caBundle}')" ]
}
for _ in $(seq 1 90); do
  ca_bundles_filled && break
  sleep 2
done
ca_bundles_filled \
  || die "the operator did not fill the webhooks' caBundles within 180 s: $(k -n remora-system logs deploy/remora-operator --tail=20 2>&1)"
echo "kind-e2e: Remora installed in $((SECONDS - t)) s"

t=$SECONDS
k apply -k config/samples
for d in frontend reviews-v1 reviews-v2 loadgen; do
  k -n shop rollout status "deploy/$d" --timeout=180s
done
echo "kind-e2e: samples Ready in $((SECONDS - t)) s"

REMORA_E2E_KUBECONFIG=$kubeconfig cargo nextest run --workspace --locked -E "$TESTS"
echo "kind-e2e: done in $((SECONDS - t0)) s"
