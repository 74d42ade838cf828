//! On-disk encoding of stored messages and of the chunks that hold them.
//!
//! A message is one record:
//! `[version=1][time ns: i64 BE][id len: u16 BE][id][subject len: u16 BE][subject][payload…]`:
//! fixed-width header fields so a time lookup (binary search by time) reads 9 bytes. A
//! message with headers (another publisher's, restored or replicated) is a version 2 record,
//! the same with `[headers len: u32 BE]` then `(name len: u16 BE, name, value len: u16 BE,
//! value)…` before the payload; messages without headers stay version 1, so stores written
//! before headers existed read unchanged.
//!
//! Records are stored in chunks, one sled entry per chunk, keyed by the big-endian sequence of
//! the chunk's first record ([`seq_key`]); the records of a chunk have consecutive sequences:
//! `[chunk version=1][count: u32 BE]` then `count` times `[record len: u32 BE][record]`, and
//! nothing after the last record. A chunk holds at least one record. Every length is checked
//! against the bytes present, so a truncated or corrupt chunk is an error, never a panic.

use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::message::Headers;
use crate::{BackboneError, Message, Result, StoredMessage};

const VERSION: u8 = 1;
const VERSION_HEADERS: u8 = 2;
/// Version byte, time and the two field lengths.
const RECORD_HEADER: usize = 13;

const CHUNK_VERSION: u8 = 1;
/// Version byte and record count.
const CHUNK_HEADER: usize = 5;

/// Key of a chunk in its stream tree: the sequence of its first message, big-endian so sled's
/// order is sequence order.
pub fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) fn key_seq(key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key.try_into().map_err(|_| BackboneError::Corrupt("sequence key".into()))?;
    Ok(u64::from_be_bytes(arr))
}

/// Length of the record of `m`.
pub(crate) fn record_len(m: &Message) -> usize {
    RECORD_HEADER + m.id.len() + m.subject.len() + m.payload.len() + headers_len(m)
}

/// Length of the headers block of `m` (0 without headers).
fn headers_len(m: &Message) -> usize {
    if m.headers.is_empty() {
        0
    } else {
        4 + m.headers.iter().map(|(n, v)| 4 + n.len() + v.len()).sum::<usize>()
    }
}

/// Appends the record of `m` to `out`.
/// Field lengths were checked by [`Message::validate`].
pub(crate) fn encode_into(out: &mut Vec<u8>, m: &Message, time_ns: i64) {
    out.push(if m.headers.is_empty() { VERSION } else { VERSION_HEADERS });
    out.extend_from_slice(&time_ns.to_be_bytes());
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    field(out, m.id.as_bytes());
    field(out, m.subject.as_bytes());
    if !m.headers.is_empty() {
        out.extend_from_slice(&((headers_len(m) - 4) as u32).to_be_bytes());
        for (name, value) in &m.headers {
            field(out, name.as_bytes());
            field(out, value.as_bytes());
        }
    }
    out.extend_from_slice(&m.payload);
}

#[cfg(test)]
pub(crate) fn encode(m: &Message, time_ns: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(record_len(m));
    encode_into(&mut v, m, time_ns);
    v
}

/// Bytes a message counts against `max_bytes`.
pub(crate) fn stored_size(m: &Message) -> u64 {
    (m.id.len() + m.subject.len() + m.payload.len() + m.headers_size()) as u64
}

fn corrupt(what: &str) -> BackboneError {
    BackboneError::Corrupt(format!("stored message: {what}"))
}

fn corrupt_chunk(what: &str) -> BackboneError {
    BackboneError::Corrupt(format!("stored chunk: {what}"))
}

pub(crate) fn time_ns(v: &[u8]) -> Result<i64> {
    if v.len() < 9 || !(v[0] == VERSION || v[0] == VERSION_HEADERS) {
        return Err(corrupt("bad header"));
    }
    Ok(i64::from_be_bytes(v[1..9].try_into().unwrap()))
}

