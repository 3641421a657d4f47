//! The webhook's `/mutate`: an AdmissionReview body in, a response and a JSON patch out
//! ([`review`]), with every `config.remora.dev/*` annotation parsed on the way.
//!
//! Asserted, for the native and the classic sidecar defaults: the response serialises and
//! echoes the request's uid; a body that is not an AdmissionReview is a 400 that admits
//! nothing; only an injection carries a patch, and that patch applied to the object as
//! submitted gives exactly the pod the injector built, which is itself valid to inject
//! again only as "already injected" (idempotence).

#![no_main]

use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use libfuzzer_sys::fuzz_target;
use remora_webhook::{
    admission::{Decision, parse, review},
    inject::{self, InjectConfig, Outcome, SkipReason},
};
use serde::Deserialize as _;

fuzz_target!(|data: &[u8]| {
    for native_sidecar in [true, false] {
        let cfg = InjectConfig {
            native_sidecar,
            ..InjectConfig::default()
        };
        check(data, &cfg);
    }
});

fn check(body: &[u8], cfg: &InjectConfig) {
    let reviewed = review(body, cfg);
    serde_json::to_vec(&reviewed.response).expect("the response serialises");
    let resp = &reviewed.response.response;
    let req = match parse(body) {
        Err(_) => {
            assert!(reviewed.bad_request && !resp.allowed && resp.patch.is_none());
            assert!(matches!(reviewed.decision, Decision::Error(_)));
            return;
        }
        Ok(req) => req,
    };
    assert!(!reviewed.bad_request);
    assert_eq!(resp.uid, req.uid);
    let Decision::Injected { native_sidecar } = reviewed.decision else {
        assert!(resp.patch.is_none(), "a patch without an injection");
        assert_eq!(
            resp.allowed,
            matches!(
                reviewed.decision,
                Decision::Skipped(_) | Decision::IgnoredOperation(_)
            )
        );
        return;
    };
    assert!(resp.allowed);
    assert_eq!(resp.patch_type, Some("JSONPatch"));
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp.patch.as_deref().expect("an injection carries a patch"))
        .expect("the patch is base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("the patch is RFC 6902");
    let mut object = req
        .object
        .clone()
        .expect("an injected review has an object");
    let pod = Pod::deserialize(&object).expect("the object was a pod");
    json_patch::patch(&mut object, &patch).expect("the patch applies to the submitted object");
    let patched = Pod::deserialize(&object).expect("the patched object is a pod");

    let Ok(Outcome::Injected(built)) = inject::inject(&pod, None, cfg) else {
        panic!("the review injected but the builder does not");
    };
    assert_eq!(built.native_sidecar, native_sidecar);
    assert_eq!(patched, built.pod, "the patch does not give the built pod");
    match inject::inject(&patched, None, cfg) {
        Ok(Outcome::Skipped(SkipReason::AlreadyInjected)) => {}
        other => panic!("an injected pod is injected again: {other:?}"),
    }
}
