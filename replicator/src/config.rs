//! Typed configuration of `chorus replicate --config FILE` (YAML).
//!
//! ```yaml
//! state_dir: /var/lib/chorus/replicator
//! listen: 127.0.0.1:9180            # /metrics and /healthz
//! links:
//!   - name: east-to-hub
//!     source: { nats: { servers: ["nats://east:4222"] } }
//!     target: { nats: { servers: ["nats://hub:4222"] } }
//!     source_site: east              # stamped on events that carry no site
//!     target_site: hub               # events that came from the hub are not sent back
//!     streams:
//!       - stream: CHORUS_LIFECYCLE
//!         rewrite:
//!           - { from: "choria.lifecycle.>", to: "sites.east.choria.lifecycle.>" }
//!       - stream: CHORUS_AUDIT
//!     sampling: { interval: 10m }    # alive events: one per node per 10 minutes
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_backbone::embedded::EmbeddedConfig;
use chorus_backbone::jetstream::NatsConfig;
use chorus_backbone::StreamConfig;
use serde::{Deserialize, Serialize};

use chorus_runtime::{Config, ConfigError};

use crate::error::Result;
use crate::rewrite::{Rewrite, RewriteRule};

/// The whole replicator process.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicatorConfig {
    /// Where checkpoints are kept; must survive restarts.
    pub state_dir: PathBuf,
    /// Address of the `/metrics` and `/healthz` endpoint; none when unset.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// The links to run; at least one, names unique.
    pub links: Vec<LinkConfig>,
    /// Run as one of several instances of which only the elected leader copies; the
    /// election and the checkpoints are kept on the first link's target.
    #[serde(default)]
    pub election: Option<chorus_platform::election::ElectionConfig>,
}

/// One source backbone copied into one target backbone. Many sites into one hub is one link
/// per site, all with the same target.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Names the link in metrics and checkpoints: letters, digits, `-`, `_`.
    pub name: String,
    /// Backbone the events are read from.
    #[serde(with = "serde_yaml::with::singleton_map")]
    #[schemars(with = "EndpointConfig")]
    pub source: EndpointConfig,
    /// Backbone the events are copied into.
    #[serde(with = "serde_yaml::with::singleton_map")]
    #[schemars(with = "EndpointConfig")]
    pub target: EndpointConfig,
    /// Site stamped as provenance (the CloudEvents `site` extension) on copied events that
    /// carry none. Events that carry one keep it.
    #[serde(default)]
    pub source_site: Option<String>,
    /// The target's site: events whose provenance is this site are not copied, which breaks
    /// the loop of a two-way (site ⇄ hub) setup.
    #[serde(default)]
    pub target_site: Option<String>,
    /// Streams this link copies; at least one.
    pub streams: Vec<StreamLink>,
    /// Samples events on the configured subjects (alive events by default); unset = every event is copied.
    #[serde(default)]
    pub sampling: Option<SamplingConfig>,
    /// Most events per target publish batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Longest wait between retries of a failing source or target.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
}

fn default_batch() -> usize {
    2048
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(10)
}

/// A backbone to read from or write to.
// Held once per link end; boxing the larger variant would only complicate matching on it.
#[allow(clippy::large_enum_variant)]
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EndpointConfig {
    /// NATS JetStream (the production and multi-site engine).
    Nats(NatsConfig),
    /// An embedded store directory (e.g. a node's outbox, copied while its agent is stopped,
    /// or a zero-setup hub).
    Embedded(EmbeddedConfig),
}

/// One stream copied by a link.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamLink {
    /// Source stream name.
    pub stream: String,
    /// Only these subjects of the source stream (empty = all).
    #[serde(default)]
    pub filter_subjects: Vec<String>,
    /// Subject rewrites applied before publishing; the first matching rule wins.
    #[serde(default)]
    pub rewrite: Vec<RewriteRule>,
    /// Created on the target when it has no stream of that name (an existing one is left
    /// as it is); otherwise the target must already have a stream capturing the
    /// (rewritten) subjects.
    #[serde(default)]
    pub target_stream: Option<StreamConfig>,
    /// How the stream is copied; `auto` by default (see [`CopyPath`]).
    #[serde(default)]
    pub path: CopyPath,
}

/// How a stream of a link is copied.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyPath {
    /// A native JetStream source where the link is plain (no rewrite, sampling, provenance
    /// or loop prevention; at most one filter subject; JetStream at both ends) and the
    /// target's servers reach the source stream through its JetStream domain; the copier
    /// otherwise. The replicator says which, and why, when the link starts.
    #[default]
    Auto,
    /// Always the replicator's own copier (read, prepare, publish with ids, checkpoint).
    Copy,
    /// Always a native source supervised by the replicator; the link fails (and says why)
    /// when the target cannot reach the source through its domain.
    Native,
}

