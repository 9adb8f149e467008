//! Leader election on a `coordination.k8s.io/v1` Lease, so that a second operator replica never
//! acts (ARCHITECTURE §2 "leader Lease").
//!
//! This is the client-go algorithm, written against plain optimistic concurrency (every write is
//! a replace carrying the Lease's `resourceVersion`), because that is all both the real API
//! server and the embedded one (docs/apiserver.md: "Leases: plain objects") guarantee.
//! `kube-lease-manager` 0.13 builds with kube 5, but it relies on server-side-apply field
//! ownership conflicts to keep two candidates from taking an orphaned Lease at once; the embedded
//! server merges applies without conflicts, so there two replicas could both believe they lead.
//!
//! - A candidate takes the Lease when it has no holder, or when the holder's record has not
//!   changed for `lease_duration` as measured on the candidate's own monotonic clock from the
//!   moment it *observed* the record (so clock skew between machines does not matter).
//! - The leader renews every `retry_period`. It steps down (stops acting) as soon as it has not
//!   renewed successfully for `renew_deadline`, measured from the moment it *sent* its last
//!   successful renewal. With `renew_deadline + retry_period < lease_duration` the old leader
//!   has stopped before any other replica may take over.
//! - A graceful stop releases the Lease (holder cleared) so a standby takes over at once; a crash
//!   leaves it to expire.
//!
//! A Lease is not a data-path fence (docs/ECOSYSTEM.md): mapping generations fence the nodes.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Parameters of the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Name of the Lease.
    pub lease_name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity (the pod name in a cluster). Two replicas must differ.
    pub identity: String,
    /// How long a holder's record stays valid without renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long stops acting.
    pub renew_deadline: Duration,
    /// Interval between attempts (renewals and acquisitions).
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Production defaults (client-go's: 15 s / 10 s / 2 s).
    pub fn new(identity: impl Into<String>) -> Self {
        LeaderConfig {
            lease_name: "tessera-operator".into(),
            namespace: "default".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What the election reports on its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaderState {
    /// This replica holds the Lease and may act.
    pub leading: bool,
    /// The last round reached the API server.
    pub healthy: bool,
}

/// A running election. Dropping it aborts the loop without releasing the Lease.
#[derive(Debug)]
pub struct LeaderElection {
    state: watch::Receiver<LeaderState>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl LeaderElection {
    /// Starts competing for the Lease.
    pub fn start(client: Client, config: LeaderConfig) -> Self {
        let (state_tx, state) = watch::channel(LeaderState::default());
        let (stop, stop_rx) = watch::channel(false);
        let api = Api::<Lease>::namespaced(client, &config.namespace);
        let task = tokio::spawn(run(api, config, state_tx, stop_rx));
        LeaderElection {
            state,
            stop,
            task: Some(task),
        }
    }

    /// The state channel (current value and changes).
    pub fn subscribe(&self) -> watch::Receiver<LeaderState> {
        self.state.clone()
    }

    /// Stops competing and releases the Lease if held, so another replica takes over at once.
    pub async fn resign(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Stops at once without releasing the Lease, as a crash would.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for LeaderElection {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The holder fields of a Lease, to notice when another holder renews.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

impl Record {
    fn of(spec: &LeaseSpec) -> Self {
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.clone(),
            transitions: spec.lease_transitions,
        }
    }
}

struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    /// The last record seen and when (local monotonic clock).
    observed: Option<(Record, Instant)>,
}

async fn run(
    api: Api<Lease>,
    config: LeaderConfig,
    state: watch::Sender<LeaderState>,
    mut stop: watch::Receiver<bool>,
) {
    let retry = config.retry_period;
    let renew_deadline = config.renew_deadline;
    let mut elector = Elector {
        api,
        config,
        observed: None,
    };
    // When the last successful renewal was sent, while leading.
    let mut renewed_at: Option<Instant> = None;
    loop {
        let sent = Instant::now();
        let outcome = elector.try_acquire_or_renew().await;
        let leading = match outcome {
            Ok(true) => {
                renewed_at = Some(sent);
                true
            }
            // Someone else holds a valid lease: step down at once.
            Ok(false) => {
                renewed_at = None;
                false
            }
            // The API server did not answer: keep leading until the renew deadline.
            Err(ref e) => {
                tracing::warn!(error = %e, "leader election round failed");
                match renewed_at {
                    Some(at) if at.elapsed() < renew_deadline => true,
                    _ => {
                        renewed_at = None;
                        false
                    }
                }
            }
        };
        let new = LeaderState {
            leading,
            healthy: outcome.is_ok(),
        };
        state.send_if_modified(|old| {
            let changed = *old != new;
            if changed && old.leading != new.leading {
                tracing::info!(identity = %elector.config.identity, leading, "leadership changed");
            }
            *old = new;
            changed
        });
        // Sleep until the next round; while leading, never past the renew deadline.
        let mut pause = retry;
        if let Some(at) = renewed_at {
            pause = pause.min(renew_deadline.saturating_sub(at.elapsed()));
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = async { stop.wait_for(|s| *s).await.is_ok() } => {
                let leading = state.borrow().leading;
                if leading
                    && let Err(e) = elector.release().await
                {
                    tracing::warn!(error = %e, "could not release the leader Lease");
                }
                state.send_replace(LeaderState { leading: false, healthy: true });
                return;
            }
        }
    }
}

impl Elector {
    fn now() -> MicroTime {
        MicroTime(Timestamp::now())
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: `Ok(true)` when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let me = self.config.identity.clone();
        let Some(lease) = self.api.get_opt(&self.config.lease_name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(Self::now()),
                    renew_time: Some(Self::now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let record = Record::of(&spec);
        let observed_at = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                let at = Instant::now();
                self.observed = Some((record.clone(), at));
                at
            }
        };
        let held_by_me = record.holder.as_deref() == Some(me.as_str());
        if let Some(holder) = &record.holder
            && !held_by_me
        {
            let valid_for = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
            );
            if observed_at.elapsed() < valid_for {
                tracing::trace!(%holder, "lease held by another replica");
                return Ok(false);
            }
        }
        let mut next = lease.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: Some(me),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: if held_by_me {
                spec.acquire_time.clone().or_else(|| Some(Self::now()))
            } else {
                Some(Self::now())
            },
            renew_time: Some(Self::now()),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me)),
            ..spec
        });
        // `replace` sends the resourceVersion we read: a concurrent writer makes it a 409.
        match self
            .api
            .replace(&self.config.lease_name, &PostParams::default(), &next)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn observe(&mut self, lease: &Lease) {
        let record = Record::of(&lease.spec.clone().unwrap_or_default());
        self.observed = Some((record, Instant::now()));
    }

    /// Clears the holder if it is still this replica (conditional on the resourceVersion).
    async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.config.lease_name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        let mut next = lease.clone();
        next.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            ..spec
        });
        match self
            .api
            .replace(&lease.name_any(), &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }
}
