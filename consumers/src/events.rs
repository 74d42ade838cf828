//! Reading events across the platform streams with filters: what `chorus events tail` and the
//! dashboard's `/api/events` serve. No durable state: a tail is a replay that follows.

use std::sync::Arc;

use chorus_backbone::{Backbone, ReplayOptions, StartPosition, StoredMessage};
use chorus_schemas::{EventKind, EventRecord};
use chrono::{DateTime, Utc};
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};

use crate::inventory::glob_match;

/// Which events to show.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct EventFilter {
    /// Event kinds (`lifecycle`, `transition`, `watcher`, `rpc_request`, `rpc_reply`,
    /// `audit`); empty = all. Decides which streams are read.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Event type, full (`io.choria.lifecycle.v1.alive`), its last part (`alive`), or a
    /// watcher's type (`nagios`, `exec`, ...).
    #[serde(default)]
    pub types: Vec<String>,
    /// Node identity glob (`web-*.example.net`).
    #[serde(default)]
    pub node: Option<String>,
    /// Only events stored at or after this time.
    #[serde(default)]
    pub since: Option<DateTime<Utc>>,
    /// Keep following new events.
    #[serde(default)]
    pub follow: bool,
}

/// One event as shown: where it is stored and what it says. Undecodable messages (dead
/// letters, foreign producers) come with `event: None` and the reason.
#[derive(Clone, Debug, Serialize)]
pub struct ShownEvent {
    /// Stream the event was read from.
    pub stream: String,
    /// Sequence in that stream.
    pub sequence: u64,
    /// When the stream stored it.
    pub stored: DateTime<Utc>,
    /// Subject it was published on.
    pub subject: String,
    /// Event id (the backbone's dedupe key).
    pub id: String,
    /// The stored CloudEvent as JSON; none when it does not decode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    /// Why the message does not decode; none for a decoded event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The decoded event, for filtering; not serialized.
    #[serde(skip)]
    pub record: Option<EventRecord>,
}

const KINDS: [(&str, &str); 6] = [
    ("lifecycle", "CHORUS_LIFECYCLE"),
    ("transition", "CHORUS_MACHINE"),
    ("watcher", "CHORUS_MACHINE"),
    ("rpc_request", "CHORUS_RPC"),
    ("rpc_reply", "CHORUS_RPC"),
    ("audit", "CHORUS_AUDIT"),
];

impl EventFilter {
    /// Rejects unknown kinds, naming the valid ones.
    pub fn validate(&self) -> Result<(), String> {
        for k in &self.kinds {
            if !KINDS.iter().any(|(kind, _)| kind == k) && k != "deadletter" {
                return Err(format!(
                    "unknown kind {k:?}: expected one of lifecycle, transition, watcher, rpc_request, rpc_reply, audit, deadletter"
                ));
            }
        }
        Ok(())
    }

    /// The streams that can hold matching events.
    pub fn streams(&self) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = if self.kinds.is_empty() {
            vec!["CHORUS_LIFECYCLE", "CHORUS_MACHINE", "CHORUS_RPC", "CHORUS_AUDIT"]
        } else {
            let mut v: Vec<&'static str> =
                KINDS.iter().filter(|(k, _)| self.kinds.iter().any(|x| x == k)).map(|(_, s)| *s).collect();
            if self.kinds.iter().any(|k| k == "deadletter") {
                v.push("CHORUS_DEADLETTER");
            }
            v
        };
        out.dedup();
        out
    }

    /// Whether a decoded record passes the kind, type and node filters.
    pub fn matches(&self, record: &EventRecord) -> bool {
        let kind = record.data.kind();
        if !self.kinds.is_empty() && !self.kinds.iter().any(|k| k == kind.as_str()) {
            return false;
        }
        let ty = record.data.event_type();
        let watcher = match &record.data {
            chorus_schemas::Event::Watcher(w) => Some(w.watcher_type()),
            _ => None,
        };
        if !self.types.is_empty()
            && !self
                .types
                .iter()
                .any(|t| t == ty || ty.rsplit(['.', ':']).next() == Some(t.as_str()) || watcher == Some(t.as_str()))
        {
            return false;
        }
        if let Some(node) = &self.node {
            if !glob_match(node, record.data.identity()) {
                return false;
            }
        }
        true
    }

    fn shows_undecodable(&self) -> bool {
        self.types.is_empty() && self.node.is_none()
    }
}

fn show(m: StoredMessage) -> ShownEvent {
    let (event, error, record) = match EventRecord::decode(&m.payload) {
        Ok(r) => (serde_json::from_slice(&m.payload).ok(), None, Some(r)),
        Err(e) => (None, Some(e.to_string()), None),
    };
    ShownEvent {
        stream: m.stream,
        sequence: m.sequence,
        stored: m.time,
        subject: m.subject,
        id: m.id,
        event,
        error,
        record,
    }
}

