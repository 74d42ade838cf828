//! Leader election for active-standby services, on a key-value bucket, as Choria's
//! elections work on JetStream KV.
//!
//! Candidates of election `name` share the key `leader` of the bucket `ELECTION_<name>`,
//! whose values live for `ttl`. A candidate becomes leader by *creating* the key (one wins),
//! and stays leader by updating it at its revision every `ttl / 4`. It steps down on its own
//! when a renewal has not succeeded for `ttl / 2` (the broker unreachable, say), well before
//! the key can expire and another candidate take it, so two candidates never both believe they
//! lead (given clocks that run at the same rate). A leader killed with SIGKILL stops renewing:
//! its key expires and a standby, trying every `ttl / 4`, takes over within about
//! `ttl * 5 / 4`. A leader that stops cleanly deletes the key, so the standby takes over at
//! its next try.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_backbone::{Backbone, BackboneError, Bucket, BucketConfig};
use chorus_runtime::Shutdown;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::PlatformError;

const KEY: &str = "leader";

/// How a service takes part in an election (a section of its configuration).
#[derive(schemars::JsonSchema, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElectionConfig {
    /// The election; instances that must not act at once share it. The service's name when
    /// absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How long a leader's claim lives without renewal: a killed leader is replaced after
    /// about 1.25 times this.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ttl: Duration,
    /// This instance's name in the election [default: host:pid].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
}

fn default_ttl() -> Duration {
    Duration::from_secs(10)
}

/// Who holds an election now.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leader {
    /// The candidate's name.
    pub candidate: String,
    /// Its process id.
    pub pid: u32,
}

/// This process's default candidate name: `host:pid`.
pub fn default_candidate() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// Leadership as a running candidate sees it; cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Always the leader: for a service that runs alone.
    pub fn alone() -> Self {
        Leadership(watch::channel(true).1)
    }

    /// Whether this instance leads now.
    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until this instance leads (at once when it does).
    pub async fn lead(&mut self) {
        while !*self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until leadership changes.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits until this instance no longer leads (at once when it does not).
    pub async fn lost(&mut self) {
        while *self.0.borrow_and_update() {
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A candidate in one election.
pub struct Candidate {
    bucket: Arc<dyn Bucket>,
    me: Bytes,
    name: String,
    ttl: Duration,
}

impl Candidate {
    /// Joins election `name` (the election's `name` when configured) as `config.candidate`.
    pub async fn join(backbone: &dyn Backbone, name: &str, config: &ElectionConfig) -> Result<Self, PlatformError> {
        let name = config.name.clone().unwrap_or_else(|| name.to_owned());
        // The name is part of the election's bucket name.
        if !chorus_backbone::kv::is_bucket_name(&name) {
            return Err(PlatformError::Invalid(format!("election name {name:?}: use letters, digits, - and _")));
        }
        if config.ttl < Duration::from_secs(1) {
            return Err(PlatformError::Invalid("election ttl must be >= 1s".into()));
        }
        let bucket = backbone.bucket(&BucketConfig::new(format!("ELECTION_{name}")).with_ttl(config.ttl)).await?;
        let me =
            Leader { candidate: config.candidate.clone().unwrap_or_else(default_candidate), pid: std::process::id() };
        let me = serde_json::to_vec(&me).expect("a leader serializes").into();
        Ok(Candidate { bucket, me, name, ttl: config.ttl })
    }

    /// Who leads election `name` now, if anyone.
    pub async fn leader_of(
        backbone: &dyn Backbone,
        name: &str,
        ttl: Duration,
    ) -> Result<Option<Leader>, PlatformError> {
        let bucket = backbone.bucket(&BucketConfig::new(format!("ELECTION_{name}")).with_ttl(ttl)).await?;
        Ok(bucket.get(KEY).await?.and_then(|e| serde_json::from_slice(&e.value).ok()))
    }

    /// Campaigns until `shutdown`: the returned leadership follows this candidate's state.
    /// The task resigns (deletes its claim) when shut down while leading.
    pub fn campaign(self, shutdown: Shutdown) -> (Leadership, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move { self.run(tx, shutdown).await });
        (Leadership(rx), task)
    }

    async fn run(self, leading: watch::Sender<bool>, shutdown: Shutdown) {
        let (try_every, renew_every, give_up) = (self.ttl / 4, self.ttl / 4, self.ttl / 2);
        let mut held: Option<(u64, Instant)> = None;
        let mut first = true;
        loop {
            let pause = match held {
                None => try_every.mul_f64(0.75 + fastrand::f64() / 2.0),
                Some(_) => renew_every,
            };
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.requested() => break,
                }
            }
            held = match held {
                None => match self.bucket.create(KEY, self.me.clone()).await {
                    Ok(revision) => {
                        tracing::info!(election = %self.name, "elected leader");
                        leading.send_replace(true);
                        Some((revision, Instant::now()))
                    }
                    Err(BackboneError::WrongRevision { .. }) => None,
                    Err(e) => {
                        tracing::warn!(election = %self.name, error = %e, "election: campaigning failed; retrying");
                        None
                    }
                },
                Some((revision, renewed)) => match self.bucket.update(KEY, self.me.clone(), revision).await {
                    Ok(revision) => Some((revision, Instant::now())),
                    Err(BackboneError::WrongRevision { .. }) => {
                        tracing::warn!(election = %self.name, "election: lost the leadership (the claim expired)");
                        leading.send_replace(false);
                        None
                    }
                    Err(e) if renewed.elapsed() >= give_up => {
                        tracing::warn!(election = %self.name, error = %e, "election: cannot renew; stepping down");
                        leading.send_replace(false);
                        None
                    }
                    Err(e) => {
                        tracing::warn!(election = %self.name, error = %e, "election: renewing failed; retrying");
                        Some((revision, renewed))
                    }
                },
            };
        }
        leading.send_replace(false);
        if let Some((revision, _)) = held {
            if let Err(e) = self.bucket.delete(KEY, Some(revision)).await {
                tracing::debug!(election = %self.name, error = %e, "election: resigning failed; the claim expires");
            }
        }
    }
}
