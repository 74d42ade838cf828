//! Typed configuration of the audit exporter (YAML or JSON), with defaults and validation.
//!
//! ```yaml
//! consumer: audit-export            # durable consumer name, one per stream
//! streams: [CHORUS_AUDIT, CHORUS_RPC]
//! batch_size: 100
//! backoff: { initial: 200ms, max: 30s, multiplier: 2 }
//! sink:
//!   kind: syslog                    # syslog | hec | jsonl
//!   address: siem.example.net:6514
//!   tls: { ca_file: /etc/chorus/siem-ca.pem }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use chorus_backbone::jetstream::NatsConfig;
use chorus_backbone::{ConsumerConfig, StartPosition};
use chorus_schemas::subject::{CHORUS_AUDIT, CHORUS_RPC};
use serde::{Deserialize, Serialize};

use chorus_runtime::{Config, ConfigError};

/// Everything the exporter needs: where to read, how to batch and retry, where to write.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Durable consumer name, used on every stream (default `audit-export`). Also the origin
    /// of dead letters: `chorus.deadletter.<consumer>`.
    #[serde(default = "default_consumer")]
    pub consumer: String,
    /// Streams to export (default `CHORUS_AUDIT` and `CHORUS_RPC`).
    #[serde(default = "default_streams")]
    pub streams: Vec<String>,
    /// Where a consumer starts when it is first created (default: the first stored message).
    #[serde(default)]
    pub start: StartPosition,
    /// Records per batch handed to the sink (default 100).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long one fetch waits for new records (default 1s).
    #[serde(default = "default_fetch_wait", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub fetch_wait: Duration,
    /// How long the backbone waits for an acknowledgement before it redelivers (default 60s).
    /// Records are acknowledged only once the sink accepted them.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ack_wait: Duration,
    /// Retry pacing while the SIEM (or the backbone) is unavailable.
    #[serde(default)]
    pub backoff: Backoff,
    /// What goes into the syslog HOSTNAME and HEC `host`: the node identity (default) or the
    /// event's site (falling back to the identity when the event has none).
    #[serde(default)]
    pub hostname: HostnameSource,
    /// The backbone to read from. `chorus audit-export` uses this when set; otherwise its
    /// `--nats` URL list or an embedded store.
    #[serde(default)]
    pub nats: Option<NatsConfig>,
    /// What each record says: `cloudevents` (default: the stored CloudEvent), `ocsf` or
    /// `ecs`; see docs/CONSUMERS.md, "Formats".
    #[serde(default)]
    pub format: super::format::Format,
    /// Where the records go.
    pub sink: SinkConfig,
}

fn default_consumer() -> String {
    "audit-export".into()
}
fn default_streams() -> Vec<String> {
    vec![CHORUS_AUDIT.into(), CHORUS_RPC.into()]
}
fn default_batch_size() -> usize {
    100
}
fn default_fetch_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_ack_wait() -> Duration {
    Duration::from_secs(60)
}

/// Largest accepted `batch_size`.
pub const MAX_BATCH_SIZE: usize = 10_000;

pub use chorus_runtime::{Backoff, TlsClientConfig};

/// Source of the syslog HOSTNAME / HEC `host`.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostnameSource {
    /// The node identity (the CloudEvents `subject`: signer, sender or replying node).
    #[default]
    Identity,
    /// The event's `site` extension; the identity when it has none.
    Site,
}

/// The sink: one of syslog (TCP, or TLS when `tls` is set), Splunk HEC or a JSON lines file,
/// chosen by `kind`.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// RFC 5424 messages over TCP with RFC 6587 octet-counting framing; over TLS (RFC 5425)
    /// when `tls` is set.
    Syslog(SyslogConfig),
    /// Splunk HTTP Event Collector.
    Hec(HecConfig),
    /// One CloudEvent JSON per line, appended to a file and fsynced per batch.
    Jsonl(JsonlConfig),
}

