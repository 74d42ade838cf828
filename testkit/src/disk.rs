//! A small file system of its own for a test: a size-limited tmpfs that a test fills to
//! make writes fail with `ENOSPC` (a full disk), then frees, under a running process. Mounting needs root (as the namespace tests do); the mount is removed
//! when the handle drops.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{HarnessError, Result};

/// A mounted tmpfs of a fixed size; unmounted on drop.
pub struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `bytes` on a new temporary directory.
    pub fn mount(bytes: u64) -> Result<Self> {
        let dir = tempfile::tempdir().map_err(|e| HarnessError::Setup(format!("tempdir: {e}")))?;
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).map_err(|e| HarnessError::Setup(format!("mkdir: {e}")))?;
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"]).arg(&path))?;
        Ok(SmallDisk { path, _dir: dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills the file system to the last byte with a file, returned for [`SmallDisk::free`]:
    /// every later write that needs a new block fails with `ENOSPC`.
    pub fn fill(&self) -> Result<PathBuf> {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).map_err(|e| HarnessError::Setup(format!("filler: {e}")))?;
        for chunk in [1 << 20, 4096, 1] {
            let block = vec![0u8; chunk];
            while file.write_all(&block).is_ok() {}
        }
        // Whatever the writes buffered is on the file system (tmpfs has no write-back); a
        // sync on a full tmpfs has nothing to report.
        file.sync_all().ok();
        Ok(filler)
    }

    /// Removes what [`SmallDisk::fill`] wrote: the disk has room again.
    pub fn free(&self, filler: &Path) -> Result<()> {
        std::fs::remove_file(filler).map_err(|e| HarnessError::Setup(format!("freeing {}: {e}", filler.display())))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: a process of the test may still hold files open on it.
        if let Err(e) = Command::new("umount").arg("-l").arg(&self.path).status() {
            eprintln!("umount {}: {e}", self.path.display());
        }
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| HarnessError::Setup(format!("{cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Setup(format!(
            "{cmd:?}: {} (mounting a tmpfs needs root)",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
