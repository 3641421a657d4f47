//! Golden tests of the injection builder and the offline injector. Each pod case reads
//! `tests/golden/<input>.input.yaml` and compares against `<case>.patch.json` (the JSON
//! patch, or the skip reason / error) and `<case>.injected.yaml` (the resulting pod). Each
//! offline case compares the rewritten stream with `<case>.output.yaml`.
//! `UPDATE_GOLDEN=1 cargo test -p remora-webhook` rewrites the files.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use pretty_assertions::assert_eq;
use remora_webhook::accel;
use remora_webhook::inject::{self, InjectConfig, InjectError, Injection, Outcome, SkipReason};
use remora_webhook::offline;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn config(native_sidecar: bool) -> InjectConfig {
    InjectConfig {
        proxy_image: "ghcr.io/remora-mesh/remora-proxy:0.1.0".into(),
        init_image: "ghcr.io/remora-mesh/remora-init:0.1.0".into(),
        proxy_version: "0.1.0".into(),
        native_sidecar,
        ..InjectConfig::default()
    }
}

fn golden(name: &str, actual: &str) {
    let path = dir().join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::write(&path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "missing golden file {}: {e}; run UPDATE_GOLDEN=1 cargo test -p remora-webhook",
            path.display()
        )
    });
    assert_eq!(
        expected, actual,
        "{name} differs; if intended, run UPDATE_GOLDEN=1 cargo test -p remora-webhook and review the diff"
    );
}

