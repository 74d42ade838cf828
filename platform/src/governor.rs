//! Governors: fleet-wide semaphores with expiring leases, as Choria's governor offers them
//! (`choria governor add NAME CAPACITY EXPIRE`, `choria governor run NAME -- command`).
//!
//! A governor has a capacity and a lease expiry. Its definition is a key of the
//! `CHORUS_GOVERNORS` bucket; its leases are the keys `slot.0` … `slot.<capacity-1>` of its own
//! bucket `GOVERNOR_<name>`, whose time to live is the expiry. A claimant takes a lease by
//! *creating* a free slot (atomic on both engines: of two claimants of one slot, one wins),
//! so no more than `capacity` leases exist at once; it renews the lease well within the
//! expiry by updating the slot at its revision, and releases it by deleting it at that
//! revision. A holder that dies stops renewing, and its slot expires: a killed holder never
//! blocks the fleet for longer than the expiry.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chorus_backbone::{Backbone, BackboneError, Bucket, BucketConfig};
use chorus_runtime::Shutdown;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::PlatformError;

/// The bucket holding every governor's definition.
pub const GOVERNORS_BUCKET: &str = "CHORUS_GOVERNORS";

/// A governor's definition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GovernorSpec {
    /// Leases that may be held at once.
    pub capacity: u32,
    /// How long a lease lives without being renewed.
    #[serde(with = "humantime_serde")]
    pub expires: Duration,
}

/// A governor, opened.
pub struct Governor {
    name: String,
    spec: GovernorSpec,
    leases: Arc<dyn Bucket>,
}

/// What a lease's slot holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LeaseHolder {
    /// Who holds it (host and process, or the caller's name).
    pub holder: String,
    /// When it was taken, RFC 3339.
    pub since: String,
}

/// A held lease; renewed in the background until released or dropped.
pub struct Lease {
    slot: u32,
    lost: watch::Receiver<bool>,
    stop: Shutdown,
    renewer: Option<tokio::task::JoinHandle<Option<u64>>>,
    leases: Arc<dyn Bucket>,
}

impl Drop for Lease {
    /// A lease dropped unreleased stops being renewed: it expires for the next claimant.
    fn drop(&mut self) {
        self.stop.request();
    }
}

/// A governor's name is part of its bucket's name.
fn check_name(name: &str) -> Result<(), PlatformError> {
    if !chorus_backbone::kv::is_bucket_name(name) {
        return Err(PlatformError::Invalid(format!("governor name {name:?}: use letters, digits, - and _")));
    }
    Ok(())
}

async fn definitions(backbone: &dyn Backbone) -> Result<Arc<dyn Bucket>, PlatformError> {
    Ok(backbone.bucket(&BucketConfig::new(GOVERNORS_BUCKET).with_history(5)).await?)
}

fn lease_bucket(name: &str, spec: &GovernorSpec) -> BucketConfig {
    BucketConfig::new(format!("GOVERNOR_{name}")).with_ttl(spec.expires)
}

impl Governor {
    /// Defines (or redefines) governor `name`. A new expiry applies to a governor whose
    /// lease bucket does not exist yet.
    pub async fn add(backbone: &dyn Backbone, name: &str, spec: GovernorSpec) -> Result<Self, PlatformError> {
        check_name(name)?;
        if spec.capacity == 0 || spec.expires < Duration::from_secs(1) {
            return Err(PlatformError::Invalid("a governor needs capacity >= 1 and expires >= 1s".into()));
        }
        let value = serde_json::to_vec(&spec).map_err(|e| PlatformError::Invalid(e.to_string()))?;
        definitions(backbone).await?.put(name, value.into()).await?;
        Self::open(backbone, name).await
    }

    /// Opens a defined governor.
    pub async fn open(backbone: &dyn Backbone, name: &str) -> Result<Self, PlatformError> {
        check_name(name)?;
        let entry = definitions(backbone)
            .await?
            .get(name)
            .await?
            .ok_or_else(|| PlatformError::Invalid(format!("no governor {name:?}: add it first")))?;
        let spec: GovernorSpec = serde_json::from_slice(&entry.value)
            .map_err(|e| PlatformError::Invalid(format!("governor {name:?} definition: {e}")))?;
        let leases = backbone.bucket(&lease_bucket(name, &spec)).await?;
        Ok(Governor { name: name.to_owned(), spec, leases })
    }

