//! Sampling of alive events: at most one per interval per node is forwarded, unless a field
//! of the event changed (a new version, a new interval), as Choria's stream replicator does
//! for heartbeats. A hub watching tens of thousands of nodes needs to know they are alive,
//! not every 5-minute beat of each, over a thin inter-site link.
//!
//! Time is the event's own timestamp, not the wall clock, so copying a backlog samples it as
//! it would have been sampled live. Forgetting a node (after a restart, or when pruning nodes
//! silent for several intervals) only ever forwards one more event, never drops one wrongly.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::Deserialize;
use serde_json::value::RawValue;

/// Decides which events matching the sampled subjects to forward.
#[derive(Clone, Debug)]
pub struct Sampler {
    interval: i64,
    subjects: Vec<String>,
    /// node key → (timestamp of the last forwarded event, fingerprint of its fields)
    last: HashMap<String, (i64, u64)>,
    newest: i64,
    decisions: u64,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

impl Sampler {
    /// Samples events on subjects matching `subjects` to one per `interval` per node.
    pub fn new(interval: std::time::Duration, subjects: Vec<String>) -> Self {
        Sampler { interval: interval.as_secs().max(1) as i64, subjects, last: HashMap::new(), newest: 0, decisions: 0 }
    }

    /// Whether to forward this event. Events on other subjects, and events that cannot be
    /// read as sampled events, are always forwarded: the sampler never drops what it does
    /// not understand.
    pub fn forward(&mut self, subject: &str, payload: &[u8]) -> bool {
        if !chorus_backbone::subject::matches_any(&self.subjects, subject) {
            return true;
        }
        let Some((key, timestamp, fingerprint)) = read(payload) else {
            return true;
        };
        self.decisions += 1;
        self.newest = self.newest.max(timestamp);
        if self.decisions.is_multiple_of(65_536) {
            let horizon = self.newest - 3 * self.interval;
            self.last.retain(|_, (t, _)| *t >= horizon);
        }
        match self.last.get_mut(&key) {
            Some((t, f)) if *f == fingerprint && timestamp >= *t && timestamp - *t < self.interval => false,
            Some(entry) => {
                *entry = (timestamp, fingerprint);
                true
            }
            None => {
                self.last.insert(key, (timestamp, fingerprint));
                true
            }
        }
    }

    /// Nodes currently remembered.
    pub fn nodes(&self) -> usize {
        self.last.len()
    }
}

/// (identity/component, timestamp, fingerprint of every other data field) of a CloudEvents
/// lifecycle event, or of a legacy bare Choria document.
fn read(payload: &[u8]) -> Option<(String, i64, u64)> {
    let envelope: Envelope = serde_json::from_slice(payload).ok()?;
    let data = match envelope.data {
        Some(raw) => raw.get(),
        None => std::str::from_utf8(payload).ok()?,
    };
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(data).ok()?;
    let identity = fields.get("identity")?.as_str()?;
    let component = fields.get("component").and_then(|c| c.as_str()).unwrap_or("");
    let timestamp = fields.get("timestamp")?.as_i64()?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (k, v) in &fields {
        if k != "id" && k != "timestamp" {
            k.hash(&mut hasher);
            v.to_string().hash(&mut hasher);
        }
    }
    Some((format!("{identity}\u{0}{component}"), timestamp, hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_schemas::lifecycle::Alive;
    use chorus_schemas::EventRecord;

    fn alive(identity: &str, version: &str, timestamp: i64) -> (String, Vec<u8>) {
        let mut a = Alive::new(identity, "server", version, Some(300));
        a.timestamp = timestamp;
        let r = EventRecord::new(a, 1);
        (r.nats_subject().unwrap(), r.encode())
    }

    #[test]
    fn one_alive_per_interval_per_node_unless_a_field_changed() {
        let mut s = Sampler::new(std::time::Duration::from_secs(600), vec!["choria.lifecycle.event.alive.>".into()]);
        let t = 1_700_000_000;
        let (subj, a1) = alive("n1", "1.0", t);
        assert!(s.forward(&subj, &a1), "first alive of a node goes");
        assert!(!s.forward(&subj, &alive("n1", "1.0", t + 300).1), "second within the interval is sampled out");
        assert!(s.forward(&subj, &alive("n2", "1.0", t + 300).1), "other nodes are independent");
        assert!(s.forward(&subj, &alive("n1", "1.1", t + 310).1), "a changed version goes at once");
        assert!(!s.forward(&subj, &alive("n1", "1.1", t + 600).1));
        assert!(s.forward(&subj, &alive("n1", "1.1", t + 910).1), "after the interval it goes again");
        assert!(s.forward("choria.lifecycle.event.startup.server", b"{}"), "other subjects always go");
        assert!(s.forward(&subj, b"not json"), "unreadable events are never dropped here");
        assert_eq!(s.nodes(), 2);
    }
}
