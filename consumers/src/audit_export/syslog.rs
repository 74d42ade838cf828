//! Syslog over TCP (RFC 6587 octet counting) and over TLS (RFC 5425).
//!
//! Syslog has no application acknowledgement: a successful write only means the bytes are
//! in our socket buffer. So a written record is not confirmed at once. It stays in an
//! *unconfirmed* queue until
//!
//! 1. the collector's TCP has acknowledged every byte written so far (the socket's send
//!    queue, `SIOCOUTQ`, is empty), **and**
//! 2. the connection is still open (no EOF, no reset) at least `settle` after the write,
//!
//! at which point the collector has had the bytes and has been alive long enough to read
//! them. Only confirmed records are acknowledged to the backbone. When the connection
//! breaks (write error, EOF, reset, timeout), the sink reconnects and first **re-sends every
//! unconfirmed record**, which covers records that sat in the socket buffers of a collector
//! that died. The price is duplicates at the collector after a reconnect (counted in
//! `resent`), never losses. What a collector loses from its own memory after it read the
//! bytes (e.g. `kill -9` with in-memory queues) is outside what any syslog sender can see;
//! configure the collector's queues to be disk-assisted for that.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::config::{HostnameSource, SyslogConfig};
use super::record::{ExportRecord, Rejection};
use super::rfc5424::{self, Formatter};
use super::sink::{ExportStats, Sent, Sink, SinkError};
use chorus_runtime::tls;

use super::ExportError;

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

struct Conn {
    io: Box<dyn Io>,
    /// The TCP socket under `io` (for peeking and the send queue), valid while `io` lives.
    fd: RawFd,
}

struct Written {
    frame: Arc<[u8]>,
    at: Instant,
}

/// The syslog sink.
pub struct SyslogSink {
    config: SyslogConfig,
    formatter: Formatter,
    tls: Option<(TlsConnector, rustls::pki_types::ServerName<'static>)>,
    conn: Option<Conn>,
    unconfirmed: VecDeque<Written>,
    /// Records confirmed so far (accepted = confirmed + unconfirmed.len()).
    confirmed: u64,
    stats: ExportStats,
}

impl SyslogSink {
    /// Prepares the formatter and, when configured, TLS; connects on the first send. `stats` counts
    /// its connects and re-sent records. Fails on bad TLS settings.
    pub fn new(config: SyslogConfig, hostname: HostnameSource, stats: ExportStats) -> Result<Self, ExportError> {
        let tls = match &config.tls {
            Some(settings) => {
                let host = host_of(&config.address);
                let client = tls::client_config(settings).map_err(|e| e.within("sink"))?;
                let name = settings.server_name(host).map_err(|e| e.within("sink"))?;
                Some((TlsConnector::from(Arc::new(client)), name))
            }
            None => None,
        };
        Ok(SyslogSink {
            formatter: Formatter::new(&config, hostname),
            config,
            tls,
            conn: None,
            unconfirmed: VecDeque::new(),
            confirmed: 0,
            stats,
        })
    }

    /// The formatter in use.
    pub fn formatter(&self) -> &Formatter {
        &self.formatter
    }

    async fn connect(&self) -> Result<Conn, SinkError> {
        let address = &self.config.address;
        let tcp = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(address))
            .await
            .map_err(|_| SinkError(format!("connecting to {address}: timed out")))?
            .map_err(|e| SinkError(format!("connecting to {address}: {e}")))?;
        tcp.set_nodelay(true).ok();
        let fd = tcp.as_raw_fd();
        Ok(match &self.tls {
            None => Conn { io: Box::new(tcp), fd },
            Some((connector, name)) => {
                let stream = tokio::time::timeout(self.config.connect_timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| SinkError(format!("TLS handshake with {address}: timed out")))?
                    .map_err(|e| SinkError(format!("TLS handshake with {address}: {e}")))?;
                Conn { io: Box::new(stream), fd }
            }
        })
    }

