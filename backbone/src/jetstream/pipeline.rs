//! Pipelined publishing: a window of publishes on the wire, acknowledgements settled in order.
//!
//! One implementation for both ways of publishing: [`Backbone::publish_batch`] (a batch, all
//! acknowledged) and [`Backbone::publish_stream`] (a flow without batch boundaries, so the
//! server never idles while the producer prepares the next batch).

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use futures::{FutureExt, StreamExt};

use super::{publish_of, to_ack, JetStreamBackbone};
use crate::backbone::{until_error, AckStream, Outgoing};
use crate::{Message, PublishAck, Result};

/// The server's acknowledgement of one publish; its timeout runs from when it was sent.
type AckFuture =
    Pin<Box<dyn Future<Output = std::result::Result<async_nats::jetstream::publish::PublishAck, PublishError>> + Send>>;

/// A publish on the wire: the message (kept for a retry) and its acknowledgement to come,
/// `None` when it could not be sent or is to be retried.
struct InFlight {
    message: Message,
    ack: Option<Ack>,
}

/// An acknowledgement to come: turned into a future (which starts its timeout) only when it
/// is the oldest, as awaiting it in turn would.
enum Ack {
    Sent(async_nats::jetstream::context::PublishAckFuture),
    Awaited(AckFuture),
    /// Taken while an older publish failed (see [`Pipeline::settle`]).
    Arrived(PublishAck),
}

/// How the oldest publish ended: its acknowledgement, or a failure (`true` when it timed
/// out: the server is likely lost) to retry.
type Outcome = std::result::Result<PublishAck, bool>;

/// Publishes `messages` keeping up to the backbone's window in flight, yielding each
/// acknowledgement in order; a publish that failed or was never acknowledged is retried on
/// its own (ids make a repeat a duplicate) before anything after it is yielded. `validate`:
/// whether messages still need [`Message::validate`] (a batch is checked before it starts).
pub(super) fn publish<'a>(backbone: Arc<JetStreamBackbone>, messages: Outgoing<'a>, validate: bool) -> AckStream<'a> {
    // Boxed: the stream moves its state in and out of each step; a pointer is cheap to move.
    let state = Box::new(Pipeline {
        backbone,
        validate,
        refused: None,
        input: Some(messages),
        inflight: VecDeque::new(),
        failing_since: None,
    });
    Box::pin(until_error(futures::stream::unfold(state, |mut p| async move {
        let next = p.next().await?;
        Some((next, p))
    })))
}

struct Pipeline<'a> {
    backbone: Arc<JetStreamBackbone>,
    /// `None` once the producer's stream ended.
    input: Option<Outgoing<'a>>,
    validate: bool,
    /// An invalid message read from the producer: yielded once everything before it is
    /// acknowledged.
    refused: Option<crate::BackboneError>,
    /// Publishes in the order sent: acknowledgements are yielded in this order, so only the
    /// oldest is waited on (and only its timeout runs).
    inflight: VecDeque<InFlight>,
    /// When publishes started failing: the retries of a window lost with a server share one
    /// `retry_for` budget, so a dead server costs one timeout, not one per message.
    failing_since: Option<Instant>,
}

impl Pipeline<'_> {
    /// The next acknowledgement (or error); `None` when every message is acknowledged.
    async fn next(&mut self) -> Option<Result<PublishAck>> {
        loop {
            let room = self.inflight.len() < self.backbone.window;
            match self.input.as_mut() {
                // Keep the window full first; settle an acknowledgement when no message is
                // ready (or the window is full).
                Some(input) if room => {
                    tokio::select! {
                        biased;
                        message = input.next() => match message {
                            Some(m) => {
                                let checked = if self.validate { m.validate() } else { Ok(()) };
                                match checked {
                                    Ok(()) => self.send(m).await,
                                    Err(e) => {
                                        self.refused = Some(e);
                                        self.input = None;
                                    }
                                }
                            }
                            None => self.input = None,
                        },
                        Some(ack) = oldest(&mut self.inflight), if !self.inflight.is_empty() => {
                            return Some(self.settle(ack).await);
                        }
                    }
                }
                _ => {
                    let Some(ack) = oldest(&mut self.inflight).await else {
                        return self.refused.take().map(Err);
                    };
                    return Some(self.settle(ack).await);
                }
            }
        }
    }

    async fn send(&mut self, message: Message) {
        let sent = self.backbone.js.send_publish(message.subject.clone(), publish_of(&message)).await;
        self.inflight.push_back(InFlight { ack: sent.ok().map(Ack::Sent), message });
    }

    /// The oldest publish's acknowledgement (from [`oldest`]), or its retry.
    async fn settle(&mut self, outcome: Outcome) -> Result<PublishAck> {
        let m = self.inflight.pop_front().expect("settled the oldest publish").message;
        match outcome {
            Ok(ack) => {
                self.failing_since = None;
                Ok(ack)
            }
            Err(timed_out) => {
                if timed_out {
                    // The server did not answer for a whole timeout: it is likely lost, and
                    // waiting for each later acknowledgement's own timeout in turn would cost
                    // one timeout per message of the window. The acknowledgements that have
                    // arrived are kept; the rest are retried one by one (a stored message
                    // answers as a duplicate).
                    for later in &mut self.inflight {
                        later.ack = match later.ack.take() {
                            Some(Ack::Sent(sent)) => arrived(sent.into_future()),
                            Some(Ack::Awaited(ack)) => arrived(ack),
                            kept => kept,
                        };
                    }
                }
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                let ack = self.backbone.publish_retrying(&m, since).await?;
                self.failing_since = None;
                Ok(ack)
            }
        }
    }
}

/// Waits for how the oldest publish ended, without removing it; `None` when nothing is in
/// flight. Cancel-safe.
fn oldest(inflight: &mut VecDeque<InFlight>) -> impl Future<Output = Option<Outcome>> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(front) = inflight.front_mut() else { return Poll::Ready(None) };
        loop {
            match front.ack.take() {
                None => return Poll::Ready(Some(Err(false))),
                Some(Ack::Arrived(ack)) => return Poll::Ready(Some(Ok(ack))),
                Some(Ack::Sent(sent)) => front.ack = Some(Ack::Awaited(sent.into_future())),
                Some(Ack::Awaited(mut ack)) => {
                    let polled = ack.as_mut().poll(cx);
                    front.ack = Some(Ack::Awaited(ack));
                    return polled.map(|r| Some(r.map(to_ack).map_err(|e| e.kind() == PublishErrorKind::TimedOut)));
                }
            }
        }
    })
}

/// The acknowledgement if it has already arrived (polled once, without waiting); `None` (to
/// retry) otherwise.
fn arrived(mut ack: AckFuture) -> Option<Ack> {
    match ack.as_mut().now_or_never() {
        Some(Ok(ack)) => Some(Ack::Arrived(to_ack(ack))),
        _ => None,
    }
}
