//! Durable pull consumers on JetStream.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};

use super::{deliver_policy, delivery_of, server_filter, stored};
use crate::message::Acker;
use crate::{BackboneError, Consumer, ConsumerConfig, Delivery, Result};

pub(crate) struct JetStreamConsumer {
    stream: String,
    client: async_nats::Client,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    /// Continuous pull with heartbeats; it keeps a batch in flight so fetches return at once.
    messages: Option<pull::Stream>,
    /// Filters the server cannot apply (JetStream 2.9 takes one); applied here, and messages
    /// outside them are acknowledged so they are not redelivered.
    client_filters: Vec<String>,
    batch: usize,
}

impl JetStreamConsumer {
    pub(crate) async fn open(
        s: jetstream::stream::Stream,
        client: async_nats::Client,
        stream: &str,
        config: &ConsumerConfig,
    ) -> Result<Self> {
        let server = server_filter(&config.filter_subjects);
        let cfg = pull::Config {
            durable_name: Some(config.name.clone()),
            filter_subject: server.clone(),
            deliver_policy: deliver_policy(&config.start),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: if config.max_deliver == 0 { -1 } else { config.max_deliver as i64 },
            max_ack_pending: config.max_ack_pending as i64,
            ..Default::default()
        };
        let consumer = s.get_or_create_consumer(&config.name, cfg).await.map_err(BackboneError::from)?;
        Ok(JetStreamConsumer {
            stream: stream.to_string(),
            client,
            consumer,
            messages: None,
            client_filters: if server.is_empty() { config.filter_subjects.clone() } else { Vec::new() },
            batch: config.max_ack_pending.clamp(1, 1000),
        })
    }

    async fn messages(&mut self) -> Result<&mut pull::Stream> {
        if self.messages.is_none() {
            let stream = self
                .consumer
                .stream()
                .max_messages_per_batch(self.batch)
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
                .map_err(BackboneError::from)?;
            self.messages = Some(stream);
        }
        Ok(self.messages.as_mut().unwrap())
    }

    /// Converts, or acknowledges and drops what the client-side filter excludes.
    async fn accept(&self, m: jetstream::Message) -> Result<Option<Delivery>> {
        let info = delivery_of(&m)?;
        let message = stored(&self.stream, info.stream_sequence, info.published, &m.message);
        if !crate::subject::matches_any(&self.client_filters, &message.subject) {
            m.ack().await.map_err(BackboneError::nats_untyped)?;
            return Ok(None);
        }
        let (_, acker) = m.split();
        let delivered = info.delivered.clamp(1, u64::from(u32::MAX)) as u32;
        Ok(Some(Delivery { message, delivered, acker: Box::new(JsAcker(acker)) }))
    }
}

struct JsAcker(jetstream::message::Acker);

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) -> Result<()> {
        self.0.ack().await.map_err(BackboneError::nats_untyped)
    }

    async fn nak(&self, delay: Option<Duration>) -> Result<()> {
        self.0.ack_with(AckKind::Nak(delay)).await.map_err(BackboneError::nats_untyped)
    }
}

#[async_trait]
impl Consumer for JetStreamConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut raw = Vec::new();
        loop {
            let messages = self.messages().await?;
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Err(_) => break,
                Ok(None) => {
                    self.messages = None;
                }
                Ok(Some(Ok(m))) => {
                    raw.push(m);
                    while raw.len() < max {
                        match messages.next().now_or_never() {
                            Some(Some(Ok(m))) => raw.push(m),
                            Some(Some(Err(e))) => {
                                tracing::debug!(error = %e, "pull stream error, will re-pull");
                                self.messages = None;
                                break;
                            }
                            Some(None) => {
                                self.messages = None;
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    // Missed heartbeats and reconnects surface here; pull again.
                    tracing::debug!(error = %e, "pull stream error, will re-pull");
                    self.messages = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            let mut out = Vec::with_capacity(raw.len());
            for m in raw.drain(..) {
                if let Some(d) = self.accept(m).await? {
                    out.push(d);
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
        }
        Ok(Vec::new())
    }

    async fn pending(&mut self) -> Result<u64> {
        // Acks are sent without waiting for confirmation; flush them so the count includes them.
        self.client.flush().await.map_err(BackboneError::from)?;
        let info = self.consumer.info().await.map_err(BackboneError::from)?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }
}
