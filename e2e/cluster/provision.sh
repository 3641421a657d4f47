#!/usr/bin/env bash
# Provision the real-apiserver and node test tiers: etcd, openssl, containerd, runc, the CNI
# plugins and conntrack from Debian, and kube-apiserver, kube-controller-manager,
# kube-scheduler, kube-proxy and kubelet built once from Debian's `kubernetes` source package
# (bookworm, 1.20.2) with the `providerless` build tag (no cloud provider: kubelet never
# queries a cloud metadata address), plus the pause binary compiled statically from the same
# tree, all cached outside the repository.
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

# Runtime prerequisites of the harness, of the network-namespace tier and of the node tier
# (containerd runs the pods with runc, the CNI bridge + host-local plugins give them their
# addresses, kube-proxy needs conntrack; gcc + libc6-dev compile the static pause binary;
# busybox-static makes the node tests' small test image; bpftool shows what the
# accelerator tests' agent attached and that --cleanup left nothing).
apt_install etcd-server etcd-client openssl iproute2 iptables ca-certificates curl util-linux \
  containerd runc containernetworking-plugins conntrack gcc libc6-dev busybox-static bpftool

# kubectl renders the kustomizations under config/ (directory resources need its built-in
# kustomize >= v3, i.e. kubectl >= 1.21; Debian's kubernetes-client 1.20 is too old). The
# machine image ships one with the Google Cloud SDK.
kubectl_minor=$(kubectl version --client -o json 2>/dev/null | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -1)
if [ -z "$kubectl_minor" ]; then
  die "kubectl is not on PATH: put a kubectl >= 1.21 on PATH (the machine image's Google Cloud SDK ships one; Debian's kubernetes-client 1.20 cannot render directory kustomizations)"
elif [ "$kubectl_minor" -lt 21 ]; then
  die "kubectl 1.$kubectl_minor is too old to render config/ (kustomize directory resources need kubectl >= 1.21): put a newer kubectl first on PATH"
fi

# Everything built from the source tree; `pause` is build/pause/linux/pause.c, static.
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubelet)
missing_bins=()
for b in "${K8S_BINS[@]}" pause; do
  [ -x "$BIN/$b" ] || missing_bins+=("$b")
done
if [ ${#missing_bins[@]} -eq 0 ]; then
  echo "$BIN"
  exit 0
fi

log "not cached in $BIN: ${missing_bins[*]}; building from Debian's kubernetes $K8S_SRC_VERSION source (~7 min cold on 2 cores for all five)"
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

SRC_DIR=$CACHE/src/kubernetes-$K8S_SRC_VERSION
R2=$CACHE/r2
if [ ! -d "$SRC_DIR" ] || [ ! -d "$R2/usr/share/gocode/src/github.com/modern-go/reflect2" ]; then
  apt-get "${O[@]}" update -qq || die "apt-get update of the private deb-src list failed"
fi
if [ ! -d "$SRC_DIR" ]; then
  (cd "$CACHE/src" && apt-get "${O[@]}" source --download-only kubernetes >/dev/null) \
    || die "could not download Debian's kubernetes source package"
  (cd "$CACHE/src" && tar xzf "$ORIG_TARBALL") || die "could not unpack $ORIG_TARBALL"
fi

# The vendored reflect2 1.0.1 crashes the apiserver on the first custom resource create
# when built with Go >= 1.18; Debian's 1.0.2 fixes it.
if [ ! -d "$R2/usr/share/gocode/src/github.com/modern-go/reflect2" ]; then
  rm -rf "$R2" && mkdir -p "$R2"
  (cd "$R2" && apt-get "${O[@]}" download golang-github-modern-go-reflect2-dev >/dev/null && dpkg -x golang-github-modern-go-reflect2-dev_*.deb .) \
    || die "could not fetch golang-github-modern-go-reflect2-dev"
fi
V=$SRC_DIR/vendor/github.com/modern-go/reflect2
rm -f "$V"/*.go "$V"/*.s "$V"/go.mod
cp "$R2"/usr/share/gocode/src/github.com/modern-go/reflect2/*.go "$R2"/usr/share/gocode/src/github.com/modern-go/reflect2/*.s "$V"/

cd "$SRC_DIR"
mkdir -p "$BIN"
if [ ! -x "$BIN/pause" ]; then
  gcc -Os -static -Wall -Werror -DVERSION=v$K8S_SRC_VERSION-remora -o "$BIN/pause.tmp" build/pause/linux/pause.c \
    || die "compiling build/pause/linux/pause.c failed (needs gcc and libc6-dev)"
  mv "$BIN/pause.tmp" "$BIN/pause"
fi

what=()
for b in "${K8S_BINS[@]}"; do
  [ -x "$BIN/$b" ] || what+=("cmd/$b")
done
if [ ${#what[@]} -gt 0 ]; then
  mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  # hack/lib/golang.sh takes the build tags out of GOFLAGS' -tags=; `providerless` compiles
  # every cloud provider (and kubelet's AWS/GCE/Azure credential providers) out.
  export GOPATH=$PWD/.go GOPROXY=off GOSUMDB=off CGO_ENABLED=0 HOME=$CACHE/gohome
  export GOFLAGS="-mod=vendor -tags=providerless"
  make WHAT="${what[*]}" >"$CACHE/build-k8s.log" 2>&1 \
    || { tail -30 "$CACHE/build-k8s.log" >&2; die "building ${what[*]} failed (log: $CACHE/build-k8s.log)"; }
  for w in "${what[@]}"; do
    b=${w#cmd/}
    # Refuse a binary built without the tag (hack/lib/golang.sh reads it from GOFLAGS):
    # the node tier must not carry cloud providers that reach out. (kubelet 1.20's ECR
    # credential provider is compiled in regardless; the node harness disables its
    # metadata lookup and the node's network namespace has no route anyway.)
    go version -m "_output/bin/$b" | grep -q -- '-tags=.*providerless' \
      || die "_output/bin/$b was built without the providerless tag (see $CACHE/build-k8s.log)"
    cp "_output/bin/$b" "$BIN/$b.tmp" && mv "$BIN/$b.tmp" "$BIN/$b"
  done
  # The build tree is several GB; only the binaries are needed again.
  rm -rf "$SRC_DIR/_output" "$SRC_DIR/.go/pkg"
fi
log "built in $BIN: ${missing_bins[*]}"
echo "$BIN"
