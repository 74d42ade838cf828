//! Durable checkpoints: per (link, stream), the highest source sequence whose events the
//! target has acknowledged.
//!
//! Stored in a small sled database in the replicator's state directory and flushed after
//! every batch, so a replicator killed at any instant resumes after the last acknowledged
//! batch. Everything at or below a checkpoint is in the target; what was in flight above it
//! is re-sent and dropped by the target's dedupe.

use std::path::Path;

use chorus_runtime::{Store, StoreOptions};

use crate::error::Result;

/// The checkpoint store of one replicator process.
#[derive(Clone)]
pub struct Checkpoints {
    tree: sled::Tree,
    store: Store,
}

impl Checkpoints {
    /// Opens (creating) the store in `dir`. Only one replicator may use a directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let options = StoreOptions { cache_capacity: Some(8 << 20), ..Default::default() };
        let store = Store::open_with(dir.join("checkpoints"), &options)?;
        let tree = store.tree("checkpoints")?;
        Ok(Checkpoints { tree, store })
    }

    /// The checkpoint key of a stream copied by a link.
    pub fn key(link: &str, stream: &str) -> String {
        format!("{link}/{stream}")
    }

    /// Last source sequence acknowledged by the target (0 = nothing yet).
    pub fn load(&self, key: &str) -> Result<u64> {
        Ok(self.tree.get(key)?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    /// Records that everything up to `sequence` is in the target, durably.
    pub async fn store(&self, key: &str, sequence: u64) -> Result<()> {
        self.tree.insert(key, &sequence.to_be_bytes())?;
        Ok(self.store.flush().await?)
    }

    /// Forgets a checkpoint, so the next run copies the stream from its start again
    /// (duplicates are then dropped only within the target's dedupe window).
    pub fn reset(&self, key: &str) -> Result<()> {
        self.tree.remove(key)?;
        Ok(self.store.flush_blocking()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = Checkpoints::key("east", "CHORUS_LIFECYCLE");
        {
            let c = Checkpoints::open(dir.path()).unwrap();
            assert_eq!(c.load(&key).unwrap(), 0);
            c.store(&key, 42).await.unwrap();
        }
        let c = Checkpoints::open(dir.path()).unwrap();
        assert_eq!(c.load(&key).unwrap(), 42);
        c.reset(&key).unwrap();
        assert_eq!(c.load(&key).unwrap(), 0);
    }
}
