//! What every reconciliation shares: the client, the metrics, the Event recorder and the
//! per-object retry backoff. Passed to the controllers as `Arc<Context>`.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use kube::{
    Client,
    runtime::events::{Recorder, Reporter},
};

use crate::metrics::Metrics;

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "remora-operator";

/// Shared state of the controllers.
#[derive(Clone)]
pub struct Context {
    pub client: Client,
    pub metrics: Metrics,
    pub recorder: Recorder,
    backoff: std::sync::Arc<Mutex<HashMap<String, u32>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// First retry delay after a failed reconciliation; doubles per failure.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Context {
    /// `instance` names this replica in Events (the pod name).
    pub fn new(client: Client, metrics: Metrics, instance: String) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(instance),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            backoff: Default::default(),
        }
    }

    /// The delay before retrying `key` after one more failure: 0.5 s, 1 s, 2 s … 5 min.
    pub fn next_backoff(&self, key: &str) -> Duration {
        let mut map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        let failures = map.entry(key.to_owned()).or_insert(0);
        *failures = failures.saturating_add(1);
        backoff_for(*failures)
    }

    /// Forgets the failures of `key` after a successful reconciliation.
    pub fn reset_backoff(&self, key: &str) {
        let mut map = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(key);
    }
}

/// Exponential backoff for the `failures`-th consecutive failure (1-based).
pub fn backoff_for(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff_for(1), Duration::from_millis(500));
        assert_eq!(backoff_for(2), Duration::from_secs(1));
        assert_eq!(backoff_for(4), Duration::from_secs(4));
        assert_eq!(backoff_for(30), BACKOFF_MAX);
        assert_eq!(backoff_for(u32::MAX), BACKOFF_MAX);
    }
}
