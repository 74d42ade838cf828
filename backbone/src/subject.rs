//! NATS subject rules, shared by both engines so a filter means the same everywhere.
//!
//! Subjects are dot-separated tokens; in filters `*` matches one token and `>` matches one or
//! more trailing tokens, exactly as in NATS.

use crate::{BackboneError, Result};

/// Whether `subject` (a concrete subject) matches `filter` (which may hold wildcards). The
/// one matcher of Chorus: streams, consumers, RPC and the schemas' own checks all use it. A
/// filter with tokens after `>` is invalid in NATS and matches nothing here.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut f = filter.split('.');
    let mut s = subject.split('.');
    loop {
        match (f.next(), s.next()) {
            (Some(">"), Some(_)) => return f.next().is_none(),
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether two subject filters can match a common subject (streams must not share one).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let (mut ta, mut tb) = (a.split('.'), b.split('.'));
    loop {
        match (ta.next(), tb.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every subject `inner` matches is also matched by `outer` (`choria.lifecycle.>`
/// covers `choria.lifecycle.event.>`, not the other way round).
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    let (mut to, mut ti) = (outer.split('.'), inner.split('.'));
    loop {
        match (to.next(), ti.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(x), Some(y)) if x == y && x != "*" && x != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `filter` matches any of `filters` (an empty list matches everything).
pub fn matches_any(filters: &[String], subject: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| matches(f, subject))
}

/// What is wrong with `subject` as NATS sees it, or `None` when it is valid. `wildcards`
/// allows `*` and `>` as whole tokens (filters); publish subjects take none.
pub fn problem(subject: &str, wildcards: bool) -> Option<&'static str> {
    if subject.is_empty() {
        return Some("is empty");
    }
    // On every publish: an ASCII subject (nearly all) is checked in one pass over its bytes.
    if subject.is_ascii() {
        return ascii_problem(subject.as_bytes(), wildcards);
    }
    general_problem(subject, wildcards)
}

/// [`problem`] for any subject, token by token.
fn general_problem(subject: &str, wildcards: bool) -> Option<&'static str> {
    let mut tokens = subject.split('.').peekable();
    while let Some(t) = tokens.next() {
        if t.is_empty() {
            return Some("has an empty token");
        }
        if t.chars().any(|c| c.is_whitespace()) {
            return Some("contains white space");
        }
        let wild = t == "*" || t == ">";
        if !wildcards && (t.contains('*') || t.contains('>')) {
            return Some("wildcards are not allowed here");
        }
        if wildcards && !wild && (t.contains('*') || t.contains('>')) {
            return Some("a wildcard must be a whole token");
        }
        if t == ">" && tokens.peek().is_some() {
            return Some("'>' must be the last token");
        }
    }
    None
}

/// [`problem`] for an ASCII subject: the same answers, one pass.
fn ascii_problem(subject: &[u8], wildcards: bool) -> Option<&'static str> {
    let mut start = 0;
    for end in 0..=subject.len() {
        if end < subject.len() && subject[end] != b'.' {
            let b = subject[end];
            if (b as char).is_whitespace() {
                return Some("contains white space");
            }
            continue;
        }
        let token = &subject[start..end];
        if token.is_empty() {
            return Some("has an empty token");
        }
        if token.iter().any(|&b| b == b'*' || b == b'>') {
            let wild = token == b"*" || token == b">";
            if !wildcards {
                return Some("wildcards are not allowed here");
            }
            if !wild {
                return Some("a wildcard must be a whole token");
            }
            if token == b">" && end != subject.len() {
                return Some("'>' must be the last token");
            }
        }
        start = end + 1;
    }
    None
}

fn validate_tokens(subject: &str, wildcards: bool) -> Result<()> {
    match problem(subject, wildcards) {
        None => Ok(()),
        Some(why) => Err(BackboneError::InvalidMessage(format!("subject {subject:?}: {why}"))),
    }
}

/// Checks a subject a message is published to (no wildcards).
pub fn validate_publish_subject(subject: &str) -> Result<()> {
    validate_tokens(subject, false)
}

/// Checks a stream or consumer subject filter (wildcards allowed).
pub fn validate_filter(filter: &str) -> Result<()> {
    validate_tokens(filter, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ascii_check_answers_as_the_general_one() {
        let alphabet = ["a", "b", ".", "*", ">", " ", "\t", "\x0b", "-", "_"];
        let mut subjects = vec![String::new()];
        for _ in 0..5 {
            let longer: Vec<String> =
                subjects.iter().flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}"))).collect();
            subjects.extend(longer);
            subjects.dedup();
        }
        for s in &subjects {
            for wildcards in [false, true] {
                assert_eq!(ascii_problem(s.as_bytes(), wildcards), general_problem(s, wildcards), "{s:?} {wildcards}");
            }
        }
    }

    #[test]
    fn overlapping_and_covering_filters() {
        assert!(filters_overlap("a.>", "a.b.c"));
        assert!(filters_overlap("a.*.c", "a.b.*"));
        assert!(!filters_overlap("a.b", "a.c"));
        assert!(!filters_overlap("a.b", "a.b.c"));
        assert!(filters_overlap(">", "x"));
        assert!(filter_covers("choria.lifecycle.>", "choria.lifecycle.event.>"));
        assert!(filter_covers("choria.lifecycle.>", "choria.lifecycle.>"));
        assert!(!filter_covers("choria.lifecycle.event.>", "choria.lifecycle.>"));
        assert!(filter_covers("a.*.c", "a.b.c"));
        assert!(!filter_covers("a.b.c", "a.*.c"));
        assert!(!filter_covers("a.*", "a.>"));
        assert!(filter_covers(">", "a.>"));
    }

    #[test]
    fn wildcards_match_like_nats_for_rpc_subjects() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(!matches("a.*.c", "a.x.y.c"));
        assert!(matches("a.>", "a.b"));
        assert!(matches("a.>", "a.b.c.d"));
        assert!(!matches("a.>", "a"));
        assert!(matches("choria.node.>", "choria.node.n1.example.net"));
        assert!(!matches("choria.node.*", "choria.node.n1.example.net"));
    }

    #[test]
    fn wildcard_matching_follows_nats() {
        assert!(matches("choria.lifecycle.>", "choria.lifecycle.event.alive.server"));
        assert!(!matches("choria.lifecycle.>", "choria.lifecycle"));
        assert!(matches("choria.lifecycle.event.*.server", "choria.lifecycle.event.alive.server"));
        assert!(!matches("choria.lifecycle.event.*.server", "choria.lifecycle.event.alive.other"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(matches("a.*.c", "a.x.c"));
        assert!(matches(">", "a"));
        assert!(!matches("choria.machine.transition", "choria.machine.transition.x"));
        assert!(matches("chorus.audit.deny.*", "chorus.audit.deny.london"));
        // Invalid in NATS: tokens after '>' match nothing.
        assert!(!matches("a.>.c", "a.b.c"));
    }

    #[test]
    fn subjects_are_validated() {
        assert!(validate_publish_subject("a.b.c").is_ok());
        assert!(validate_publish_subject("a..c").is_err());
        assert!(validate_publish_subject("a.*").is_err());
        assert!(validate_publish_subject("a b").is_err());
        assert!(validate_filter("a.>").is_ok());
        assert!(validate_filter("a.>.b").is_err());
        assert!(validate_filter("a.b*").is_err());
    }
}
