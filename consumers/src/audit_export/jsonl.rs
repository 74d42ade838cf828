//! JSON lines: one CloudEvent per line, appended to a file, `fsync`ed once per batch before
//! the batch is acknowledged.
//!
//! A failed write is cut back to the file's length before the batch, so a retry never
//! leaves half a line behind; when the file is opened, a partial last line (from a crash in
//! the middle of a write, never acknowledged) is removed for the same reason.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::record::ExportRecord;
use super::sink::{Sent, Sink, SinkError};

/// The JSON lines sink.
pub struct JsonlSink {
    path: PathBuf,
    file: Option<File>,
    accepted: u64,
}

impl JsonlSink {
    /// A sink appending to `path`; the file is opened (created if missing) on the first batch.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        JsonlSink { path: path.into(), file: None, accepted: 0 }
    }
}

#[async_trait]
impl Sink for JsonlSink {
    async fn send(&mut self, batch: &[ExportRecord]) -> Result<Sent, SinkError> {
        let mut buf = Vec::with_capacity(batch.iter().map(|r| r.body().len() + 1).sum());
        for r in batch {
            buf.extend_from_slice(r.body().as_bytes());
            buf.push(b'\n');
        }
        let path = self.path.clone();
        let file = self.file.take();
        let (file, result) = tokio::task::spawn_blocking(move || append(&path, file, &buf))
            .await
            .map_err(|e| SinkError::new(format!("writer task: {e}")))?;
        self.file = file;
        result.map_err(|e| SinkError(format!("appending to {}: {e}", self.path.display())))?;
        self.accepted += batch.len() as u64;
        Ok(Sent::default())
    }

    async fn confirmed(&mut self) -> Result<u64, SinkError> {
        Ok(self.accepted)
    }
}

/// Appends and syncs; on failure cuts the file back and drops the handle (reopened next time).
fn append(path: &Path, file: Option<File>, buf: &[u8]) -> (Option<File>, io::Result<()>) {
    let mut file = match file {
        Some(f) => f,
        None => match open(path) {
            Ok(f) => f,
            Err(e) => return (None, Err(e)),
        },
    };
    let before = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return (None, Err(e)),
    };
    match file.write_all(buf).and_then(|_| file.sync_data()) {
        Ok(()) => (Some(file), Ok(())),
        Err(e) => {
            file.set_len(before).ok();
            (None, Err(e))
        }
    }
}

/// Opens for appending, creating the file (and syncing its directory) when missing, and
/// removes a partial last line.
fn open(path: &Path) -> io::Result<File> {
    let existed = path.exists();
    let file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
    if !existed {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
    }
    let len = file.metadata()?.len();
    let end = complete_lines_end(&file, len)?;
    if end != len {
        tracing::warn!(path = %path.display(), removed = len - end, "removing a partial last line (an unacknowledged write cut short)");
        file.set_len(end)?;
        file.sync_data()?;
    }
    Ok(file)
}

/// Offset just past the last `\n` (0 when there is none).
fn complete_lines_end(file: &File, len: u64) -> io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit_export::record::tests::{audit, record};
    use chorus_schemas::AuditAction;

    #[tokio::test]
    async fn appends_one_line_per_record_and_repairs_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"old\":1}\n{\"torn\":").unwrap();
        let mut sink = JsonlSink::new(&path);
        let records: Vec<_> = ["up=a", "up=b"].iter().map(|c| record(audit(AuditAction::Deny, c))).collect();
        sink.send(&records).await.unwrap();
        sink.send(&records[..1]).await.unwrap();
        assert_eq!(sink.confirmed().await.unwrap(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "{\"old\":1}");
        for (line, r) in lines[1..].iter().zip([&records[0], &records[1], &records[0]]) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["id"], r.id());
        }
        assert!(text.ends_with('\n'));
    }

    #[tokio::test]
    async fn an_unwritable_path_is_an_error_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = JsonlSink::new(dir.path().join("missing-dir").join("audit.jsonl"));
        assert!(sink.send(&[record(audit(AuditAction::Deny, "x"))]).await.is_err());
        assert_eq!(sink.confirmed().await.unwrap(), 0);
    }

    #[test]
    fn finds_the_end_of_complete_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        for (content, end) in [("", 0u64), ("abc", 0), ("a\n", 2), ("a\nbc", 2)] {
            std::fs::write(&p, content).unwrap();
            let f = File::open(&p).unwrap();
            assert_eq!(complete_lines_end(&f, content.len() as u64).unwrap(), end, "{content:?}");
        }
        let mut big = "x".repeat(200_000);
        big.insert(10, '\n');
        std::fs::write(&p, &big).unwrap();
        assert_eq!(complete_lines_end(&File::open(&p).unwrap(), big.len() as u64).unwrap(), 11);
    }
}
