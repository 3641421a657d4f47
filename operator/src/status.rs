//! Writes `status` with server-side apply on the status subresource, as field manager
//! `remora-operator`, only the fields this operator owns.

use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
};
use remora_crds::PolicyStatus;
use serde::{Serialize, de::DeserializeOwned};

use crate::context::FIELD_MANAGER;

/// The apply patch: apiVersion, kind and status, nothing else.
pub fn apply_patch<K: Resource<DynamicType = ()>>(status: &PolicyStatus) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    })
}

/// Applies `status` to `obj`'s status subresource.
pub async fn apply<K>(api: &Api<K>, obj: &K, status: &PolicyStatus) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(
        &obj.name_any(),
        &params,
        &Patch::Apply(apply_patch::<K>(status)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use remora_crds::MeshPolicy;

    #[test]
    fn patch_names_the_type_and_carries_only_status() {
        let status = PolicyStatus {
            conditions: Vec::new(),
            observed_generation: Some(3),
        };
        assert_eq!(
            apply_patch::<MeshPolicy>(&status),
            serde_json::json!({
                "apiVersion": "remora.dev/v1alpha1",
                "kind": "MeshPolicy",
                "status": {"observedGeneration": 3},
            })
        );
    }
}