    /// Makes sure there is a live connection; a new one first gets every unconfirmed record
    /// again.
    async fn ensure_connected(&mut self) -> Result<(), SinkError> {
        if let Some(conn) = &mut self.conn {
            if let Err(e) = probe(conn) {
                tracing::warn!(address = %self.config.address, error = %e, unconfirmed = self.unconfirmed.len(), "syslog connection lost");
                self.conn = None;
            }
        }
        if self.conn.is_some() {
            return Ok(());
        }
        let mut conn = self.connect().await?;
        self.stats.connects.inc();
        if !self.unconfirmed.is_empty() {
            let mut buf = Vec::with_capacity(self.unconfirmed.iter().map(|w| w.frame.len()).sum());
            for w in &self.unconfirmed {
                buf.extend_from_slice(&w.frame);
            }
            write(&mut conn, &buf, self.config.write_timeout).await?;
            let now = Instant::now();
            for w in &mut self.unconfirmed {
                w.at = now;
            }
            self.stats.resent.inc_by(self.unconfirmed.len() as u64);
            tracing::info!(address = %self.config.address, records = self.unconfirmed.len(), "re-sent unconfirmed records after reconnecting");
        }
        self.conn = Some(conn);
        Ok(())
    }
}

#[async_trait]
impl Sink for SyslogSink {
    async fn send(&mut self, batch: &[ExportRecord]) -> Result<Sent, SinkError> {
        let mut sent = Sent::default();
        let mut frames = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            let message = self.formatter.message(record);
            if self.config.max_message_bytes > 0 && message.len() > self.config.max_message_bytes {
                sent.rejected.push((
                    i,
                    Rejection {
                        code: "oversize".into(),
                        reason: format!(
                            "syslog message is {} bytes, over sink.max_message_bytes ({})",
                            message.len(),
                            self.config.max_message_bytes
                        ),
                    },
                ));
                continue;
            }
            frames.push(Arc::<[u8]>::from(rfc5424::frame(message.as_bytes())));
        }
        if frames.is_empty() {
            return Ok(sent);
        }
        self.ensure_connected().await?;
        let mut buf = Vec::with_capacity(frames.iter().map(|f| f.len()).sum());
        for f in &frames {
            buf.extend_from_slice(f);
        }
        let conn = self.conn.as_mut().expect("connected above");
        if let Err(e) = write(conn, &buf, self.config.write_timeout).await {
            self.conn = None;
            return Err(e);
        }
        let now = Instant::now();
        self.unconfirmed.extend(frames.into_iter().map(|frame| Written { frame, at: now }));
        Ok(sent)
    }

    async fn confirmed(&mut self) -> Result<u64, SinkError> {
        if self.unconfirmed.is_empty() {
            return Ok(self.confirmed);
        }
        self.ensure_connected().await?;
        let conn = self.conn.as_ref().expect("connected above");
        match unsent_bytes(conn.fd) {
            Ok(0) => {
                let now = Instant::now();
                while self.unconfirmed.front().is_some_and(|w| now.duration_since(w.at) >= self.config.settle) {
                    self.unconfirmed.pop_front();
                    self.confirmed += 1;
                }
            }
            Ok(_) => {} // the collector has not acknowledged everything yet
            Err(e) => {
                self.conn = None;
                return Err(SinkError(format!("syslog socket: {e}")));
            }
        }
        Ok(self.confirmed)
    }

    fn unconfirmed(&self) -> usize {
        self.unconfirmed.len()
    }

    fn max_unconfirmed(&self) -> usize {
        self.config.max_unconfirmed
    }

    async fn close(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            tokio::time::timeout(Duration::from_secs(1), conn.io.shutdown()).await.ok();
        }
    }
}

async fn write(conn: &mut Conn, buf: &[u8], limit: Duration) -> Result<(), SinkError> {
    let io = &mut conn.io;
    match tokio::time::timeout(limit, async {
        io.write_all(buf).await?;
        io.flush().await
    })
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(SinkError(format!("writing to the syslog collector: {e}"))),
        Err(_) => Err(SinkError(format!("writing to the syslog collector: no progress in {limit:?}"))),
    }
}