struct Parts<'a> {
    time_ns: i64,
    id: &'a str,
    subject: &'a str,
    /// The headers block (after its length), empty for a version 1 record.
    headers: &'a [u8],
    payload: &'a [u8],
}

/// Reads a `[len: u16 BE][bytes]` field of `v` at `*at`, moving `*at` past it.
fn field<'a>(v: &'a [u8], at: &mut usize) -> Result<&'a [u8]> {
    let len_bytes = v.get(*at..*at + 2).ok_or_else(|| corrupt("truncated"))?;
    let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
    let bytes = v.get(*at + 2..*at + 2 + len).ok_or_else(|| corrupt("truncated"))?;
    *at += 2 + len;
    Ok(bytes)
}

fn parts(v: &[u8]) -> Result<Parts<'_>> {
    let time_ns = time_ns(v)?;
    let mut at = 9;
    let id = std::str::from_utf8(field(v, &mut at)?).map_err(|_| corrupt("id not utf-8"))?;
    let subject = std::str::from_utf8(field(v, &mut at)?).map_err(|_| corrupt("subject not utf-8"))?;
    let mut headers: &[u8] = &[];
    if v[0] == VERSION_HEADERS {
        let len_bytes = v.get(at..at + 4).ok_or_else(|| corrupt("truncated"))?;
        let len = u32::from_be_bytes(len_bytes.try_into().expect("four bytes")) as usize;
        headers = v.get(at + 4..at + 4 + len).ok_or_else(|| corrupt("truncated headers"))?;
        at += 4 + len;
    }
    Ok(Parts { time_ns, id, subject, headers, payload: &v[at..] })
}

/// The headers of a record's headers block.
fn headers(block: &[u8]) -> Result<Headers> {
    let (mut out, mut at) = (Headers::new(), 0);
    let text = |b: &[u8]| std::str::from_utf8(b).map(str::to_owned).map_err(|_| corrupt("header not utf-8"));
    while at < block.len() {
        let name = text(field(block, &mut at)?)?;
        let value = text(field(block, &mut at)?)?;
        out.push((name, value));
    }
    Ok(out)
}

pub(crate) fn id_of(v: &[u8]) -> Result<(i64, &str)> {
    let p = parts(v)?;
    Ok((p.time_ns, p.id))
}

pub(crate) fn size_of(v: &[u8]) -> Result<u64> {
    let p = parts(v)?;
    // Names and values are the block's fields: their lengths, without decoding them.
    let (mut at, mut headers) = (0, 0);
    while at < p.headers.len() {
        headers += field(p.headers, &mut at)?.len();
    }
    Ok((p.id.len() + p.subject.len() + p.payload.len() + headers) as u64)
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
        headers: headers(p.headers)?,
    })
}

/// Builds one chunk in a reusable buffer: push records, then take the bytes with
/// [`ChunkBuilder::finish`].
#[derive(Default)]
pub(crate) struct ChunkBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl ChunkBuilder {
    /// Records pushed since the last `finish`.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Encoded size of the chunk so far (0 before the first push).
    pub(crate) fn len(&self) -> usize {
        if self.count == 0 {
            0
        } else {
            self.buf.len()
        }
    }

    fn start_record(&mut self, len: usize) -> Result<()> {
        let len = u32::try_from(len).map_err(|_| BackboneError::InvalidMessage("message larger than 4 GiB".into()))?;
        if self.count == 0 {
            self.buf.clear();
            self.buf.push(CHUNK_VERSION);
            self.buf.extend_from_slice(&[0; 4]);
        }
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.count += 1;
        Ok(())
    }

    /// Appends the record of `m`, stored at `time_ns`.
    pub(crate) fn push_message(&mut self, m: &Message, time_ns: i64) -> Result<()> {
        let len = record_len(m);
        self.start_record(len)?;
        self.buf.reserve(len);
        encode_into(&mut self.buf, m, time_ns);
        Ok(())
    }