/// By hand rather than derived: serde's internally tagged enums lose the path of an error
/// inside the variant, and `sink.facility: unknown variant` is what an operator needs to see.
impl<'de> Deserialize<'de> for SinkConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let kind = match map.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(_) => return Err(D::Error::custom("kind: must be one of syslog, hec, jsonl")),
            None => return Err(D::Error::custom("kind: missing (syslog, hec or jsonl)")),
        };
        fn inner<T: serde::de::DeserializeOwned, E: Error>(
            map: serde_json::Map<String, serde_json::Value>,
        ) -> Result<T, E> {
            chorus_runtime::config::from_value(serde_json::Value::Object(map)).map_err(E::custom)
        }
        match kind.as_str() {
            "syslog" => inner(map).map(SinkConfig::Syslog),
            "hec" => inner(map).map(SinkConfig::Hec),
            "jsonl" => inner(map).map(SinkConfig::Jsonl),
            other => Err(D::Error::custom(format_args!("kind: unknown sink {other:?}; expected syslog, hec or jsonl"))),
        }
    }
}

impl SinkConfig {
    /// Short name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Syslog(s) if s.tls.is_some() => "syslog-tls",
            SinkConfig::Syslog(_) => "syslog",
            SinkConfig::Hec(_) => "hec",
            SinkConfig::Jsonl(_) => "jsonl",
        }
    }
}

/// Syslog over TCP or TLS.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// Collector as `host:port` (RFC 5425 registers port 6514 for TLS).
    pub address: String,
    /// TLS towards the collector (RFC 5425); plain TCP when absent.
    #[serde(default)]
    pub tls: Option<TlsClientConfig>,
    /// Facility of every message (default `auth`).
    #[serde(default = "default_facility")]
    pub facility: Facility,
    /// Severity by decision.
    #[serde(default)]
    pub severity: SeverityMap,
    /// APP-NAME (default `chorus`): 1 to 48 printable ASCII characters.
    #[serde(default = "default_app_name")]
    pub app_name: String,
    /// SD-ID of the structured data element (default `chorus@32473`): `name@<private
    /// enterprise number>`, at most 32 printable ASCII characters without `=`, `]`, `"` or
    /// space. 32473 is the example number of RFC 5612; use your organisation's.
    #[serde(default = "default_sd_id")]
    pub sd_id: String,
    /// Give up one connection attempt after this long (default 10s).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Give up one batch write after this long (default 30s) and reconnect.
    #[serde(default = "default_write_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub write_timeout: Duration,
    /// Syslog has no application acknowledgement. A record is acknowledged to the backbone
    /// once the collector's TCP acknowledged every byte written so far and the connection
    /// was still open `settle` after the record was written (default 1s). Until then it is
    /// kept, and re-sent after a reconnect.
    #[serde(default = "default_settle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub settle: Duration,
    /// At most this many records written but not yet settled; the exporter waits for
    /// settling beyond it (default 10,000).
    #[serde(default = "default_max_unconfirmed")]
    pub max_unconfirmed: usize,
    /// Records whose message would be longer than this many bytes are dead-lettered instead
    /// of being truncated by the collector (rsyslog's `maxMessageSize`, 8k by default, must
    /// be raised to match). 0 (default) sends every record.
    #[serde(default)]
    pub max_message_bytes: usize,
}