/// Sampling of alive events.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    /// At most one event per node per this interval, unless a field changed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// Subjects sampled.
    #[serde(default = "default_sampled")]
    pub subjects: Vec<String>,
}

fn default_sampled() -> Vec<String> {
    vec!["choria.lifecycle.event.alive.>".into()]
}

impl ReplicatorConfig {
    /// Reads and validates a YAML file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(chorus_runtime::config::load(path)?)
    }

    /// Parses and validates YAML text.
    pub fn from_yaml(text: &str) -> Result<Self> {
        Ok(chorus_runtime::config::from_text(text)?)
    }
}

impl Config for ReplicatorConfig {
    /// Rejects what would fail later, naming the field.
    fn validate(&self) -> std::result::Result<(), ConfigError> {
        if self.links.is_empty() {
            return Err(ConfigError::invalid("links", "must not be empty"));
        }
        let mut names = std::collections::HashSet::new();
        for (i, link) in self.links.iter().enumerate() {
            let at = |field: &str| format!("links[{i}].{field}");
            if link.name.is_empty() || !link.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(ConfigError::invalid(
                    at("name"),
                    format!("{:?} must be letters, digits, '-' or '_'", link.name),
                ));
            }
            if !names.insert(&link.name) {
                return Err(ConfigError::invalid(at("name"), format!("duplicate link name {:?}", link.name)));
            }
            if link.streams.is_empty() {
                return Err(ConfigError::invalid(at("streams"), "must not be empty"));
            }
            if link.batch == 0 || link.batch > 100_000 {
                return Err(ConfigError::invalid(at("batch"), "must be 1..=100000"));
            }
            for (field, site) in [("source_site", &link.source_site), ("target_site", &link.target_site)] {
                if let Some(site) = site {
                    chorus_schemas::subject::validate_token("site", site)
                        .map_err(|e| ConfigError::invalid(at(field), &e).with_source(e))?;
                }
            }
            if let EndpointConfig::Nats(n) = &link.source {
                n.validate().map_err(|e| e.within(&at("source.nats")))?;
            }
            if let EndpointConfig::Nats(n) = &link.target {
                n.validate().map_err(|e| e.within(&at("target.nats")))?;
            }
            for (j, s) in link.streams.iter().enumerate() {
                let at = |field: &str| at(&format!("streams[{j}].{field}"));
                for f in &s.filter_subjects {
                    chorus_backbone::subject::validate_filter(f)
                        .map_err(|e| ConfigError::invalid(at("filter_subjects"), &e).with_source(e))?;
                }
                for r in &s.rewrite {
                    Rewrite::new(r).map_err(|e| ConfigError::invalid(at("rewrite"), &e).with_source(e))?;
                }
                if let Some(t) = &s.target_stream {
                    // A target that captures no subjects is made as a mirror: native links only.
                    let copied = s.path == CopyPath::Copy || !crate::path::not_plain(link, s).is_empty();
                    let checked = if copied { t.validate() } else { t.validate_copy() };
                    checked.map_err(|e| ConfigError::invalid(at("target_stream"), &e).with_source(e))?;
                }
                if s.path == CopyPath::Native {
                    if let Some(why) = crate::path::not_plain(link, s).into_iter().next() {
                        return Err(ConfigError::invalid(at("path"), format!("native needs a plain link, but {why}")));
                    }
                }
            }
            if let Some(s) = &link.sampling {
                if s.interval.is_zero() {
                    return Err(ConfigError::invalid(at("sampling.interval"), "must be > 0"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_documented_example() {
        let text = r#"
state_dir: /tmp/r
listen: 127.0.0.1:9180
links:
  - name: east-to-hub
    source: { nats: { servers: ["nats://east:4222"] } }
    target: { embedded: { path: /tmp/hub } }
    source_site: east
    target_site: hub
    streams:
      - stream: CHORUS_LIFECYCLE
        rewrite:
          - { from: "choria.lifecycle.>", to: "sites.east.choria.lifecycle.>" }
      - stream: CHORUS_AUDIT
    sampling: { interval: 10m }
"#;
        let c = ReplicatorConfig::from_yaml(text).unwrap();
        assert_eq!(c.links[0].batch, 2048);
        assert_eq!(c.links[0].sampling.as_ref().unwrap().subjects, vec!["choria.lifecycle.event.alive.>"]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = ReplicatorConfig::from_yaml("state_dir: x\nlinks: []\n").unwrap_err();
        assert!(e.to_string().contains("links"), "{e}");
        let e = ReplicatorConfig::from_yaml(
            "state_dir: x\nlinks:\n  - name: a\n    source: {embedded: {path: a}}\n    target: {embedded: {path: b}}\n    streams: [{stream: S, rewrite: [{from: 'a.*', to: 'b.>'}]}]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("streams[0].rewrite"), "{e}");
        let e = ReplicatorConfig::from_yaml("state_dir: x\nbogus: 1\nlinks: []\n").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
