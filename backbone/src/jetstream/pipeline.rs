//! Pipelined publishing: a window of publishes on the wire, acknowledgements settled in order.
//!
//! One implementation for both ways of publishing: [`Backbone::publish_batch`] (a batch, all
//! acknowledged) and [`Backbone::publish_stream`] (a flow without batch boundaries, so the
//! server never idles while the producer prepares the next batch).
//!
//! Acknowledgements come to an inbox of the pipeline's own ([`AckInbox`]), not through
//! async-nats's `send_publish`. That call makes, for every publish, a fresh inbox name, a
//! oneshot channel, a semaphore permit, a boxed timeout future and an entry in the client's
//! request multiplexer, and parses the reply as an untagged enum that is first tried (and
//! fails) as an error: together more client CPU than the rest of a publish. Only the
//! successful acknowledgement is read here; anything else (an error reply, no responders, a
//! lost or late acknowledgement) sends the publish through [`JetStreamBackbone`]'s retrying
//! path, which uses async-nats's own calls and reports their errors.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::StreamExt;
use serde::Deserialize;

use super::{headers, JetStreamBackbone};
use crate::backbone::{until_error, AckStream, Outgoing};
use crate::{Message, PublishAck, Result};

/// A publish on the wire: the message (kept for a retry) and how its acknowledgement stands.
struct InFlight {
    message: Message,
    ack: Slot,
}

/// Where one publish's acknowledgement stands.
enum Slot {
    /// Sent; the server has not answered yet.
    Waiting,
    /// Stored (or found a duplicate) by the server.
    Arrived(PublishAck),
    /// Not sent, not stored, or given up on: retried on its own when it is the oldest.
    Failed,
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
        acks: None,
        deadline: Deadline::default(),
        draining: false,
        stalled: false,
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
    /// Taken with the first publish (from the backbone's idle inboxes, or subscribed), given
    /// back when the pipeline is dropped.
    acks: Option<AckInbox>,
    deadline: Deadline,
    /// The window filled up and is not yet drained enough to refill.
    draining: bool,
    /// A publish could not even be handed to the connection within the timeout (it is
    /// reconnecting): nothing more is sent until the window has been settled by retries.
    stalled: bool,
    /// When publishes started failing: the retries of a window lost with a server share one
    /// `retry_for` budget, so a dead server costs one timeout, not one per message.
    failing_since: Option<Instant>,
}