enum Expect {
    Injected,
    Skipped(SkipReason),
    Error(&'static str),
}

/// (case, input, native sidecar by default, expectation)
const POD_CASES: &[(&str, &str, bool, Expect)] = &[
    ("plain-pod-native", "plain-pod", true, Expect::Injected),
    ("plain-pod-classic", "plain-pod", false, Expect::Injected),
    (
        "several-containers-native",
        "several-containers",
        true,
        Expect::Injected,
    ),
    (
        "several-containers-classic",
        "several-containers",
        false,
        Expect::Injected,
    ),
    (
        "existing-init-containers-native",
        "existing-init-containers",
        true,
        Expect::Injected,
    ),
    (
        "existing-init-containers-classic",
        "existing-init-containers",
        false,
        Expect::Injected,
    ),
    (
        "opt-out",
        "opt-out",
        true,
        Expect::Skipped(SkipReason::OptedOut),
    ),
    (
        "host-network",
        "host-network",
        true,
        Expect::Skipped(SkipReason::HostNetwork),
    ),
    (
        "already-injected",
        "already-injected",
        true,
        Expect::Skipped(SkipReason::AlreadyInjected),
    ),
    (
        "ann-skip-inbound-ports",
        "ann-skip-inbound-ports",
        true,
        Expect::Injected,
    ),
    (
        "ann-skip-outbound-ports",
        "ann-skip-outbound-ports",
        true,
        Expect::Injected,
    ),
    (
        "ann-skip-outbound-cidrs",
        "ann-skip-outbound-cidrs",
        true,
        Expect::Injected,
    ),
    (
        "ann-opaque-ports",
        "ann-opaque-ports",
        true,
        Expect::Injected,
    ),
    ("ann-proxy-cpu", "ann-proxy-cpu", true, Expect::Injected),
    (
        "ann-proxy-memory",
        "ann-proxy-memory",
        true,
        Expect::Injected,
    ),
    ("ann-log-level", "ann-log-level", true, Expect::Injected),
    ("ann-access-log", "ann-access-log", true, Expect::Injected),
    ("ann-weight", "ann-weight", true, Expect::Injected),
    (
        "ann-native-sidecar-true",
        "ann-native-sidecar-true",
        false,
        Expect::Injected,
    ),
    (
        "ann-native-sidecar-false",
        "ann-native-sidecar-false",
        true,
        Expect::Injected,
    ),
    (
        "ann-shutdown-grace-period",
        "ann-shutdown-grace-period",
        false,
        Expect::Injected,
    ),
    (
        "ann-proxy-ready-timeout-classic",
        "ann-proxy-ready-timeout",
        false,
        Expect::Injected,
    ),
    (
        "ann-proxy-ready-timeout-native",
        "ann-proxy-ready-timeout",
        true,
        Expect::Injected,
    ),
    ("probe-http", "probe-http", true, Expect::Injected),
    ("probe-tcp", "probe-tcp", true, Expect::Injected),
    ("probe-grpc", "probe-grpc", true, Expect::Injected),
    ("probe-exec", "probe-exec", true, Expect::Injected),
    (
        "bad-port-list",
        "bad-port-list",
        true,
        Expect::Error("config.remora.dev/skip-inbound-ports"),
    ),
    (
        "bad-skip-proxy-port",
        "bad-skip-proxy-port",
        true,
        Expect::Error("port 15001 is the proxy's outbound capture port"),
    ),
    (
        "bad-native-sidecar",
        "bad-native-sidecar",
        true,
        Expect::Error("config.remora.dev/native-sidecar"),
    ),
    (
        "bad-weight",
        "bad-weight",
        true,
        Expect::Error("config.remora.dev/weight"),
    ),
    (
        "bad-unknown-knob",
        "bad-unknown-knob",
        true,
        Expect::Error("config.remora.dev/skip-inbound-port"),
    ),
    (
        "bad-inject-value",
        "bad-inject-value",
        true,
        Expect::Error("remora.dev/inject"),
    ),
    (
        "bad-request-above-limit",
        "bad-request-above-limit",
        true,
        Expect::Error("config.remora.dev/proxy-memory-request"),
    ),
    (
        "bad-port-conflict",
        "bad-port-conflict",
        true,
        Expect::Error("15001"),
    ),
    (
        "bad-probe-port",
        "bad-probe-port",
        true,
        Expect::Error("livenessProbe"),
    ),
    (
        "bad-uid-conflict",
        "bad-uid-conflict",
        true,
        Expect::Error("UID 1337"),
    ),
];

fn read_input(input: &str) -> (Pod, serde_json::Value) {
    let text =
        std::fs::read_to_string(dir().join(format!("{input}.input.yaml"))).expect("read input");
    let raw: serde_json::Value = serde_yaml::from_str(&text).expect("input YAML");
    let pod: Pod = serde_json::from_value(raw.clone()).expect("input is a Pod");
    (pod, raw)
}

/// Compares an injection with its golden files, applies its patch to the raw input with an
/// independent RFC 6902 implementation (as the API server does), and re-injects it.
fn check_injected(case: &str, raw: &serde_json::Value, inj: &Injection, cfg: &InjectConfig) {
    let patch = serde_json::to_string_pretty(&inj.patch).expect("patch JSON") + "\n";
    golden(&format!("{case}.patch.json"), &patch);
    golden(
        &format!("{case}.injected.yaml"),
        &serde_yaml::to_string(&inj.pod).expect("pod YAML"),
    );
    let ops: json_patch::Patch =
        serde_json::from_str(&patch).expect("the patch is valid RFC 6902 JSON");
    let mut patched = raw.clone();
    json_patch::patch(&mut patched, &ops)
        .unwrap_or_else(|e| panic!("{case}: patch does not apply: {e}"));
    let expected = serde_json::to_value(&inj.pod).expect("json");
    assert_eq!(
        patched, expected,
        "{case}: patched raw input differs from the injected pod"
    );
    // Idempotence: the injected pod is left alone.
    assert_eq!(
        inject::inject(&inj.pod, None, cfg).expect("re-inject"),
        Outcome::Skipped(SkipReason::AlreadyInjected),
        "{case}: re-injection"
    );
}

#[test]
fn pod_cases() {
    for (case, input, native, expect) in POD_CASES {
        let (pod, raw) = read_input(input);
        let result = inject::inject(&pod, None, &config(*native));
        match (result, expect) {
            (Ok(Outcome::Injected(inj)), Expect::Injected) => {
                check_injected(case, &raw, &inj, &config(*native));
            }
            (Ok(Outcome::Skipped(reason)), Expect::Skipped(want)) => {
                assert_eq!(reason, *want, "{case}");
                golden(
                    &format!("{case}.patch.json"),
                    &format!("{{\"skipped\": \"{reason}\"}}\n"),
                );
            }
            (Err(e), Expect::Error(needle)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(needle),
                    "{case}: error {msg:?} should mention {needle:?}"
                );
                golden(
                    &format!("{case}.patch.json"),
                    &(serde_json::to_string_pretty(&serde_json::json!({"error": msg}))
                        .expect("json")
                        + "\n"),
                );
            }
            (other, _) => panic!("{case}: unexpected outcome {other:?}"),
        }
    }
}

/// (case, input, --native-sidecar)
const OFFLINE_CASES: &[(&str, &str, bool)] = &[
    ("job-classic", "job", false),
    ("job-native", "job", true),
    ("cronjob-native", "cronjob", true),
    ("workloads-classic", "workloads", false),
];

#[test]
fn offline_cases() {
    for (case, input, native) in OFFLINE_CASES {
        let text =
            std::fs::read_to_string(dir().join(format!("{input}.input.yaml"))).expect("read input");
        let out = offline::inject_stream(&text, &config(*native))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let mut report = String::new();
        for r in &out.reports {
            report.push_str(&format!("# {} {}\n", r.what, r.result));
        }
        golden(
            &format!("{case}.output.yaml"),
            &format!("{report}{}", out.output),
        );

        // Injecting the output again changes nothing.
        let again = offline::inject_stream(&out.output, &config(*native)).expect("re-inject");
        assert_eq!(
            again.output, out.output,
            "{case}: offline injection is idempotent"
        );
    }
}

