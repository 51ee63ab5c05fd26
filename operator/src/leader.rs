//! Leader election over a coordination.k8s.io Lease, so that several operator replicas
//! can run and exactly one reconciles and serves the gateway. A replica takes the Lease
//! when it is free or its holder stopped renewing it, renews it while it works, and
//! stops working (its `run` returns an error, and the process exits) as soon as it can
//! no longer prove it holds it. Replicas that wait are not ready, so the gateway's
//! Service only sends workers to the leader.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

/// Where and how the Lease is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderElection {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name, made unique).
    pub identity: String,
    /// How long a Lease holds without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews it (well within the duration).
    pub renew_interval: Duration,
}

impl LeaderElection {
    /// Defaults of controller-style leader election: a 15 s Lease renewed every 5 s.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
        }
    }
}

/// Why the Lease was lost.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// Another replica holds it now.
    #[error("lease {lease} is now held by {holder}")]
    Taken {
        /// The Lease.
        lease: String,
        /// Its holder.
        holder: String,
    },
    /// It could not be renewed before it expired.
    #[error("lease {lease} could not be renewed for {seconds} s: {last_error}")]
    Expired {
        /// The Lease.
        lease: String,
        /// Seconds since the last renewal.
        seconds: u64,
        /// The last error.
        last_error: String,
    },
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Whether a Lease's holder let it run out (or nobody holds it).
fn free(spec: &LeaseSpec, identity: &str, at: Timestamp) -> bool {
    let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty()) else { return true };
    if holder == identity {
        return true;
    }
    let (Some(renewed), Some(seconds)) = (spec.renew_time.as_ref(), spec.lease_duration_seconds) else {
        return true;
    };
    let expires = renewed.0.as_millisecond() + i64::from(seconds) * 1000;
    at.as_millisecond() > expires
}

/// The spec that makes `identity` the holder, counting a change of holder.
fn held_by(old: Option<&LeaseSpec>, election: &LeaderElection) -> LeaseSpec {
    let changed = old.and_then(|s| s.holder_identity.as_deref()) != Some(election.identity.as_str());
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(election.identity.clone()),
        lease_duration_seconds: Some(election.lease_duration.as_secs().max(1) as i32),
        acquire_time: if changed { Some(now()) } else { old.and_then(|s| s.acquire_time.clone()) },
        renew_time: Some(now()),
        lease_transitions: Some(if changed && old.is_some() { transitions + 1 } else { transitions }),
        ..Default::default()
    }
}

/// One attempt to take or renew the Lease: Ok(true) when this replica holds it now,
/// Ok(false) when another live replica does.
async fn try_hold(api: &Api<Lease>, election: &LeaderElection) -> kube::Result<Result<bool, String>> {
    match api.get_opt(&election.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(election.name.clone()), ..Default::default() },
                spec: Some(held_by(None, election)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Ok(true)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Ok(false)),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            if !free(&spec, &election.identity, Timestamp::now()) {
                return Ok(Err(spec.holder_identity.unwrap_or_default()));
            }
            lease.spec = Some(held_by(Some(&spec), election));
            // The resourceVersion read above makes this a compare-and-swap.
            match api.replace(&election.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(Ok(true)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Ok(false)),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica holds the Lease.
pub async fn acquire(client: &kube::Client, election: &LeaderElection) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    let mut waiting_for: Option<String> = None;
    loop {
        match try_hold(&api, election).await {
            Ok(Ok(true)) => {
                tracing::info!(lease = %election.name, identity = %election.identity, "became the leader");
                return;
            }
            Ok(Ok(false)) => {}
            Ok(Err(holder)) => {
                if waiting_for.as_deref() != Some(holder.as_str()) {
                    tracing::info!(lease = %election.name, %holder, "waiting for the leader's lease");
                    waiting_for = Some(holder);
                }
            }
            Err(e) => tracing::warn!(lease = %election.name, error = %e, "reading the lease failed"),
        }
        tokio::time::sleep(election.renew_interval / 2).await;
    }
}

/// Renews the Lease until it is lost; returns why.
pub async fn keep(client: &kube::Client, election: &LeaderElection) -> LeaderError {
    let api: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(election.renew_interval).await;
        let error = match try_hold(&api, election).await {
            Ok(Ok(true)) => {
                renewed = tokio::time::Instant::now();
                continue;
            }
            Ok(Ok(false)) => "the lease changed while renewing it".to_string(),
            Ok(Err(holder)) => return LeaderError::Taken { lease: election.name.clone(), holder },
            Err(e) => e.to_string(),
        };
        // Stop before the Lease can run out, so two replicas never work at once.
        let since = renewed.elapsed();
        if since + election.renew_interval >= election.lease_duration {
            return LeaderError::Expired { lease: election.name.clone(), seconds: since.as_secs(), last_error: error };
        }
        tracing::warn!(lease = %election.name, error = %error, "renewing the lease failed; retrying");
    }
}

/// Gives the Lease up (it expires at once), so another replica takes over without
/// waiting out its duration.
pub async fn release(client: &kube::Client, election: &LeaderElection) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
    if let Ok(Some(mut lease)) = api.get_opt(&election.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(election.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        match api.replace(&election.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %election.name, "released the lease"),
            Err(e) => tracing::warn!(lease = %election.name, error = %e, "releasing the lease failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: Timestamp, seconds: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(renewed)),
            lease_duration_seconds: Some(seconds),
            ..Default::default()
        }
    }

    #[test]
    fn a_lease_is_free_when_unheld_ours_or_run_out() {
        let t = Timestamp::from_second(1_000_000).expect("time");
        let later = |s: i64| Timestamp::from_second(1_000_000 + s).expect("time");
        assert!(free(&LeaseSpec::default(), "me", t));
        assert!(free(&spec("me", t, 15), "me", later(1)));
        assert!(!free(&spec("other", t, 15), "me", later(10)));
        assert!(free(&spec("other", t, 15), "me", later(16)));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let election = LeaderElection::new("ns", "lease", "me");
        let other = spec("other", Timestamp::now(), 15);
        let taken = held_by(Some(&LeaseSpec { lease_transitions: Some(2), ..other }), &election);
        assert_eq!((taken.holder_identity.as_deref(), taken.lease_transitions), (Some("me"), Some(3)));
        let renewed = held_by(Some(&taken), &election);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