fn default_facility() -> Facility {
    Facility::Auth
}
fn default_app_name() -> String {
    "chorus".into()
}
fn default_sd_id() -> String {
    "chorus@32473".into()
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_write_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_settle() -> Duration {
    Duration::from_secs(1)
}
fn default_max_unconfirmed() -> usize {
    10_000
}

impl SyslogConfig {
    /// Plain TCP to `address` with every other setting at its default.
    pub fn new(address: impl Into<String>) -> Self {
        SyslogConfig {
            address: address.into(),
            tls: None,
            facility: default_facility(),
            severity: SeverityMap::default(),
            app_name: default_app_name(),
            sd_id: default_sd_id(),
            connect_timeout: default_connect_timeout(),
            write_timeout: default_write_timeout(),
            settle: default_settle(),
            max_unconfirmed: default_max_unconfirmed(),
            max_message_bytes: 0,
        }
    }

    fn validate(&self) -> Result<(), String> {
        validate_address("sink.address", &self.address)?;
        if let Some(tls) = &self.tls {
            validate_tls(tls)?;
        }
        if self.app_name.is_empty() || self.app_name.len() > 48 || !self.app_name.bytes().all(is_print_ascii) {
            return Err(format!("sink.app_name {:?} must be 1 to 48 printable ASCII characters", self.app_name));
        }
        validate_sd_id(&self.sd_id)?;
        if self.connect_timeout.is_zero() || self.write_timeout.is_zero() {
            return Err("sink.connect_timeout and sink.write_timeout must be > 0".into());
        }
        if self.max_unconfirmed == 0 {
            return Err("sink.max_unconfirmed must be > 0".into());
        }
        Ok(())
    }
}

/// Checks the TLS section of a syslog or HEC sink: the shared settings, and no plain-text
/// fallback (only NATS URLs can ask for one).
fn validate_tls(tls: &TlsClientConfig) -> Result<(), String> {
    tls.validate().map_err(|e| e.within("sink").to_string())?;
    if !tls.required {
        return Err("sink.tls.required: only NATS connections can fall back to plain text".into());
    }
    if let Some(name) = &tls.server_name {
        if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            return Err(format!("sink.tls.server_name {name:?} is not a DNS name or IP address"));
        }
    }
    Ok(())
}

/// Syslog facility (RFC 5424 table 1).
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Facility {
    /// 0, kernel messages.
    Kern,
    /// 1, user-level messages.
    User,
    /// 2, mail system.
    Mail,
    /// 3, system daemons.
    Daemon,
    /// 4, security/authorization messages.
    Auth,
    /// 5, messages generated internally by syslogd.
    Syslog,
    /// 6, line printer subsystem.
    Lpr,
    /// 7, network news subsystem.
    News,
    /// 8, UUCP subsystem.
    Uucp,
    /// 9, clock daemon (cron).
    Cron,
    /// 10, security/authorization messages (private).
    Authpriv,
    /// 11, FTP daemon.
    Ftp,
    /// 12, NTP subsystem.
    Ntp,
    /// 13, log audit.
    Audit,
    /// 14, log alert.
    Alert,
    /// 15, clock daemon.
    Clock,
    /// 16, local use 0.
    Local0,
    /// 17, local use 1.
    Local1,
    /// 18, local use 2.
    Local2,
    /// 19, local use 3.
    Local3,
    /// 20, local use 4.
    Local4,
    /// 21, local use 5.
    Local5,
    /// 22, local use 6.
    Local6,
    /// 23, local use 7.
    Local7,
}

impl Facility {
    /// The numerical code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Syslog severity (RFC 5424 table 2).
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// 0, system is unusable.
    #[serde(alias = "emerg")]
    Emergency,
    /// 1, action must be taken immediately.
    Alert,
    /// 2, critical conditions.
    #[serde(alias = "crit")]
    Critical,
    /// 3, error conditions.
    #[serde(alias = "err")]
    Error,
    /// 4, warning conditions.
    #[serde(alias = "warn")]
    Warning,
    /// 5, normal but significant condition.
    Notice,
    /// 6, informational messages.
    #[serde(alias = "informational")]
    Info,
    /// 7, debug-level messages.
    Debug,
}

impl Severity {
    /// The numerical code.
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Severity of a record by the decision it carries.
#[derive(schemars::JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeverityMap {
    /// Allowed: an audit `allow`, an authorized RPC reply (default `info`).
    #[serde(default = "info")]
    pub allow: Severity,
    /// Denied: an audit `deny`, an RPC reply the node's policy refused (default `warning`).
    #[serde(default = "warning")]
    pub deny: Severity,
    /// An audit record with decision `unknown` (default `notice`).
    #[serde(default = "notice")]
    pub unknown: Severity,
    /// An RPC request, which carries no decision (default `info`).
    #[serde(default = "info")]
    pub request: Severity,
}

