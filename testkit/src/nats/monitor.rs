//! A deliberately tiny HTTP/1.0 GET client for nats-server's monitoring port.
//!
//! The monitoring endpoints (`/healthz`, `/varz`, `/jsz`, ...) are plain JSON over HTTP on
//! loopback. An HTTP/1.0 request with `Connection: close` makes the Go server answer with
//! a `Content-Length` body (never chunked) and close the socket, so "read to end, split at
//! the blank line" is a complete client. That is all the harness needs, and it keeps a full
//! HTTP stack (and its async runtime) out of every test binary.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Per-request budget: connect, write and each read. Monitoring answers in microseconds on
/// loopback; a slow answer means the server is busy starting, and the caller polls again.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A monitoring response: status code and body.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` on `127.0.0.1:port`. Errors are plain strings because the callers fold them
/// into their own, more specific, [`crate::HarnessError`]s.
pub(crate) fn get(port: u16, path: &str, timeout: Duration) -> Result<Response, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|_| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket options: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Response, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("malformed response ({} bytes, no header end)", raw.len()))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => {
            code.parse::<u16>().map_err(|_| format!("bad status line {status_line:?}"))?
        }
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    Ok(Response { status, body: body.to_string() })
}

/// Connects to a NATS protocol port (client or route) and returns the JSON of the `INFO`
/// line the server sends first. Its `server_id` identifies the process that owns the port.
pub(crate) fn read_nats_info(port: u16, timeout: Duration) -> Result<serde_json::Value, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| format!("socket options: {e}"))?;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.windows(2).any(|w| w == b"\r\n") {
        if line.len() > 1 << 20 {
            return Err("no INFO line in the first MiB".into());
        }
        let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before INFO".into());
        }
        line.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&line);
    let first = text.split("\r\n").next().unwrap_or_default();
    let json = first.strip_prefix("INFO ").ok_or_else(|| format!("expected INFO, got {:?}", truncate(first, 80)))?;
    serde_json::from_str(json).map_err(|e| format!("bad INFO JSON: {e}"))
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn parses_status_and_body() {
        let raw =
            b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n\r\n{\"status\":\"unavailable\"}";
        let response = parse(raw).unwrap();
        assert_eq!(response.status, 503);
        assert_eq!(response.body, "{\"status\":\"unavailable\"}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"hello").is_err());
        assert!(parse(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn talks_to_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
            request
        });
        let response = get(port, "/healthz?js-enabled-only=true", REQUEST_TIMEOUT).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.body, "ok");
        let request = peer.join().unwrap();
        assert!(request.starts_with("GET /healthz?js-enabled-only=true HTTP/1.0\r\n"));
    }

    #[test]
    fn connection_refused_is_an_error() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let err = get(port, "/healthz", REQUEST_TIMEOUT).unwrap_err();
        assert!(err.starts_with("connect:"), "{err}");
    }
}
