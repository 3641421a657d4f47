//! The node's configuration files, rendered from its [`Layout`]: containerd's config, the
//! CNI bridge network, the `KubeletConfiguration`, and kubeconfigs for the node's
//! components. Pure functions, so what the node runs with is checked by unit tests.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

/// The pod network: a /24 that exists only inside the node's network namespace, on the
/// bridge whose address is the node's.
pub const POD_CIDR: &str = "10.244.0.0/24";
/// The node's address: the bridge's, which is the pods' gateway.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The prefix length of [`POD_CIDR`].
pub const POD_PREFIX: u8 = 24;
/// Service ClusterIPs (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The pod bridge, created before the node starts so that kubelet's `--node-ip` exists.
pub const BRIDGE: &str = "cni0";

/// Where everything of one node lives, all under its run directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The run directory.
    pub run: PathBuf,
    /// `remora-node-<id>`: the network namespace, the cgroup and the CNI network name.
    pub name: String,
    /// The Kubernetes node name.
    pub node_name: String,
    /// The pause image reference containerd and kubelet use for sandboxes.
    pub pause_image: String,
}

impl Layout {
    fn p(&self, rel: &str) -> PathBuf {
        self.run.join(rel)
    }
    pub fn containerd_root(&self) -> PathBuf {
        self.p("containerd/root")
    }
    pub fn containerd_state(&self) -> PathBuf {
        self.p("containerd/state")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.p("containerd/containerd.sock")
    }
    pub fn containerd_config(&self) -> PathBuf {
        self.p("containerd/config.toml")
    }
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.p("cni/net.d")
    }
    pub fn kubelet_root(&self) -> PathBuf {
        self.p("kubelet/root")
    }
    pub fn kubelet_config(&self) -> PathBuf {
        self.p("kubelet/config.yaml")
    }
    pub fn resolv_conf(&self) -> PathBuf {
        self.p("resolv.conf")
    }
    /// Directories bind-mounted, inside the node's own mount namespace, over host paths
    /// that kubelet 1.20 and containerd 1.6 hard-code (pod logs, the CNI cache, shim
    /// sockets): (host path, directory in the run directory).
    pub fn shadowed(&self) -> Vec<(PathBuf, PathBuf)> {
        [
            ("/var/log/pods", "shadow/var-log-pods"),
            ("/var/log/containers", "shadow/var-log-containers"),
            ("/var/lib/cni", "shadow/var-lib-cni"),
            ("/run/containerd", "shadow/run-containerd"),
            ("/var/lib/kubelet", "shadow/var-lib-kubelet"),
        ]
        .into_iter()
        .map(|(host, rel)| (PathBuf::from(host), self.p(rel)))
        .collect()
    }
}

fn toml_str(p: &Path) -> String {
    // TOML basic strings share JSON's escapes for what paths can hold.
    serde_json::Value::String(p.display().to_string()).to_string()
}

/// containerd 1.6's config: every path in the run directory, the CRI plugin set for this
/// VM (see `k8s-node.md`: OOM scores cannot be lowered, no AppArmor) and the local pause
/// image, and pod network namespaces mounted under the state directory.
pub fn containerd_toml(l: &Layout) -> String {
    let run = |rel: &str| toml_str(&l.run.join(rel));
    format!(
        r#"version = 2
root = {root}
state = {state}
# Plugins that would touch host paths or probe for filesystems this node does not use.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = {sock}

[ttrpc]
  address = {ttrpc}

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = {opt}

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = {runc}
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {cni}
    max_conf_num = 1
"#,
        root = toml_str(&l.containerd_root()),
        state = toml_str(&l.containerd_state()),
        sock = toml_str(&l.containerd_socket()),
        ttrpc = run("containerd/containerd.ttrpc.sock"),
        opt = run("containerd/opt"),
        pause = l.pause_image,
        runc = run("containerd/runc"),
        cni = toml_str(&l.cni_conf_dir()),
    )
}

/// The pod network: a `bridge` with `host-local` IPAM on [`POD_CIDR`], the bridge being
/// the pods' gateway to the Service range; no masquerade and no default route (nothing is
/// routed beyond the node).
pub fn cni_conflist(l: &Layout) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": l.name,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP.to_string()}]],
                // Pods reach Services through the node (kube-proxy's rules); there is
                // nowhere else to go, so no default route.
                "routes": [{"dst": SERVICE_CIDR, "gw": NODE_IP.to_string()}],
                "dataDir": l.run.join("cni/ipam"),
            },
        }],
    })
}

