//! Leader election with a `coordination.k8s.io/v1` Lease, so only one replica writes
//! status (every replica will serve streams and certificates).
//!
//! The holder renews the Lease every `renew_every`; another replica takes it over once it
//! has seen the same holder and renew time for longer than the Lease's duration (measured
//! on its own clock, as client-go does, so clock skew between nodes does not matter).
//! Writes use the Lease's `resourceVersion`, so two candidates never both win. A leader
//! that cannot renew for a full Lease duration steps down; on shutdown it releases the
//! Lease so a standby takes over at once.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Where the Lease lives and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub duration: Duration,
    /// How often the holder renews (and a standby retries).
    pub renew_every: Duration,
}

/// What to do with the Lease as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// It does not exist: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Free, released or expired: take it over.
    Acquire,
    /// Someone else holds it and renews.
    Follow { holder: String },
}

/// The pure rule. `unchanged_for` is how long this replica has seen the same holder and
/// renew time (`None`: it just changed or was never seen).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, unchanged_for: Option<Duration>) -> Decision {
    let Some(spec) = spec else {
        return Decision::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(15),
    );
    match unchanged_for {
        Some(seen) if seen > duration => Decision::Acquire,
        _ => Decision::Follow {
            holder: holder.to_owned(),
        },
    }
}

/// Errors of one election round.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} Lease {namespace}/{name}: {source}")]
    Kube {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Runs the election until `shutdown` fires, publishing whether we lead on `leading`.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
        }
    }

    fn err(&self, action: &'static str) -> impl FnOnce(kube::Error) -> Error + use<> {
        let namespace = self.cfg.namespace.clone();
        let name = self.cfg.name.clone();
        move |source| Error::Kube {
            action,
            namespace,
            name,
            source,
        }
    }

    fn spec(&self, now: Timestamp, acquire: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: i32::try_from(self.cfg.duration.as_secs()).ok(),
            acquire_time: Some(acquire.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: returns whether we hold the Lease afterwards.
    pub async fn step(&mut self) -> Result<bool, Error> {
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(self.err("reading"))?;
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let seen = (
            spec.and_then(|s| s.holder_identity.clone()),
            spec.and_then(|s| s.renew_time.clone()),
        );
        let unchanged_for = match &self.observed {
            Some((holder, renew, since)) if (holder, renew) == (&seen.0, &seen.1) => {
                Some(since.elapsed())
            }
            _ => {
                self.observed = Some((seen.0, seen.1, Instant::now()));
                None
            }
        };
        match (decide(spec, &self.cfg.identity, unchanged_for), current) {
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(self.err("creating")(e)),
                }
            }
            (Decision::Renew | Decision::Acquire, Some(mut lease)) => {
                let old = lease.spec.take().unwrap_or_default();
                let renewing = old.holder_identity.as_deref() == Some(self.cfg.identity.as_str());
                let transitions = old.lease_transitions.unwrap_or(0);
                lease.spec = Some(if renewing {
                    self.spec(now, old.acquire_time, transitions)
                } else {
                    self.spec(now, None, transitions.saturating_add(1))
                });
                match self
                    .api
                    .replace(&lease.name_any(), &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(self.err("updating")(e)),
                }
            }
            (Decision::Renew | Decision::Acquire, None) | (Decision::Follow { .. }, _) => Ok(false),
        }
    }

    /// Gives the Lease up (holder cleared) if we hold it.
    pub async fn release(&mut self) -> Result<(), Error> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.cfg.name)
            .await
            .map_err(self.err("reading"))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
            .await
            .map_err(self.err("releasing"))?;
        Ok(())
    }

    /// Runs rounds until `shutdown` becomes true (the caller sets it once nothing writes
    /// status any more), then releases the Lease.
    pub async fn run(
        mut self,
        leading: watch::Sender<Option<bool>>,
        metrics: Metrics,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_renewal: Option<Instant> = None;
        loop {
            let was_leading = leading.borrow().unwrap_or(false);
            let now_leading = match self.step().await {
                Ok(true) => {
                    last_renewal = Some(Instant::now());
                    true
                }
                Ok(false) => false,
                Err(e) => {
                    tracing::warn!("leader election: {e}");
                    // Keep leading only while the Lease we hold has not run out.
                    was_leading && last_renewal.is_some_and(|t| t.elapsed() < self.cfg.duration)
                }
            };
            if now_leading != was_leading || leading.borrow().is_none() {
                tracing::info!(identity = %self.cfg.identity, leading = now_leading, "leadership");
            }
            metrics.set_leader(now_leading);
            leading.send_replace(Some(now_leading));
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.renew_every) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if leading.borrow().unwrap_or(false) {
            leading.send_replace(Some(false));
            metrics.set_leader(false);
            if let Err(e) = self.release().await {
                tracing::warn!("releasing the leader Lease: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: Option<&str>, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_owned),
            lease_duration_seconds: Some(secs),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", None), Decision::Create);
        assert_eq!(
            decide(Some(&held_by(None, 15)), "me", None),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held_by(Some(""), 15)), "me", None),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&held_by(Some("me"), 15)), "me", None),
            Decision::Renew
        );
        let other = held_by(Some("other"), 15);
        let follow = Decision::Follow {
            holder: "other".to_owned(),
        };
        assert_eq!(decide(Some(&other), "me", None), follow);
        assert_eq!(
            decide(Some(&other), "me", Some(Duration::from_secs(14))),
            follow
        );
        assert_eq!(
            decide(Some(&other), "me", Some(Duration::from_secs(16))),
            Decision::Acquire
        );
    }
}
