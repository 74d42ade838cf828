//! The platform's streams, provisioned the same way on every backbone.

use std::time::Duration;

use chorus_backbone::{Backbone, StreamConfig};

use crate::PlatformError;

/// Limits applied to the platform streams.
#[derive(Clone, Debug)]
pub struct StreamLimits {
    /// Replicas on a JetStream cluster (1 on a single server or the embedded store).
    pub replicas: usize,
    /// How long events are kept; unset keeps them until `max_bytes` is reached.
    pub max_age: Option<Duration>,
    /// Dedupe window: how long an event id is remembered (replicated copies, retries).
    pub dedupe_window: Duration,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits { replicas: 1, max_age: None, dedupe_window: Duration::from_secs(600) }
    }
}

/// The platform's streams as Chorus would create them with `limits`.
pub fn platform_streams(limits: &StreamLimits) -> Vec<StreamConfig> {
    chorus_schemas::subject::streams()
        .into_iter()
        .map(|(name, subjects)| {
            let mut cfg = StreamConfig::new(name, subjects.iter().map(|s| s.to_string()).collect());
            cfg.replicas = limits.replicas;
            cfg.max_age = limits.max_age;
            cfg.dedupe_window = limits.dedupe_window;
            cfg
        })
        .collect()
}

/// One way an existing stream differs from what Chorus would create: reported, never
/// applied (operators own their streams; `chorus streams edit` changes them on purpose).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDrift {
    /// The stream.
    pub stream: String,
    /// The setting (`replicas`, `max_age`, `max_bytes`, `max_messages`, `dedupe_window`,
    /// `subjects`).
    pub field: &'static str,
    /// What the stream has.
    pub existing: String,
    /// What Chorus would have created.
    pub chorus: String,
}

impl std::fmt::Display for StreamDrift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stream {} has {} {} (Chorus would create {})", self.stream, self.field, self.existing, self.chorus)
    }
}

/// The differences between an existing stream and what Chorus would create. Limits and
/// replicas an operator chose are differences to report; subjects missing from the stream
/// matter more (events on them are not stored), extra subjects are fine.
pub fn drift(existing: &StreamConfig, wanted: &StreamConfig) -> Vec<StreamDrift> {
    let mut out = Vec::new();
    let mut differ = |field, existing: String, chorus: String| {
        if existing != chorus {
            out.push(StreamDrift { stream: wanted.name.clone(), field, existing, chorus });
        }
    };
    let age = |a: Option<Duration>| a.map_or("unlimited".to_string(), |a| humantime::format_duration(a).to_string());
    let limit = |v: u64| if v == 0 { "unlimited".to_string() } else { v.to_string() };
    differ("replicas", existing.replicas.to_string(), wanted.replicas.to_string());
    differ("max_age", age(existing.max_age), age(wanted.max_age));
    differ("max_bytes", limit(existing.max_bytes), limit(wanted.max_bytes));
    differ("max_messages", limit(existing.max_messages), limit(wanted.max_messages));
    differ(
        "dedupe_window",
        humantime::format_duration(existing.dedupe_window).to_string(),
        humantime::format_duration(wanted.dedupe_window).to_string(),
    );
    let missing = missing_subjects(existing, wanted);
    if !missing.is_empty() {
        differ("subjects", format!("{:?}", existing.subjects), format!("{:?} (missing {missing:?})", wanted.subjects));
    }
    out
}

/// The subjects of `wanted` that no subject filter of `existing` covers: events on them are
/// not stored in `existing`.
pub fn missing_subjects(existing: &StreamConfig, wanted: &StreamConfig) -> Vec<String> {
    wanted
        .subjects
        .iter()
        .filter(|w| !existing.subjects.iter().any(|x| chorus_backbone::subject::filter_covers(x, w)))
        .cloned()
        .collect()
}

/// Which stream holds each platform stream's subjects on one backbone: Chorus's own
/// (`CHORUS_LIFECYCLE`), one that already captured them (Choria Streams' `CHORIA_EVENTS`
/// captures `choria.lifecycle.>`), or one an operator named. Components read through it,
/// so a Chorus component sits beside a Choria broker's streams instead of fighting them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamMap(std::collections::BTreeMap<String, String>);

impl Default for StreamMap {
    /// Every platform stream under its own name.
    fn default() -> Self {
        StreamMap(chorus_schemas::subject::streams().iter().map(|(n, _)| (n.to_string(), n.to_string())).collect())
    }
}

impl StreamMap {
    /// The stream that holds `platform`'s subjects (`platform` itself when unmapped).
    pub fn get<'a>(&'a self, platform: &'a str) -> &'a str {
        self.0.get(platform).map_or(platform, String::as_str)
    }

    /// The same map with `platform`'s subjects read from `stream`.
    pub fn with(mut self, platform: impl Into<String>, stream: impl Into<String>) -> Self {
        self.0.insert(platform.into(), stream.into());
        self
    }

