//! The reactor's state on disk: per-stream positions, rule state by key, and the firings
//! whose actions are not all done. One sled tree; each evaluated batch is one atomic write.

use std::path::Path;

use chorus_runtime::Store;

use super::error::ReactorError;
use super::rules::{Firing, KeyState};

const POSITION: &[u8] = b"p/";
const STATE: &[u8] = b"k/";
const FIRING: &[u8] = b"f/";
const DONE: &[u8] = b"d/";
const RECORDS: &[u8] = b"r/position";

/// The reactor's sled tree.
pub(super) struct ReactorStore {
    store: Store,
    tree: sled::Tree,
}

/// Changes written together.
#[derive(Default)]
pub(super) struct Commit {
    batch: sled::Batch,
    empty: bool,
}

fn key(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut k = prefix.to_vec();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

impl Commit {
    pub(super) fn new() -> Self {
        Commit { batch: sled::Batch::default(), empty: true }
    }

    pub(super) fn position(&mut self, stream: &str, sequence: u64) {
        self.batch.insert(key(POSITION, &[stream]), &sequence.to_be_bytes());
        self.empty = false;
    }

    pub(super) fn state(&mut self, rule: &str, k: &str, state: Option<&KeyState>) {
        let key = key(STATE, &[rule, k]);
        match state {
            Some(s) => self.batch.insert(key, serde_json::to_vec(s).expect("key state serializes")),
            None => self.batch.remove(key),
        }
        self.empty = false;
    }

    pub(super) fn firing(&mut self, firing: &Firing) {
        self.batch.insert(key(FIRING, &[&firing.id]), serde_json::to_vec(firing).expect("a firing serializes"));
        self.empty = false;
    }

    /// Notes that the actions of firing `id` before `next` are done (by whichever instance).
    pub(super) fn actions_done(&mut self, id: &str, next: usize, at_ms: i64) {
        let value = serde_json::to_vec(&(next, at_ms)).expect("a pair serializes");
        self.batch.insert(key(DONE, &[id]), value);
        self.empty = false;
    }

    /// Forgets a done note.
    pub(super) fn forget_done(&mut self, id: &str) {
        self.batch.remove(key(DONE, &[id]));
        self.empty = false;
    }

    /// Position in the stream of the reactor's own records.
    pub(super) fn records_position(&mut self, sequence: u64) {
        self.batch.insert(RECORDS, &sequence.to_be_bytes());
        self.empty = false;
    }

    pub(super) fn done(&mut self, id: &str) {
        self.batch.remove(key(FIRING, &[id]));
        self.empty = false;
    }
}

impl ReactorStore {
    pub(super) fn open(path: &Path, name: &str) -> Result<Self, ReactorError> {
        let store = Store::open(path)?;
        let tree = store.tree(&format!("chorus/reactor/{name}"))?;
        Ok(ReactorStore { store, tree })
    }

    /// Applies `commit` atomically and makes it durable.
    pub(super) async fn apply(&self, commit: Commit) -> Result<(), ReactorError> {
        if commit.empty {
            return Ok(());
        }
        self.tree.apply_batch(commit.batch)?;
        self.store.flush().await?;
        Ok(())
    }

    /// Applies `commit` atomically; it becomes durable with the next flush.
    pub(super) fn apply_lazily(&self, commit: Commit) -> Result<(), ReactorError> {
        if !commit.empty {
            self.tree.apply_batch(commit.batch)?;
        }
        Ok(())
    }

    pub(super) fn position(&self, stream: &str) -> Result<Option<u64>, ReactorError> {
        Ok(chorus_runtime::store::read_u64(self.tree.get(key(POSITION, &[stream]))?, "position")?)
    }

    /// How many actions of firing `id` are known done, if any are.
    pub(super) fn actions_done(&self, id: &str) -> Result<Option<usize>, ReactorError> {
        let Some(v) = self.tree.get(key(DONE, &[id]))? else { return Ok(None) };
        let (next, _): (usize, i64) =
            serde_json::from_slice(&v).map_err(|e| ReactorError::Corrupt(format!("done {id}: {e}")))?;
        Ok(Some(next))
    }

    /// Done notes written before `before_ms`, as firing ids.
    pub(super) fn done_before(&self, before_ms: i64) -> Result<Vec<String>, ReactorError> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(DONE) {
            let (k, v) = item?;
            if let Ok((_, at)) = serde_json::from_slice::<(usize, i64)>(&v) {
                if at < before_ms {
                    out.push(String::from_utf8_lossy(&k[DONE.len()..]).into_owned());
                }
            }
        }
        Ok(out)
    }

    pub(super) fn records_position(&self) -> Result<Option<u64>, ReactorError> {
        Ok(chorus_runtime::store::read_u64(self.tree.get(RECORDS)?, "records position")?)
    }

    /// Every key's state as (rule, key, state).
    pub(super) fn states(&self) -> Result<Vec<(String, String, KeyState)>, ReactorError> {
        self.tree
            .scan_prefix(STATE)
            .map(|item| {
                let (k, v) = item?;
                let text = String::from_utf8_lossy(&k[STATE.len()..]).into_owned();
                let (rule, key) = text.split_once('\0').ok_or_else(|| ReactorError::Corrupt(text.clone()))?;
                let state = serde_json::from_slice(&v).map_err(|e| ReactorError::Corrupt(format!("{text}: {e}")))?;
                Ok((rule.to_owned(), key.to_owned(), state))
            })
            .collect()
    }

    /// Firings not yet done, in id order.
    pub(super) fn firings(&self) -> Result<Vec<Firing>, ReactorError> {
        self.tree
            .scan_prefix(FIRING)
            .map(|item| {
                let (k, v) = item?;
                serde_json::from_slice(&v)
                    .map_err(|e| ReactorError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(&k))))
            })
            .collect()
    }
}