/// Checks without blocking that the collector has not closed or reset the connection.
/// Collectors send nothing; whatever arrives (TLS session tickets, an alert, close_notify)
/// is consumed through the stream so the TLS layer sees it.
fn probe(conn: &mut Conn) -> Result<(), String> {
    let mut byte = [0u8; 1];
    for _ in 0..16 {
        // SAFETY: recv(2) into a valid one-byte buffer on a socket we own; MSG_DONTWAIT
        // keeps it from blocking and MSG_PEEK leaves the data in place.
        let n = unsafe { libc::recv(conn.fd, byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
        if n == 0 {
            return Err("the collector closed the connection".into());
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(()),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e.to_string()),
            }
        }
        let mut buf = [0u8; 4096];
        match conn.io.read(&mut buf).now_or_never() {
            None => return Ok(()), // the runtime has not seen it yet: look again next time
            Some(Ok(0)) => return Err("the collector closed the connection".into()),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Bytes written to the socket that the peer's TCP has not acknowledged yet.
#[cfg(target_os = "linux")]
fn unsent_bytes(fd: RawFd) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int through the pointer.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut n) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

/// Without SIOCOUTQ, settling relies on the connection staying open for `settle`.
#[cfg(not(target_os = "linux"))]
fn unsent_bytes(_fd: RawFd) -> std::io::Result<usize> {
    Ok(0)
}

/// `host` of `host:port` (brackets of an IPv6 literal removed).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_export::record::tests::{audit, record};
    use chorus_schemas::AuditAction;
    use tokio::net::TcpListener;

    /// A collector that reads octet-counted frames and keeps them.
    async fn collector(listener: TcpListener, out: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let out = out.clone();
            tokio::spawn(async move {
                let mut all = Vec::new();
                let mut buf = [0u8; 8192];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                }
                out.send(all).ok();
            });
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("siem.example.net:6514"), "siem.example.net");
        assert_eq!(host_of("[::1]:6514"), "::1");
    }

    #[tokio::test]
    async fn writes_frames_and_confirms_after_settling() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(collector(listener, tx));
        let mut cfg = SyslogConfig::new(addr);
        cfg.settle = Duration::from_millis(100);
        let stats = ExportStats::default();
        let mut sink = SyslogSink::new(cfg, HostnameSource::Identity, stats.clone()).unwrap();
        let records: Vec<_> = (0..3).map(|i| record(audit(AuditAction::Deny, &format!("up=u{i}")))).collect();
        assert!(sink.send(&records).await.unwrap().rejected.is_empty());
        assert_eq!(sink.unconfirmed(), 3);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sink.confirmed().await.unwrap() < 3 {
            assert!(Instant::now() < deadline, "records never settled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sink.close().await;
        let got = rx.recv().await.unwrap();
        let frames = rfc5424::parse_frames(&got).expect("octet-counted frames");
        let expected: Vec<Vec<u8>> = records.iter().map(|r| sink.formatter().message(r).into_bytes()).collect();
        assert_eq!(frames, expected);
        assert_eq!(stats.connects.get(), 1);
    }

    #[tokio::test]
    async fn unconfirmed_records_are_resent_after_the_collector_goes_away() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut cfg = SyslogConfig::new(addr.to_string());
        cfg.settle = Duration::from_secs(3600); // nothing settles in this test
        let stats = ExportStats::default();
        let mut sink = SyslogSink::new(cfg, HostnameSource::Identity, stats.clone()).unwrap();
        let a = record(audit(AuditAction::Deny, "up=a"));
        let b = record(audit(AuditAction::Allow, "up=b"));
        sink.send(std::slice::from_ref(&a)).await.unwrap();
        // The collector takes the connection and dies without reading.
        let (first, _) = listener.accept().await.unwrap();
        drop(first);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(collector(listener, tx));
        // The next confirm or send notices, reconnects and re-sends `a` before `b`.
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(tries < 200, "never reconnected");
            sink.confirmed().await.ok();
            if stats.connects.get() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sink.send(std::slice::from_ref(&b)).await.unwrap();
        assert_eq!(sink.unconfirmed(), 2);
        assert_eq!(sink.confirmed().await.unwrap(), 0);
        sink.close().await;
        let got = rx.recv().await.unwrap();
        let frames = rfc5424::parse_frames(&got).unwrap();
        let f = sink.formatter();
        assert_eq!(frames, vec![f.message(&a).into_bytes(), f.message(&b).into_bytes()]);
        assert_eq!(stats.resent.get(), 1);
    }

    #[tokio::test]
    async fn oversize_records_are_rejected_not_truncated() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = SyslogConfig::new(listener.local_addr().unwrap().to_string());
        cfg.max_message_bytes = 200;
        let mut sink = SyslogSink::new(cfg, HostnameSource::Identity, ExportStats::default()).unwrap();
        let sent = sink.send(&[record(audit(AuditAction::Deny, "x"))]).await.unwrap();
        assert_eq!(sent.rejected.len(), 1);
        assert_eq!(sent.rejected[0].1.code, "oversize");
        assert_eq!(sink.unconfirmed(), 0);
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error_to_retry() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut sink = SyslogSink::new(
            SyslogConfig::new(format!("127.0.0.1:{port}")),
            HostnameSource::Identity,
            ExportStats::default(),
        )
        .unwrap();
        let err = sink.send(&[record(audit(AuditAction::Deny, "x"))]).await.unwrap_err();
        assert!(err.to_string().contains("connecting"), "{err}");
        assert_eq!(sink.unconfirmed(), 0);
    }
}