impl Pipeline<'_> {
    /// The next acknowledgement (or error); `None` when every message is acknowledged.
    async fn next(&mut self) -> Option<Result<PublishAck>> {
        loop {
            // A full window is refilled only once an eighth of it is acknowledged: publishes
            // then go out, and their acknowledgements come back, in runs, so the connection
            // writes many to a syscall (one at a time each costs the server a read).
            let window = self.backbone.window;
            if self.inflight.len() >= window {
                self.draining = true;
            } else if self.inflight.len() + (window / 8).max(1) <= window {
                self.draining = false;
            }
            if self.inflight.is_empty() {
                self.stalled = false;
            }
            let room = !self.draining && !self.stalled;
            match (self.input.as_mut(), self.acks.as_mut()) {
                // Keep the window full first; settle an acknowledgement when no message is
                // ready (or the window is full).
                (Some(input), acks) if room => {
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
                        Some(ack) = oldest(&mut self.inflight, acks, &mut self.deadline), if !self.inflight.is_empty() => {
                            return Some(self.settle(ack).await);
                        }
                    }
                }
                (_, acks) => {
                    let Some(ack) = oldest(&mut self.inflight, acks, &mut self.deadline).await else {
                        return self.refused.take().map(Err);
                    };
                    return Some(self.settle(ack).await);
                }
            }
        }
    }

    async fn send(&mut self, message: Message) {
        let timeout = self.backbone.request_timeout;
        if self.acks.is_none() {
            self.acks = Some(AckInbox::take(&self.backbone).await);
        }
        let acks = self.acks.as_mut().expect("taken above");
        let ack = match acks.reply_for(self.inflight.len()) {
            None => Slot::Failed,
            Some(reply) => {
                let headers = headers::of_message(&message);
                // Handing the publish over waits while the client reconnects: as long as an
                // acknowledgement may take, as async-nats's own publish waits. The timer is
                // made only then (it reads the clock): nearly every hand-over is immediate.
                let handed = {
                    let mut publish = std::pin::pin!(self.backbone.client.publish_with_reply_and_headers(
                        message.subject.clone(),
                        reply,
                        headers,
                        message.payload.clone(),
                    ));
                    match futures::poll!(publish.as_mut()) {
                        Poll::Ready(handed) => Ok(handed),
                        Poll::Pending => tokio::time::timeout(timeout, publish).await,
                    }
                };
                match handed {
                    Ok(Ok(())) => Slot::Waiting,
                    Ok(Err(_)) => Slot::Failed,
                    Err(_) => {
                        // The connection is likely lost: what is in flight is retried one by
                        // one (a stored message answers as a duplicate), nothing more is sent
                        // until then, so a lost server costs one timeout.
                        self.stalled = true;
                        self.give_up_waiting();
                        Slot::Failed
                    }
                }
            }
        };
        self.inflight.push_back(InFlight { ack, message });
    }

    /// Publishes still waiting for their acknowledgement are retried instead.
    fn give_up_waiting(&mut self) {
        for publish in &mut self.inflight {
            if matches!(publish.ack, Slot::Waiting) {
                publish.ack = Slot::Failed;
            }
        }
    }

    /// The oldest publish's acknowledgement (from [`oldest`]), or its retry.
    async fn settle(&mut self, outcome: Outcome) -> Result<PublishAck> {
        let m = self.inflight.pop_front().expect("settled the oldest publish").message;
        if let Some(acks) = self.acks.as_mut() {
            acks.first += 1;
        }
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
                    self.give_up_waiting();
                }
                let since = *self.failing_since.get_or_insert_with(Instant::now);
                let ack = self.backbone.publish_retrying(&m, since).await?;
                self.failing_since = None;
                Ok(ack)
            }
        }
    }
}

impl Drop for Pipeline<'_> {
    fn drop(&mut self) {
        if let Some(mut acks) = self.acks.take() {
            // Numbers handed out are never handed out again: late acknowledgements of this
            // pipeline's publishes are ignored by the next one.
            acks.first = acks.next;
            self.backbone.give_back(acks);
        }
    }
}

/// Waits for how the oldest publish ended, without removing it; `None` when nothing is in
/// flight. Cancel-safe: acknowledgements taken from the inbox are kept in their slots.
fn oldest<'b>(
    inflight: &'b mut VecDeque<InFlight>,
    mut acks: Option<&'b mut AckInbox>,
    deadline: &'b mut Deadline,
) -> impl Future<Output = Option<Outcome>> + 'b {
    std::future::poll_fn(move |cx| {
        if let Some(acks) = acks.as_deref_mut() {
            acks.collect(inflight, cx);
        }
        let Some(front) = inflight.front_mut() else { return Poll::Ready(None) };
        match std::mem::replace(&mut front.ack, Slot::Failed) {
            Slot::Arrived(ack) => Poll::Ready(Some(Ok(ack))),
            Slot::Failed => Poll::Ready(Some(Err(false))),
            Slot::Waiting => {
                front.ack = Slot::Waiting;
                // Without an inbox nothing can answer: given up on at once.
                let waiting = acks.as_deref().is_some_and(|acks| !deadline.passed(acks.first, acks.timeout, cx));
                if waiting {
                    Poll::Pending
                } else {
                    Poll::Ready(Some(Err(true)))
                }
            }
        }
    })
}

/// The acknowledgements of one pipeline's publishes: a subscription of its own, each
/// publish's reply subject numbered in sending order, so an acknowledgement finds its
/// publish by that number whatever order the server answers in.
pub(super) struct AckInbox {
    /// `None` when the subscription could not be made or has ended (the connection was
    /// closed): every publish then fails over to the retrying path.
    subscriber: Option<async_nats::Subscriber>,
    /// The reply subject without its number, ending in a dot.
    prefix: String,
    /// Reply number of the oldest publish in flight; the one at index `i` has `first + i`.
    first: u64,
    /// The next reply number to hand out.
    next: u64,
    /// How long the oldest publish's acknowledgement is waited for, from when it is first
    /// waited on (as awaiting each acknowledgement in turn would).
    timeout: std::time::Duration,
}

