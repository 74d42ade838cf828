//! Buckets in the embedded store: two sled trees per bucket, the current value of each key
//! (`kv/<bucket>`) and its kept history (`kvh/<bucket>`, key and revision). Create and update
//! are compare-and-swaps on the current value, so they stay atomic between handles; revisions
//! come from the store's monotonic id generator. A value older than the bucket's ttl reads as
//! absent and is removed when next written over or listed.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::EmbeddedBackbone;
use crate::kv::{validate_key, Bucket, BucketConfig, KvEntry, KvOperation, KvWatch};
use crate::{BackboneError, Result};

struct SledBucket {
    name: String,
    config: BucketConfig,
    db: sled::Db,
    current: sled::Tree,
    history: sled::Tree,
}

/// revision (8, big endian) · created in ms (8) · operation (1: put, 0: delete) · value.
fn encode(revision: u64, created_ms: i64, op: KvOperation, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + value.len());
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(&created_ms.to_be_bytes());
    out.push(u8::from(op == KvOperation::Put));
    out.extend_from_slice(value);
    out
}

fn decode(key: &str, raw: &[u8]) -> Result<KvEntry> {
    if raw.len() < 17 {
        return Err(BackboneError::Corrupt(format!("kv entry of {key:?} is {} bytes", raw.len())));
    }
    let revision = u64::from_be_bytes(raw[..8].try_into().expect("8 bytes"));
    let ms = i64::from_be_bytes(raw[8..16].try_into().expect("8 bytes"));
    Ok(KvEntry {
        key: key.to_owned(),
        value: Bytes::copy_from_slice(&raw[17..]),
        revision,
        created: DateTime::from_timestamp_millis(ms).unwrap_or_default(),
        operation: if raw[16] == 1 { KvOperation::Put } else { KvOperation::Delete },
    })
}

fn history_key(key: &str, revision: u64) -> Vec<u8> {
    let mut k = key.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

impl EmbeddedBackbone {
    pub(super) fn open_bucket(&self, config: &BucketConfig) -> Result<Arc<dyn Bucket>> {
        config.validate()?;
        let db = self.inner.db.clone();
        let meta_key = format!("kv/{}", config.name);
        let stored = match self.inner.meta.get(&meta_key)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| BackboneError::Corrupt(format!("{meta_key}: {e}")))?,
            None => {
                let v = serde_json::to_vec(config).expect("a bucket config serializes");
                self.inner.meta.insert(&meta_key, v)?;
                config.clone()
            }
        };
        Ok(Arc::new(SledBucket {
            name: config.name.clone(),
            config: stored,
            current: db.open_tree(format!("kv/{}", config.name))?,
            history: db.open_tree(format!("kvh/{}", config.name))?,
            db,
        }))
    }
}

impl SledBucket {
    fn live(&self, entry: &KvEntry, now: DateTime<Utc>) -> bool {
        entry.operation == KvOperation::Put
            && self
                .config
                .ttl
                .is_none_or(|ttl| entry.created + chrono::Duration::from_std(ttl).unwrap_or_default() > now)
    }

    fn current_raw(&self, key: &str) -> Result<Option<(sled::IVec, KvEntry)>> {
        match self.current.get(key)? {
            Some(raw) => {
                let e = decode(key, &raw)?;
                Ok(Some((raw, e)))
            }
            None => Ok(None),
        }
    }

    /// Writes when the current value is what `check` accepts, atomically.
    fn write(
        &self,
        key: &str,
        value: &[u8],
        op: KvOperation,
        check: impl Fn(Option<&KvEntry>) -> Result<()>,
    ) -> Result<u64> {
        validate_key(key)?;
        loop {
            let before = self.current_raw(key)?;
            let now = Utc::now();
            let visible = before.as_ref().map(|(_, e)| e).filter(|e| self.live(e, now));
            check(visible)?;
            let revision = self.db.generate_id()? + 1;
            let encoded = encode(revision, now.timestamp_millis(), op, value);
            let swapped = self.current.compare_and_swap(
                key,
                before.as_ref().map(|(raw, _)| raw.clone()),
                Some(encoded.clone()),
            )?;
            if swapped.is_err() {
                continue; // another writer came first: judge again
            }
            self.history.insert(history_key(key, revision), encoded)?;
            self.trim(key)?;
            return Ok(revision);
        }
    }

