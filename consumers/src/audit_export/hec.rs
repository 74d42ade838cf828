//! Splunk HTTP Event Collector: `POST <url>/services/collector/event` with
//! `Authorization: Splunk <token>` and a batch of event objects in the body.
//!
//! A batch is confirmed when HEC answers 2xx with `"code": 0` (or no JSON body). Responses:
//!
//! | Answer | What the exporter does |
//! |---|---|
//! | 2xx, code 0 | acknowledge the batch |
//! | 400 (except code 7, incorrect index) or 413 | split the batch; each record HEC still refuses alone is dead-lettered with HEC's reason |
//! | 400 code 7, 401, 403, 404, 429, 5xx, connection errors, timeouts | retry the batch with backoff (a wrong token or index is fixed by the operator; nothing is dropped meanwhile) |
//!
//! HEC's optional indexer acknowledgement (`useACK`) is not used: a 200 means HEC received
//! the events.

use async_trait::async_trait;
use serde_json::Value;

use super::config::{HecConfig, HostnameSource, TlsClientConfig};
use super::format::Format;
use super::record::{ExportRecord, Rejection};
use super::sink::{Sent, Sink, SinkError};
use chorus_runtime::{tls, ConfigError};

use super::ExportError;

/// Path of the event endpoint below the collector URL.
pub const EVENT_PATH: &str = "/services/collector/event";

/// The HEC sink.
pub struct HecSink {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    authorization: String,
    index: Option<String>,
    source: String,
    sourcetype: String,
    hostname: HostnameSource,
    accepted: u64,
}

enum Answer {
    Accepted,
    Refused(String),
    Retry(String),
}

impl HecSink {
    /// Builds the HTTP client: reads the token and sets up TLS for an `https` URL; sends nothing.
    /// Fails on a bad URL, an unreadable token or bad TLS settings.
    pub fn new(config: &HecConfig, hostname: HostnameSource, format: Format) -> Result<Self, ExportError> {
        let bad = |m: String| ExportError::Config(ConfigError::message(m));
        let base = reqwest::Url::parse(&config.url).map_err(|e| bad(format!("sink.url: {e}")))?;
        let endpoint = base
            .join(&format!("{}{EVENT_PATH}", base.path().trim_end_matches('/')))
            .map_err(|e| bad(format!("sink.url: {e}")))?;
        let token = config.read_token().map_err(bad)?;
        let mut builder = reqwest::Client::builder().timeout(config.timeout).connect_timeout(config.timeout);
        if endpoint.scheme() == "https" {
            let settings =
                config.tls.clone().unwrap_or_else(|| TlsClientConfig { required: true, ..Default::default() });
            let mut client = tls::client_config(&settings).map_err(|e| e.within("sink"))?;
            client.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder = builder.use_preconfigured_tls(client);
        }
        let client = builder.build().map_err(|e| bad(format!("HEC client: {e}")))?;
        Ok(HecSink {
            client,
            endpoint,
            authorization: format!("Splunk {token}"),
            index: config.index.clone(),
            source: config.source.clone(),
            sourcetype: config.sourcetype.clone().unwrap_or_else(|| format.default_sourcetype().into()),
            hostname,
            accepted: 0,
        })
    }

    /// The endpoint events are POSTed to.
    pub fn endpoint(&self) -> &reqwest::Url {
        &self.endpoint
    }

    /// One HEC event object: `time`, `host`, `source`, `sourcetype`, optional `index`,
    /// indexed `fields` (id, type, callerid, agent, action, decision, site), and the
    /// CloudEvent as `event`.
    pub fn event_json(&self, record: &ExportRecord) -> String {
        let q = |s: &str| Value::String(s.to_owned()).to_string();
        let time = record.event.time;
        let mut fields = serde_json::Map::new();
        fields.insert("chorus_id".into(), record.id().into());
        fields.insert("chorus_type".into(), record.event.data.event_type().into());
        fields.insert("callerid".into(), record.callerid.clone().into());
        for (name, value) in [
            ("agent", &record.agent),
            ("action", &record.action),
            ("site", &record.site),
            ("requestid", &record.requestid),
        ] {
            if let Some(v) = value {
                fields.insert(name.into(), v.clone().into());
            }
        }
        if let Some(d) = record.decision {
            fields.insert("decision".into(), d.as_str().into());
        }
        let mut out = String::with_capacity(record.body().len() + 512);
        out.push_str(&format!("{{\"time\":{}.{:03}", time.timestamp(), time.timestamp_subsec_millis()));
        out.push_str(&format!(",\"host\":{}", q(record.host(self.hostname))));
        out.push_str(&format!(",\"source\":{},\"sourcetype\":{}", q(&self.source), q(&self.sourcetype)));
        if let Some(index) = &self.index {
            out.push_str(&format!(",\"index\":{}", q(index)));
        }
        out.push_str(&format!(",\"fields\":{}", Value::Object(fields)));
        out.push_str(",\"event\":");
        out.push_str(record.body());
        out.push('}');
        out
    }

