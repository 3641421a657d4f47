#!/usr/bin/env bash
# Provision the real-apiserver test tier: etcd, openssl and kubectl from Debian, and
# kube-apiserver + kube-controller-manager built once from Debian's `kubernetes` source
# package (bookworm, 1.20.2), cached outside the repository.
#
# Usage: e2e/cluster/provision.sh            # install + build if missing, print the bin dir
# Env:   REMORA_CACHE  cache root (default: $XDG_CACHE_HOME/remora or ~/.cache/remora)
#
# Idempotent: a second run with a warm cache only checks and prints.
set -euo pipefail

CACHE=${REMORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/remora}
BIN=$CACHE/k8s-1.20.2/bin
K8S_SRC_VERSION=1.20.2
ORIG_TARBALL=kubernetes_1.20.5+really1.20.2.orig.tar.gz

log() { printf '[provision] %s\n' "$*" >&2; }
die() { printf '[provision] error: %s\n' "$*" >&2; exit 1; }

need_root_for_apt() {
  if [ "$(id -u)" != 0 ]; then
    die "missing Debian packages ($*); install them as root: apt-get install -y --no-install-recommends $*  (or run this script as root)"
  fi
}

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  need_root_for_apt "${missing[*]}"
  command -v apt-get >/dev/null || die "apt-get not found: this tier needs a Debian bookworm machine with packages: ${missing[*]}"
  if [ $apt_updated = 0 ]; then
    log "apt-get update"
    apt-get update -qq || die "apt-get update failed: the Debian package mirror must be reachable"
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# Runtime prerequisites of the harness and of the network-namespace tier.
apt_install etcd-server etcd-client openssl iproute2 iptables ca-certificates curl util-linux

# kubectl renders the kustomizations under config/ (directory resources need its built-in
# kustomize >= v3, i.e. kubectl >= 1.21; Debian's kubernetes-client 1.20 is too old). The
# machine image ships one with the Google Cloud SDK.
kubectl_minor=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -1)
if [ -z "$kubectl_minor" ]; then
  die "kubectl is not on PATH: put a kubectl >= 1.21 on PATH (the machine image's Google Cloud SDK ships one; Debian's kubernetes-client 1.20 cannot render directory kustomizations)"
elif [ "$kubectl_minor" -lt 21 ]; then
  die "kubectl 1.$kubectl_minor is too old to render config/ (kustomize directory resources need kubectl >= 1.21): put a newer kubectl first on PATH"
fi

if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
  echo "$BIN"
  exit 0
fi

log "kube-apiserver not cached in $BIN; building from Debian's kubernetes $K8S_SRC_VERSION source (~7 min on 2 cores)"
apt_install golang-go rsync make dpkg-dev

D=$CACHE/apt
mkdir -p "$D/lists/partial" "$D/cache/archives/partial" "$CACHE/src"
cat > "$D/sources.list" <<'SRC'
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
SRC
O=(-oDir::Etc::SourceList="$D/sources.list" -oDir::Etc::SourceParts=/dev/null
   -oDir::State::Lists="$D/lists" -oDir::Cache="$D/cache" -oAPT::Sandbox::User=root)
apt-get "${O[@]}" update -qq || die "apt-get update of the private deb-src list failed"

SRC_DIR=$CACHE/src/kubernetes-$K8S_SRC_VERSION
if [ ! -d "$SRC_DIR" ]; then
  (cd "$CACHE/src" && apt-get "${O[@]}" source --download-only kubernetes >/dev/null) \
    || die "could not download Debian's kubernetes source package"
  (cd "$CACHE/src" && tar xzf "$ORIG_TARBALL") || die "could not unpack $ORIG_TARBALL"
fi

# The vendored reflect2 1.0.1 crashes the apiserver on the first custom resource create
# when built with Go >= 1.18; Debian's 1.0.2 fixes it.
R2=$CACHE/r2
if [ ! -d "$R2/usr/share/gocode/src/github.com/modern-go/reflect2" ]; then
  rm -rf "$R2" && mkdir -p "$R2"
  (cd "$R2" && apt-get "${O[@]}" download golang-github-modern-go-reflect2-dev >/dev/null && dpkg -x golang-github-modern-go-reflect2-dev_*.deb .) \
    || die "could not fetch golang-github-modern-go-reflect2-dev"
fi
V=$SRC_DIR/vendor/github.com/modern-go/reflect2
rm -f "$V"/*.go "$V"/*.s "$V"/go.mod
cp "$R2"/usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R2"/usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$V"/

cd "$SRC_DIR"
mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
export GOPATH=$PWD/.go GOPROXY=off GOFLAGS=-mod=vendor GOSUMDB=off CGO_ENABLED=0 HOME=$CACHE/gohome
make WHAT=cmd/kube-apiserver >"$CACHE/build-apiserver.log" 2>&1 \
  || { tail -30 "$CACHE/build-apiserver.log" >&2; die "building kube-apiserver failed (log: $CACHE/build-apiserver.log)"; }
make WHAT=cmd/kube-controller-manager >"$CACHE/build-kcm.log" 2>&1 \
  || { tail -30 "$CACHE/build-kcm.log" >&2; die "building kube-controller-manager failed (log: $CACHE/build-kcm.log)"; }

mkdir -p "$BIN"
for b in kube-apiserver kube-controller-manager; do
  cp "_output/bin/$b" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
done
# The build tree is 2.5 GB; only the binaries are needed again.
rm -rf "$SRC_DIR/_output" "$SRC_DIR/.go/pkg"
log "built $BIN/kube-apiserver and $BIN/kube-controller-manager"
echo "$BIN"
