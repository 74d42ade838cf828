//! Buckets as JetStream KV (`KV_<bucket>` streams): the same buckets `nats kv` and Choria use.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::{to_chrono, JetStreamBackbone};
use crate::kv::{validate_key, Bucket, BucketConfig, KvEntry, KvOperation, KvWatch};
use crate::{BackboneError, Result};

struct JsBucket {
    name: String,
    store: kv::Store,
}

fn nats(e: impl std::error::Error + Send + Sync + 'static) -> BackboneError {
    BackboneError::nats_untyped(Box::new(e))
}

fn entry(e: kv::Entry) -> KvEntry {
    KvEntry {
        key: e.key,
        value: e.value,
        revision: e.revision,
        created: to_chrono(e.created),
        operation: match e.operation {
            Operation::Put => KvOperation::Put,
            Operation::Delete | Operation::Purge => KvOperation::Delete,
        },
    }
}

impl JetStreamBackbone {
    pub(super) async fn open_bucket(&self, config: &BucketConfig) -> Result<Arc<dyn Bucket>> {
        config.validate()?;
        let store = match self.js.get_key_value(&config.name).await {
            Ok(store) => store,
            Err(e) if e.kind() == async_nats::jetstream::context::KeyValueErrorKind::GetBucket => {
                // The stream JetStream KV is made of (ADR-8), created directly: async-nats's
                // create_key_value first asks for account information in a form nats-server
                // 2.9 does not answer.
                use async_nats::jetstream::stream;
                let name = format!("KV_{}", config.name);
                let created = self
                    .js
                    .create_stream(stream::Config {
                        name: name.clone(),
                        subjects: vec![format!("$KV.{}.>", config.name)],
                        max_messages_per_subject: i64::from(config.history),
                        max_age: config.ttl.unwrap_or_default(),
                        max_message_size: -1,
                        max_bytes: -1,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        num_replicas: config.replicas.max(1),
                        discard: stream::DiscardPolicy::New,
                        duplicate_window: config.ttl.map(|t| t.min(Duration::from_secs(120))).unwrap_or_default(),
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = created {
                    // Made by another process meanwhile is fine; anything else is not.
                    if self.js.get_stream(&name).await.is_err() {
                        return Err(nats(e));
                    }
                }
                self.js.get_key_value(&config.name).await.map_err(nats)?
            }
            Err(e) => return Err(nats(e)),
        };
        Ok(Arc::new(JsBucket { name: config.name.clone(), store }))
    }
}

#[async_trait]
impl Bucket for JsBucket {
    fn name(&self) -> &str {
        &self.name
    }

    async fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        validate_key(key)?;
        Ok(self.store.entry(key).await.map_err(nats)?.filter(|e| e.operation == Operation::Put).map(entry))
    }

    async fn put(&self, key: &str, value: Bytes) -> Result<u64> {
        validate_key(key)?;
        self.store.put(key, value).await.map_err(nats)
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<u64> {
        validate_key(key)?;
        self.store.create(key, value).await.map_err(|e| match e.kind() {
            CreateErrorKind::AlreadyExists => {
                BackboneError::WrongRevision { key: key.to_owned(), message: "it has a value".into() }
            }
            _ => nats(e),
        })
    }

    async fn update(&self, key: &str, value: Bytes, revision: u64) -> Result<u64> {
        validate_key(key)?;
        self.store.update(key, value, revision).await.map_err(|e| match e.kind() {
            UpdateErrorKind::WrongLastRevision => {
                BackboneError::WrongRevision { key: key.to_owned(), message: format!("expected revision {revision}") }
            }
            _ => nats(e),
        })
    }

    async fn delete(&self, key: &str, revision: Option<u64>) -> Result<()> {
        validate_key(key)?;
        let Err(e) = self.store.delete_expect_revision(key, revision).await else { return Ok(()) };
        // async-nats does not type the server's "wrong last sequence" on deletes: a delete
        // at a revision failed for that reason when the key is now at another revision.
        if let Some(expected) = revision {
            let now = self.store.entry(key).await.map_err(nats)?.filter(|e| e.operation == Operation::Put);
            if now.as_ref().map(|e| e.revision) != Some(expected) {
                return Err(BackboneError::WrongRevision {
                    key: key.to_owned(),
                    message: format!("expected revision {expected}"),
                });
            }
        }
        Err(nats(e))
    }

    async fn history(&self, key: &str) -> Result<Vec<KvEntry>> {
        validate_key(key)?;
        let history = self.store.history(key).await.map_err(nats)?;
        history.map_ok(entry).map_err(nats).try_collect().await
    }

    async fn keys(&self) -> Result<Vec<String>> {
        let keys = self.store.keys().await.map_err(nats)?;
        let mut keys: Vec<String> = keys.map_err(nats).try_collect().await?;
        keys.sort();
        Ok(keys)
    }

    async fn watch(&self, pattern: &str) -> Result<KvWatch> {
        let watch = self.store.watch_with_history(pattern).await.map_err(nats)?;
        Ok(watch.map(|e| e.map(entry).map_err(nats)).boxed())
    }
}