    /// Every defined governor.
    pub async fn list(backbone: &dyn Backbone) -> Result<Vec<(String, GovernorSpec)>, PlatformError> {
        let defs = definitions(backbone).await?;
        let mut out = Vec::new();
        for name in defs.keys().await? {
            if let Some(e) = defs.get(&name).await? {
                if let Ok(spec) = serde_json::from_slice(&e.value) {
                    out.push((name, spec));
                }
            }
        }
        Ok(out)
    }

    /// The governor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its definition.
    pub fn spec(&self) -> &GovernorSpec {
        &self.spec
    }

    /// The leases held now, as (slot, holder).
    pub async fn holders(&self) -> Result<Vec<(u32, LeaseHolder)>, PlatformError> {
        let mut out = Vec::new();
        for slot in 0..self.spec.capacity {
            if let Some(e) = self.leases.get(&format!("slot.{slot}")).await? {
                if let Ok(h) = serde_json::from_slice(&e.value) {
                    out.push((slot, h));
                }
            }
        }
        Ok(out)
    }

    /// Takes a free lease, trying every slot, then again after a pause, until `max_wait`
    /// passes (`None`) or `shutdown` is requested.
    pub async fn claim(
        &self,
        holder: &str,
        max_wait: Duration,
        shutdown: &Shutdown,
    ) -> Result<Option<Lease>, PlatformError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        let value: Bytes = serde_json::to_vec(&LeaseHolder {
            holder: holder.to_owned(),
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
        .expect("a holder serializes")
        .into();
        loop {
            let start = fastrand::u32(..self.spec.capacity);
            for i in 0..self.spec.capacity {
                let slot = (start + i) % self.spec.capacity;
                match self.leases.create(&format!("slot.{slot}"), value.clone()).await {
                    Ok(revision) => return Ok(Some(self.hold(slot, revision, value))),
                    Err(BackboneError::WrongRevision { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let pause = Duration::from_millis(100 + fastrand::u64(..400));
            if tokio::time::Instant::now() + pause > deadline {
                return Ok(None);
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.requested() => return Ok(None),
            }
        }
    }

    fn hold(&self, slot: u32, revision: u64, value: Bytes) -> Lease {
        let (lost_tx, lost) = watch::channel(false);
        let stop = Shutdown::new();
        let leases = self.leases.clone();
        let every = self.spec.expires / 3;
        let give_up = self.spec.expires * 2 / 3;
        let key = format!("slot.{slot}");
        let renewer = {
            let (stop, leases) = (stop.clone(), leases.clone());
            tokio::spawn(async move {
                let mut revision = revision;
                let mut renewed = tokio::time::Instant::now();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = stop.requested() => return Some(revision),
                    }
                    match leases.update(&key, value.clone(), revision).await {
                        Ok(r) => {
                            revision = r;
                            renewed = tokio::time::Instant::now();
                        }
                        Err(BackboneError::WrongRevision { .. }) => {
                            tracing::warn!(%key, "governor: the lease expired before it was renewed");
                            lost_tx.send(true).ok();
                            return None;
                        }
                        // Not renewed for two thirds of the expiry (the broker unreachable):
                        // the lease may be gone there, and another claimant may hold the
                        // slot; give it up rather than exceed the capacity.
                        Err(e) if renewed.elapsed() >= give_up => {
                            tracing::warn!(%key, error = %e, "governor: cannot renew the lease; giving it up");
                            lost_tx.send(true).ok();
                            return None;
                        }
                        Err(e) => tracing::warn!(%key, error = %e, "governor: renewing the lease failed; retrying"),
                    }
                }
            })
        };
        Lease { slot, lost, stop, renewer: Some(renewer), leases }
    }
}

impl Lease {
    /// The slot held.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Resolves when the lease is lost (it expired before a renewal got through): the
    /// holder no longer counts against the capacity and should stop.
    pub async fn lost(&mut self) {
        while !*self.lost.borrow() {
            if self.lost.changed().await.is_err() {
                // The renewer ended without losing the lease: only on release.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Gives the lease back for the next claimant.
    pub async fn release(mut self) -> Result<(), PlatformError> {
        self.stop.request();
        let revision = match self.renewer.take() {
            Some(renewer) => renewer.await.ok().flatten(),
            None => None,
        };
        if let Some(revision) = revision {
            match self.leases.delete(&format!("slot.{}", self.slot), Some(revision)).await {
                Ok(()) | Err(BackboneError::WrongRevision { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
