//! The stored form of a node: a small binary record, because the projection decodes and
//! re-encodes one per applied event and JSON (with RFC 3339 times) cost several times more
//! than the rest of applying an alive event. The identity is the key, so it is not repeated.
//!
//! Layout (integers little-endian, strings as u32 length and UTF-8, times as i64 seconds and
//! u32 nanoseconds, optional fields as a flag byte and the value): format byte `1`, component,
//! version, site, first seen, last seen, last event, last startup, alive interval (u64),
//! shutdown (byte), events (u64), sequence (u64).

use chrono::{DateTime, Utc};

use super::node::Node;
use super::NODE_PREFIX;
use crate::projection::ViewError;

const FORMAT: u8 = 1;

pub(super) fn encode(node: &Node, out: &mut Vec<u8>) {
    out.clear();
    out.push(FORMAT);
    string(out, &node.component);
    opt(out, node.version.as_deref(), string);
    opt(out, node.site.as_deref(), string);
    time(out, &node.first_seen);
    time(out, &node.last_seen);
    string(out, &node.last_event);
    opt(out, node.last_startup.as_ref(), time);
    opt(out, node.alive_interval, |out, v| out.extend_from_slice(&v.to_le_bytes()));
    out.push(node.shutdown as u8);
    out.extend_from_slice(&node.events.to_le_bytes());
    out.extend_from_slice(&node.sequence.to_le_bytes());
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
    out.extend_from_slice(&t.timestamp().to_le_bytes());
    out.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
}

fn opt<T>(out: &mut Vec<u8>, v: Option<T>, f: impl FnOnce(&mut Vec<u8>, T)) {
    match v {
        Some(v) => {
            out.push(1);
            f(out, v);
        }
        None => out.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("record is truncated".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String, String> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map(str::to_owned).map_err(|e| e.to_string())
    }
    fn time(&mut self) -> Result<DateTime<Utc>, String> {
        let secs = self.u64()? as i64;
        let nanos = self.u32()?;
        DateTime::from_timestamp(secs, nanos).ok_or_else(|| format!("time {secs}.{nanos} is out of range"))
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, String>) -> Result<Option<T>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => f(self).map(Some),
            b => Err(format!("bad option flag {b}")),
        }
    }
}

pub(super) fn decode(identity: &str, bytes: &[u8]) -> Result<Node, String> {
    let mut r = Reader(bytes);
    let format = r.u8()?;
    if format != FORMAT {
        return Err(format!("unknown record format {format}"));
    }
    let node = Node {
        identity: identity.to_owned(),
        component: r.string()?,
        version: r.opt(Reader::string)?,
        site: r.opt(Reader::string)?,
        first_seen: r.time()?,
        last_seen: r.time()?,
        last_event: r.string()?,
        last_startup: r.opt(Reader::time)?,
        alive_interval: r.opt(Reader::u64)?,
        shutdown: r.u8()? != 0,
        events: r.u64()?,
        sequence: r.u64()?,
    };
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the record", r.0.len()));
    }
    Ok(node)
}

pub(super) fn read_node(key: &[u8], value: &[u8]) -> Result<Node, ViewError> {
    let corrupt = |reason: String| ViewError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason };
    let identity = std::str::from_utf8(&key[NODE_PREFIX.len()..]).map_err(|e| corrupt(e.to_string()))?;
    decode(identity, value).map_err(corrupt)
}