    /// Parses `PLATFORM=STREAM` (as `--use-stream` takes it).
    pub fn parse_entry(text: &str) -> Result<(String, String), String> {
        let (platform, stream) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected PLATFORM=STREAM"))?;
        let known: Vec<&str> = chorus_schemas::subject::streams().iter().map(|(n, _)| *n).collect();
        if !known.contains(&platform) {
            return Err(format!("{platform:?} is not a platform stream ({})", known.join(", ")));
        }
        if stream.is_empty() {
            return Err(format!("{text:?}: no stream named"));
        }
        Ok((platform.to_string(), stream.to_string()))
    }
}

/// The platform streams as found (and made) on a backbone.
#[derive(Clone, Debug)]
pub struct PlatformStreams {
    /// Which stream holds each platform stream's subjects.
    pub streams: StreamMap,
    /// How the streams used differ from what Chorus would create (reported, never applied).
    pub drifts: Vec<StreamDrift>,
    /// Platform streams with no stream at all (only when not creating).
    pub missing: Vec<String>,
}

impl PlatformStreams {
    /// The stream that holds `platform`'s subjects, `None` when there is none.
    pub fn holding<'a>(&'a self, platform: &'a str) -> Option<&'a str> {
        (!self.missing.iter().any(|m| m == platform)).then(|| self.streams.get(platform))
    }
}

/// Creates the lifecycle, machine, RPC, audit, registration and dead-letter streams that
/// are missing. A stream that already captures a platform stream's subjects (Choria's, or
/// one named in `overrides`) is used instead, so creating never fails on an overlap it could
/// use. Existing streams are never changed (replicas, limits, retention): how each differs
/// from what Chorus would create is logged and returned.
pub async fn ensure_platform_streams(
    b: &dyn Backbone,
    limits: &StreamLimits,
) -> Result<PlatformStreams, PlatformError> {
    resolve_platform_streams(b, limits, &StreamMap::default(), true).await
}

/// Finds which stream holds each platform stream's subjects: the one named in `overrides`
/// when it differs from the platform name, else the platform stream itself, else the
/// existing stream that captures most of its subjects; creates what is still missing when
/// `create` (else lists it in [`PlatformStreams::missing`]). What is used is logged.
pub async fn resolve_platform_streams(
    b: &dyn Backbone,
    limits: &StreamLimits,
    overrides: &StreamMap,
    create: bool,
) -> Result<PlatformStreams, PlatformError> {
    let mut existing = b.streams().await?;
    let mut out = PlatformStreams { streams: StreamMap::default(), drifts: Vec::new(), missing: Vec::new() };
    for wanted in platform_streams(limits) {
        let named = overrides.get(&wanted.name);
        let found = if named != wanted.name {
            match existing.iter().find(|s| s.name == named) {
                Some(s) => Some(s.clone()),
                None => {
                    return Err(PlatformError::Streams(format!(
                        "stream {named} (configured for {}'s subjects) does not exist",
                        wanted.name
                    )))
                }
            }
        } else {
            capturing(&existing, &wanted).cloned()
        };
        let used = match found {
            Some(s) => s,
            None if create => {
                b.ensure_stream(&wanted).await?;
                existing.push(wanted.clone());
                wanted.clone()
            }
            None => {
                out.missing.push(wanted.name.clone());
                continue;
            }
        };
        if used.name != wanted.name {
            tracing::info!("{}'s subjects are captured by stream {}: using it", wanted.name, used.name);
            out.streams = out.streams.with(wanted.name.clone(), used.name.clone());
        }
        for d in drift(&used, &wanted) {
            if d.field == "subjects" {
                tracing::warn!("{d}: events on the missing subjects are not stored there");
            } else {
                tracing::info!("{d}: left as it is (change it with `chorus streams edit`)");
            }
            out.drifts.push(d);
        }
    }
    Ok(out)
}

/// The existing stream for `wanted`'s subjects: the one of its name, else the one that
/// captures most of them (ties: by name).
pub fn capturing<'a>(existing: &'a [StreamConfig], wanted: &StreamConfig) -> Option<&'a StreamConfig> {
    if let Some(own) = existing.iter().find(|s| s.name == wanted.name) {
        return Some(own);
    }
    let score = |s: &StreamConfig| {
        let covered = wanted.subjects.len() - missing_subjects(s, wanted).len();
        let overlaps =
            wanted.subjects.iter().any(|w| s.subjects.iter().any(|x| chorus_backbone::subject::filters_overlap(x, w)));
        (covered, overlaps)
    };
    existing
        .iter()
        .map(|s| (score(s), s))
        .filter(|((_, overlaps), _)| *overlaps)
        .max_by(|(a, sa), (b, sb)| a.cmp(b).then_with(|| sb.name.cmp(&sa.name)))
        .map(|(_, s)| s)
}
