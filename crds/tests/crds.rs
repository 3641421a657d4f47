//! The generated CRDs: committed YAML is current, and the schema carries what users rely on.

use kube::CustomResourceExt;
use pretty_assertions::assert_eq;
use remora_crds::{MeshPolicy, TrafficSplit, crdgen, policy::LbAlgorithm};

fn repo_file(rel: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../").to_owned() + rel;
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

#[test]
fn committed_crd_yaml_is_what_crdgen_produces() {
    for (name, yaml) in crdgen::render().expect("renders") {
        let committed = repo_file(&format!("config/crd/{name}"));
        assert!(
            committed == yaml,
            "config/crd/{name} is stale: run `make crds` and commit the result"
        );
    }
}

#[test]
fn crds_have_short_names_status_and_printer_columns() {
    let mp = MeshPolicy::crd();
    assert_eq!(mp.spec.names.short_names, Some(vec!["mp".to_owned()]));
    assert_eq!(mp.spec.scope, "Namespaced");
    let version = &mp.spec.versions[0];
    assert!(
        version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some()
    );
    let columns: Vec<_> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Target", "mTLS", "Accepted", "Age"]);
    let ts = TrafficSplit::crd();
    assert_eq!(ts.spec.names.short_names, Some(vec!["ts".to_owned()]));
}

#[test]
fn schema_carries_ranges_enums_patterns_and_required_fields() {
    let schema = serde_json::to_value(MeshPolicy::crd()).expect("json");
    let spec = &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["retries"]["properties"]["attempts"]["maximum"], 10.0);
    assert_eq!(spec["retries"]["required"], serde_json::json!(["attempts"]));
    assert_eq!(
        spec["mtls"]["properties"]["mode"]["enum"],
        serde_json::json!(["Strict", "Permissive", "Disabled"])
    );
    assert!(spec["timeouts"]["properties"]["request"]["pattern"].is_string());
    let ts = serde_json::to_value(TrafficSplit::crd()).expect("json");
    let spec = &ts["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(spec["required"], serde_json::json!(["backends", "service"]));
    assert_eq!(
        spec["properties"]["backends"]["items"]["properties"]["weight"]["maximum"],
        1_000_000.0
    );
    assert_eq!(spec["properties"]["backends"]["minItems"], 1);
}

#[test]
fn samples_round_trip_and_defaults_apply() {
    let text = repo_file("config/samples/meshpolicy.yaml");
    let docs: Vec<MeshPolicy> = serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("sample is a MeshPolicy"))
        .collect();
    assert_eq!(docs.len(), 2);
    for mp in &docs {
        let again: MeshPolicy =
            serde_yaml::from_str(&serde_yaml::to_string(mp).expect("ser")).expect("de");
        assert_eq!(again.spec, mp.spec);
        assert_eq!(again.metadata, mp.metadata);
    }
    let retries = docs[0].spec.retries.as_ref().expect("retries");
    assert_eq!(retries.retry_on, ["connect-failure", "reset", "503"]);
    let lb: remora_crds::policy::LoadBalancer = serde_json::from_str("{}").expect("empty lb");
    assert_eq!(lb.algorithm, LbAlgorithm::LeastRequest, "default algorithm");
    let ts: TrafficSplit =
        serde_yaml::from_str(&repo_file("config/samples/trafficsplit-canary.yaml")).expect("split");
    assert_eq!(ts.spec.backends.iter().map(|b| b.weight).sum::<u32>(), 100);
    assert_eq!(ts.spec.mirror.map(|m| m.percent), Some(10));
    let locality = docs[0]
        .spec
        .load_balancer
        .as_ref()
        .and_then(|l| l.locality.as_ref())
        .expect("locality");
    assert_eq!(locality.min_healthy_percent, 70);
    assert!(
        docs[0]
            .spec
            .rate_limit
            .as_ref()
            .is_some_and(|r| r.per_identity)
    );
}

#[test]
fn the_fault_sample_is_valid_and_off_by_default() {
    let mp: MeshPolicy =
        serde_yaml::from_str(&repo_file("config/samples/meshpolicy-fault.yaml")).expect("sample");
    let fault = mp.spec.fault.as_ref().expect("fault");
    assert_eq!(fault.delay.as_ref().map(|d| d.percent), Some(10));
    assert_eq!(fault.abort.as_ref().map(|a| a.http_status), Some(503));
    let problems = remora_crds::check::traffic_policy(&mp.spec.traffic_policy());
    assert!(problems.is_empty(), "{problems:?}");
    let cookie = mp
        .spec
        .load_balancer
        .and_then(|l| l.consistent_hash)
        .and_then(|h| h.cookie)
        .expect("cookie");
    assert_eq!(cookie.path(), "/ratings");
    let plain: MeshPolicy = serde_yaml::from_str(
        "apiVersion: remora.dev/v1alpha1\nkind: MeshPolicy\nmetadata: {name: a}\nspec: {}\n",
    )
    .expect("minimal");
    assert_eq!(plain.spec.fault, None, "no fault unless asked for");
}

#[test]
fn schema_carries_the_new_fields_ranges() {
    let schema = serde_json::to_value(MeshPolicy::crd()).expect("json");
    let spec = &schema["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let fault = &spec["fault"]["properties"];
    assert_eq!(fault["abort"]["properties"]["httpStatus"]["minimum"], 200.0);
    assert_eq!(fault["abort"]["properties"]["httpStatus"]["maximum"], 599.0);
    assert_eq!(fault["delay"]["properties"]["percent"]["maximum"], 100.0);
    assert!(fault["delay"]["properties"]["fixed"]["pattern"].is_string());
    let lb = &spec["loadBalancer"]["properties"];
    let locality = &lb["locality"]["properties"]["minHealthyPercent"];
    assert_eq!(
        (locality["default"].clone(), locality["maximum"].clone()),
        (70.into(), 100.0.into())
    );
    assert!(
        lb["consistentHash"]["properties"]["cookie"]["properties"]["path"]["pattern"].is_string()
    );
    assert_eq!(
        spec["rateLimit"]["properties"]["perIdentity"]["type"],
        "boolean"
    );
}
