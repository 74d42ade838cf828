//! On-disk encoding of stored messages.
//!
//! `[version=1][time ns: i64 BE][id len: u16 BE][id][subject len: u16 BE][subject][payload…]`:
//! fixed-width header fields so a time lookup (binary search by time) reads 9 bytes.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::{BackboneError, Message, Result, StoredMessage};

const VERSION: u8 = 1;

/// Key of a message in its stream tree: big-endian so sled's order is sequence order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn key_seq(key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key.try_into().map_err(|_| BackboneError::Storage("corrupt sequence key".into()))?;
    Ok(u64::from_be_bytes(arr))
}

pub(crate) fn encode(m: &Message, time_ns: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(13 + m.id.len() + m.subject.len() + m.payload.len());
    v.push(VERSION);
    v.extend_from_slice(&time_ns.to_be_bytes());
    v.extend_from_slice(&(m.id.len() as u16).to_be_bytes());
    v.extend_from_slice(m.id.as_bytes());
    v.extend_from_slice(&(m.subject.len() as u16).to_be_bytes());
    v.extend_from_slice(m.subject.as_bytes());
    v.extend_from_slice(&m.payload);
    v
}

/// Bytes a message counts against `max_bytes`.
pub(crate) fn stored_size(m: &Message) -> u64 {
    (m.id.len() + m.subject.len() + m.payload.len()) as u64
}

fn corrupt(what: &str) -> BackboneError {
    BackboneError::Storage(format!("corrupt stored message: {what}"))
}

pub(crate) fn time_ns(v: &[u8]) -> Result<i64> {
    if v.len() < 9 || v[0] != VERSION {
        return Err(corrupt("bad header"));
    }
    Ok(i64::from_be_bytes(v[1..9].try_into().unwrap()))
}

struct Parts<'a> {
    time_ns: i64,
    id: &'a str,
    subject: &'a str,
    payload: &'a [u8],
}

fn parts(v: &[u8]) -> Result<Parts<'_>> {
    let time_ns = time_ns(v)?;
    let mut at = 9;
    let mut field = |v: &'_ [u8]| -> Result<std::ops::Range<usize>> {
        let len_bytes = v.get(at..at + 2).ok_or_else(|| corrupt("truncated"))?;
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
        let r = at + 2..at + 2 + len;
        if r.end > v.len() {
            return Err(corrupt("truncated"));
        }
        at = r.end;
        Ok(r)
    };
    let id = field(v)?;
    let subject = field(v)?;
    let id = std::str::from_utf8(&v[id]).map_err(|_| corrupt("id not utf-8"))?;
    let subject = std::str::from_utf8(&v[subject.clone()]).map_err(|_| corrupt("subject not utf-8"))?;
    let payload_at = 9 + 2 + id.len() + 2 + subject.len();
    Ok(Parts { time_ns, id, subject, payload: &v[payload_at..] })
}

pub(crate) fn id_of(v: &[u8]) -> Result<(i64, String)> {
    let p = parts(v)?;
    Ok((p.time_ns, p.id.to_string()))
}

pub(crate) fn size_of(v: &[u8]) -> Result<u64> {
    let p = parts(v)?;
    Ok((p.id.len() + p.subject.len() + p.payload.len()) as u64)
}

pub(crate) fn subject_of(v: &[u8]) -> Result<&str> {
    Ok(parts(v)?.subject)
}

pub(crate) fn decode(stream: &str, seq: u64, v: &[u8]) -> Result<StoredMessage> {
    let p = parts(v)?;
    Ok(StoredMessage {
        stream: stream.to_string(),
        sequence: seq,
        time: DateTime::<Utc>::from_timestamp_nanos(p.time_ns),
        id: p.id.to_string(),
        subject: p.subject.to_string(),
        payload: Bytes::copy_from_slice(p.payload),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption_is_an_error() {
        let m = Message::new("id-1", "a.b", &b"payload"[..]);
        let v = encode(&m, 42);
        let d = decode("S", 7, &v).unwrap();
        assert_eq!((d.id.as_str(), d.subject.as_str(), &d.payload[..], d.sequence), ("id-1", "a.b", &b"payload"[..], 7));
        assert_eq!(time_ns(&v).unwrap(), 42);
        assert_eq!(size_of(&v).unwrap(), stored_size(&m));
        for cut in 0..v.len() - 7 {
            assert!(decode("S", 1, &v[..cut]).is_err(), "cut at {cut}");
        }
    }
}