    fn trim(&self, key: &str) -> Result<()> {
        let mut prefix = key.as_bytes().to_vec();
        prefix.push(0);
        let kept: Vec<sled::IVec> = self.history.scan_prefix(&prefix).keys().collect::<std::result::Result<_, _>>()?;
        let excess = kept.len().saturating_sub(usize::from(self.config.history));
        for k in &kept[..excess] {
            self.history.remove(k)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Bucket for SledBucket {
    fn name(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        validate_key(key)?;
        let now = Utc::now();
        Ok(self.current_raw(key)?.map(|(_, e)| e).filter(|e| self.live(e, now)))
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64> {
        self.write(key, &value, KvOperation::Put, |_| Ok(()))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        self.write(key, &value, KvOperation::Put, |current| match current {
            None => Ok(()),
            Some(_) => Err(BackboneError::WrongRevision { key: key.to_owned(), message: "it has a value".into() }),
        })
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        self.write(key, &value, KvOperation::Put, |current| match current {
            Some(e) if e.revision == revision => Ok(()),
            other => Err(BackboneError::WrongRevision {
                key: key.to_owned(),
                message: format!(
                    "expected revision {revision}, found {}",
                    other.map(|e| e.revision.to_string()).unwrap_or_else(|| "none".into())
                ),
            }),
        })
    }

    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<()> {
        self.write(key, &[], KvOperation::Delete, |current| match (revision, current) {
            (None, _) => Ok(()),
            (Some(r), Some(e)) if e.revision == r => Ok(()),
            (Some(r), other) => Err(BackboneError::WrongRevision {
                key: key.to_owned(),
                message: format!(
                    "expected revision {r}, found {}",
                    other.map(|e| e.revision.to_string()).unwrap_or_else(|| "none".into())
                ),
            }),
        })
        .map(drop)
    }

    async fn history(&self, key: &str) -> Result<Vec<KvEntry>> {
        validate_key(key)?;
        let mut prefix = key.as_bytes().to_vec();
        prefix.push(0);
        self.history.scan_prefix(&prefix).values().map(|v| decode(key, &v?)).collect()
    }

    async fn keys(&self) -> Result<Vec<String>> {
        let now = Utc::now();
        let mut keys = Vec::new();
        for item in self.current.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            if self.live(&decode(&key, &v)?, now) {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    async fn watch(&self, pattern: &str) -> Result<KvWatch> {
        crate::subject::validate_filter(pattern)?;
        // Subscribed before the current values are read, so no change falls in between.
        let subscriber = self.current.watch_prefix(vec![]);
        let now = Utc::now();
        let mut first = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for item in self.current.iter() {
            let (k, v) = item?;
            let key = String::from_utf8_lossy(&k).into_owned();
            if !crate::subject::matches(pattern, &key) {
                continue;
            }
            let e = decode(&key, &v)?;
            seen.insert(key, e.revision);
            if self.live(&e, now) {
                first.push(Ok(e));
            }
        }
        let pattern = pattern.to_owned();
        let changes = futures::stream::unfold((subscriber, seen), move |(mut subscriber, mut seen)| {
            let pattern = pattern.clone();
            async move {
                loop {
                    let event = (&mut subscriber).await?;
                    let sled::Event::Insert { key, value } = event else { continue };
                    let key = String::from_utf8_lossy(&key).into_owned();
                    if !crate::subject::matches(&pattern, &key) {
                        continue;
                    }
                    let entry = match decode(&key, &value) {
                        Ok(e) => e,
                        Err(e) => return Some((Err(e), (subscriber, seen))),
                    };
                    if seen.get(&key).is_some_and(|r| *r >= entry.revision) {
                        continue;
                    }
                    seen.insert(key, entry.revision);
                    return Some((Ok(entry), (subscriber, seen)));
                }
            }
        });
        Ok(futures::stream::iter(first).chain(changes).boxed())
    }
}