/// kubelet's `KubeletConfiguration`: cgroupfs under the node's own cgroup, webhook authn/z,
/// no read-only port, eviction and image GC thresholds that never fire on a test machine
/// (imported images cannot be pulled again).
pub fn kubelet_config(l: &Layout, client_ca: &Path) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP.to_string(),
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": client_ca},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{}", l.name),
        "cgroupsPerQOS": true,
        "failSwapOn": false,
        "protectKernelDefaults": false,
        "clusterDomain": super::dns::CLUSTER_DOMAIN,
        // The node's own DNS responder (Service names only), on the node address.
        "clusterDNS": [NODE_IP.to_string()],
        "resolvConf": l.resolv_conf(),
        "evictionHard": {
            "memory.available": "50Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "rotateCertificates": false,
        "serverTLSBootstrap": false,
        "maxPods": 110,
    })
}

/// A kubeconfig for a node component with its own client certificate.
pub fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "node", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "component", "user": {"client-certificate": cert, "client-key": key}}],
        "contexts": [{"name": "node", "context": {"cluster": "node", "user": "component"}}],
        "current-context": "node",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            run: PathBuf::from("/tmp/remora-node-x"),
            name: "remora-node-ab12".to_owned(),
            node_name: "remora-node".to_owned(),
            pause_image: "remora.local/pause:1.20.2".to_owned(),
        }
    }

    #[test]
    fn containerd_keeps_every_path_in_the_run_directory_and_sets_the_vm_workarounds() {
        let text = containerd_toml(&layout());
        for line in text.lines().filter(|l| l.contains('/')) {
            let allowed = line.contains("/tmp/remora-node-x/")
                || line.contains("\"/usr/lib/cni\"")
                || line.contains("remora.local/pause")
                || line.trim_start().starts_with('#');
            assert!(allowed, "path outside the run directory: {line}");
        }
        for setting in [
            "restrict_oom_score_adj = true",
            "disable_apparmor = true",
            "snapshotter = \"overlayfs\"",
            "SystemdCgroup = false",
            "runtime_type = \"io.containerd.runc.v2\"",
            "netns_mounts_under_state_dir = true",
            "sandbox_image = \"remora.local/pause:1.20.2\"",
        ] {
            assert!(text.contains(setting), "missing {setting}");
        }
    }

    #[test]
    fn the_pod_network_is_a_bridge_on_the_pod_cidr_with_the_node_as_gateway() {
        let c = cni_conflist(&layout());
        let plugin = &c["plugins"][0];
        assert_eq!(plugin["type"], "bridge");
        assert_eq!(plugin["bridge"], BRIDGE);
        assert_eq!(plugin["ipMasq"], false);
        assert_eq!(plugin["ipam"]["ranges"][0][0]["subnet"], POD_CIDR);
        assert_eq!(plugin["ipam"]["ranges"][0][0]["gateway"], "10.244.0.1");
        assert_eq!(plugin["ipam"]["dataDir"], "/tmp/remora-node-x/cni/ipam");
        assert_eq!(
            plugin["ipam"]["routes"],
            serde_json::json!([{"dst": SERVICE_CIDR, "gw": "10.244.0.1"}])
        );
        assert_eq!(c["name"], "remora-node-ab12");
    }

    #[test]
    fn kubelet_runs_under_the_nodes_cgroup_with_cgroupfs_and_webhook_auth() {
        let c = kubelet_config(&layout(), Path::new("/tmp/remora-node-x/pki/ca.crt"));
        assert_eq!(c["cgroupRoot"], "/remora-node-ab12");
        assert_eq!(c["cgroupDriver"], "cgroupfs");
        assert_eq!(c["readOnlyPort"], 0);
        assert_eq!(c["failSwapOn"], false);
        assert_eq!(c["authentication"]["anonymous"]["enabled"], false);
        assert_eq!(c["authorization"]["mode"], "Webhook");
        assert_eq!(c["address"], "10.244.0.1");
        assert_eq!(c["clusterDNS"], serde_json::json!(["10.244.0.1"]));
    }

    #[test]
    fn shadowed_host_paths_map_into_the_run_directory() {
        for (host, local) in layout().shadowed() {
            assert!(host.is_absolute());
            assert!(
                local.starts_with("/tmp/remora-node-x/shadow"),
                "{}",
                local.display()
            );
        }
    }
}
