//! What the provisioner knows about one node, and how each event changes it. Pure: the
//! clock is passed in, nothing is read or written here.

use chorus_runtime::Backoff;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a node is in provisioning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// A provisioning-mode startup was seen; the node waits for (or is in) its first attempt.
    Pending,
    /// The last attempt failed; it is retried after `next_attempt_at`.
    Failed,
    /// Provisioned: its `provisioned` event is stored.
    Provisioned,
}

/// A lifecycle event as the provisioner remembers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    /// The event id (CloudEvents `id`).
    pub event_id: String,
    /// Its sequence in `CHORUS_LIFECYCLE`; 0 when unknown (a re-published event JetStream
    /// reported as a duplicate without its sequence).
    pub sequence: u64,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Its component.
    pub component: String,
}

/// What the provisioner knows about one node; one atomic sled value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node identity; the record's key in the state store.
    pub identity: String,
    /// Where the node is in provisioning.
    pub status: NodeStatus,
    /// The provisioning-mode startup being served (the node's current boot).
    pub startup: Option<EventRef>,
    /// The newest `provisioned` event known for the node (ours or anyone's).
    pub provisioned: Option<EventRef>,
    /// Attempts finished for the current boot, failed ones and the successful one.
    pub attempts: u32,
    /// Steps that succeeded in the current boot: the next attempt starts at this index.
    pub next_step: usize,
    /// A pending or failed node is not attempted before this time.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// The `provisioned` event (encoded) stamped for this boot and not yet confirmed stored;
    /// published again, with the same id, until it is.
    pub outbox: Option<String>,
    /// Times the node went to provisioned (more than 1 after re-provisioning).
    pub times_provisioned: u32,
    /// Last change of this record.
    pub updated_at: DateTime<Utc>,
}

/// What a provisioning-mode startup event did to a node's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupOutcome {
    /// First startup seen for the node: pending.
    New,
    /// A newer boot of a pending or failed node: progress reset, pending.
    Restarted,
    /// The node came back in provisioning mode after it was provisioned: pending again.
    Reprovision,
    /// The startup already served (same event id): nothing changes.
    Duplicate,
    /// Stored before the node's current startup or its `provisioned` event: nothing changes.
    Stale,
}

impl StartupOutcome {
    /// Whether the node now needs provisioning.
    pub fn is_due(self) -> bool {
        matches!(self, StartupOutcome::New | StartupOutcome::Restarted | StartupOutcome::Reprovision)
    }
}

/// What a `provisioned` event did to a node's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProvisionedOutcome {
    /// The node is now provisioned.
    Recorded,
    /// Already known (same event, or an older one): nothing changes.
    Duplicate,
    /// The node started in provisioning mode after this event: remembered, the node stays
    /// pending.
    Superseded,
}

impl NodeRecord {
    /// A node never seen before.
    pub fn new(identity: impl Into<String>, now: DateTime<Utc>) -> Self {
        NodeRecord {
            identity: identity.into(),
            status: NodeStatus::Pending,
            startup: None,
            provisioned: None,
            attempts: 0,
            next_step: 0,
            next_attempt_at: None,
            last_error: None,
            outbox: None,
            times_provisioned: 0,
            updated_at: now,
        }
    }

    /// Applies a provisioning-mode startup event (see the module documentation).
    pub fn on_startup(&mut self, seen: EventRef, now: DateTime<Utc>) -> StartupOutcome {
        if let Some(current) = &self.startup {
            if current.event_id == seen.event_id {
                return StartupOutcome::Duplicate;
            }
            if current.sequence >= seen.sequence {
                return StartupOutcome::Stale;
            }
        }
        if self.provisioned.as_ref().is_some_and(|p| p.event_id == seen.event_id || p.sequence >= seen.sequence) {
            return StartupOutcome::Stale;
        }
        let outcome = match (self.status, &self.startup) {
            (NodeStatus::Provisioned, _) => StartupOutcome::Reprovision,
            (_, None) => StartupOutcome::New,
            (_, Some(_)) => StartupOutcome::Restarted,
        };
        self.startup = Some(seen);
        self.status = NodeStatus::Pending;
        self.attempts = 0;
        self.next_step = 0;
        self.next_attempt_at = Some(now);
        self.last_error = None;
        // A provisioned event stamped for the previous boot must not confirm this one.
        self.outbox = None;
        self.updated_at = now;
        outcome
    }

    /// Applies a `provisioned` event (ours, read back, or anyone's).
    pub fn on_provisioned(&mut self, seen: EventRef, now: DateTime<Utc>) -> ProvisionedOutcome {
        if let Some(known) = &mut self.provisioned {
            if known.event_id == seen.event_id {
                // Our own event confirmed without its sequence (a re-publish JetStream called a
                // duplicate): learn the sequence now.
                if known.sequence == 0 && seen.sequence > 0 {
                    known.sequence = seen.sequence;
                    self.updated_at = now;
                }
                return ProvisionedOutcome::Duplicate;
            }
            if known.sequence >= seen.sequence {
                return ProvisionedOutcome::Duplicate;
            }
        }
        if self.startup.as_ref().is_some_and(|s| s.sequence > seen.sequence) {
            self.provisioned = Some(seen);
            self.updated_at = now;
            return ProvisionedOutcome::Superseded;
        }
        self.mark_provisioned(seen, now);
        ProvisionedOutcome::Recorded
    }

    /// Whether an attempt (or the publication of a stamped event) should start now.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.status != NodeStatus::Provisioned
            && (self.startup.is_some() || self.outbox.is_some())
            && !matches!(self.next_attempt_at, Some(t) if t > now)
    }

    /// Step `index` succeeded: the next attempt starts after it.
    pub fn step_done(&mut self, index: usize, now: DateTime<Utc>) {
        self.next_step = self.next_step.max(index + 1);
        self.updated_at = now;
    }

    /// An attempt failed: failed, tried again after the backoff.
    pub fn attempt_failed(&mut self, error: String, backoff: &Backoff, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.status = NodeStatus::Failed;
        let delay = chrono::Duration::from_std(backoff.delay(self.attempts)).unwrap_or(chrono::Duration::MAX);
        self.next_attempt_at = Some(now.checked_add_signed(delay).unwrap_or(DateTime::<Utc>::MAX_UTC));
        self.last_error = Some(error);
        self.updated_at = now;
    }

    /// Our `provisioned` event for this boot is stored.
    pub fn confirmed(&mut self, seen: EventRef, now: DateTime<Utc>) {
        self.attempts = self.attempts.saturating_add(1);
        self.mark_provisioned(seen, now);
    }

    fn mark_provisioned(&mut self, seen: EventRef, now: DateTime<Utc>) {
        self.status = NodeStatus::Provisioned;
        self.provisioned = Some(seen);
        self.next_attempt_at = None;
        self.last_error = None;
        self.outbox = None;
        self.times_provisioned = self.times_provisioned.saturating_add(1);
        self.updated_at = now;
    }

    /// The event id of the boot being served.
    pub(super) fn boot(&self) -> Option<&str> {
        self.startup.as_ref().map(|s| s.event_id.as_str())
    }

    /// Whether an attempt begun for `boot` may still record its result.
    pub(super) fn serves(&self, boot: Option<&str>) -> bool {
        self.status != NodeStatus::Provisioned && self.boot() == boot
    }
}
