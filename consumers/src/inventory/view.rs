//! The inventory view: how each lifecycle event changes a node.

use chorus_schemas::lifecycle::LifecycleType;
use chorus_schemas::{Event, EventRecord, Lifecycle};

use super::codec::{self, read_node};
use super::node::Node;
use super::{node_key, VIEW_NAME};
use crate::projection::{Txn, View, ViewError};

/// The inventory fold. Everything is in the view store; the view only keeps a scratch buffer.
#[derive(Clone, Debug, Default)]
pub struct InventoryView {
    buf: Vec<u8>,
}

impl View for InventoryView {
    fn name(&self) -> &str {
        VIEW_NAME
    }

    fn apply(&mut self, sequence: u64, record: &EventRecord, txn: &mut Txn<'_>) -> Result<(), ViewError> {
        let Event::Lifecycle(event) = &record.data else {
            return Ok(());
        };
        // Governor events describe a concurrency slot (often taken from a CLI host), not the
        // node's life.
        if event.lifecycle_type() == LifecycleType::Governor {
            return Ok(());
        }
        let key = node_key(event.identity());
        let time = record.time;
        let mut node = match txn.get(&key)? {
            Some(value) => read_node(&key, &value)?,
            None => Node {
                identity: event.identity().to_owned(),
                component: String::new(),
                version: None,
                site: None,
                first_seen: time,
                last_seen: time,
                last_event: String::new(),
                last_startup: None,
                alive_interval: None,
                shutdown: false,
                events: 0,
                sequence: 0,
            },
        };
        node.events += 1;
        node.first_seen = node.first_seen.min(time);
        if time >= node.last_seen || node.events == 1 {
            node.last_seen = time;
            node.sequence = sequence;
            let last_event = event.lifecycle_type().as_str();
            if node.last_event != last_event {
                node.last_event = last_event.to_owned();
            }
            // A provisioned event names the provisioner that sent it, not what the node runs.
            let from_node = !matches!(event, Lifecycle::Provisioned(_));
            if from_node && node.component != event.component() {
                node.component = event.component().to_owned();
            }
            if record.site.is_some() && node.site != record.site {
                node.site.clone_from(&record.site);
            }
            node.shutdown = false;
            match event {
                Lifecycle::Startup(s) => {
                    set_version(&mut node, &s.version);
                    node.last_startup = Some(time);
                }
                Lifecycle::Alive(a) => {
                    set_version(&mut node, &a.version);
                    if a.interval.is_some() {
                        node.alive_interval = a.interval;
                    }
                }
                Lifecycle::Upgraded(u) => set_version(&mut node, &u.new_version),
                Lifecycle::Shutdown(_) => node.shutdown = true,
                Lifecycle::Provisioned(_) | Lifecycle::Governor(_) => {}
            }
        }
        codec::encode(&node, &mut self.buf);
        txn.insert(&key, &self.buf[..])
    }
}

fn set_version(node: &mut Node, version: &str) {
    if node.version.as_deref() != Some(version) {
        node.version = Some(version.to_owned());
    }
}
