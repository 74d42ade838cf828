//! The cargo-fuzz targets (`fuzz/fuzz_targets`) run for a bounded time each without a crash,
//! starting from their seeds in `fuzz/seeds/<target>`: event decoding (`decode_event`, 45 s),
//! Action Policy files (`policy_file`), machine manifests (`machine_manifest`), credentials
//! and their JWS (`credential`) and signed-request envelopes (`request_envelope`), 20 s each.
//! CHORUS_FUZZ_SECONDS sets the time of every target.
//!
//! libFuzzer needs the `-Z` flags of a nightly compiler; this machine has one stable toolchain,
//! so the run sets RUSTC_BOOTSTRAP=1, which lets stable rustc accept them.

use std::path::PathBuf;
use std::process::Command;

/// Runs `target` from its seeds for CHORUS_FUZZ_SECONDS, else `default_seconds`; `what` names
/// what it fuzzes in the failure message.
fn fuzz(target: &str, default_seconds: u32, what: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let seconds = std::env::var("CHORUS_FUZZ_SECONDS").unwrap_or_else(|_| default_seconds.to_string());
    let corpus = tempfile::tempdir().unwrap();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "--fuzz-dir", "fuzz", "--sanitizer", "none", target])
        .arg(corpus.path())
        .arg(root.join("fuzz/seeds").join(target))
        .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048", "-max_len=65536"])
        .status()
        .expect("cargo fuzz must be installed (scripts/setup installs it)");
    assert!(status.success(), "the fuzzer found a crash in {what} (see fuzz/artifacts/{target})");
}

#[test]
fn event_decoding_survives_a_bounded_fuzz_run() {
    fuzz("decode_event", 45, "event decoding");
}

#[test]
fn policy_parsing_survives_a_bounded_fuzz_run() {
    fuzz("policy_file", 20, "Action Policy parsing or evaluation");
}

#[test]
fn machine_manifest_loading_survives_a_bounded_fuzz_run() {
    fuzz("machine_manifest", 20, "machine manifest loading");
}

#[test]
fn credential_checking_survives_a_bounded_fuzz_run() {
    fuzz("credential", 20, "credential or JWS checking");
}

#[test]
fn request_authentication_survives_a_bounded_fuzz_run() {
    fuzz("request_envelope", 20, "signed-request decoding or authentication");
}
