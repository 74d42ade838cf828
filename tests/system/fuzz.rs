//! The cargo-fuzz target for event decoding runs for a bounded time without a crash.
//!
//! libFuzzer needs the `-Z` flags of a nightly compiler; this machine has one stable toolchain,
//! so the run sets RUSTC_BOOTSTRAP=1, which lets stable rustc accept them.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn event_decoding_survives_a_bounded_fuzz_run() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let seconds = std::env::var("CHORUS_FUZZ_SECONDS").unwrap_or_else(|_| "45".into());
    let corpus = tempfile::tempdir().unwrap();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .env("RUSTC_BOOTSTRAP", "1")
        .args(["fuzz", "run", "--fuzz-dir", "fuzz", "--sanitizer", "none", "decode_event"])
        .arg(corpus.path())
        .arg(root.join("fuzz/seeds/decode_event"))
        .args(["--", &format!("-max_total_time={seconds}"), "-rss_limit_mb=2048", "-max_len=65536"])
        .status()
        .expect("cargo fuzz must be installed (scripts/setup installs it)");
    assert!(status.success(), "the fuzzer found a crash in event decoding (see fuzz/artifacts/decode_event)");
}
