//! No key material leaves the proxy: two meshed pods (network namespaces, the real
//! `remora-proxy` binaries with file certificates, debug logging and the access log) carry
//! mTLS traffic and refuse a plaintext client; then every byte the proxies wrote (stdout
//! and stderr) and every admin endpoint's answer is searched for PEM markers and for
//! either workload key in any form: its PEM lines, its private scalar as hex and as
//! decimal bytes (a `Debug` print), and its raw bytes.
//!
//! Root, `ip`, `iptables`, `curl`, `python3` and `setpriv`, as every `netns_*` test.

mod common;

use std::{fs, path::Path};

use common::netns::{
    FRONTEND, REVIEWS, SERVER_IP, check_prerequisites, curl, curl_around_proxy, pods, wait_for,
};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject};

/// The forms a private key could leak in, each with a name for the failure message.
fn key_forms(pem_path: &Path) -> Vec<(String, Vec<u8>)> {
    let pem = fs::read_to_string(pem_path).expect("key PEM");
    let mut forms: Vec<(String, Vec<u8>)> = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| {
            // Any 16 characters of the base64 body (lines wrap anywhere when re-encoded).
            l.as_bytes()
                .chunks(16)
                .filter(|c| c.len() == 16)
                .map(|c| ("a piece of the key's PEM body".to_owned(), c.to_vec()))
                .collect::<Vec<_>>()
        })
        .collect();
    let der = PrivateKeyDer::from_pem_file(pem_path).expect("key");
    let der = der.secret_der();
    // PKCS#8 ECPrivateKey: version 1 (02 01 01), then the scalar as OCTET STRING (04 20 ..).
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("a P-256 private scalar in the PKCS#8 DER")
        + 5;
    let scalar = &der[at..at + 32];
    let hex: String = scalar.iter().map(|b| format!("{b:02x}")).collect();
    let decimal = scalar[..8]
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    forms.push(("the scalar in hex".to_owned(), hex.clone().into_bytes()));
    forms.push((
        "the scalar in HEX".to_owned(),
        hex.to_uppercase().into_bytes(),
    ));
    forms.push((
        "the scalar as decimal bytes".to_owned(),
        decimal.into_bytes(),
    ));
    forms.push(("the raw scalar".to_owned(), scalar[..16].to_vec()));
    forms.push(("the raw DER".to_owned(), der[at - 8..at + 8].to_vec()));
    // The search finds each form where it is (a leak of any of them would be caught).
    let mut leaky = pem.into_bytes();
    for extra in [
        hex.as_bytes(),
        hex.to_uppercase().as_bytes(),
        format!("{:?}", scalar).as_bytes(),
        der,
    ] {
        leaky.extend_from_slice(extra);
    }
    for (form, needle) in &forms {
        assert!(found(&leaky, needle), "the search misses {form}");
    }
    forms
}

fn found(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_key_material_in_logs_metrics_or_admin_endpoints() {
    check_prerequisites();
    let mut pods = pods();
    let (server_id, client_id) = pods.identities();
    let www = pods.path("www");
    fs::create_dir(&www).expect("www");
    fs::write(www.join("index.html"), "hello\n").expect("index");
    let www = www.display().to_string();
    pods.spawn(
        true,
        "app",
        &[
            "/usr/bin/python3",
            "-m",
            "http.server",
            "8080",
            "--directory",
            &www,
        ],
    );
    wait_for(
        "app listening",
        || curl(&pods.server, "http://127.0.0.1:8080/").is_some_and(|(c, _)| c == 200),
        || pods.log("app"),
    );
    let server_cfg = pods.write(
        "server.yaml",
        &format!(
            "version: 1\n{}inbound:\n  default: {{mtls: Strict}}\n",
            server_id.yaml()
        ),
    );
    let client_cfg = pods.write(
        "client.yaml",
        &format!(
            "version: 1\n{}outbound:\n  services:\n  - name: reviews.shop\n    addresses: [\"{SERVER_IP}:8080\"]\n    endpoints:\n    - {{address: \"{SERVER_IP}:8080\", identity: \"{REVIEWS}\", meshed: true}}\n",
            client_id.yaml()
        ),
    );
    let flags = ["--access-log"];
    pods.proxy_with(true, &server_cfg, &flags);
    pods.proxy_with(false, &client_cfg, &flags);

    let url = format!("http://{SERVER_IP}:8080/index.html");
    for _ in 0..3 {
        let (code, body) = curl(&pods.client, &url).expect("curl");
        assert_eq!(code, 200, "{body}\n{}", pods.proxy_logs());
    }
    // A plaintext client around the client proxy is refused by the server's Strict mTLS.
    let direct = curl_around_proxy(&pods.client, &url);
    assert!(
        !direct.status.success(),
        "plaintext to a Strict pod must fail"
    );

    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    for (pod, ns) in [("server", &pods.server), ("client", &pods.client)] {
        for path in [
            "/live",
            "/ready",
            "/metrics",
            "/config_dump",
            "/endpoints",
            &format!("/explain?dst={SERVER_IP}:8080&path=/index.html"),
            "/log-level",
            "/app-health/app/readiness",
        ] {
            let (code, body) = curl(ns, &format!("http://127.0.0.1:15020{path}"))
                .unwrap_or_else(|| panic!("{pod} {path}: no answer"));
            assert!(code > 0, "{pod} {path}");
            outputs.push((format!("{pod} admin {path}"), body.into_bytes()));
        }
    }
    // The proxies saw both identities, so the scrape is of a run that used the keys.
    let metrics = outputs
        .iter()
        .find(|(what, _)| what == "server admin /metrics")
        .map(|(_, m)| String::from_utf8_lossy(m).into_owned())
        .expect("metrics");
    assert!(metrics.contains(FRONTEND), "{metrics}");
    assert!(
        metrics.contains(r#"remora_proxy_inbound_refused_total{reason="plaintext"} 1"#),
        "{metrics}"
    );
    for (what, level) in outputs.iter().filter(|(w, _)| w.ends_with("/log-level")) {
        let level = String::from_utf8_lossy(level);
        assert!(level.contains("debug"), "{what}: {level}");
    }
    for what in ["proxy-server", "proxy-client"] {
        let log = fs::read(pods.path(&format!("{what}.log"))).expect("log");
        assert!(
            String::from_utf8_lossy(&log).contains("identity loaded"),
            "{what} logged"
        );
        outputs.push((format!("{what} stdout+stderr"), log));
    }

    let mut forms = vec![
        ("a PEM marker".to_owned(), b"-----BEGIN".to_vec()),
        ("a PEM key label".to_owned(), b"PRIVATE KEY".to_vec()),
    ];
    forms.extend(key_forms(&server_id.key));
    forms.extend(key_forms(&client_id.key));
    let total: usize = outputs.iter().map(|(_, o)| o.len()).sum();
    for (what, out) in &outputs {
        for (form, needle) in &forms {
            assert!(!found(out, needle), "{form} appears in the {what}");
        }
    }
    println!(
        "key material: {} forms of the two workload keys searched in {} outputs ({total} bytes: debug logs, access log, {} admin answers): none found",
        forms.len(),
        outputs.len(),
        outputs.len() - 2
    );
}
