//! `POST /v1/certify`: a CSR and a projected service-account token in, a workload
//! certificate out (docs/ca.md).

use serde::{Deserialize, Serialize};

/// The request body. The token may instead come as `Authorization: Bearer <token>`
/// (not both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertifyRequest {
    /// A PEM certificate signing request for the proxy's in-memory key.
    pub csr: String,
    /// The projected service-account token (audience `remora`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// The body of a successful certify (200). PEM strings; times in Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertifyResponse {
    pub spiffe_id: String,
    /// The leaf certificate.
    pub certificate: String,
    /// The leaf and its intermediates; a proxy falls back to `certificate` when empty.
    #[serde(default)]
    pub chain: String,
    pub trust_bundle: String,
    pub not_before: u64,
    pub not_after: u64,
    #[serde(default)]
    pub serial: String,
}

/// The body of every refusal (4xx/5xx) of the operator's API, certify and watches alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable reason (`unauthenticated`, `invalid_token`, `not_synced`, ...).
    #[serde(default)]
    pub error: String,
    /// Why, for people.
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_field_names() {
        let r = CertifyResponse {
            spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
            certificate: "C".into(),
            chain: "CH".into(),
            trust_bundle: "B".into(),
            not_before: 1,
            not_after: 2,
            serial: "ab".into(),
        };
        assert_eq!(
            serde_json::to_value(&r).expect("json"),
            serde_json::json!({"spiffeId": "spiffe://cluster.local/ns/a/sa/b", "certificate": "C",
                "chain": "CH", "trustBundle": "B", "notBefore": 1, "notAfter": 2, "serial": "ab"})
        );
        let lean: CertifyResponse = serde_json::from_value(serde_json::json!({
            "spiffeId": "s", "certificate": "C", "trustBundle": "B", "notBefore": 1, "notAfter": 2
        }))
        .expect("chain and serial are optional");
        assert_eq!((lean.chain.as_str(), lean.serial.as_str()), ("", ""));
        let req: CertifyRequest =
            serde_json::from_str(r#"{"csr": "X"}"#).expect("the token may be a header");
        assert_eq!(req.token, None);
        assert_eq!(
            serde_json::to_string(&ErrorBody {
                error: "forbidden".into(),
                message: "no".into()
            })
            .expect("json"),
            r#"{"error":"forbidden","message":"no"}"#
        );
    }
}
