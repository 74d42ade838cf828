//! Durable checkpoints: per (link, stream), the highest source sequence whose events the
//! target has acknowledged.
//!
//! A replicator alone keeps them in a small sled database in its state directory, flushed
//! after every batch, so a replicator killed at any instant resumes after the last
//! acknowledged batch. Active-standby replicators keep them in a key-value bucket on the hub
//! instead, where the standby that takes over finds the leader's. Everything at or below a
//! checkpoint is in the target; what was in flight above it is re-sent and dropped by the
//! target's dedupe.

use std::path::Path;
use std::sync::Arc;

use chorus_backbone::Bucket;
use chorus_runtime::{Store, StoreOptions};

use crate::error::Result;

/// The checkpoint store of one replicator process (or of every instance of an
/// active-standby replicator).
#[derive(Clone)]
pub struct Checkpoints(Backend);

#[derive(Clone)]
enum Backend {
    Local { tree: sled::Tree, store: Store },
    Shared(Arc<dyn Bucket>),
}

impl Checkpoints {
    /// Opens (creating) the store in `dir`. Only one replicator may use a directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let options = StoreOptions { cache_capacity: Some(8 << 20), ..Default::default() };
        let store = Store::open_with(dir.join("checkpoints"), &options)?;
        let tree = store.tree("checkpoints")?;
        Ok(Checkpoints(Backend::Local { tree, store }))
    }

    /// Checkpoints in a bucket every instance reaches: the leader writes, a new leader reads.
    pub fn shared(bucket: Arc<dyn Bucket>) -> Self {
        Checkpoints(Backend::Shared(bucket))
    }

    /// The checkpoint key of a stream copied by a link (also a valid bucket key).
    pub fn key(link: &str, stream: &str) -> String {
        format!("{link}/{stream}")
    }

    /// Last source sequence acknowledged by the target (0 = nothing yet).
    pub async fn load(&self, key: &str) -> Result<u64> {
        let value = match &self.0 {
            Backend::Local { tree, .. } => tree.get(key)?.map(|v| v.to_vec()),
            Backend::Shared(bucket) => bucket.get(key).await?.map(|e| e.value.to_vec()),
        };
        Ok(value.and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok()).map(u64::from_be_bytes).unwrap_or(0))
    }

    /// Records that everything up to `sequence` is in the target, durably.
    pub async fn store(&self, key: &str, sequence: u64) -> Result<()> {
        match &self.0 {
            Backend::Local { tree, store } => {
                tree.insert(key, &sequence.to_be_bytes())?;
                Ok(store.flush().await?)
            }
            Backend::Shared(bucket) => {
                bucket.put(key, sequence.to_be_bytes().to_vec().into()).await?;
                Ok(())
            }
        }
    }

    /// Forgets a checkpoint, so the next run copies the stream from its start again
    /// (duplicates are then dropped only within the target's dedupe window).
    pub async fn reset(&self, key: &str) -> Result<()> {
        match &self.0 {
            Backend::Local { tree, store } => {
                tree.remove(key)?;
                Ok(store.flush().await?)
            }
            Backend::Shared(bucket) => Ok(bucket.delete(key, None).await?),
        }
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
            assert_eq!(c.load(&key).await.unwrap(), 0);
            c.store(&key, 42).await.unwrap();
        }
        let c = Checkpoints::open(dir.path()).unwrap();
        assert_eq!(c.load(&key).await.unwrap(), 42);
        c.reset(&key).await.unwrap();
        assert_eq!(c.load(&key).await.unwrap(), 0);
    }
}