    /// Appends an already encoded record (copied from another chunk).
    pub(crate) fn push_record(&mut self, record: &[u8]) -> Result<()> {
        self.start_record(record.len())?;
        self.buf.extend_from_slice(record);
        Ok(())
    }

    /// The finished chunk, `None` when nothing was pushed since the last `finish`. The builder
    /// starts a new chunk (reusing its buffer) at the next push.
    pub(crate) fn finish(&mut self) -> Option<&[u8]> {
        if self.count == 0 {
            return None;
        }
        self.buf[1..CHUNK_HEADER].copy_from_slice(&self.count.to_be_bytes());
        self.count = 0;
        Some(&self.buf)
    }
}

/// Number of records in a chunk, from its header.
pub(crate) fn chunk_count(v: &[u8]) -> Result<u32> {
    if v.len() < CHUNK_HEADER || v[0] != CHUNK_VERSION {
        return Err(corrupt_chunk("bad header"));
    }
    let count = u32::from_be_bytes(v[1..CHUNK_HEADER].try_into().unwrap());
    if count == 0 {
        return Err(corrupt_chunk("no records"));
    }
    Ok(count)
}

/// The records of a chunk, in sequence order. Yields an error (and then ends) when the chunk is
/// truncated, when a length runs past its end or when bytes follow the last record.
pub(crate) fn records(v: &[u8]) -> Result<Records<'_>> {
    let left = chunk_count(v)?;
    Ok(Records { v, at: CHUNK_HEADER, left, done: false })
}

pub(crate) struct Records<'a> {
    v: &'a [u8],
    at: usize,
    left: u32,
    done: bool,
}

