//! Replacing a file whole: written beside it, synced, renamed over it, so a crash leaves the
//! old file or the new one, never half of either (node credentials, configuration written
//! by enrolment, a machine's data store).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Replaces `path` with `content`, made with permission bits `mode` (its directory is
/// made if missing). The error names the file it concerns.
pub fn replace(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    let named = |at: &Path, e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", at.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| named(dir, e))?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".replacing");
    let tmp = Path::new(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| named(tmp, e))?;
    f.write_all(content).and_then(|()| f.sync_all()).map_err(|e| named(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| named(path, e))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_file_is_replaced_whole_with_its_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/f.json");
        super::replace(&path, b"one", 0o600).unwrap();
        super::replace(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "nothing left beside it");
    }
}
