//! Native JetStream sources: a stream on this server copying a stream of another JetStream
//! domain inside the servers (flow-controlled batches, no client publishes, no
//! acknowledgement per message), which is the fastest lossless copy NATS offers.
//!
//! The calls here speak the JetStream API as JSON: the stream's whole configuration is read
//! and written back with only its `sources` changed, so fields this client does not know
//! (set by an operator or a newer server) survive the update, and the source status includes
//! the server's `error`, which async-nats does not decode.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::JetStreamBackbone;
use crate::{BackboneError, Result, StreamConfig};

/// A stream of another domain to copy into a stream of this server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NativeSource {
    /// The source stream's name.
    pub stream: String,
    /// The JetStream API prefix that reaches the source from this server, e.g.
    /// `$JS.east.API` for a site in domain `east` behind a leafnode.
    pub api_prefix: String,
    /// The first source sequence to copy (used when the source is added).
    pub start_sequence: u64,
    /// Only the source's messages on this subject filter.
    pub filter_subject: Option<String>,
    /// Copy as the target stream's mirror (the same sequences; only into a stream made for
    /// it, with no subjects of its own) instead of as one of its sources. A mirror stores
    /// what it receives as it is, without the per-message work of a source (a new header,
    /// a dedupe lookup), and never stops at a duplicate id.
    pub mirror: bool,
    /// Subjects rewritten on the way (`from` filter, `to` mapping in NATS subject-mapping
    /// syntax): a source subject transform, which nats-server 2.10 and later apply. Only
    /// the source's messages matching `from` are copied.
    pub transform: Option<(String, String)>,
}

impl NativeSource {
    /// How the target server names this source in the `Nats-Stream-Source` header of what it
    /// copies: `<stream>:<hash of the API prefix>` (nats-server's 8-character base-62 digest
    /// of SHA-256), which tells apart same-named streams of different domains.
    pub fn origin(&self) -> String {
        use sha2::Digest;
        const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let digest = sha2::Sha256::digest(self.api_prefix.as_bytes());
        let hash: String = digest[..8].iter().map(|b| DIGITS[(*b % 62) as usize] as char).collect();
        format!("{}:{hash}", self.stream)
    }
}

/// How a configured source is doing, as the target server reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceStatus {
    /// Source messages not yet copied, as of the last delivery.
    pub lag: u64,
    /// Time since the source last delivered; none when it never did.
    pub active: Option<Duration>,
    /// The server's complaint about the source (unreachable, refused), if any.
    pub error: Option<String>,
}

/// A stream as seen through some API prefix (possibly another domain's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteStream {
    /// When the stream was created: tells one stream from another of the same name.
    pub created: String,
    /// Oldest sequence held.
    pub first_sequence: u64,
    /// Newest sequence stored.
    pub last_sequence: u64,
    /// Messages held.
    pub messages: u64,
}

/// The header nats-server stamps on every sourced message: `<source> <sequence> ...`.
pub const SOURCE_HEADER: &str = "Nats-Stream-Source";

/// The source sequence a `Nats-Stream-Source` header names (its second field, in both the
/// 2.9 and the 2.10+ layouts).
pub fn sourced_sequence(header: &str) -> Option<u64> {
    header.split_whitespace().nth(1)?.parse().ok()
}

impl JetStreamBackbone {
    /// The version of the server this client is connected to (`2.9.10`), if known yet.
    pub fn server_version(&self) -> Option<String> {
        let v = self.client.server_info().version;
        (!v.is_empty()).then_some(v)
    }

    /// The JetStream domain of the servers this backbone reaches (through its configured
    /// domain, if any); `None` when they run without one.
    pub async fn domain(&self) -> Result<Option<String>> {
        #[derive(Deserialize)]
        struct AccountInfo {
            #[serde(default)]
            domain: Option<String>,
        }
        let info: AccountInfo = self.api_call(&format!("{}.INFO", self.api_prefix()), Value::Null).await?;
        Ok(info.domain.filter(|d| !d.is_empty()))
    }

