//! Which way a stream of a link is copied.
//!
//! A plain link (no rewrite, sampling, provenance or loop prevention) between two JetStream
//! domains is best copied by the servers themselves: a native source on the target stream
//! moves events in flow-controlled batches inside the servers, at the speed of a native
//! mirror, with no client publish and no dedupe id to remember per event. The replicator
//! then sets the source up and supervises it (`native`). Everything else (rewrites,
//! sampling, provenance, loop prevention, embedded stores, a target that cannot address the
//! source's domain) takes the replicator's own copier (`copy`).

use chorus_backbone::jetstream::{transforms_sources, JetStreamBackbone, NativeSource};
use chorus_backbone::subject::filter_covers;
use chorus_backbone::{Backbone, BackboneError, StreamConfig};

use crate::config::{CopyPath, EndpointConfig, LinkConfig, StreamLink};

/// The way chosen for one (link, stream), with what the operator is told about it.
pub(crate) enum Chosen {
    /// The replicator's copier; `why` says why not a native source.
    Copy { why: String },
    /// A native source on the target stream `target` (created from `create` when it does
    /// not exist), supervised by the replicator over the two `engines` (source, target).
    Native(Box<NativeChoice>),
}

/// What a native copy is made of.
pub(crate) struct NativeChoice {
    pub source: NativeSource,
    pub target: String,
    pub create: Option<StreamConfig>,
    pub note: String,
    /// The source's and the target's engines.
    pub engines: (JetStreamBackbone, JetStreamBackbone),
}

/// Why a link cannot be copied natively, from its configuration alone (empty = it can). A
/// link with one rewrite rule can, on servers that transform subjects in sources (2.10+);
/// [`choose`] checks the rest.
pub(crate) fn not_plain(link: &LinkConfig, s: &StreamLink) -> Vec<String> {
    let mut why = Vec::new();
    if !matches!(link.source, EndpointConfig::Nats(_)) || !matches!(link.target, EndpointConfig::Nats(_)) {
        why.push("an endpoint is an embedded store".to_string());
    }
    if s.rewrite.len() > 1 {
        why.push("subjects are rewritten by more than one rule".into());
    } else if !s.rewrite.is_empty() && !s.filter_subjects.is_empty() {
        why.push("subjects are rewritten and filtered".into());
    }
    if link.sampling.is_some() {
        why.push("alive events are sampled".into());
    }
    if link.source_site.is_some() {
        why.push("source_site provenance is stamped".into());
    }
    if link.target_site.is_some() {
        why.push("target_site loop prevention reads every event".into());
    }
    if s.filter_subjects.len() > 1 {
        why.push("more than one filter subject".into());
    }
    why
}