/// Matching events of every stream the filter names, each stream in order, streams
/// interleaved as they arrive.
pub async fn tail(
    backbone: Arc<dyn Backbone>,
    filter: EventFilter,
) -> Result<BoxStream<'static, Result<ShownEvent, chorus_backbone::BackboneError>>, chorus_backbone::BackboneError> {
    // The streams that hold each platform stream's subjects (Choria's CHORIA_MACHINE, say).
    let found = chorus_platform::resolve_platform_streams(
        &*backbone,
        &chorus_platform::StreamLimits::default(),
        &chorus_platform::StreamMap::default(),
        false,
    )
    .await
    .map_err(|e| match e {
        chorus_platform::PlatformError::Backbone(e) => e,
        other => chorus_backbone::BackboneError::InvalidMessage(other.to_string()),
    })?;
    let mut names: Vec<&str> = filter.streams().into_iter().map(|s| found.streams.get(s)).collect();
    names.dedup();
    let mut streams = Vec::new();
    for stream in names {
        let options = ReplayOptions {
            start: filter.since.map(StartPosition::Time).unwrap_or(StartPosition::First),
            filter_subjects: Vec::new(),
            follow: filter.follow,
        };
        match backbone.replay(stream, options).await {
            Ok(s) => streams.push(s),
            Err(chorus_backbone::BackboneError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    let filter = Arc::new(filter);
    Ok(futures::stream::select_all(streams)
        .filter_map(move |item| {
            let filter = filter.clone();
            async move {
                match item {
                    Err(e) => Some(Err(e)),
                    Ok(m) => {
                        let shown = show(m);
                        let keep = match &shown.record {
                            Some(r) => filter.matches(r),
                            None => filter.shows_undecodable(),
                        };
                        keep.then_some(Ok(shown))
                    }
                }
            }
        })
        .boxed())
}

/// One line for a terminal.
pub fn one_line(e: &ShownEvent) -> String {
    match &e.record {
        Some(r) => {
            let detail = match &r.data {
                chorus_schemas::Event::Lifecycle(l) => format!("component={}", l.component()),
                chorus_schemas::Event::Transition(t) => format!("{} {} → {}", t.machine, t.from_state, t.to_state),
                chorus_schemas::Event::Watcher(w) => match &w.details {
                    chorus_schemas::machine::WatcherDetails::Nagios(n) => {
                        format!("{} {} {} {}", w.machine, w.name, n.status, n.output)
                    }
                    _ => format!("{} {} {} {}", w.machine, w.name, w.watcher_type(), w.details.state()),
                },
                chorus_schemas::Event::RpcRequest(q) => format!("{}#{} by {}", q.agent, q.action, q.callerid),
                chorus_schemas::Event::RpcReply(p) => format!("{}#{} status={}", p.agent, p.action, p.statuscode as u8),
                chorus_schemas::Event::Audit(a) => format!("{} {}", a.action.as_str(), a.callerid),
                chorus_schemas::Event::Registration(g) => {
                    format!("{} facts, {} agents", g.content.facts.len(), g.content.agents.len())
                }
                chorus_schemas::Event::Reaction(x) => match &x.action {
                    Some(a) => format!("{} {} {}#{} {}", x.rule, x.outcome.as_str(), a.kind, a.index, a.detail),
                    None => format!("{} {} key={} ({})", x.rule, x.outcome.as_str(), x.key, x.reason),
                },
            };
            let kind = match r.data.kind() {
                EventKind::Lifecycle => r.data.event_type().rsplit('.').next().unwrap_or("lifecycle"),
                other => other.as_str(),
            };
            format!(
                "{} {:<17} {:<12} {:<36} {}",
                r.time.format("%Y-%m-%dT%H:%M:%SZ"),
                format!("{}#{}", short(&e.stream), e.sequence),
                kind,
                r.data.identity(),
                detail
            )
        }
        None => format!(
            "{} {:<17} undecodable  {} ({})",
            e.stored.format("%Y-%m-%dT%H:%M:%SZ"),
            format!("{}#{}", short(&e.stream), e.sequence),
            e.subject,
            e.error.as_deref().unwrap_or("")
        ),
    }
}

fn short(stream: &str) -> &str {
    stream.strip_prefix("CHORUS_").unwrap_or(stream)
}

/// Parses `since`: an RFC 3339 time, or a duration (`90s`, `10m`, `2h`) back from now.
pub fn parse_since(text: &str) -> Result<chrono::DateTime<Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("since {text:?}: not an RFC 3339 time nor a duration ({e})"))?;
    Ok(Utc::now() - chrono::Duration::from_std(d).map_err(|e| e.to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_schemas::lifecycle::{Alive, Startup};

    #[test]
    fn filters_by_kind_type_and_node() {
        let alive = EventRecord::new(Alive::new("web-1.example.net", "server", "1.0", Some(60)), 1);
        let startup = EventRecord::new(Startup::new("db-1.example.net", "server", "1.0"), 1);
        let f = EventFilter { types: vec!["alive".into()], ..Default::default() };
        assert!(f.matches(&alive) && !f.matches(&startup));
        let f = EventFilter { node: Some("db-*".into()), ..Default::default() };
        assert!(!f.matches(&alive) && f.matches(&startup));
        let f = EventFilter { kinds: vec!["audit".into()], ..Default::default() };
        assert!(!f.matches(&alive));
        assert_eq!(f.streams(), vec!["CHORUS_AUDIT"]);
        assert!(EventFilter { kinds: vec!["bogus".into()], ..Default::default() }
            .validate()
            .unwrap_err()
            .contains("lifecycle"));
        assert!(one_line(&show(StoredMessage {
            stream: "CHORUS_LIFECYCLE".into(),
            sequence: 7,
            time: Utc::now(),
            id: alive.id.clone(),
            subject: "choria.lifecycle.event.alive.server".into(),
            payload: alive.encode().into(),
            headers: Vec::new(),
        }))
        .contains("web-1.example.net"));
    }
}
