//! The node in a box: it starts, runs pods from imported images on the pod network, and a
//! Service's ClusterIP answers through kube-proxy; teardown leaves nothing behind.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use remora_e2e::Node;

fn busybox_image(dir: &std::path::Path) -> std::path::PathBuf {
    let busybox = std::path::Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "/bin/busybox is missing: apt-get install busybox-static (the test image is built from it)"
    );
    let mut image = remora_e2e::image::Image::new("remora.local/busybox:e2e")
        .expect("reference")
        .entrypoint(["/bin/busybox"]);
    image.file(busybox, "/bin/busybox", 0o755).expect("busybox");
    for applet in [
        "sh", "nc", "httpd", "sleep", "cat", "echo", "mkdir", "hostname", "nslookup",
    ] {
        image
            .symlink(&format!("/bin/{applet}"), "busybox")
            .expect("applet");
    }
    let out = dir.join("busybox.tar");
    image.write(&out).expect("image written");
    out
}

async fn wait_running(pods: &Api<Pod>, name: &str, timeout: Duration) -> Pod {
    let start = Instant::now();
    loop {
        let pod = pods.get(name).await.expect("get pod");
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if ready {
            return pod;
        }
        assert!(
            start.elapsed() < timeout,
            "pod {name} not Ready after {timeout:?}: {:?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: remora.local/busybox:e2e
    imagePullPolicy: IfNotPresent
    command: ["/bin/sh", "-c", "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{containerPort: 8080}]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: remora.local/busybox:e2e
    imagePullPolicy: IfNotPresent
    command: ["/bin/sleep", "3600"]
"#;

#[tokio::test]
async fn a_pod_runs_on_the_pod_network_and_its_service_answers_through_kube_proxy() {
    let node = Node::start().await.expect("node starts");
    println!("node Ready in {:.1} s", node.started_in().as_secs_f64());
    println!("node network:\n{}", node.describe_network());

    // Isolation: no default route, and no link but loopback and the pod bridge.
    let routes = node.exec_in_netns(&["ip", "route"]).expect("routes");
    assert!(
        !routes.contains("default"),
        "a default route in the node: {routes}"
    );
    let links = node.exec_in_netns(&["ip", "-br", "link"]).expect("links");
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(names, ["lo", "cni0"], "links in the node before any pod");

    let images = tempfile::tempdir().expect("tempdir");
    node.import_image(&busybox_image(images.path()))
        .expect("busybox image imported");

    let manifests = images.path().join("smoke.yaml");
    std::fs::write(&manifests, MANIFESTS).expect("write manifests");
    let applied = Instant::now();
    node.kubectl(&["apply", "-f", &manifests.display().to_string()])
        .expect("kubectl apply");

    let pods: Api<Pod> = Api::default_namespaced(node.client().await.expect("client"));
    let web = wait_running(&pods, "web", Duration::from_secs(60)).await;
    println!(
        "pod Ready {:.1} s after apply",
        applied.elapsed().as_secs_f64()
    );
    wait_running(&pods, "client", Duration::from_secs(60)).await;
    let ip: std::net::Ipv4Addr = web
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP")
        .parse()
        .expect("IPv4 pod IP");
    assert_eq!(
        ip.octets()[..3],
        [10, 244, 0],
        "pod IP {ip} outside the pod CIDR 10.244.0.0/24"
    );

    let cluster_ip = node
        .kubectl(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])
        .expect("service");
    assert!(cluster_ip.starts_with("10.96."), "{cluster_ip}");

    // From inside the node's namespace: routed to the pod by kube-proxy's rules.
    let url = format!("http://{cluster_ip}/");
    let body = retry(|| node.exec_in_netns(&["curl", "-sS", "--max-time", "2", &url])).await;
    assert_eq!(body.trim(), "web", "answer from the node namespace");

    // From another pod, over the bridge and back.
    let body = retry(|| {
        node.kubectl(&[
            "exec",
            "client",
            "--",
            "/bin/sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {cluster_ip} 80"),
        ])
    })
    .await;
    assert!(
        body.ends_with("web\n"),
        "answer from the client pod: {body:?}"
    );

    // The Service's name, from the pod, through the node's DNS responder.
    let resolved = retry(|| {
        node.kubectl(&[
            "exec",
            "client",
            "--",
            "nslookup",
            "web.default.svc.cluster.local",
        ])
    })
    .await;
    assert!(resolved.contains(&cluster_ip), "nslookup: {resolved}");

    // Every pod's host-side veth is a port of the bridge, nothing else appeared.
    let links = node.exec_in_netns(&["ip", "-br", "link"]).expect("links");
    for l in links.lines() {
        let name = l.split_whitespace().next().unwrap_or_default();
        assert!(
            name == "lo" || name == "cni0" || name.starts_with("veth"),
            "unexpected link in the node: {l}"
        );
    }
    // kubelet's ECR credential provider is compiled in; it must not have looked for the
    // cloud metadata address.
    let kubelet_log =
        std::fs::read_to_string(node.run_dir().join("kubelet.log")).expect("kubelet log");
    assert!(
        !kubelet_log.contains("169.254.169.254"),
        "kubelet reached for cloud metadata"
    );

    println!(
        "memory of the box: {} MiB",
        node.memory_bytes() / (1024 * 1024)
    );
    let report = node.stop();
    println!("restored sysctls: {:?}", report.restored_sysctls);
    assert!(
        report.problems.is_empty(),
        "left behind: {:#?}",
        report.problems
    );
}

async fn retry<F>(mut f: F) -> String
where
    F: FnMut() -> Result<String, remora_e2e::HarnessError>,
{
    let start = Instant::now();
    loop {
        match f() {
            Ok(out) => return out,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                eprintln!("retrying: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}
