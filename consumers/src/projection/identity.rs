//! Idempotence by CloudEvents identity: an event is applied once per `(source, id)`, whoever
//! published it and however often.
//!
//! The stream's own dedupe works only for publishers that send `Nats-Msg-Id`; go-choria does
//! not, so the same event can be stored twice under two sequences. The projector remembers
//! the identities of the events of the last `window` stream sequences it applied, with a
//! digest of each payload: a second copy with the same payload is skipped (counted as a
//! duplicate), one with a different payload is a conflict (not applied, dead-lettered).
//!
//! The memory is rebuilt when a projector starts by reading the `window` messages before its
//! checkpoint (no store writes on the apply path), so what is remembered depends only on the
//! stream, and a restart, a crash or a rebuild decide exactly as an uninterrupted run would.
//! An identity is kept as the 128-bit SipHash-1-3 of `(source, id)` (one pass; keys drawn at
//! random per process, so no publisher can aim a collision at a real event and have it
//! suppressed; one pass costs 41–45 ns on a 60-byte identity against 93–100 for the two
//! 64-bit passes std's SipHash took before), with the sequence and a 64-bit keyed digest of the
//! payload (aHash: the digest only tells a duplicate from a conflict, neither of which is
//! applied, and SipHash over every replayed payload was most of the check's cost; XXH3 was
//! measured no faster on 581-byte payloads): under 100 bytes per remembered event (measured in
//! docs/CONSUMERS.md).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};

use siphasher::sip128::{Hasher128, SipHasher13};

use chorus_schemas::EventRecord;

/// What to do with an event, by its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seen {
    /// Not seen within the window: apply it.
    New,
    /// Seen at `sequence` with the same payload: skip it.
    Duplicate { sequence: u64 },
    /// Seen at `sequence` with another payload: do not apply it; dead-letter it.
    Conflict { sequence: u64 },
}

/// Identities of the events of the last `window` sequences.
#[derive(Debug)]
pub(super) struct Identities {
    window: u64,
    /// SipHash keys of the identities.
    keys: (u64, u64),
    digest: ahash::RandomState,
    /// Identity → (sequence where it was applied, payload digest).
    by_identity: HashMap<u128, (u64, u64), BuildHasherDefault<AlreadyHashed>>,
    /// In sequence order, to forget what falls out of the window.
    order: VecDeque<(u64, u128)>,
}

impl Identities {
    /// Remembers the identities of `window` sequences (0 turns the check off).
    pub(super) fn new(window: u64) -> Self {
        Identities {
            window,
            keys: (random_u64(), random_u64()),
            digest: ahash::RandomState::new(),
            by_identity: HashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// How many sequences are remembered.
    pub(super) fn window(&self) -> u64 {
        self.window
    }

    /// Decides about the event stored at `sequence` and, when it is new, remembers it.
    pub(super) fn check(&mut self, sequence: u64, record: &EventRecord, payload: &[u8]) -> Seen {
        if self.window == 0 {
            return Seen::New;
        }
        self.forget_before(sequence.saturating_sub(self.window - 1));
        let key = self.identity(record);
        let digest = self.digest.hash_one(payload);
        match self.by_identity.get(&key) {
            Some(&(seen, d)) if d == digest => Seen::Duplicate { sequence: seen },
            Some(&(seen, _)) => Seen::Conflict { sequence: seen },
            None => {
                self.by_identity.insert(key, (sequence, digest));
                self.order.push_back((sequence, key));
                Seen::New
            }
        }
    }

    /// 128 bits naming `(source, id)`.
    fn identity(&self, record: &EventRecord) -> u128 {
        let mut hasher = SipHasher13::new_with_keys(self.keys.0, self.keys.1);
        (record.source.as_str(), record.id.as_str()).hash(&mut hasher);
        hasher.finish128().as_u128()
    }

    /// Forgets what was remembered for sequences below `first`.
    fn forget_before(&mut self, first: u64) {
        while let Some((sequence, _)) = self.order.front() {
            if *sequence >= first {
                break;
            }
            if let Some((sequence, key)) = self.order.pop_front() {
                if self.by_identity.get(&key).is_some_and(|(s, _)| *s == sequence) {
                    self.by_identity.remove(&key);
                }
            }
        }
    }

    /// Forgets everything (a rebuild starts from the stream's first message).
    pub(super) fn clear(&mut self) {
        self.by_identity.clear();
        self.order.clear();
    }

    /// Identities remembered now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.by_identity.len()
    }
}

/// 64 random bits, from the process's random hashing keys (std draws them from the OS): what
/// std's SipHash of a constant under fresh random keys gives is as unpredictable as they are.
fn random_u64() -> u64 {
    RandomState::new().hash_one(0x5eed_u64)
}

/// The map's hasher: its keys are already keyed hashes (secret per process), so they are
/// used as they are instead of being hashed a second time on every lookup, insert and
/// removal (a sixth of a projector's CPU went to hashing before).
#[derive(Default)]
struct AlreadyHashed(u64);

impl Hasher for AlreadyHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys reach this map; fold anything else in, should it ever.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = (key as u64) ^ ((key >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_schemas::lifecycle::Alive;

    fn record(id: &str) -> EventRecord {
        let mut r = EventRecord::new(Alive::new("n1", "server", "1.0", None), 1);
        r.id = id.into();
        r
    }

    /// Memory per remembered event, for docs/CONSUMERS.md: `cargo test --release -p
    /// chorus-consumers identities_memory -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn identities_memory() {
        let rss = || -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096
        };
        let n = 1_000_000u64;
        let records: Vec<EventRecord> = (0..1000).map(|i| record(&format!("{i}"))).collect();
        let before = rss();
        let mut ids = Identities::new(n);
        for i in 0..n {
            let mut r = records[(i % 1000) as usize].clone();
            r.id = format!("01a22e41-4dcf-76cd-8c6b-{i:012x}");
            ids.check(i + 1, &r, r.id.as_bytes());
        }
        let after = rss();
        println!("{} identities: {} bytes each", ids.len(), (after - before) / n);
    }

    #[test]
    fn repeats_and_conflicts_within_the_window() {
        let mut ids = Identities::new(3);
        assert_eq!(ids.check(1, &record("a"), b"one"), Seen::New);
        assert_eq!(ids.check(2, &record("a"), b"one"), Seen::Duplicate { sequence: 1 });
        assert_eq!(ids.check(3, &record("a"), b"changed"), Seen::Conflict { sequence: 1 });
        assert_eq!(ids.check(3, &record("b"), b"one"), Seen::New);
        // Sequence 1 falls out of the window (4 - 3 + 1 = 2 is the first remembered).
        assert_eq!(ids.check(4, &record("a"), b"one"), Seen::New);
        assert_eq!(ids.len(), 2);
        ids.clear();
        assert_eq!(ids.check(5, &record("b"), b"one"), Seen::New);
        let mut off = Identities::new(0);
        assert_eq!(off.check(1, &record("a"), b"one"), Seen::New);
        assert_eq!(off.check(2, &record("a"), b"one"), Seen::New);
    }
}
