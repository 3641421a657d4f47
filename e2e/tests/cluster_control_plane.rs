//! The proxy's side of the control plane against the real thing: a `remora-operator`
//! process on a real kube-apiserver 1.20, and `remora-proxy` in-process in Kubernetes mode
//! with a projected-style token from the TokenRequest API. The proxy certifies (its
//! SPIFFE ID comes from its service account), turns ready, subscribes to a Service VIP on
//! the first connection and routes to the endpoint of a hand-made EndpointSlice. Then the
//! operator is stopped: the proxy keeps routing on its last good config; the slice moves
//! to another server meanwhile; the operator starts again on the same address, and the
//! proxy catches up.

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Secret, Service};
use kube::{Api, Client};
use remora_crds::proxy::{ProxyConfig, UnknownDestinations};
use remora_e2e::{
    Cluster, ClusterOptions,
    apply::{apply_all, install_crds, parse_documents},
    cluster::free_ports,
    mesh::{LocalOperator, service_account_token, start_operator_on},
};
use remora_proxy::{
    Context, Proxy, Settings,
    control::{
        ControlSettings,
        assemble::LocalRules,
        target::{OperatorAddr, OperatorName, PodRef},
        transport::OperatorEndpoint,
    },
    listen::OrigDstMode,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const NS: &str = "shop";
const SA: &str = "web";
const POD: &str = "web-1";
/// How long each step may take (operator start, index sync, backoff).
const DEADLINE: Duration = Duration::from_secs(60);

/// An HTTP/1.1 server on loopback that answers every request with `name`.
async fn named_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    addr
}

/// One request through the proxy's outbound listener; the body, or why there is none.
async fn get(outbound: SocketAddr) -> Result<String, String> {
    let exchange = async {
        let mut s = TcpStream::connect(outbound)
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: reviews.shop\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out)
            .await
            .map_err(|e| e.to_string())?;
        match out.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_owned()),
            _ => Err(format!("unexpected answer: {out:?}")),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_owned())?
}

/// Polls `probe` until it returns `Ok`, panicking after `deadline` with the last error.
async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < deadline,
                "{what}: not within {deadline:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The Service without selector and its hand-made EndpointSlice (`discovery.k8s.io/v1beta1`
/// on 1.20) with one endpoint, `server`; applied again to move the endpoint.
fn slice_yaml(server: SocketAddr) -> String {
    format!(
        r#"
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: reviews-1
  namespace: {NS}
  labels: {{kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
- addresses: ["{ip}"]
  conditions: {{ready: true}}
"#,
        port = server.port(),
        ip = server.ip(),
    )
}

async fn apply_yaml(client: &Client, yaml: &str, what: &str) {
    let objs = parse_documents(yaml, what).expect("test YAML parses");
    apply_all(client, &objs, false)
        .await
        .unwrap_or_else(|e| panic!("{what} applied: {e}"));
}

/// The objects of a meshed pod: namespace, service account, the Pod (annotated as
/// injected, no kubelet runs it), the Service `reviews` without selector.
async fn workload(client: &Client) {
    let yaml = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: remora-system}}
---
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {SA}, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata:
  name: {POD}
  namespace: {NS}
  annotations: {{remora.dev/injected: "true"}}
spec:
  serviceAccountName: {SA}
  automountServiceAccountToken: false
  containers: [{{name: app, image: app, ports: [{{containerPort: 8080, protocol: TCP}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: reviews, namespace: {NS}}}
spec:
  ports: [{{name: http, port: 80, protocol: TCP}}]
"#
    );
    apply_yaml(client, &yaml, "workload").await;
}

/// The mesh trust bundle (`ca.crt` of the CA Secret the operator generates).
async fn trust_bundle(client: &Client) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "remora-system");
    eventually("the operator's CA Secret", DEADLINE, || async {
        let secret = secrets
            .get_opt("remora-ca")
            .await
            .map_err(|e| e.to_string())?
            .ok_or("not created yet")?;
        let bundle = secret
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .ok_or("no ca.crt")?;
        String::from_utf8(bundle.0.clone()).map_err(|e| e.to_string())
    })
    .await
}