fn info() -> Severity {
    Severity::Info
}
fn warning() -> Severity {
    Severity::Warning
}
fn notice() -> Severity {
    Severity::Notice
}

impl Default for SeverityMap {
    fn default() -> Self {
        SeverityMap { allow: info(), deny: warning(), unknown: notice(), request: info() }
    }
}

/// Splunk HTTP Event Collector.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HecConfig {
    /// Base URL of the collector, e.g. `https://splunk.example.net:8088`; events are POSTed
    /// to `<url>/services/collector/event`.
    pub url: String,
    /// The HEC token (sent as `Authorization: Splunk <token>`). Give this or `token_file`.
    #[serde(default, skip_serializing)]
    pub token: Option<Secret>,
    /// A file holding the token (surrounding white space is ignored).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Splunk index; the token's default index when absent.
    #[serde(default)]
    pub index: Option<String>,
    /// HEC `source` (default `chorus`).
    #[serde(default = "default_source")]
    pub source: String,
    /// HEC `sourcetype`; by default `chorus:cloudevent`, `chorus:ocsf` or `chorus:ecs` after
    /// the export's `format`.
    #[serde(default)]
    pub sourcetype: Option<String>,
    /// TLS settings for an `https` URL (CA, client certificate, server name).
    #[serde(default)]
    pub tls: Option<TlsClientConfig>,
    /// Timeout of one request (default 30s).
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_source() -> String {
    "chorus".into()
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(30)
}

impl HecConfig {
    /// A collector at `url` with `token` and defaults for everything else.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        HecConfig {
            url: url.into(),
            token: Some(Secret(token.into())),
            token_file: None,
            index: None,
            source: default_source(),
            sourcetype: None,
            tls: None,
            timeout: default_http_timeout(),
        }
    }

    /// The token, from `token` or `token_file`.
    pub fn read_token(&self) -> Result<String, String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), None) => t.0.trim().to_owned(),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("sink.token_file {}: {e}", path.display()))?
                .trim()
                .to_owned(),
            _ => return Err("sink: give exactly one of token and token_file".into()),
        };
        if token.is_empty() || !token.bytes().all(is_print_ascii) {
            return Err("sink: the HEC token must be non-empty printable ASCII".into());
        }
        Ok(token)
    }

    fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| format!("sink.url {:?}: {e}", self.url))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(format!("sink.url {:?} must be an http or https URL with a host", self.url));
        }
        self.read_token()?;
        if let Some(tls) = &self.tls {
            validate_tls(tls)?;
        }
        if self.timeout.is_zero() {
            return Err("sink.timeout must be > 0".into());
        }
        Ok(())
    }
}

/// A secret string: never printed by `Debug`, never serialized back.
#[derive(Clone, Deserialize, schemars::JsonSchema)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// JSON lines file.
#[derive(schemars::JsonSchema, Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The file; created when missing, appended to otherwise.
    pub path: PathBuf,
}

impl ExportConfig {
    /// Defaults for everything but the sink.
    pub fn new(sink: SinkConfig) -> Self {
        ExportConfig {
            consumer: default_consumer(),
            streams: default_streams(),
            start: StartPosition::First,
            batch_size: default_batch_size(),
            fetch_wait: default_fetch_wait(),
            ack_wait: default_ack_wait(),
            backoff: Backoff::default(),
            hostname: HostnameSource::default(),
            nats: None,
            format: Default::default(),
            sink,
        }
    }