    /// The stream `stream` as this connection reaches it through `api_prefix`; `None` when
    /// nothing answers there or the stream does not exist.
    pub async fn remote_stream(&self, api_prefix: &str, stream: &str) -> Result<Option<RemoteStream>> {
        match self.api_call::<Value>(&format!("{api_prefix}.STREAM.INFO.{stream}"), Value::Null).await {
            Ok(info) => Ok(Some(RemoteStream {
                created: info["created"].as_str().unwrap_or_default().to_string(),
                first_sequence: info["state"]["first_seq"].as_u64().unwrap_or(0),
                last_sequence: info["state"]["last_seq"].as_u64().unwrap_or(0),
                messages: info["state"]["messages"].as_u64().unwrap_or(0),
            })),
            Err(BackboneError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes `target` copy `source`: creates the stream (as `target` says, plus the source)
    /// when it does not exist, or adds the source to the existing stream's configuration,
    /// everything else kept. A stream that already has the source is left as it is.
    /// Returns whether anything was changed.
    pub async fn add_source(&self, target: &StreamConfig, source: &NativeSource) -> Result<bool> {
        target.validate_copy()?;
        let prefix = self.api_prefix();
        let _guard = config_lock(&prefix, &target.name).lock_owned().await;
        let entry = source_entry(source);
        let info = match self.api_call::<Value>(&format!("{prefix}.STREAM.INFO.{}", target.name), Value::Null).await {
            Ok(info) => info,
            Err(BackboneError::NotFound { .. }) => {
                let mut config = serde_json::to_value(super::stream_config(target)).map_err(json_error)?;
                if source.mirror {
                    config["mirror"] = entry;
                    // A mirror keeps the source's sequences, so it never needs to remember
                    // ids (2.10+ would for a duplicate window, at a cost per message).
                    if let Some(c) = config.as_object_mut() {
                        c.remove("subjects");
                        c.remove("duplicate_window");
                    }
                } else {
                    config["sources"] = json!([entry]);
                }
                self.api_call::<Value>(&format!("{prefix}.STREAM.CREATE.{}", target.name), config).await?;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        if source.mirror {
            return if same_source(&info["config"]["mirror"], source) {
                Ok(false)
            } else {
                Err(BackboneError::Refused {
                    operation: format!("mirroring {} into {}", source.stream, target.name),
                    source: format!("stream {} exists and is not a mirror of {}", target.name, source.stream).into(),
                })
            };
        }
        let mut config = info["config"].clone();
        let sources = config["sources"].as_array().cloned().unwrap_or_default();
        if sources.iter().any(|s| same_source(s, source)) {
            return Ok(false);
        }
        let mut sources = sources;
        sources.push(entry);
        config["sources"] = Value::Array(sources);
        self.api_call::<Value>(&format!("{prefix}.STREAM.UPDATE.{}", target.name), config).await?;
        Ok(true)
    }

    /// Removes `source` from the stream `target` (the servers stop copying it); returns
    /// whether it was there.
    /// A mirror cannot be removed from its stream: `false`.
    pub async fn remove_source(&self, target: &str, source: &NativeSource) -> Result<bool> {
        if source.mirror {
            return Ok(false);
        }
        let prefix = self.api_prefix();
        let _guard = config_lock(&prefix, target).lock_owned().await;
        let info: Value = self.api_call(&format!("{prefix}.STREAM.INFO.{target}"), Value::Null).await?;
        let mut config = info["config"].clone();
        let sources = config["sources"].as_array().cloned().unwrap_or_default();
        let kept: Vec<Value> = sources.iter().filter(|s| !same_source(s, source)).cloned().collect();
        if kept.len() == sources.len() {
            return Ok(false);
        }
        config["sources"] = Value::Array(kept);
        self.api_call::<Value>(&format!("{prefix}.STREAM.UPDATE.{target}"), config).await?;
        Ok(true)
    }

    /// The status of `source` in the stream `target`; `None` when the stream does not
    /// source it (removed by an operator, or the stream recreated without it).
    pub async fn source_status(&self, target: &str, source: &NativeSource) -> Result<Option<SourceStatus>> {
        let info: Value = self.api_call(&format!("{}.STREAM.INFO.{target}", self.api_prefix()), Value::Null).await?;
        let (configured, reported) = if source.mirror {
            (same_source(&info["config"]["mirror"], source), vec![info["mirror"].clone()])
        } else {
            let configured =
                info["config"]["sources"].as_array().is_some_and(|s| s.iter().any(|s| same_source(s, source)));
            (configured, info["sources"].as_array().cloned().unwrap_or_default())
        };
        if !configured {
            return Ok(None);
        }
        let status = reported
            .iter()
            .find(|s| s["name"] == source.stream.as_str() && s["external"]["api"] == source.api_prefix.as_str())
            .map(|s| SourceStatus {
                lag: s["lag"].as_u64().unwrap_or(0),
                active: s["active"].as_i64().and_then(|n| u64::try_from(n).ok()).map(Duration::from_nanos),
                error: s.get("error").filter(|e| !e.is_null()).map(|e| {
                    serde_json::from_value::<ApiError>(e.clone()).map_or_else(|_| e.to_string(), |e| e.to_string())
                }),
            })
            .unwrap_or_default();
        Ok(Some(status))
    }

    /// Writes `config`'s subjects, limits, dedupe window and replicas over the stream's
    /// configuration as the server holds it, everything else kept (see `update_stream`).
    pub(super) async fn update_stream_fields(
        &self,
        config: &StreamConfig,
    ) -> Result<async_nats::jetstream::stream::Info> {
        let prefix = self.api_prefix();
        let _guard = config_lock(&prefix, &config.name).lock_owned().await;
        let info: Value = self.api_call(&format!("{prefix}.STREAM.INFO.{}", config.name), Value::Null).await?;
        let ours = serde_json::to_value(super::stream_config(config)).map_err(json_error)?;
        let mut current = info["config"].clone();
        for key in ["subjects", "max_msgs", "max_bytes", "max_age", "duplicate_window", "num_replicas"] {
            current[key] = ours[key].clone();
        }
        let updated: Value = self.api_call(&format!("{prefix}.STREAM.UPDATE.{}", config.name), current).await?;
        serde_json::from_value(updated).map_err(json_error)
    }

    /// The prefix of this backbone's own JetStream API (`$JS.API`, or `$JS.<domain>.API`).
    pub fn api_prefix(&self) -> String {
        match &self.domain {
            Some(d) => format!("$JS.{d}.API"),
            None => "$JS.API".into(),
        }
    }

    /// One JetStream API request and its answer: an API error becomes `NotFound` (code 404)
    /// or `Refused`; no responders or a timeout are transient NATS errors.
    async fn api_call<T: serde::de::DeserializeOwned>(&self, subject: &str, body: Value) -> Result<T> {
        let payload = if body.is_null() { Vec::new() } else { serde_json::to_vec(&body).map_err(json_error)? };
        let request = async_nats::client::Request::new().payload(payload.into()).timeout(Some(self.request_timeout));
        let reply = self
            .client
            .send_request(subject.to_string(), request)
            .await
            .map_err(|e| BackboneError::Nats { transient: true, source: Box::new(e) })?;
        let value: Value = serde_json::from_slice(&reply.payload).map_err(json_error)?;
        if let Some(error) = value.get("error") {
            let error: ApiError = serde_json::from_value(error.clone()).map_err(json_error)?;
            return Err(if error.code == 404 {
                BackboneError::NotFound { kind: "stream", name: subject.rsplit('.').next().unwrap_or_default().into() }
            } else {
                BackboneError::Refused { operation: subject.to_string(), source: Box::new(error) }
            });
        }
        serde_json::from_value(value).map_err(json_error)
    }
}

/// One lock per stream (by API prefix and name) for this process's read-modify-write
/// updates of its configuration: supervisors of sources into one stream, and stream edits,
/// do not lose each other's changes. (Writers in other processes are not covered.)
fn config_lock(prefix: &str, stream: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    locks.entry(format!("{prefix} {stream}")).or_default().clone()
}

/// An error the JetStream API answered with.
#[derive(Debug, Deserialize, thiserror::Error)]
#[error("{description} (code {code}, error code {err_code})")]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u32,
    #[serde(default)]
    description: String,
}

fn json_error(e: serde_json::Error) -> BackboneError {
    BackboneError::Nats { transient: false, source: Box::new(e) }
}

fn source_entry(s: &NativeSource) -> Value {
    let mut entry = json!({
        "name": s.stream,
        "external": { "api": s.api_prefix },
    });
    if s.start_sequence > 1 {
        entry["opt_start_seq"] = json!(s.start_sequence);
    }
    if let Some(f) = &s.filter_subject {
        entry["filter_subject"] = json!(f);
    }
    if let Some((from, to)) = &s.transform {
        entry["subject_transforms"] = json!([{ "src": from, "dest": to }]);
    }
    entry
}

/// Whether a configured source entry is `s` (same stream, API prefix, filter, transform).
fn same_source(entry: &Value, s: &NativeSource) -> bool {
    let transform = entry["subject_transforms"]
        .as_array()
        .and_then(|t| t.first())
        .map(|t| (t["src"].as_str().unwrap_or_default(), t["dest"].as_str().unwrap_or_default()));
    entry["name"] == s.stream.as_str()
        && entry["external"]["api"] == s.api_prefix.as_str()
        && entry["filter_subject"].as_str().filter(|f| !f.is_empty()) == s.filter_subject.as_deref()
        && transform == s.transform.as_ref().map(|(a, b)| (a.as_str(), b.as_str()))
}

/// Whether a server of `version` (`2.10.4`) applies subject transforms in sources (2.10+).
pub fn transforms_sources(version: &str) -> bool {
    at_least(version, (2, 10))
}

/// Whether a source on a server of `version` stops for good at a sourced message the stream
/// already holds under the same `Nats-Msg-Id`: nats-server 2.9 retries it forever (seen on
/// 2.9.10); 2.15.1 drops it and goes on (tested), as 2.10 and later are taken to.
pub fn sources_stop_at_duplicates(version: &str) -> bool {
    !at_least(version, (2, 10))
}

fn at_least(version: &str, wanted: (u32, u32)) -> bool {
    let mut parts = version.trim_start_matches('v').split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sourced_sequence_is_read_from_both_header_layouts() {
        assert_eq!(sourced_sequence("SRC:a1b2 42"), Some(42));
        assert_eq!(sourced_sequence("SRC 42 > >"), Some(42));
        assert_eq!(sourced_sequence("garbage"), None);
    }

    #[test]
    fn a_source_entry_is_recognised_whatever_the_server_added() {
        let s = NativeSource {
            stream: "S".into(),
            api_prefix: "$JS.east.API".into(),
            start_sequence: 5,
            filter_subject: None,
            mirror: false,
            transform: None,
        };
        let mut entry = source_entry(&s);
        assert_eq!(entry["opt_start_seq"], 5);
        entry["external"]["deliver"] = json!("");
        entry["filter_subject"] = json!("");
        assert!(same_source(&entry, &s));
        let other = NativeSource { api_prefix: "$JS.west.API".into(), ..s.clone() };
        assert!(!same_source(&entry, &other));
        let transformed = NativeSource { transform: Some(("a.>".into(), "b.>".into())), ..s.clone() };
        assert!(!same_source(&entry, &transformed));
        assert!(same_source(&source_entry(&transformed), &transformed));
    }

    #[test]
    fn subject_transforms_in_sources_start_with_2_10() {
        assert!(!transforms_sources("2.9.10"));
        assert!(transforms_sources("2.10.0"));
        assert!(transforms_sources("2.15.1"));
        assert!(!transforms_sources(""));
    }
}
