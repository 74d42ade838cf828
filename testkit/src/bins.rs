//! The workspace's own programs, for system tests that run them as a user would (`chorus`)
//! or kill them (`projection-runner`, `embedded-writer`).
//!
//! Cargo gives a test the path of its own package's binaries only; these live in other
//! packages, so they are found in the target directory the running test was built into
//! (`target/<profile>/`), and built there with `cargo build` when missing (`scripts/test`
//! builds them beforehand, so a test never waits on a build in CI).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use crate::{HarnessError, Result};

/// Path of the workspace binary `name` (`chorus`, `chorus-bench`, `projection-runner`, …),
/// built first when it is not there.
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    static BUILDING: Mutex<()> = Mutex::new(());
    let exe = std::env::current_exe().map_err(|e| HarnessError::Setup(format!("current_exe: {e}")))?;
    // target/<profile>/deps/<test binary>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| HarnessError::Setup(format!("no target directory above {}", exe.display())))?;
    let path = dir.join(name);
    if path.is_file() {
        return Ok(path);
    }
    let _one_build_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    if path.is_file() {
        return Ok(path);
    }
    let profile = dir.file_name().and_then(|p| p.to_str()).unwrap_or("debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--bin", name]);
    match profile {
        "debug" => {}
        "release" => {
            build.arg("--release");
        }
        other => {
            build.args(["--profile", other]);
        }
    }
    let target_dir = dir.parent().map(PathBuf::from);
    if let Some(target) = &target_dir {
        build.env("CARGO_TARGET_DIR", target);
    }
    let status = build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| HarnessError::Setup(format!("running cargo build --bin {name}: {e}")))?;
    if !status.success() || !path.is_file() {
        return Err(HarnessError::Setup(format!(
            "cargo build --bin {name} failed ({status}); build it before running the tests"
        )));
    }
    Ok(path)
}
