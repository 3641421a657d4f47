//! Which EndpointSlice API the server offers, detected once at start from discovery:
//! `discovery.k8s.io/v1` (Kubernetes 1.21+) or `v1beta1` (1.17–1.24; the test tier
//! runs 1.20).

/// The EndpointSlice API to watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceApi {
    V1,
    V1Beta1,
}

impl SliceApi {
    pub fn version(self) -> &'static str {
        match self {
            Self::V1 => "v1",
            Self::V1Beta1 => "v1beta1",
        }
    }
}

/// Why no EndpointSlice API can be used.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "the API server serves no discovery.k8s.io EndpointSlice (v1 or v1beta1); it offers {offered:?}"
    )]
    NoEndpointSlices { offered: Vec<String> },
    #[error("discovering discovery.k8s.io: {0}")]
    Discovery(#[from] kube::Error),
}

/// Picks the newest EndpointSlice version among the versions the server offers for the
/// `discovery.k8s.io` group.
pub fn pick(offered: &[String]) -> Result<SliceApi, ApiError> {
    if offered.iter().any(|v| v == "v1") {
        Ok(SliceApi::V1)
    } else if offered.iter().any(|v| v == "v1beta1") {
        Ok(SliceApi::V1Beta1)
    } else {
        Err(ApiError::NoEndpointSlices {
            offered: offered.to_vec(),
        })
    }
}

/// Asks the server which `discovery.k8s.io` versions it serves and picks one.
pub async fn detect(client: &kube::Client) -> Result<SliceApi, ApiError> {
    let groups = client.list_api_groups().await?;
    let offered: Vec<String> = groups
        .groups
        .iter()
        .filter(|g| g.name == "discovery.k8s.io")
        .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
        .collect();
    pick(&offered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_offered_version_wins() {
        let v = |xs: &[&str]| xs.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(pick(&v(&["v1", "v1beta1"])).ok(), Some(SliceApi::V1));
        assert_eq!(pick(&v(&["v1beta1"])).ok(), Some(SliceApi::V1Beta1));
        let err = pick(&v(&["v2alpha1"])).expect_err("nothing usable");
        assert!(err.to_string().contains("v2alpha1"), "{err}");
        assert!(pick(&[]).is_err());
    }
}
