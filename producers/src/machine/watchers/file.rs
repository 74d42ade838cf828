//! `file` watcher: polls a file every `interval` (default 5 s) and on entering a matching
//! state. A change (modification time, size or, for files up to 1 MiB, content hash, so a
//! rewrite within one mtime tick still counts) fires `success_transition`; a missing file
//! fires `fail_transition`.
//!
//! State events go out on a change and when the file goes missing (once, not on every poll
//! while it stays missing, which Choria does); the transitions fire on every such check.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::time::SystemTime;

use chorus_schemas::machine::FileDetails;
use chorus_schemas::WatcherDetails;
use tracing::debug;

use super::{next_state, tick, ticker, WatcherCtx};
use crate::machine::manifest::{FileProperties, DEFAULT_FILE_INTERVAL};

/// Content hashing is for small files (configuration, flags); large ones rely on mtime/size.
const MAX_HASHED_LEN: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Unknown,
    Skipped,
    Error,
    Unchanged,
    Changed,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Unknown => "unknown",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
            Outcome::Unchanged => "unchanged",
            Outcome::Changed => "changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    modified: Option<SystemTime>,
    len: u64,
    hash: Option<u64>,
}

async fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let meta = tokio::fs::metadata(path).await?;
    let hash = if meta.is_file() && meta.len() <= MAX_HASHED_LEN {
        let contents = tokio::fs::read(path).await?;
        let mut hasher = DefaultHasher::new();
        contents.hash(&mut hasher);
        Some(hasher.finish())
    } else {
        None
    };
    Ok(Fingerprint { modified: meta.modified().ok(), len: meta.len(), hash })
}

struct FileWatch {
    path: std::path::PathBuf,
    gather_initial_state: bool,
    known: Option<Fingerprint>,
    previous: Outcome,
}

impl FileWatch {
    fn details(&self) -> WatcherDetails {
        WatcherDetails::File(FileDetails {
            path: self.path.display().to_string(),
            previous_outcome: self.previous.as_str().into(),
        })
    }

    fn skip(&mut self) {
        self.previous = Outcome::Skipped;
        // Without gather_initial_state, a file seen again after a pause counts as changed,
        // as on the first check; with it, only changes made from now on count (as Choria).
        if !self.gather_initial_state {
            self.known = None;
        }
    }

    async fn check(&mut self, ctx: &WatcherCtx) {
        match fingerprint(&self.path).await {
            Err(e) => {
                debug!(machine = %ctx.machine(), watcher = %ctx.name(), path = %self.path.display(), error = %e, "file missing");
                self.known = None;
                let was_missing = self.previous == Outcome::Error;
                self.previous = Outcome::Error;
                if !was_missing {
                    ctx.notify(self.details()).await;
                }
                ctx.fail().await;
            }
            Ok(fp) if self.known.as_ref() != Some(&fp) => {
                debug!(machine = %ctx.machine(), watcher = %ctx.name(), path = %self.path.display(), "file changed");
                self.known = Some(fp);
                self.previous = Outcome::Changed;
                ctx.notify(self.details()).await;
                ctx.success().await;
            }
            Ok(_) => self.previous = Outcome::Unchanged,
        }
    }
}

pub(super) async fn run(ctx: WatcherCtx, props: FileProperties) {
    let (mut states, state) = ctx.subscribe();
    let stop = ctx.stop_signal();
    let path = ctx.shared.machine_dir.join(&props.path);
    let known = if props.gather_initial_state { fingerprint(&path).await.ok() } else { None };
    let mut watch =
        FileWatch { path, gather_initial_state: props.gather_initial_state, known, previous: Outcome::Unknown };
    let mut interval = ticker(Some(ctx.def.interval.unwrap_or(DEFAULT_FILE_INTERVAL)));
    let mut announce = ticker(ctx.def.announce_interval);

    // Starting in a matching state counts as entering it.
    let mut due = ctx.active_in(&state);
    loop {
        if due {
            due = false;
            tokio::select! {
                biased;
                _ = stop.requested() => return,
                _ = watch.check(&ctx) => {}
            }
        }
        tokio::select! {
            biased;
            _ = stop.requested() => return,
            state = next_state(&mut states) => match state {
                None => return,
                Some(state) if ctx.active_in(&state) => due = true,
                Some(_) => watch.skip(),
            },
            _ = tick(&mut interval) => {
                if ctx.active_in(&ctx.current_state()) {
                    due = true;
                } else {
                    watch.skip();
                }
            }
            _ = tick(&mut announce) => ctx.notify(watch.details()).await,
        }
    }
}
