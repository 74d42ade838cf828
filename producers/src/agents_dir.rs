//! The node's agents: the built-in ones and the external agents of its agents directory,
//! loaded at start and loaded again when the directory changes while the node runs (an
//! agent added, its DDL or executable replaced, or removed), as Choria reloads its plugins.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chorus_rpc::agents::{self, ExternalAgent};
use chorus_rpc::{Agent, RpcServer};
use chorus_runtime::Shutdown;

/// The agents every node has.
pub fn builtin() -> Vec<Arc<dyn Agent>> {
    vec![Arc::new(agents::RpcUtil), Arc::new(agents::Package), Arc::new(agents::Service), Arc::new(agents::Shell)]
}

/// The built-in agents, the node's own (`node`: scout over its machines) and the external
/// agents of `dir` that activate, and why the others were left out (`<ddl>: <reason>`, for
/// health).
pub async fn load(dir: Option<&Path>, node: &[Arc<dyn Agent>]) -> (Vec<Arc<dyn Agent>>, Vec<String>) {
    let mut all = builtin();
    all.extend(node.iter().cloned());
    let mut skipped = Vec::new();
    if let Some(dir) = dir {
        let loaded = ExternalAgent::load_dir(dir, dir).await;
        for (path, reason) in &loaded.skipped {
            tracing::warn!(ddl = %path.display(), "external agent left out: {reason}");
            skipped.push(format!("{}: {reason}", path.display()));
        }
        all.extend(loaded.agents.into_iter().map(|a| Arc::new(a) as Arc<dyn Agent>));
    }
    (all, skipped)
}

/// What identifies the directory's content: every entry (and the entries of its
/// sub-directories, where an agent may keep its DDL and executable) with its size and
/// modification time.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    let mut visit = |path: PathBuf| {
        if let Ok(meta) = std::fs::metadata(&path) {
            out.push((path, meta.len(), meta.modified().ok()));
        }
    };
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if let Ok(inner) = std::fs::read_dir(&path) {
                    inner.flatten().for_each(|e| visit(e.path()));
                }
            }
            visit(path);
        }
    }
    out.sort();
    out
}

/// Every `every`, until `shutdown`: when `dir` changed, loads its agents again and gives
/// them to `server` (requests arriving afterwards see them), and keeps `skipped` current.
pub async fn watch(
    server: Arc<RpcServer>,
    dir: PathBuf,
    node: Vec<Arc<dyn Agent>>,
    every: Duration,
    skipped: Arc<Mutex<Vec<String>>>,
    shutdown: Shutdown,
) {
    let mut seen = fingerprint(&dir);
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.requested() => return,
        }
        let now = fingerprint(&dir);
        if now == seen {
            continue;
        }
        let before = server.agents();
        let (all, left_out) = load(Some(&dir), &node).await;
        match server.set_agents(all).await {
            Ok(()) => {
                seen = now;
                let after = server.agents();
                let added: Vec<&String> = after.iter().filter(|a| !before.contains(a)).collect();
                let removed: Vec<&String> = before.iter().filter(|a| !after.contains(a)).collect();
                tracing::info!(?added, ?removed, "external agents reloaded from {}", dir.display());
                *skipped.lock().unwrap_or_else(|e| e.into_inner()) = left_out;
            }
            // Kept as it was; tried again at the next change or tick.
            Err(e) => tracing::warn!("external agents not reloaded: {e}"),
        }
    }
}