    async fn post(&self, records: &[&ExportRecord]) -> Answer {
        let body: Vec<String> = records.iter().map(|r| self.event_json(r)).collect();
        let response = self
            .client
            .post(self.endpoint.clone())
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.join("\n"))
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => return Answer::Retry(format!("HEC request to {}: {}", self.endpoint, error_chain(&e))),
        };
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let code = serde_json::from_str::<Value>(&text).ok().and_then(|v| v.get("code").and_then(Value::as_i64));
        let detail = || format!("HEC answered {status}: {}", clip(text.trim(), 300));
        match status.as_u16() {
            200..=299 if matches!(code, None | Some(0)) => Answer::Accepted,
            200..=299 => Answer::Retry(detail()),
            400 if code == Some(7) => Answer::Retry(detail()),
            400 | 413 => Answer::Refused(detail()),
            _ => Answer::Retry(detail()),
        }
    }
}

#[async_trait]
impl Sink for HecSink {
    async fn send(&mut self, batch: &[ExportRecord]) -> Result<Sent, SinkError> {
        let all: Vec<&ExportRecord> = batch.iter().collect();
        match self.post(&all).await {
            Answer::Accepted => {
                self.accepted += batch.len() as u64;
                return Ok(Sent::default());
            }
            Answer::Retry(e) => return Err(SinkError(e)),
            Answer::Refused(e) if batch.len() > 1 => {
                tracing::warn!(error = %e, records = batch.len(), "HEC refused a batch; sending its records one by one");
            }
            Answer::Refused(e) => {
                return Ok(Sent { rejected: vec![(0, Rejection { code: "refused_by_siem".into(), reason: e })] });
            }
        }
        // One by one: those HEC refuses alone are rejected; a retryable failure fails the
        // batch (records already accepted are sent again: duplicates, never losses).
        let mut sent = Sent::default();
        let mut accepted = 0;
        for (i, record) in batch.iter().enumerate() {
            match self.post(&[record]).await {
                Answer::Accepted => accepted += 1,
                Answer::Refused(e) => sent.rejected.push((i, Rejection { code: "refused_by_siem".into(), reason: e })),
                Answer::Retry(e) => return Err(SinkError(e)),
            }
        }
        self.accepted += accepted;
        Ok(sent)
    }