impl AckInbox {
    /// An idle inbox of `backbone`'s, or a new subscription: subscribing for every batch
    /// would cost the servers a SUB and an UNSUB each, passed on to every route and leaf node.
    async fn take(backbone: &JetStreamBackbone) -> Self {
        if let Some(inbox) = backbone.idle_inbox() {
            return inbox;
        }
        let prefix = format!("{}.", backbone.client.new_inbox());
        let subscribe = backbone.client.subscribe(format!("{prefix}*"));
        let subscriber = match tokio::time::timeout(backbone.request_timeout, subscribe).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "no acknowledgement inbox; publishing one at a time");
                None
            }
            Err(_) => None,
        };
        AckInbox { subscriber, prefix, first: 0, next: 0, timeout: backbone.request_timeout }
    }

    /// Whether it can serve another pipeline (its subscription is still open).
    pub(super) fn reusable(&self) -> bool {
        self.subscriber.is_some()
    }

    /// The reply subject of the next publish, which will be at index `index` of the window;
    /// `None` when there is no inbox to answer to.
    fn reply_for(&mut self, index: usize) -> Option<String> {
        self.subscriber.as_ref()?;
        debug_assert_eq!(self.next, self.first + index as u64, "one reply number per publish in flight");
        let mut number = itoa::Buffer::new();
        let number = number.format(self.next);
        self.next += 1;
        let mut reply = String::with_capacity(self.prefix.len() + number.len());
        reply.push_str(&self.prefix);
        reply.push_str(number);
        Some(reply)
    }

    /// Takes every acknowledgement that has arrived into its publish's slot.
    fn collect(&mut self, inflight: &mut VecDeque<InFlight>, cx: &mut Context<'_>) {
        let Some(subscriber) = self.subscriber.as_mut() else { return };
        loop {
            match subscriber.poll_next_unpin(cx) {
                Poll::Ready(Some(reply)) => record(&self.prefix, self.first, &reply, inflight),
                Poll::Ready(None) => {
                    self.subscriber = None;
                    for publish in inflight.iter_mut().filter(|p| matches!(p.ack, Slot::Waiting)) {
                        publish.ack = Slot::Failed;
                    }
                    return;
                }
                Poll::Pending => return,
            }
        }
    }
}

/// The timer of the oldest publish in flight.
#[derive(Default)]
struct Deadline {
    /// Made on first use (it needs the runtime), then reset for each oldest publish.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Reply number the timer runs for.
    armed_for: Option<u64>,
}

impl Deadline {
    /// Whether publish `number` (the oldest) has waited `timeout`; arms the timer for it when
    /// it is first waited on.
    fn passed(&mut self, number: u64, timeout: std::time::Duration, cx: &mut Context<'_>) -> bool {
        if self.armed_for != Some(number) {
            let now = tokio::time::Instant::now();
            // A timeout too long to add is as good as never.
            let at = now.checked_add(timeout).unwrap_or(now + std::time::Duration::from_secs(1 << 30));
            match self.timer.as_mut() {
                Some(timer) => timer.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed_for = Some(number);
        }
        self.timer.as_mut().is_some_and(|timer| timer.as_mut().poll(cx).is_ready())
    }
}

/// Puts `reply` in the slot of the publish it answers: the one whose reply subject is
/// `prefix` and its number, `first` being the number of the oldest in flight.
fn record(prefix: &str, first: u64, reply: &async_nats::Message, inflight: &mut VecDeque<InFlight>) {
    let number = reply
        .subject
        .strip_prefix(prefix)
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u64>().ok());
    // A number before `first` belongs to a publish already given up on and retried (or to
    // an earlier pipeline that used this inbox).
    let Some(index) = number.and_then(|n| n.checked_sub(first)).and_then(|i| usize::try_from(i).ok()) else {
        return;
    };
    if let Some(publish) = inflight.get_mut(index) {
        if matches!(publish.ack, Slot::Waiting) {
            publish.ack = stored(reply).map_or(Slot::Failed, Slot::Arrived);
        }
    }
}

