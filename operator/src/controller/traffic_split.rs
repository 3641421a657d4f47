//! `TrafficSplit` in the shared reconcile loop: one split per root Service; root,
//! backends and mirror must exist and backends must expose the root Service's ports.

use remora_crds::{PolicyStatus, TrafficSplit};

use crate::{
    conditions::{self, Verdicts},
    controller::PolicyKind,
    validate::Services,
};

impl PolicyKind for TrafficSplit {
    const KIND: &'static str = "TrafficSplit";

    fn policy_status(&self) -> Option<&PolicyStatus> {
        self.status.as_ref()
    }

    fn referenced_services(&self) -> Vec<String> {
        let mut names: Vec<String> = conditions::split_references(self)
            .map(str::to_owned)
            .collect();
        names.sort();
        names.dedup();
        names
    }

    fn verdicts(&self, siblings: &[Self], services: &Services) -> Verdicts {
        conditions::traffic_split(self, siblings, services)
    }

    fn same_target(&self, other: &Self) -> bool {
        self.spec.service == other.spec.service
    }
}