impl<'a> Records<'a> {
    fn fail(&mut self, what: &str) -> Option<Result<&'a [u8]>> {
        self.done = true;
        Some(Err(corrupt_chunk(what)))
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.left == 0 {
            self.done = true;
            return if self.at == self.v.len() { None } else { self.fail("bytes after the last record") };
        }
        let Some(len) = self.v.get(self.at..self.at + 4) else { return self.fail("truncated") };
        let len = u32::from_be_bytes(len.try_into().unwrap()) as usize;
        let start = self.at + 4;
        let Some(record) = start.checked_add(len).and_then(|end| self.v.get(start..end)) else {
            return self.fail("truncated");
        };
        self.at = start + len;
        self.left -= 1;
        Some(Ok(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_in_a_version_2_record() {
        let headers =
            vec![("B-Trace".to_string(), "x y".to_string()), ("A".into(), "1".into()), ("A".into(), "".into())];
        let m = Message::new("id-1", "a.b", &b"\xff payload"[..]).with_headers(headers);
        let v = encode(&m, 42);
        assert_eq!(v[0], VERSION_HEADERS);
        let d = decode("S", 7, &v).unwrap();
        assert_eq!((&d.headers, &d.payload[..], d.id.as_str()), (&m.headers, &b"\xff payload"[..], "id-1"));
        assert_eq!(size_of(&v).unwrap(), stored_size(&m));
        assert_eq!(v.len(), record_len(&m));
        for cut in 0..v.len() - 10 {
            assert!(decode("S", 1, &v[..cut]).is_err(), "cut at {cut}");
        }
        // Without headers, the record is the version 1 record it always was.
        assert_eq!(encode(&Message::new("id-1", "a.b", &b"p"[..]), 42)[0], VERSION);
    }

    #[test]
    fn round_trip_and_corruption_is_an_error() {
        let m = Message::new("id-1", "a.b", &b"payload"[..]);
        let v = encode(&m, 42);
        let d = decode("S", 7, &v).unwrap();
        assert_eq!(
            (d.id.as_str(), d.subject.as_str(), &d.payload[..], d.sequence),
            ("id-1", "a.b", &b"payload"[..], 7)
        );
        assert_eq!(time_ns(&v).unwrap(), 42);
        assert_eq!(size_of(&v).unwrap(), stored_size(&m));
        assert_eq!(v.len(), record_len(&m));
        for cut in 0..v.len() - 7 {
            assert!(decode("S", 1, &v[..cut]).is_err(), "cut at {cut}");
        }
    }

    fn sample(n: usize) -> Vec<Message> {
        (0..n).map(|i| Message::new(format!("id-{i}"), format!("a.b{}", i % 3), vec![i as u8; i * 7])).collect()
    }

    fn build(msgs: &[Message]) -> Vec<u8> {
        let mut b = ChunkBuilder::default();
        for (i, m) in msgs.iter().enumerate() {
            b.push_message(m, 100 + i as i64).unwrap();
        }
        b.finish().unwrap().to_vec()
    }

    fn read_all(v: &[u8]) -> Result<Vec<StoredMessage>> {
        records(v)?.enumerate().map(|(i, r)| decode("S", 10 + i as u64, r?)).collect()
    }

    #[test]
    fn chunk_round_trip() {
        let msgs = sample(40);
        let v = build(&msgs);
        assert_eq!(chunk_count(&v).unwrap(), 40);
        let back = read_all(&v).unwrap();
        assert_eq!(back.len(), 40);
        for (i, (m, d)) in msgs.iter().zip(&back).enumerate() {
            assert_eq!(
                (d.id.as_str(), d.subject.as_str(), &d.payload[..]),
                (m.id.as_str(), m.subject.as_str(), &m.payload[..])
            );
            assert_eq!(d.sequence, 10 + i as u64);
            assert_eq!(d.time.timestamp_nanos_opt().unwrap(), 100 + i as i64);
        }
        // Random access walks the lengths.
        let r = records(&v).unwrap().nth(17).unwrap().unwrap();
        assert_eq!(id_of(r).unwrap(), (117, "id-17"));
        assert!(records(&v).unwrap().nth(40).is_none());

        // A builder is reusable; copying records rebuilds the same chunk.
        let mut b = ChunkBuilder::default();
        assert!(b.finish().is_none());
        b.push_message(&msgs[0], 1).unwrap();
        assert_eq!(b.count(), 1);
        assert!(b.finish().is_some());
        for r in records(&v).unwrap() {
            b.push_record(r.unwrap()).unwrap();
        }
        assert_eq!(b.len(), v.len());
        assert_eq!(b.finish().unwrap(), &v[..]);
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn truncated_or_corrupt_chunks_are_errors() {
        let v = build(&sample(5));
        for cut in 0..v.len() {
            assert!(read_all(&v[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = v.clone();
        trailing.push(0);
        assert!(read_all(&trailing).is_err(), "bytes after the last record");

        let mut bad = v.clone();
        bad[0] = 9;
        assert!(records(&bad).is_err(), "unknown chunk version");
        let mut zero = v.clone();
        zero[1..5].copy_from_slice(&0u32.to_be_bytes());
        assert!(records(&zero).is_err(), "empty chunk");
        let mut more = v.clone();
        more[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(read_all(&more).is_err(), "count larger than the records");
        let mut fewer = v.clone();
        fewer[1..5].copy_from_slice(&4u32.to_be_bytes());
        assert!(read_all(&fewer).is_err(), "count smaller than the records");
        let mut long = v.clone();
        long[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(read_all(&long).is_err(), "record length past the end");
        let mut short = v.clone();
        short[5..9].copy_from_slice(&3u32.to_be_bytes());
        assert!(read_all(&short).is_err(), "record length inside a record");
        // Whatever the bytes, reading never panics.
        for i in 0..v.len() {
            for byte in [0u8, 1, 0x7f, 0xff] {
                let mut x = v.clone();
                x[i] = byte;
                read_all(&x).ok();
            }
        }
    }
}
