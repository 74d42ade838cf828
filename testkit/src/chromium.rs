//! Headless Chromium for dashboard tests: loads a page, lets its JavaScript run (fetches
//! included) for a virtual-time budget, and returns the DOM as rendered.
//!
//! `--dump-dom` is enough for "does the page show X" checks and needs no WebDriver session.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::{HarnessError, Result};

/// The Chromium binary: `$CHORUS_CHROMIUM`, or Debian's `/usr/bin/chromium`.
pub fn chromium_binary() -> Result<PathBuf> {
    let path =
        std::env::var_os("CHORUS_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError::BinaryNotFound(format!(
            "chromium not at {}; run scripts/setup (Debian package chromium) or set CHORUS_CHROMIUM",
            path.display()
        )))
    }
}

/// Loads `url` in headless Chromium, runs its scripts for `budget` of virtual time, and
/// returns the serialized DOM.
pub fn dump_dom(url: &str, budget: Duration) -> Result<String> {
    let profile =
        tempfile::tempdir().map_err(|source| HarnessError::Io { context: "chromium profile dir".into(), source })?;
    let output = Command::new(chromium_binary()?)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--virtual-time-budget={}", budget.as_millis()))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .map_err(|source| HarnessError::Io { context: "running chromium".into(), source })?;
    if !output.status.success() {
        return Err(HarnessError::Io {
            context: format!("chromium exited with {}: {}", output.status, String::from_utf8_lossy(&output.stderr)),
            source: std::io::Error::other("chromium failed"),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Loads `url` repeatedly until `check` accepts the DOM or `timeout` passes; returns the last
/// DOM and whether it was accepted. For pages that fill as data arrives.
pub fn wait_for_dom(url: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> Result<(String, bool)> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let dom = dump_dom(url, Duration::from_secs(3))?;
        if check(&dom) {
            return Ok((dom, true));
        }
        if std::time::Instant::now() > deadline {
            return Ok((dom, false));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