/// Decides how `s` is copied, given the backbones the link holds and the checkpoint it
/// resumes from. `Err` when it cannot be decided yet (a server unreachable, the source
/// stream not there yet, or `native` asked for but not possible), with the side at fault.
/// `sequenced`: the copier could append to the link's own target stream with sequenced
/// publishes, which `chorus bench replicate` measures faster than a transforming source, so
/// `auto` keeps rewrites there on the copier
/// (`source`, `target`, or `path`): retried.
pub(crate) async fn choose(
    link: &LinkConfig,
    s: &StreamLink,
    source: &dyn Backbone,
    target: &dyn Backbone,
    checkpoint: u64,
    sequenced: bool,
) -> Result<Chosen, (&'static str, String)> {
    if s.path == CopyPath::Copy {
        return Ok(Chosen::Copy { why: "path: copy is configured".into() });
    }
    let native = s.path == CopyPath::Native;
    let copy_or_wait = |why: String| if native { Err(("path", why)) } else { Ok(Chosen::Copy { why }) };
    let why = not_plain(link, s);
    if !why.is_empty() {
        return copy_or_wait(why.join(", "));
    }
    let (Some(src), Some(dst)) =
        (source.as_any().downcast_ref::<JetStreamBackbone>(), target.as_any().downcast_ref::<JetStreamBackbone>())
    else {
        return copy_or_wait("an endpoint is an embedded store".into());
    };
    let missing = |e: BackboneError| match e {
        BackboneError::NotFound { .. } => ("source", format!("stream {} does not exist yet", s.stream)),
        e => ("source", e.to_string()),
    };
    let own = src.remote_stream(&src.api_prefix(), &s.stream).await.map_err(missing)?;
    let Some(own) = own else { return Err(("source", format!("stream {} does not exist yet", s.stream))) };
    // A rewrite becomes the source's subject transform: the target's server must apply it,
    // and the rule must match every subject of the stream (a source copies only what its
    // transform matches, where the copier passes the rest unchanged).
    let transform = match s.rewrite.first() {
        None => None,
        Some(_) if sequenced && !native => {
            return Ok(Chosen::Copy {
                why: "subjects are rewritten into a stream the link owns: sequenced publishes (faster than a source \
                      transforming them, as chorus bench replicate measures)"
                    .into(),
            })
        }
        Some(rule) => {
            let version = dst.server_version().unwrap_or_default();
            if !transforms_sources(&version) {
                return copy_or_wait(format!(
                    "subjects are rewritten, and nats-server {version} at the target does not transform subjects in sources (2.10+)"
                ));
            }
            let subjects = source.stream_config(&s.stream).await.map_err(|e| ("source", e.to_string()))?.subjects;
            if let Some(uncovered) = subjects.iter().find(|f| !filter_covers(&rule.from, f)) {
                return copy_or_wait(format!(
                    "the rewrite rule {} does not cover the stream's subject {uncovered}",
                    rule.from
                ));
            }
            Some((rule.from.clone(), rule.to.clone()))
        }
    };
    let Some(domain) = src.domain().await.map_err(|e| ("source", e.to_string()))? else {
        return copy_or_wait(
            "the source's servers run JetStream without a domain, so the target cannot address them".into(),
        );
    };
    let api_prefix = format!("$JS.{domain}.API");
    match dst.remote_stream(&api_prefix, &s.stream).await {
        Ok(Some(seen)) if seen.created == own.created => {}
        Ok(Some(_)) => {
            return copy_or_wait(format!("through {api_prefix} the target reaches another stream named {}", s.stream))
        }
        Ok(None) => return copy_or_wait(format!("the target has no stream {} in domain {domain}", s.stream)),
        Err(e) => return copy_or_wait(format!("the target does not reach domain {domain} ({api_prefix}): {e}")),
    }
    let (target_name, create) = match &s.target_stream {
        Some(t) => (t.name.clone(), Some(t.clone())),
        None => match target.stream_config(&s.stream).await {
            Ok(_) => (s.stream.clone(), None),
            Err(BackboneError::NotFound { .. }) if native => {
                // A stream that only copies the source (a mirror): its limits, no subjects.
                let mut config = source.stream_config(&s.stream).await.map_err(|e| ("source", e.to_string()))?;
                config.subjects.clear();
                (s.stream.clone(), Some(config))
            }
            Err(BackboneError::NotFound { .. }) => {
                return Ok(Chosen::Copy {
                    why: format!("no target_stream is configured and the target has no stream {}", s.stream),
                })
            }
            Err(e) => return Err(("target", e.to_string())),
        },
    };
    let version = |b: &JetStreamBackbone| b.server_version().unwrap_or_else(|| "unknown".into());
    let mirror = transform.is_none() && create.as_ref().is_some_and(|c| c.subjects.is_empty());
    Ok(Chosen::Native(Box::new(NativeChoice {
        note: format!(
            "native {} of {} through {api_prefix} into {target_name}{} (nats-server {} at the target, {} at the source)",
            if mirror { "mirror" } else { "source" },
            s.stream,
            transform.as_ref().map(|(from, to)| format!(", subjects {from} → {to}")).unwrap_or_default(),
            version(dst),
            version(src)
        ),
        source: NativeSource {
            stream: s.stream.clone(),
            api_prefix,
            start_sequence: checkpoint + 1,
            filter_subject: s.filter_subjects.first().cloned(),
            mirror,
            transform,
        },
        target: target_name,
        create,
        engines: (src.clone(), dst.clone()),
    })))
}
