//! Reading startup and provisioned events into the node records.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chorus_backbone::StoredMessage;
use chorus_platform::deadletter::{self, DeadLetter};
use chorus_platform::Emitter;
use chorus_rpc::transport::node_subject;
use chorus_runtime::Backoff;
use chorus_schemas::lifecycle::Lifecycle;
use chorus_schemas::subject::CHORUS_LIFECYCLE;
use chorus_schemas::{Event, EventRecord};
use chrono::Utc;
use tokio::sync::mpsc;

use super::engine::{Applied, Shared};
use super::error::ProvisionerError;
use super::record::{EventRef, NodeRecord, StartupOutcome};
use super::stats::ProvisionerStats;

/// Pauses between failed reads of the stream: 400 ms doubling up to 10 s.
const READ_BACKOFF: Backoff = Backoff::doubling(Duration::from_millis(400), Duration::from_secs(10));

/// Reads startup and provisioned events, records them, acknowledges them, and hands nodes
/// that became due to the dispatcher.
pub(super) async fn consume(shared: Arc<Shared>, due: mpsc::UnboundedSender<String>) -> Result<(), ProvisionerError> {
    let cfg = &shared.config;
    let shutdown = shared.shutdown.clone();
    let mut retry = READ_BACKOFF.retry();
    let Some(mut consumer) = chorus_platform::open_consumer(
        &*shared.backbone,
        cfg.lifecycle_stream(),
        &cfg.consumer_config(),
        &shared.reading,
        &shutdown,
    )
    .await
    else {
        return Ok(());
    };
    loop {
        if shutdown.is_requested() {
            return Ok(());
        }
        let fetched = tokio::select! {
            r = consumer.fetch(cfg.batch_size, cfg.fetch_wait) => r,
            _ = shutdown.requested() => return Ok(()),
        };
        let deliveries = match fetched {
            Ok(d) => {
                retry.reset();
                d
            }
            Err(e) => {
                tracing::warn!(error = %e, failures = retry.failures() + 1, "provisioner: reading {CHORUS_LIFECYCLE} failed; retrying");
                if !retry.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        if deliveries.is_empty() {
            shared.caught_up.send_if_modified(|c| !std::mem::replace(c, true));
            shared.idle.send_modify(|n| *n += 1);
            continue;
        }
        let mut letters = Vec::new();
        let mut lettered = HashSet::new();
        let mut now_due = Vec::new();
        for (i, d) in deliveries.iter().enumerate() {
            match shared.apply(&d.message)? {
                Applied::Nothing => {}
                Applied::Due(identity) => now_due.push(identity),
                Applied::Reject(code, reason) => {
                    tracing::warn!(sequence = d.message.sequence, subject = %d.message.subject, %reason, "provisioner: dead-lettering");
                    letters.push(DeadLetter::new(&cfg.consumer, &d.message, code, reason));
                    lettered.insert(i);
                }
            }
        }
        // Acknowledge only what is on disk.
        shared.store.flush().await?;
        let letters_stored = match deadletter::publish(&*shared.backbone, &letters).await {
            Ok(()) => {
                shared.stats.dead_lettered.fetch_add(letters.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "provisioner: dead letters not stored; their messages will be redelivered");
                false
            }
        };
        for (i, d) in deliveries.iter().enumerate() {
            if !letters_stored && lettered.contains(&i) {
                continue;
            }
            if let Err(e) = d.ack().await {
                // Redelivered later and recognised as a duplicate.
                tracing::debug!(error = %e, sequence = d.message.sequence, "provisioner: ack failed");
            }
        }
        for identity in now_due {
            due.send(identity).ok();
        }
        if deliveries.len() < cfg.batch_size
            && !*shared.caught_up.borrow()
            && consumer.pending().await.is_ok_and(|p| p == 0)
        {
            shared.caught_up.send_if_modified(|c| !std::mem::replace(c, true));
        }
    }
}

impl Shared {
    pub(super) fn emitter(&self) -> std::sync::MutexGuard<'_, Emitter> {
        self.emitter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one consumed message in the node's state.
    pub(super) fn apply(&self, message: &StoredMessage) -> Result<Applied, ProvisionerError> {
        let record = match EventRecord::decode(&message.payload) {
            Ok(r) => r,
            Err(e) => return Ok(Applied::Reject(e.code(), e.to_string())),
        };
        let Event::Lifecycle(event) = &record.data else {
            return Ok(Applied::Reject("rejected", format!("{} is not a lifecycle event", record.data.event_type())));
        };
        let identity = event.identity();
        // Identities usually contain dots; what matters is that the directed subject is valid.
        let directed = node_subject(&self.config.collective, identity);
        if identity.is_empty() || chorus_backbone::subject::validate_publish_subject(&directed).is_err() {
            return Ok(Applied::Reject("rejected", format!("node identity {identity:?} cannot be addressed over RPC")));
        }
        let seen = EventRef {
            event_id: record.id.clone(),
            sequence: message.sequence,
            time: record.time,
            component: event.component().to_owned(),
        };
        let now = Utc::now();
        let stats = &self.stats;
        match event {
            Lifecycle::Startup(_) => {
                if !self.config.components.iter().any(|c| c == event.component()) {
                    return Ok(Applied::Reject(
                        "rejected",
                        format!("startup of component {} is not a provisioning component", event.component()),
                    ));
                }
                ProvisionerStats::bump(&stats.startups);
                let outcome = self.store.modify(identity, |record, _| {
                    record.get_or_insert_with(|| NodeRecord::new(identity, now)).on_startup(seen, now)
                })?;
                match outcome {
                    StartupOutcome::Duplicate => ProvisionerStats::bump(&stats.duplicate_startups),
                    StartupOutcome::Stale => ProvisionerStats::bump(&stats.stale_startups),
                    StartupOutcome::Reprovision => {
                        ProvisionerStats::bump(&stats.reprovisions);
                        tracing::info!(%identity, "provisioner: provisioned node started in provisioning mode again");
                    }
                    StartupOutcome::New | StartupOutcome::Restarted => {}
                }
                Ok(if outcome.is_due() { Applied::Due(identity.to_owned()) } else { Applied::Nothing })
            }
            Lifecycle::Provisioned(_) => {
                ProvisionerStats::bump(&stats.provisioned_events);
                let ours = event.component() == self.config.event_component && record.site == self.config.site;
                self.store.modify(identity, |node, next_seq| {
                    // Never number an event below one of ours already stored.
                    let mut emitter = self.emitter();
                    if ours && record.seq >= emitter.next_seq() {
                        *emitter = Emitter::new(self.sink.clone(), record.seq + 1, self.config.site.clone());
                        *next_seq = Some(record.seq + 1);
                    }
                    node.get_or_insert_with(|| NodeRecord::new(identity, now)).on_provisioned(seen, now)
                })?;
                Ok(Applied::Nothing)
            }
            other => Ok(Applied::Reject(
                "rejected",
                format!("{} event on a subject the provisioner reads", other.lifecycle_type()),
            )),
        }
    }
}