#[test]
fn offline_and_webhook_inject_the_same_pod() {
    let (pod, _) = read_input("probe-http");
    let text = std::fs::read_to_string(dir().join("probe-http.input.yaml")).expect("read");
    let out = offline::inject_stream(&text, &config(true)).expect("offline");
    let offline_pod: Pod = serde_yaml::from_str(&out.output).expect("pod");
    let Outcome::Injected(inj) = inject::inject(&pod, None, &config(true)).expect("inject") else {
        panic!("not injected");
    };
    assert_eq!(offline_pod, inj.pod);
}

#[test]
fn namespace_label_is_checked_when_known() {
    let (pod, _) = read_input("plain-pod");
    let mut labels = std::collections::BTreeMap::new();
    assert_eq!(
        inject::inject(&pod, Some(&labels), &config(true)).expect("decide"),
        Outcome::Skipped(SkipReason::NamespaceNotEnabled)
    );
    labels.insert("remora.dev/inject".to_owned(), "enabled".to_owned());
    assert!(matches!(
        inject::inject(&pod, Some(&labels), &config(true)).expect("decide"),
        Outcome::Injected(_)
    ));
}

const ACCEL_DIR: &str = "/run/remora/accel";

/// (case, input, native sidecar): injected with `--accel-registrations /run/remora/accel`.
const ACCEL_CASES: &[(&str, &str, bool)] = &[
    ("accel-plain-pod-native", "plain-pod", true),
    ("accel-plain-pod-classic", "plain-pod", false),
    (
        "accel-existing-init-containers-classic",
        "existing-init-containers",
        false,
    ),
];

fn accel_config(native_sidecar: bool) -> InjectConfig {
    InjectConfig {
        accel_registrations: Some(ACCEL_DIR.to_owned()),
        ..config(native_sidecar)
    }
}

#[test]
fn accel_cases() {
    for (case, input, native) in ACCEL_CASES {
        let (pod, raw) = read_input(input);
        let cfg = accel_config(*native);
        let Outcome::Injected(inj) = inject::inject(&pod, None, &cfg).expect("inject") else {
            panic!("{case}: not injected");
        };
        check_injected(case, &raw, &inj, &cfg);

        // Exactly the registration directory is added, to remora-init only, and nothing
        // else differs from the injection without the accelerator.
        let Outcome::Injected(plain) =
            inject::inject(&pod, None, &config(*native)).expect("inject")
        else {
            panic!("{case}: not injected without the accelerator");
        };
        let mut with = serde_json::to_value(&inj.pod).expect("json");
        let spec = &mut with["spec"];
        let volumes = spec["volumes"].as_array_mut().expect("volumes");
        let last = volumes.pop().expect("the accelerator's volume");
        assert_eq!(
            last,
            serde_json::json!({"name": accel::VOLUME, "hostPath": {"path": ACCEL_DIR, "type": "DirectoryOrCreate"}})
        );
        let inits = spec["initContainers"]
            .as_array_mut()
            .expect("init containers");
        let init = inits
            .iter_mut()
            .find(|c| c["name"] == inject::INIT_CONTAINER)
            .expect("remora-init");
        let env = init["env"].as_array_mut().expect("env");
        assert_eq!(
            env.pop(),
            Some(serde_json::json!({"name": accel::INIT_ENV, "value": ACCEL_DIR}))
        );
        let mounts = init
            .as_object_mut()
            .and_then(|o| o.remove("volumeMounts"))
            .expect("remora-init's mounts");
        assert_eq!(
            mounts,
            serde_json::json!([{"name": accel::VOLUME, "mountPath": ACCEL_DIR}])
        );
        assert_eq!(
            with,
            serde_json::to_value(&plain.pod).expect("json"),
            "{case}: the accelerator changed more than remora-init's registration directory"
        );
    }
}

#[test]
fn the_accelerators_volume_name_is_reserved_only_when_it_is_on() {
    let (mut pod, _) = read_input("plain-pod");
    let spec = pod.spec.as_mut().expect("spec");
    spec.volumes.get_or_insert_with(Vec::new).push(
        serde_json::from_value(serde_json::json!({"name": accel::VOLUME, "emptyDir": {}}))
            .expect("volume"),
    );
    assert_eq!(
        inject::inject(&pod, None, &accel_config(true)),
        Err(InjectError::VolumeConflict(accel::VOLUME.to_owned()))
    );
    assert!(matches!(
        inject::inject(&pod, None, &config(true)),
        Ok(Outcome::Injected(_))
    ));
}
