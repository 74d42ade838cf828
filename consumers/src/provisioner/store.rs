//! The node records on disk.

use std::path::Path;
use std::sync::Mutex;

use chorus_runtime::Store;

use super::error::ProvisionerError;
use super::record::NodeRecord;

const TREE: &str = "chorus/provisioner";
const NODE_PREFIX: &[u8] = b"n/";
const NEXT_SEQ_KEY: &[u8] = b"m/next_seq";

/// Node records and the provisioner's event sequence in one sled tree. Read-modify-writes
/// are serialised by a lock; each is one atomic batch. Flushes are the runtime store's group
/// commits.
pub(super) struct StateStore {
    store: Store,
    tree: sled::Tree,
    lock: Mutex<()>,
}

impl StateStore {
    pub(super) fn open(path: &Path) -> Result<Self, ProvisionerError> {
        let store = Store::open(path)?;
        let tree = store.tree(TREE)?;
        Ok(StateStore { store, tree, lock: Mutex::new(()) })
    }

    fn key(identity: &str) -> Vec<u8> {
        let mut k = NODE_PREFIX.to_vec();
        k.extend_from_slice(identity.as_bytes());
        k
    }

    fn decode(key: &[u8], value: &[u8]) -> Result<NodeRecord, ProvisionerError> {
        serde_json::from_slice(value)
            .map_err(|e| ProvisionerError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(key))))
    }

    pub(super) fn get(&self, identity: &str) -> Result<Option<NodeRecord>, ProvisionerError> {
        let key = Self::key(identity);
        self.tree.get(&key)?.map(|v| Self::decode(&key, &v)).transpose()
    }

    /// Reads the node's record, lets `f` change it (or create it) and set the next event
    /// sequence, and writes both in one batch when anything changed.
    pub(super) fn modify<T>(
        &self,
        identity: &str,
        f: impl FnOnce(&mut Option<NodeRecord>, &mut Option<u64>) -> T,
    ) -> Result<T, ProvisionerError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(identity);
        let before = self.tree.get(&key)?.map(|v| Self::decode(&key, &v)).transpose()?;
        let mut record = before.clone();
        let mut next_seq = None;
        let out = f(&mut record, &mut next_seq);
        let mut batch = sled::Batch::default();
        let mut changed = false;
        if record != before {
            match &record {
                Some(r) => batch.insert(key, serde_json::to_vec(r).expect("a node record serializes")),
                None => batch.remove(key),
            }
            changed = true;
        }
        if let Some(seq) = next_seq {
            batch.insert(NEXT_SEQ_KEY, &seq.to_be_bytes());
            changed = true;
        }
        if changed {
            self.tree.apply_batch(batch)?;
        }
        Ok(out)
    }

    /// The sequence of the next event the provisioner publishes (1 at first).
    pub(super) fn next_seq(&self) -> Result<u64, ProvisionerError> {
        Ok(chorus_runtime::store::read_u64(self.tree.get(NEXT_SEQ_KEY)?, "next_seq")?.unwrap_or(1))
    }

    /// Every node record, in identity order.
    pub(super) fn all(&self) -> Result<Vec<NodeRecord>, ProvisionerError> {
        self.tree
            .scan_prefix(NODE_PREFIX)
            .map(|item| {
                let (k, v) = item?;
                Self::decode(&k, &v)
            })
            .collect()
    }

    /// Flushes from synchronous code (tests).
    #[cfg(test)]
    pub(super) fn flush_blocking(&self) -> Result<(), ProvisionerError> {
        Ok(self.store.flush_blocking()?)
    }

    /// Makes every write applied before this call durable.
    pub(super) async fn flush(&self) -> Result<(), ProvisionerError> {
        Ok(self.store.flush().await?)
    }
}
