//! Key-value buckets on both engines: JetStream KV on NATS (Choria's own KV, readable with
//! `nats kv`), and an equivalent in the embedded store.
//!
//! What Choria users rely on, and governors and elections are built on: put and get, create
//! (only when absent) and update (only at a revision) as the atomic operations, delete,
//! history per key, watch, and a bucket-wide time to live (a value not written again within
//! it is gone: leases expire on their own when their holder dies).

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::Result;

/// A bucket's configuration; a bucket that exists is used as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Name: letters, digits, `-` and `_`.
    pub name: String,
    /// Values kept per key, the newest included (1..=64).
    #[serde(default = "default_history")]
    pub history: u8,
    /// How long a value lives after it was written; none: forever.
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Duration>,
    /// Copies kept in a JetStream cluster.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
}

fn default_history() -> u8 {
    1
}
fn default_replicas() -> usize {
    1
}

impl BucketConfig {
    /// A bucket keeping one value per key, forever.
    pub fn new(name: impl Into<String>) -> Self {
        BucketConfig { name: name.into(), history: 1, ttl: None, replicas: 1 }
    }

    /// Keeps `history` values per key.
    pub fn with_history(mut self, history: u8) -> Self {
        self.history = history;
        self
    }

    /// Values expire `ttl` after they were written.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Checks the name and the history.
    pub fn validate(&self) -> Result<()> {
        if !is_bucket_name(&self.name) {
            return Err(crate::BackboneError::invalid_config(format!(
                "bucket name {:?}: use letters, digits, - and _",
                self.name
            )));
        }
        if !(1..=64).contains(&self.history) {
            return Err(crate::BackboneError::invalid_config("bucket history must be 1..=64"));
        }
        if self.ttl.is_some_and(|t| t < Duration::from_millis(100)) {
            return Err(crate::BackboneError::invalid_config("bucket ttl must be >= 100ms"));
        }
        Ok(())
    }
}

/// Whether `name` can name a bucket (letters, digits, `-` and `_`): also the rule for the
/// names that become part of one (governors, elections).
pub fn is_bucket_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether a key is valid: tokens of letters, digits and `-_/=` separated by dots, as
/// JetStream KV accepts them.
pub fn validate_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || "-_/=.".contains(c))
        && !key.contains("..");
    if ok {
        Ok(())
    } else {
        Err(crate::BackboneError::InvalidMessage(format!(
            "key {key:?}: use letters, digits and -_/= in dot-separated tokens"
        )))
    }
}

/// What wrote an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvOperation {
    /// A value was written.
    Put,
    /// The key was deleted.
    Delete,
}

/// One value of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value (empty for a delete).
    pub value: Bytes,
    /// The bucket-wide revision of this write; increases with every write.
    pub revision: u64,
    /// When it was written.
    pub created: DateTime<Utc>,
    /// Put or delete.
    pub operation: KvOperation,
}

/// Changes of a bucket's keys, the current values first.
pub type KvWatch = Pin<Box<dyn Stream<Item = Result<KvEntry>> + Send>>;

/// A key-value bucket.
#[async_trait]
pub trait Bucket: Send + Sync {
    /// The bucket's name.
    fn name(&self) -> &str;

    /// The key's current value; `None` when it has none (never written, deleted, expired).
    async fn get(&self, key: &str) -> Result<Option<KvEntry>>;

    /// Writes a value; returns its revision.
    async fn put(&self, key: &str, value: Bytes) -> Result<u64>;

    /// Writes a value only when the key has none; [`crate::BackboneError::WrongRevision`]
    /// when it has.
    async fn create(&self, key: &str, value: Bytes) -> Result<u64>;

    /// Writes a value only when the key's current revision is `revision`;
    /// [`crate::BackboneError::WrongRevision`] when it is not.
    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64>;

    /// Deletes the key's value (its history keeps a delete); with `revision`, only when
    /// that is the key's current revision ([`crate::BackboneError::WrongRevision`] else).
    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<()>;

    /// The key's kept values, oldest first, deletes included.
    async fn history(&self, key: &str) -> Result<Vec<KvEntry>>;

    /// Keys that have a value.
    async fn keys(&self) -> Result<Vec<String>>;

    /// Every change of keys matching `pattern` (`>` for all, NATS wildcards), starting with
    /// their current values.
    async fn watch(&self, pattern: &str) -> Result<KvWatch>;
}
