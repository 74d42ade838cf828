//! The Chorus backbone: durable, replayable event streams behind one trait.
//!
//! Everything Chorus does is recorded as an event on a stream. Producers publish, projections
//! consume with durable cursors, and replays rebuild state from any point. Two engines implement
//! the same [`Backbone`] trait and are held to the same conformance suite (`chorus-testkit`):
//!
//! * [`jetstream::JetStreamBackbone`]: NATS JetStream through async-nats, the production and
//!   multi-site engine (TLS with rustls, user/password, token, creds and nkey auth).
//! * [`embedded::EmbeddedBackbone`]: a sled-backed store for zero-setup runs and for the node's
//!   offline outbox. An acknowledged publish is on disk (group commit), so it survives `kill -9`.
//!
//! The backbone is payload-agnostic: a [`Message`] is an event id (the dedupe key), a subject and
//! opaque bytes. Typed events and their encoding live in `chorus-schemas`; the backbone does
//! not depend on them. It sits on the service runtime (`chorus-runtime`: backoff, TLS, local
//! stores, configuration errors).

pub mod backup;
pub mod config;
pub mod embedded;
pub mod error;
pub mod jetstream;
pub mod kv;
pub mod message;
pub mod subject;

mod backbone;

pub use backbone::{AckStream, Backbone, Consumer, MessageStream, Outgoing, ReplayOptions};
pub use config::{ConsumerConfig, StartPosition, StreamConfig};
pub use error::{BackboneError, Result, SharedError};
pub use kv::{Bucket, BucketConfig, KvEntry, KvOperation, KvWatch};
pub use message::{Delivery, Message, PublishAck, StoredMessage, StreamInfo};