    /// Reads and validates a YAML (or JSON) file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        chorus_runtime::config::load(path)
    }

    /// Parses and validates YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        chorus_runtime::config::from_text(text)
    }

    fn check(&self) -> Result<(), String> {
        self.consumer_config().validate().map_err(|e| format!("consumer: {e}"))?;
        chorus_schemas::subject::validate_token("consumer", &self.consumer).map_err(|e| e.to_string())?;
        if self.streams.is_empty() {
            return Err("streams must list at least one stream".into());
        }
        for (i, s) in self.streams.iter().enumerate() {
            if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("streams[{i}]: {s:?} is not a stream name"));
            }
            if self.streams[..i].contains(s) {
                return Err(format!("streams[{i}]: {s} is listed twice"));
            }
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            return Err(format!("batch_size must be 1..={MAX_BATCH_SIZE}"));
        }
        if self.fetch_wait < Duration::from_millis(10) {
            return Err("fetch_wait must be >= 10ms".into());
        }
        self.backoff.validate("backoff").map_err(|e| e.to_string())?;
        if let Some(nats) = &self.nats {
            nats.validate().map_err(|e| e.within("nats").to_string())?;
        }
        match &self.sink {
            SinkConfig::Syslog(s) => {
                s.validate()?;
                if self.ack_wait <= s.settle * 2 {
                    return Err(format!(
                        "ack_wait ({:?}) must be longer than twice sink.settle ({:?}), or records are redelivered while they settle",
                        self.ack_wait, s.settle
                    ));
                }
            }
            SinkConfig::Hec(h) => h.validate()?,
            SinkConfig::Jsonl(j) => {
                if j.path.as_os_str().is_empty() {
                    return Err("sink.path must not be empty".into());
                }
            }
        }
        Ok(())
    }

    /// The durable consumer opened on each stream.
    pub fn consumer_config(&self) -> ConsumerConfig {
        let mut c =
            ConsumerConfig::new(self.consumer.clone()).with_start(self.start.clone()).with_ack_wait(self.ack_wait);
        // Enough for a full channel, a batch in hand and every record still settling.
        let unconfirmed = match &self.sink {
            SinkConfig::Syslog(s) => s.max_unconfirmed,
            _ => 0,
        };
        c.max_ack_pending = c.max_ack_pending.max(unconfirmed + 4 * self.batch_size);
        c
    }
}

impl Config for ExportConfig {
    /// Rejects settings that cannot work; the message starts with the field at fault.
    fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(ConfigError::message)
    }
}

fn is_print_ascii(b: u8) -> bool {
    (33..=126).contains(&b)
}

fn validate_address(field: &str, address: &str) -> Result<(), String> {
    let bad = || format!("{field} {address:?} must be host:port");
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.chars().any(char::is_whitespace) || !matches!(port.parse::<u16>(), Ok(p) if p != 0) {
        return Err(bad());
    }
    Ok(())
}

