//! `MeshPolicy` in the shared reconcile loop: one policy per target Service (or one
//! namespace-wide policy per namespace); the target must exist.

use remora_crds::{MeshPolicy, PolicyStatus};

use crate::{
    conditions::{self, Verdicts},
    controller::PolicyKind,
    validate::Services,
};

impl PolicyKind for MeshPolicy {
    const KIND: &'static str = "MeshPolicy";

    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }

    fn referenced_services(&self) -> Vec<String> {
        conditions::policy_target(self)
            .map(str::to_owned)
            .into_iter()
            .collect()
    }

    fn verdicts(&self, siblings: &[Self], services: &Services) -> Verdicts {
        conditions::mesh_policy(self, siblings, services)
    }

    fn same_target(&self, other: &Self) -> bool {
        conditions::policy_target(self) == conditions::policy_target(other)
    }
}
