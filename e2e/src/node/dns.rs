//! The node's cluster DNS: a small responder for Service names, as CoreDNS would answer
//! them, so that pods resolve `<service>.<namespace>.svc[.cluster.local]` (the webhook
//! injects `remora-operator.remora-system.svc:15012` as the proxies' operator address).
//!
//! It answers A queries for every Service with a ClusterIP (NXDOMAIN for any other name,
//! an empty answer for other types of a known name) from a Service list refreshed every
//! 500 ms. It runs on a thread of the test process inside the node's network namespace
//! (see [`super::netthread`]), on UDP port 53 of the node address, which kubelet hands to
//! pods as `clusterDNS`. Nothing is forwarded anywhere: there is no upstream.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::api::core::v1::Service;

use super::netthread::NetnsThread;
use crate::HarnessError;

/// The cluster domain (kubelet's `clusterDomain`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

type Records = Arc<RwLock<HashMap<String, Ipv4Addr>>>;

/// Starts the responder on `listen` inside the namespace at `netns`, reading Services with
/// the admin kubeconfig (whose server is the apiserver's loopback address there too).
pub fn start(
    netns: &std::path::Path,
    listen: SocketAddr,
    kubeconfig: PathBuf,
) -> Result<NetnsThread, HarnessError> {
    NetnsThread::spawn(netns, "node-dns", move |ready| async move {
        let socket = match tokio::net::UdpSocket::bind(listen).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let records: Records = Arc::default();
        tokio::spawn(refresh(kubeconfig, records.clone()));
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let answer = {
                let table = records.read().unwrap_or_else(|e| e.into_inner());
                respond(&buf[..n], |name| table.get(name).copied())
            };
            if let Some(answer) = answer {
                let _ = socket.send_to(&answer, peer).await;
            }
        }
    })
}

async fn refresh(kubeconfig: PathBuf, records: Records) {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let client = async {
        let kc = Kubeconfig::read_from(&kubeconfig).ok()?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .ok()?;
        kube::Client::try_from(config).ok()
    }
    .await;
    let Some(client) = client else {
        tracing::warn!("node DNS: no client from {}", kubeconfig.display());
        return;
    };
    let api: kube::Api<Service> = kube::Api::all(client);
    loop {
        if let Ok(list) = api.list(&Default::default()).await {
            let table = service_records(&list.items);
            *records.write().unwrap_or_else(|e| e.into_inner()) = table;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `<name>.<namespace>.svc.cluster.local` (and the same without the cluster domain) →
/// ClusterIP, for every Service that has an IPv4 ClusterIP.
pub fn service_records(services: &[Service]) -> HashMap<String, Ipv4Addr> {
    let mut table = HashMap::new();
    for s in services {
        let (Some(name), Some(ns)) = (s.metadata.name.as_deref(), s.metadata.namespace.as_deref())
        else {
            continue;
        };
        let Some(ip) = s
            .spec
            .as_ref()
            .and_then(|spec| spec.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        table.insert(format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"), ip);
        table.insert(format!("{name}.{ns}.svc"), ip);
    }
    table
}

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// The response to one DNS query message, or `None` for something that is not a
/// single-question query (dropped, as a resolver then times out or retries).
pub fn respond(query: &[u8], lookup: impl Fn(&str) -> Option<Ipv4Addr>) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    if flags & 0x8000 != 0 || qdcount != 1 {
        return None;
    }
    // The question: labels up to the root, then type and class.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = query.get(pos..pos + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let qclass = u16::from_be_bytes([*query.get(pos + 2)?, *query.get(pos + 3)?]);
    let question_end = pos + 4;
    let name = labels.join(".");
    let found = lookup(&name);
    let answer = found.filter(|_| qtype == TYPE_A && qclass == CLASS_IN);
    // QR, AA, RD copied, RA; rcode NXDOMAIN (3) for unknown names.
    let rcode: u16 = if found.is_some() { 0 } else { 3 };
    let out_flags = 0x8400 | (flags & 0x0100) | 0x0080 | rcode;
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&query[..2]);
    out.extend_from_slice(&out_flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&u16::from(answer.is_some()).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&query[12..question_end]);
    if let Some(ip) = answer {
        out.extend_from_slice(&[0xc0, 0x0c]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&5u32.to_be_bytes()); // TTL: Services come and go in tests
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(u8::try_from(label.len()).expect("short label"));
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    fn lookup(name: &str) -> Option<Ipv4Addr> {
        (name == "web.default.svc.cluster.local").then_some(Ipv4Addr::new(10, 96, 0, 7))
    }

    #[test]
    fn a_known_service_name_gets_its_cluster_ip() {
        let q = query("Web.default.svc.cluster.local", TYPE_A);
        let r = respond(&q, lookup).expect("answered");
        assert_eq!(&r[..2], &[0x12, 0x34], "same id");
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], &[10, 96, 0, 7]);
        assert_eq!(&r[12..q.len()], &q[12..], "the question is echoed");
    }

    #[test]
    fn unknown_names_are_nxdomain_and_other_types_of_known_names_empty() {
        let r = respond(&query("example.com", TYPE_A), lookup).expect("answered");
        assert_eq!(r[3] & 0x0f, 3);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0);
        let r = respond(&query("web.default.svc.cluster.local", 28), lookup).expect("answered");
        assert_eq!(r[3] & 0x0f, 0);
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0);
    }

    #[test]
    fn truncated_or_non_query_messages_are_dropped() {
        assert!(respond(&[0; 5], lookup).is_none());
        let mut q = query("web.default.svc.cluster.local", TYPE_A);
        q.truncate(q.len() - 2);
        assert!(respond(&q, lookup).is_none());
        let mut response = query("a.b", TYPE_A);
        response[2] |= 0x80;
        assert!(respond(&response, lookup).is_none());
    }

    #[test]
    fn services_are_named_with_and_without_the_cluster_domain() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "remora-operator", "namespace": "remora-system"},
            "spec": {"clusterIP": "10.96.0.20"},
        }))
        .expect("service");
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h", "namespace": "x"},
            "spec": {"clusterIP": "None"},
        }))
        .expect("service");
        let t = service_records(&[svc, headless]);
        assert_eq!(t.len(), 2);
        assert_eq!(
            t["remora-operator.remora-system.svc"],
            Ipv4Addr::new(10, 96, 0, 20)
        );
        assert!(t.contains_key("remora-operator.remora-system.svc.cluster.local"));
    }
}
