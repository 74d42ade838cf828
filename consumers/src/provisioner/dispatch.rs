//! Running provisioning attempts: due nodes, the sweep, the steps, the provisioned event.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chorus_platform::to_message;
use chorus_rpc::{RequestOptions, Target};
use chorus_schemas::lifecycle::Provisioned;
use chorus_schemas::{EventRecord, StatusCode};
use chrono::Utc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::config::Step;
use super::engine::{InFlight, Shared};
use super::error::ProvisionerError;
use super::record::EventRef;
use super::stats::ProvisionerStats;

/// Starts attempts for nodes the consumer reports and, every `sweep_interval`, for every due
/// node; on shutdown waits for the attempts in progress.
pub(super) async fn dispatch_loop(
    shared: Arc<Shared>,
    mut due: mpsc::UnboundedReceiver<String>,
) -> Result<(), ProvisionerError> {
    let shutdown = shared.shutdown.clone();
    let mut caught_up = shared.caught_up.subscribe();
    let mut ticker = tokio::time::interval(shared.config.sweep_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running: JoinSet<()> = JoinSet::new();
    let mut leadership = shared.leadership.clone();
    // Whether this instance provisions: it leads, and has read what the former leader did.
    let mut acting = false;
    let result = loop {
        if shutdown.is_requested() {
            break Ok(());
        }
        if leadership.is_leader() != acting {
            acting = !acting;
            if acting {
                if !shared.read_to_now().await {
                    break Ok(());
                }
                tracing::info!("provisioner: leading");
                if *caught_up.borrow() {
                    if let Err(e) = shared.sweep(&mut running) {
                        break Err(e);
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.requested() => break Ok(()),
            _ = leadership.changed() => {}
            Some(identity) = due.recv() => {
                if *caught_up.borrow() && acting {
                    shared.dispatch(identity, &mut running);
                }
            }
            _ = ticker.tick() => {
                if *caught_up.borrow() && acting {
                    if let Err(e) = shared.sweep(&mut running) {
                        break Err(e);
                    }
                }
            }
            Ok(()) = caught_up.changed() => {
                if *caught_up.borrow_and_update() && acting {
                    if let Err(e) = shared.sweep(&mut running) {
                        break Err(e);
                    }
                }
            }
            Some(joined) = running.join_next(), if !running.is_empty() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "provisioner: a provisioning task panicked");
                }
            }
        }
    };
    while running.join_next().await.is_some() {}
    result
}

impl Shared {
    /// Waits until everything stored in the stream now has been read (two fetches that
    /// found nothing, the second started after this call), so a new leader knows what the
    /// former one provisioned. `false` at shutdown.
    async fn read_to_now(&self) -> bool {
        if self.config.election.is_none() {
            return true;
        }
        let mut idle = self.idle.subscribe();
        let start = *idle.borrow_and_update();
        while *idle.borrow_and_update() < start + 2 {
            tokio::select! {
                r = idle.changed() => if r.is_err() { return false },
                _ = self.shutdown.requested() => return false,
            }
        }
        true
    }

    /// Starts an attempt for `identity` unless one is already waiting or running.
    fn dispatch(self: &Arc<Self>, identity: String, running: &mut JoinSet<()>) {
        if !self.in_flight.lock().unwrap_or_else(|e| e.into_inner()).insert(identity.clone()) {
            return;
        }
        let guard = InFlight { shared: self.clone(), identity: identity.clone() };
        let this = self.clone();
        ProvisionerStats::bump(&this.stats.queued);
        running.spawn(async move {
            let _guard = guard;
            let permit = tokio::select! {
                p = this.permits.clone().acquire_owned() => p.ok(),
                _ = this.shutdown.requested() => None,
            };
            this.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let Some(_permit) = permit else { return };
            if this.shutdown.is_requested() {
                return;
            }
            ProvisionerStats::bump(&this.stats.in_flight);
            if let Err(e) = this.provision(&identity).await {
                tracing::error!(%identity, error = %e, "provisioner: attempt aborted; the sweep retries it");
            }
            this.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Starts an attempt for every due node.
    fn sweep(self: &Arc<Self>, running: &mut JoinSet<()>) -> Result<(), ProvisionerError> {
        let now = Utc::now();
        for record in self.store.all()? {
            if record.is_due(now) {
                self.dispatch(record.identity, running);
            }
        }
        Ok(())
    }

    /// One attempt on one node: the remaining steps, then the `provisioned` event.
    async fn provision(&self, identity: &str) -> Result<(), ProvisionerError> {
        let Some(record) = self.store.get(identity)? else { return Ok(()) };
        if !record.is_due(Utc::now()) {
            return Ok(());
        }
        let boot = record.boot().map(str::to_owned);
        let boot = boot.as_deref();
        if record.outbox.is_none() {
            if record.attempts > 0 {
                ProvisionerStats::bump(&self.stats.retries);
            }
            for (i, step) in self.steps.iter().enumerate().skip(record.next_step) {
                if self.shutdown.is_requested() || !self.leadership.is_leader() {
                    return Ok(());
                }
                let result = self.run_step(identity, step).await;
                let now = Utc::now();
                let current = match result {
                    Ok(()) => {
                        ProvisionerStats::bump(&self.stats.steps_ok);
                        self.store.modify(identity, |r, _| match r {
                            Some(r) if r.serves(boot) => {
                                r.step_done(i, now);
                                true
                            }
                            _ => false,
                        })?
                    }
                    Err(reason) => {
                        ProvisionerStats::bump(&self.stats.failed);
                        let error = format!("step {} ({}): {reason}", i + 1, step.label());
                        tracing::warn!(%identity, %error, "provisioner: attempt failed; will retry");
                        self.store.modify(identity, |r, _| {
                            if let Some(r) = r.as_mut().filter(|r| r.serves(boot)) {
                                r.attempt_failed(error, &self.config.backoff, now);
                            }
                        })?;
                        self.store.flush().await?;
                        return Ok(());
                    }
                };
                self.store.flush().await?;
                if !current {
                    tracing::info!(%identity, "provisioner: node restarted during the attempt; starting over");
                    return Ok(());
                }
            }
            // Stamp the event and keep it with the node before publishing it: a crash from here
            // on publishes the same event again.
            let stamped = self.store.modify(identity, |r, next_seq| match r {
                Some(r) if r.serves(boot) && r.outbox.is_none() => {
                    let event = self.emitter().stamp(Provisioned::new(identity, &self.config.event_component));
                    *next_seq = Some(event.seq + 1);
                    r.outbox = Some(String::from_utf8(event.encode()).expect("events encode to UTF-8 JSON"));
                    r.updated_at = Utc::now();
                    true
                }
                _ => false,
            })?;
            self.store.flush().await?;
            if !stamped {
                return Ok(());
            }
        }
        self.publish_outbox(identity).await
    }

    /// Publishes the node's stamped `provisioned` event and records the node provisioned.
    async fn publish_outbox(&self, identity: &str) -> Result<(), ProvisionerError> {
        let Some(encoded) = self.store.get(identity)?.and_then(|r| r.outbox) else { return Ok(()) };
        let event = EventRecord::decode(encoded.as_bytes())
            .map_err(|e| ProvisionerError::Corrupt(format!("stamped event of {identity}: {e}")))?;
        let message =
            to_message(&event).map_err(|e| ProvisionerError::Corrupt(format!("stamped event of {identity}: {e}")))?;
        match self.backbone.publish(message).await {
            Ok(ack) => {
                let seen = EventRef {
                    event_id: event.id.clone(),
                    sequence: if ack.stream == self.config.lifecycle_stream() { ack.sequence } else { 0 },
                    time: event.time,
                    component: self.config.event_component.clone(),
                };
                let now = Utc::now();
                let done = self.store.modify(identity, |r, _| match r {
                    Some(r) if r.outbox.as_deref() == Some(encoded.as_str()) => {
                        r.confirmed(seen, now);
                        true
                    }
                    // The consumer read the event back before this confirmation.
                    Some(r) if r.provisioned.as_ref().is_some_and(|p| p.event_id == seen.event_id) => {
                        r.attempts = r.attempts.saturating_add(1);
                        r.updated_at = now;
                        true
                    }
                    _ => false,
                })?;
                self.store.flush().await?;
                if done {
                    ProvisionerStats::bump(&self.stats.provisioned);
                    tracing::info!(%identity, event = %event.id, "provisioner: node provisioned");
                }
            }
            Err(e) => {
                ProvisionerStats::bump(&self.stats.failed);
                let error = format!("publishing the provisioned event: {e}");
                tracing::warn!(%identity, %error, "provisioner: will retry");
                let now = Utc::now();
                self.store.modify(identity, |r, _| {
                    if let Some(r) = r.as_mut().filter(|r| r.outbox.as_deref() == Some(encoded.as_str())) {
                        r.attempt_failed(error, &self.config.backoff, now);
                    }
                })?;
                self.store.flush().await?;
            }
        }
        Ok(())
    }

    /// Runs one step on the node: a directed request, one OK reply expected.
    async fn run_step(&self, identity: &str, step: &Step) -> Result<(), String> {
        let timeout = step.timeout.unwrap_or(self.config.step_timeout);
        let options = RequestOptions {
            filter: Default::default(),
            target: Target::Node(identity.to_owned()),
            expected: Some(1),
            timeout,
            ttl: self.config.ttl,
        };
        if let (Some(enroller), true) = (
            &self.enroller,
            step.agent == chorus_rpc::agents::provision::AGENT && step.action == super::enrol::ENROL_ACTION,
        ) {
            return enroller.enrol(&self.rpc, identity, &options).await;
        }
        let results = self
            .rpc
            .call(&step.agent, &step.action, step.data.clone(), options)
            .await
            .map_err(|e| format!("request not sent: {e}"))?;
        match results.replies.iter().find(|r| r.identity == identity) {
            None => Err(format!("no reply within {timeout:?}")),
            Some(r) if r.statuscode == StatusCode::Ok => Ok(()),
            Some(r) if !r.authorized => Err(format!("denied: {}", r.statusmsg)),
            Some(r) => Err(format!("{:?}: {}", r.statuscode, r.statusmsg)),
        }
    }
}
