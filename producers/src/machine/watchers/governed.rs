//! Running a watcher's work under a governor (`chorus governor`), as Choria's exec
//! watcher does with `governor:`: a lease is taken before and given back after, and every
//! step is a `governor` lifecycle event (`enter`, `exit`, `timeouts`) from the node, as
//! Choria's nodes publish them.

use std::time::Duration;

use chorus_platform::governor::{Governor, Lease};
use chorus_schemas::lifecycle::{Governor as GovernorEvent, GovernorEventType};
use tracing::warn;

use super::WatcherCtx;

/// A lease held for one run.
pub(super) struct Held {
    name: String,
    lease: Lease,
}

async fn record(ctx: &WatcherCtx, name: &str, slot: u64, kind: GovernorEventType) {
    let event = GovernorEvent::new(&ctx.shared.instance.identity, "machine", name, slot, kind);
    if let Err(e) = ctx.shared.emitter.emit(event).await {
        warn!(machine = %ctx.machine(), watcher = %ctx.name(), error = %e, "could not emit governor event");
    }
}

/// Takes a lease of governor `name`, waiting up to `timeout`.
pub(super) async fn enter(ctx: &WatcherCtx, name: &str, timeout: Duration) -> Result<Held, String> {
    let backbone = ctx.shared.backbone.as_ref().ok_or("no site broker: governors need one")?;
    let governor = Governor::open(&**backbone, name).await.map_err(|e| e.to_string())?;
    let holder = format!("{}:{}:{}", ctx.shared.instance.identity, ctx.machine(), ctx.name());
    match governor.claim(&holder, timeout, &ctx.shared.stop).await.map_err(|e| e.to_string())? {
        Some(lease) => {
            record(ctx, name, u64::from(lease.slot()), GovernorEventType::Enter).await;
            Ok(Held { name: name.to_owned(), lease })
        }
        None => {
            record(ctx, name, 0, GovernorEventType::Timeouts).await;
            Err(format!("no lease of {name} within {timeout:?}"))
        }
    }
}

impl Held {
    /// Gives the lease back.
    pub(super) async fn exit(self, ctx: &WatcherCtx) {
        let slot = u64::from(self.lease.slot());
        if let Err(e) = self.lease.release().await {
            warn!(machine = %ctx.machine(), watcher = %ctx.name(), error = %e, "releasing the governor lease failed; it expires");
        }
        record(ctx, &self.name, slot, GovernorEventType::Exit).await;
    }
}