/// The server's acknowledgement that it stored a publish; `None` for anything else (a status
/// such as no responders, an error reply, a body that is not an acknowledgement), which the
/// retrying path then meets and reports.
fn stored(reply: &async_nats::Message) -> Option<PublishAck> {
    /// A JetStream publish acknowledgement, `{"stream":"S","seq":N}` with `"duplicate":true`
    /// for a repeated id; other fields (domain, counters, batches) are not needed here.
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        stream: std::borrow::Cow<'a, str>,
        seq: u64,
        #[serde(default)]
        duplicate: bool,
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
    }
    if reply.status.is_some() {
        return None;
    }
    let body: Body = serde_json::from_slice(&reply.payload).ok()?;
    if body.error.is_some() {
        return None;
    }
    Some(PublishAck { stream: body.stream.into_owned(), sequence: body.seq, duplicate: body.duplicate })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(subject: &str, payload: &str, status: Option<async_nats::StatusCode>) -> async_nats::Message {
        async_nats::Message {
            subject: subject.into(),
            reply: None,
            payload: payload.to_string().into(),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    fn waiting(n: usize) -> VecDeque<InFlight> {
        (0..n).map(|i| InFlight { message: Message::new(format!("id-{i}"), "s", "x"), ack: Slot::Waiting }).collect()
    }

    fn acked(slot: &Slot) -> Option<(&str, u64, bool)> {
        match slot {
            Slot::Arrived(a) => Some((a.stream.as_str(), a.sequence, a.duplicate)),
            _ => None,
        }
    }

    #[test]
    fn only_a_stored_acknowledgement_counts_as_one() {
        let ok = stored(&reply("i.1", r#"{"stream":"EVENTS","seq":42}"#, None)).unwrap();
        assert_eq!((ok.stream.as_str(), ok.sequence, ok.duplicate), ("EVENTS", 42, false));
        let dup = stored(&reply("i.1", r#"{"stream":"EVENTS","domain":"hub","seq":7,"duplicate":true}"#, None));
        assert!(dup.is_some_and(|a| a.duplicate && a.sequence == 7));
        for refused in [
            r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"stream":"EVENTS","seq":0}"#,
            r#"{"error":{"code":400,"description":"bad"}}"#,
            r#"{"stream":"EVENTS"}"#,
            "",
            "not json",
        ] {
            assert!(stored(&reply("i.1", refused, None)).is_none(), "{refused}");
        }
        let no_responders = reply("i.1", "", Some(async_nats::StatusCode::NO_RESPONDERS));
        assert!(stored(&no_responders).is_none());
    }

    #[test]
    fn acknowledgements_find_their_publish_by_number_in_any_order() {
        let mut inflight = waiting(3);
        // The window starts at publish number 10; answers come out of order.
        record("_INBOX.x.", 10, &reply("_INBOX.x.12", r#"{"stream":"S","seq":3}"#, None), &mut inflight);
        record("_INBOX.x.", 10, &reply("_INBOX.x.10", r#"{"stream":"S","seq":1}"#, None), &mut inflight);
        assert_eq!(acked(&inflight[0].ack), Some(("S", 1, false)));
        assert!(matches!(inflight[1].ack, Slot::Waiting));
        assert_eq!(acked(&inflight[2].ack), Some(("S", 3, false)));
        // An answer is not overwritten by a repeat, and a refusal fails its publish only.
        record("_INBOX.x.", 10, &reply("_INBOX.x.10", r#"{"stream":"S","seq":9}"#, None), &mut inflight);
        record("_INBOX.x.", 10, &reply("_INBOX.x.11", r#"{"error":{"code":503}}"#, None), &mut inflight);
        assert_eq!(acked(&inflight[0].ack), Some(("S", 1, false)));
        assert!(matches!(inflight[1].ack, Slot::Failed));
        // Numbers of publishes already settled, beyond the window, or of another inbox are
        // ignored.
        let mut fresh = waiting(2);
        for subject in ["_INBOX.x.9", "_INBOX.x.12", "_INBOX.y.10", "_INBOX.x.ten", "_INBOX.x."] {
            record("_INBOX.x.", 10, &reply(subject, r#"{"stream":"S","seq":1}"#, None), &mut fresh);
        }
        assert!(fresh.iter().all(|p| matches!(p.ack, Slot::Waiting)));
    }
}