    async fn confirmed(&mut self) -> Result<u64, SinkError> {
        Ok(self.accepted)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_export::record::tests::{audit, record};
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use chorus_schemas::AuditAction;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Hec {
        /// Status and body to answer with, in turn; then 200 Success.
        script: Mutex<Vec<(u16, String)>>,
        /// Requests seen: authorization header and body.
        seen: Mutex<Vec<(String, String)>>,
        /// Refuse any body containing this text with 400 code 6.
        poison: Mutex<Option<String>>,
    }

    async fn collect(State(hec): State<Arc<Hec>>, headers: HeaderMap, body: String) -> (StatusCode, String) {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        hec.seen.lock().unwrap().push((auth, body.clone()));
        if let Some(p) = hec.poison.lock().unwrap().as_deref() {
            if body.contains(p) {
                return (
                    StatusCode::BAD_REQUEST,
                    r#"{"text":"Invalid data format","code":6,"invalid-event-number":0}"#.into(),
                );
            }
        }
        let next = {
            let mut s = hec.script.lock().unwrap();
            if s.is_empty() {
                None
            } else {
                Some(s.remove(0))
            }
        };
        match next {
            Some((status, body)) => (StatusCode::from_u16(status).unwrap(), body),
            None => (StatusCode::OK, r#"{"text":"Success","code":0}"#.into()),
        }
    }

    async fn server() -> (Arc<Hec>, String) {
        let hec = Arc::new(Hec::default());
        let app = Router::new().route("/services/collector/event", post(collect)).with_state(hec.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (hec, url)
    }

    fn objects(body: &str) -> Vec<Value> {
        serde_json::Deserializer::from_str(body).into_iter::<Value>().map(Result::unwrap).collect()
    }

    #[tokio::test]
    async fn batches_are_posted_with_the_token_and_one_object_per_record() {
        let (hec, url) = server().await;
        let mut cfg = HecConfig::new(format!("{url}/"), "s3cr3t");
        cfg.index = Some("audit".into());
        let mut sink = HecSink::new(&cfg, HostnameSource::Identity, Format::default()).unwrap();
        assert_eq!(sink.endpoint().path(), "/services/collector/event");
        let records = vec![record(audit(AuditAction::Deny, "up=bob")), record(audit(AuditAction::Allow, "up=ann"))];
        assert!(sink.send(&records).await.unwrap().rejected.is_empty());
        assert_eq!(sink.confirmed().await.unwrap(), 2);
        let seen = hec.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, "Splunk s3cr3t");
        let events = objects(&seen[0].1);
        assert_eq!(events.len(), 2);
        let e = &events[0];
        assert_eq!(e["time"].as_f64().unwrap(), 1_713_772_800.0);
        assert_eq!(e["host"], "aaa1.example.net");
        assert_eq!(
            (e["source"].as_str(), e["sourcetype"].as_str(), e["index"].as_str()),
            (Some("chorus"), Some("chorus:cloudevent"), Some("audit"))
        );
        assert_eq!(e["fields"]["decision"], "deny");
        assert_eq!(e["fields"]["callerid"], "up=bob");
        assert_eq!(e["fields"]["chorus_id"], records[0].id());
        let cloudevent: Value = serde_json::from_str(&records[0].cloudevent).unwrap();
        assert_eq!(e["event"], cloudevent);
        assert_eq!(events[1]["fields"]["decision"], "allow");
    }

    #[tokio::test]
    async fn outages_and_bad_tokens_are_retried_not_dropped() {
        let (hec, url) = server().await;
        let mut sink = HecSink::new(&HecConfig::new(url, "t"), HostnameSource::Identity, Format::default()).unwrap();
        let records = vec![record(audit(AuditAction::Deny, "up=bob"))];
        for (status, body) in [
            (503, r#"{"text":"Server is busy","code":9}"#),
            (403, r#"{"text":"Invalid token","code":4}"#),
            (400, r#"{"text":"Incorrect index","code":7}"#),
            (429, ""),
            (200, r#"{"text":"Server is busy","code":9}"#),
        ] {
            hec.script.lock().unwrap().push((status, body.into()));
            let err = sink.send(&records).await.unwrap_err();
            assert!(err.to_string().contains(&status.to_string()), "{err}");
            assert_eq!(sink.confirmed().await.unwrap(), 0);
        }
        assert!(sink.send(&records).await.unwrap().rejected.is_empty());
        assert_eq!(sink.confirmed().await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_refused_batch_is_split_and_only_the_bad_record_rejected() {
        let (hec, url) = server().await;
        let mut sink = HecSink::new(&HecConfig::new(url, "t"), HostnameSource::Identity, Format::default()).unwrap();
        let records: Vec<_> =
            ["up=a", "up=poison", "up=c"].iter().map(|c| record(audit(AuditAction::Allow, c))).collect();
        *hec.poison.lock().unwrap() = Some("up=poison".into());
        let sent = sink.send(&records).await.unwrap();
        assert_eq!(sent.rejected.len(), 1);
        assert_eq!(sent.rejected[0].0, 1);
        assert_eq!(sent.rejected[0].1.code, "refused_by_siem");
        assert!(sent.rejected[0].1.reason.contains("Invalid data format"), "{:?}", sent.rejected);
        assert_eq!(sink.confirmed().await.unwrap(), 2);
        assert_eq!(hec.seen.lock().unwrap().len(), 4, "one batch, then three singles");
    }

    /// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`; returns
    /// (ca file, server chain, server key).
    fn pki(
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)
    {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        (ca_file, vec![cert.der().clone()], key)
    }

    /// An HTTPS server answering every request with HEC's success.
    async fn https_hec(
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 4096];
                    // Headers, then Content-Length bytes of body.
                    loop {
                        let Ok(n) = tls.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&req).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse::<usize>().unwrap())
                                })
                                .unwrap_or(0);
                            if req.len() >= end + 4 + len {
                                seen.lock().unwrap().push(text);
                                break;
                            }
                        }
                    }
                    let body = r#"{"text":"Success","code":0}"#;
                    let response = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    tls.write_all(response.as_bytes()).await.ok();
                    tls.shutdown().await.ok();
                });
            }
        });
        (url, requests)
    }

    #[tokio::test]
    async fn https_with_a_private_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, chain, key) = pki(dir.path());
        let (url, requests) = https_hec(chain, key).await;
        let mut cfg = HecConfig::new(url.clone(), "t0k");
        cfg.tls = Some(TlsClientConfig::with_ca(ca_file));
        let mut sink = HecSink::new(&cfg, HostnameSource::Identity, Format::default()).unwrap();
        sink.send(&[record(audit(AuditAction::Deny, "up=bob"))]).await.unwrap();
        assert_eq!(sink.confirmed().await.unwrap(), 1);
        let seen = requests.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].starts_with("POST /services/collector/event HTTP/1.1\r\n"), "{}", seen[0]);
        assert!(seen[0].to_ascii_lowercase().contains("authorization: splunk t0k\r\n"), "{}", seen[0]);

        // A server whose certificate the configured CA did not sign is refused (and retried).
        let other_dir = tempfile::tempdir().unwrap();
        let (untrusting_ca, _, _) = pki(other_dir.path());
        let mut cfg = HecConfig::new(url, "t0k");
        cfg.tls = Some(TlsClientConfig::with_ca(untrusting_ca));
        let mut sink = HecSink::new(&cfg, HostnameSource::Identity, Format::default()).unwrap();
        let err = sink.send(&[record(audit(AuditAction::Deny, "up=bob"))]).await.unwrap_err();
        assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_collector_is_an_error_to_retry() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut sink = HecSink::new(
            &HecConfig::new(format!("http://127.0.0.1:{port}"), "t"),
            HostnameSource::Identity,
            Format::default(),
        )
        .unwrap();
        assert!(sink.send(&[record(audit(AuditAction::Deny, "x"))]).await.is_err());
        assert_eq!(sink.confirmed().await.unwrap(), 0);
    }
}