/// SD-NAME rules (RFC 5424 6.3.2): 1 to 32 printable ASCII characters except `=`, space,
/// `]` and `"`; a name that is not IANA-registered must have the form `name@<digits>`.
fn validate_sd_id(id: &str) -> Result<(), String> {
    let ok_chars =
        !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| is_print_ascii(b) && !matches!(b, b'=' | b']' | b'"'));
    let ok_form = match id.split_once('@') {
        Some((name, pen)) => {
            !name.is_empty() && !pen.is_empty() && pen.bytes().all(|b| b.is_ascii_digit()) && !pen.contains('@')
        }
        None => false,
    };
    if ok_chars && ok_form {
        Ok(())
    } else {
        Err(format!("sink.sd_id {id:?} must be name@<enterprise number>, at most 32 printable ASCII characters without '=', ']' or '\"'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_defaults() {
        let c = ExportConfig::from_yaml("sink:\n  kind: syslog\n  address: 127.0.0.1:514\n").unwrap();
        assert_eq!(c.consumer, "audit-export");
        assert_eq!(c.streams, vec!["CHORUS_AUDIT", "CHORUS_RPC"]);
        assert_eq!(c.batch_size, 100);
        let SinkConfig::Syslog(s) = &c.sink else { panic!("syslog") };
        assert_eq!(s.facility, Facility::Auth);
        assert_eq!(s.severity.deny, Severity::Warning);
        assert_eq!(s.sd_id, "chorus@32473");
        assert!(s.tls.is_none());
        assert_eq!(c.sink.kind(), "syslog");
    }

    #[test]
    fn full_yaml() {
        let c = ExportConfig::from_yaml(
            r#"
consumer: siem
streams: [CHORUS_AUDIT]
start: { from: new }
batch_size: 500
fetch_wait: 250ms
ack_wait: 2m
backoff: { initial: 100ms, max: 10s, multiplier: 3 }
hostname: site
sink:
  kind: syslog
  address: "[::1]:6514"
  facility: local4
  severity: { deny: notice, allow: info }
  app_name: chorus-aaa
  sd_id: audit@99999
  settle: 500ms
"#,
        )
        .unwrap();
        assert_eq!(c.start, StartPosition::New);
        assert_eq!(c.hostname, HostnameSource::Site);
        assert_eq!(c.backoff.delay(1), Duration::from_millis(100));
        assert_eq!(c.backoff.delay(2), Duration::from_millis(300));
        assert_eq!(c.backoff.delay(50), Duration::from_secs(10));
        let SinkConfig::Syslog(s) = &c.sink else { panic!("syslog") };
        assert_eq!((s.facility.code(), s.severity.deny.code(), s.severity.unknown.code()), (20, 5, 5));
    }

    #[test]
    fn hec_and_jsonl() {
        let c =
            ExportConfig::from_yaml("sink: {kind: hec, url: 'https://splunk:8088', token: abc-123, index: audit}\n")
                .unwrap();
        let SinkConfig::Hec(h) = &c.sink else { panic!("hec") };
        assert_eq!(h.read_token().unwrap(), "abc-123");
        assert!(!format!("{h:?}").contains("abc-123"), "the token must not be printed");
        let c = ExportConfig::from_yaml("sink: {kind: jsonl, path: /tmp/audit.jsonl}\n").unwrap();
        assert_eq!(c.sink.kind(), "jsonl");
    }

    #[test]
    fn errors_name_the_field() {
        let err = |yaml: &str| ExportConfig::from_yaml(yaml).unwrap_err().to_string();
        assert!(err("sink: {kind: syslog, address: nohost}").contains("sink.address"));
        assert!(err("sink: {kind: syslog, address: 'h:1', bogus: 1}").contains("bogus"));
        assert!(err("sink: {kind: syslog, address: 'h:1', facility: nope}").contains("facility"));
        assert!(err("sink: {kind: syslog, address: 'h:1', sd_id: 'chorus'}").contains("sd_id"));
        assert!(err("sink: {kind: syslog, address: 'h:1', sd_id: 'a b@1'}").contains("sd_id"));
        assert!(err("sink: {kind: syslog, address: 'h:1', app_name: ''}").contains("app_name"));
        assert!(err("sink: {kind: syslog, address: 'h:1', tls: {cert_file: /nonexistent}}").contains("key_file"));
        assert!(err("sink: {kind: syslog, address: 'h:1', tls: {ca_file: /nonexistent}}").contains("does not exist"));
        assert!(err("batch_size: 0\nsink: {kind: jsonl, path: x}").contains("batch_size"));
        assert!(err("streams: []\nsink: {kind: jsonl, path: x}").contains("streams"));
        assert!(err("streams: [A, A]\nsink: {kind: jsonl, path: x}").contains("twice"));
        assert!(err("consumer: 'a.b'\nsink: {kind: jsonl, path: x}").contains("consumer"));
        assert!(err("backoff: {multiplier: 0.5}\nsink: {kind: jsonl, path: x}").contains("multiplier"));
        assert!(err("ack_wait: 1s\nsink: {kind: syslog, address: 'h:1'}").contains("ack_wait"));
        assert!(err("sink: {kind: hec, url: 'ftp://x', token: t}").contains("sink.url"));
        assert!(err("sink: {kind: hec, url: 'http://x'}").contains("token"));
        assert!(err("sink: {kind: carrier_pigeon}").contains("carrier_pigeon"));
        assert!(err("{}").contains("sink"));
    }
}