fn proxy_settings(vip: SocketAddr, operator: SocketAddr, dir: &Path) -> Settings {
    let local = SocketAddr::from(([127, 0, 0, 1], 0));
    Settings {
        outbound_listen: vec![local],
        inbound_listen: vec![local],
        admin_listen: Some(local),
        // No iptables here: every outbound connection is "to" the Service VIP.
        orig_dst: OrigDstMode::Fixed(vip),
        control: Some(ControlSettings {
            endpoint: OperatorEndpoint {
                addr: operator
                    .to_string()
                    .parse::<OperatorAddr>()
                    .expect("operator address"),
                // The operator's serving certificate names its Service.
                name: OperatorName::new("remora-operator.remora-system.svc").expect("name"),
                trust_bundle: dir.join("bundle.pem"),
            },
            token_file: dir.join("token"),
            pod: PodRef {
                namespace: NS.to_owned(),
                name: POD.to_owned(),
            },
            spiffe_id: Some(ControlSettings::spiffe_id_of("cluster.local", NS, SA)),
            heartbeat_interval: Duration::from_secs(10),
            discovery_timeout: Duration::from_secs(1),
            outbound_idle_timeout: Duration::from_secs(300),
            rules: LocalRules {
                unknown_destinations: UnknownDestinations::Passthrough,
                opaque_ports: "6379".parse().expect("ports"),
            },
            inbound_ports: "8080".parse().expect("ports"),
        }),
        ..Settings::default()
    }
}

fn alive(operator: &mut LocalOperator) -> Result<(), String> {
    operator.process.check_running().map_err(|e| e.to_string())
}

fn ready(ctx: &Context) -> Result<(), String> {
    match ctx.not_ready_reason() {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_certifies_routes_and_rides_out_an_operator_restart() {
    let cluster = Cluster::start_with(ClusterOptions {
        controller_manager: false,
        ..ClusterOptions::default()
    })
    .await
    .expect("cluster starts");
    let client = cluster.client().await.expect("client");
    install_crds(&client).await.expect("CRDs installed");
    workload(&client).await;
    let (server_a, server_b) = (
        named_server("server-a").await,
        named_server("server-b").await,
    );
    apply_yaml(&client, &slice_yaml(server_a), "EndpointSlice").await;
    let vip: std::net::IpAddr = Api::<Service>::namespaced(client.clone(), NS)
        .get("reviews")
        .await
        .expect("Service")
        .spec
        .and_then(|s| s.cluster_ip)
        .expect("a cluster IP")
        .parse()
        .expect("an IP");
    let vip = SocketAddr::new(vip, 80);

    let [admin_port, ca_port] = free_ports::<2>().expect("ports");
    let start = || -> LocalOperator {
        start_operator_on(&cluster, admin_port, ca_port).expect("operator starts")
    };
    let mut operator = start();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bundle.pem"), trust_bundle(&client).await).expect("bundle");
    std::fs::write(
        dir.path().join("token"),
        service_account_token(&client, NS, SA, "remora", 3600)
            .await
            .expect("a token for the pod's service account"),
    )
    .expect("token");

    let settings = proxy_settings(vip, SocketAddr::from(([127, 0, 0, 1], ca_port)), dir.path());
    let proxy = Proxy::start(settings, ProxyConfig::default(), None)
        .await
        .expect("proxy starts");
    let ctx = Arc::clone(proxy.context());
    let outbound = proxy.outbound_addrs[0];

    eventually("the proxy is ready", DEADLINE, || {
        let alive = alive(&mut operator);
        let ready = ready(&ctx);
        async move { alive.and(ready) }
    })
    .await;
    let identity = ctx.identity.current().expect("an identity once ready");
    assert_eq!(
        &*identity.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web",
        "the certificate is for the pod's service account"
    );
    assert_eq!(
        ctx.config.load().config.inbound.for_port(6379).protocol,
        remora_crds::proxy::Protocol::Opaque,
        "the local opaque ports apply where the operator is silent"
    );
    let body = eventually("a request routed to server-a", DEADLINE, || get(outbound)).await;
    assert_eq!(body, "server-a");
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains(r#"remora_proxy_certificate_renewals_total{reason="issued"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("remora_proxy_control_subscriptions 1"),
        "{metrics}"
    );

    // The operator goes away: the last good config keeps serving.
    drop(operator);
    for _ in 0..3 {
        assert_eq!(get(outbound).await.as_deref(), Ok("server-a"));
    }
    apply_yaml(&client, &slice_yaml(server_b), "the moved EndpointSlice").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        get(outbound).await.as_deref(),
        Ok("server-a"),
        "nothing tells the proxy while the operator is down"
    );

    // Back on the same address: the proxy resumes and catches up.
    operator = start();
    let restarted = Instant::now();
    eventually("requests reach server-b", DEADLINE, || {
        let alive = alive(&mut operator);
        async move {
            alive?;
            match get(outbound).await? {
                b if b == "server-b" => Ok(()),
                other => Err(format!("still {other}")),
            }
        }
    })
    .await;
    eprintln!(
        "caught up {:?} after the operator restarted",
        restarted.elapsed()
    );
    assert!(ready(&ctx).is_ok(), "still ready");
    let metrics = ctx.metrics.encode();
    assert!(
        metrics.contains("remora_proxy_control_stream_reconnects_total"),
        "{metrics}"
    );
    proxy.shutdown();
    drop(operator);
}
