//! Local state on disk: the one way Chorus opens, writes and flushes a sled database (view
//! state, the provisioner's node records, the replicator's checkpoints).
//!
//! Two sled 0.34 behaviours are handled here once:
//!
//! * **Lock on reopen.** A database just closed in this process (a restarted projector, a
//!   replaced provisioner) can keep its file lock for a moment while sled's background flush
//!   of the old handle ends. [`Store::open`] retries a held lock for up to two seconds before
//!   reporting [`StoreError::Locked`]. Whether the lock is held is asked of the operating
//!   system (`flock`), not read from sled's error text.
//! * **Flushing.** Many concurrent `flush_async` calls can hang sled's own thread pool, and a
//!   flush per writer wastes the disk. [`Store::flush`] is a *group commit*: one flush at a
//!   time on tokio's blocking pool, and a caller whose writes a flush that started after its
//!   call has already made durable returns without flushing again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed: disk full, I/O error, corruption.
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// Another process (or a handle not yet closed) holds the database.
    #[error("state store {path}: in use by another process (lock held for over {waited:?})")]
    Locked {
        /// The database directory.
        path: PathBuf,
        /// How long the lock was waited for.
        waited: Duration,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// The directory could not be created.
    #[error("state store {path}: {source}")]
    Directory {
        /// The database directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A stored value is not what this version wrote (a counter that is not 8 bytes).
    #[error("state store: {0}")]
    Corrupt(String),
    /// The blocking flush task was cancelled or panicked.
    #[error("state store flush: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How a store is opened.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// sled's high-throughput mode: faster rewrites of the same keys, more space before the
    /// log is compacted. What views want.
    pub high_throughput: bool,
    /// Page cache size in bytes (sled's default, 1 GiB, when unset).
    pub cache_capacity: Option<u64>,
}

/// A sled database with the group-commit flush. Cheap to clone: clones share the database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    flush: Arc<GroupFlush>,
}

#[derive(Default)]
struct GroupFlush {
    /// Flushes started so far; flush number n is the n-th started.
    started: AtomicU64,
    /// Number of the last flush that completed.
    completed: AtomicU64,
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// How long [`Store::open`] waits for a lock held by a closing handle.
const LOCK_WAIT: Duration = Duration::from_secs(2);
const LOCK_POLL: Duration = Duration::from_millis(50);

impl Store {
    /// Opens (creating) the database in directory `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, &StoreOptions::default())
    }

    /// Opens (creating) the database in directory `path`.
    pub fn open_with(path: impl AsRef<Path>, options: &StoreOptions) -> Result<Self, StoreError> {
        let path = path.as_ref();
        std::fs::create_dir_all(path).map_err(|source| StoreError::Directory { path: path.to_path_buf(), source })?;
        let mut config = sled::Config::new().path(path);
        if options.high_throughput {
            config = config.mode(sled::Mode::HighThroughput);
        }
        if let Some(bytes) = options.cache_capacity {
            config = config.cache_capacity(bytes);
        }
        let started = std::time::Instant::now();
        loop {
            match config.open() {
                Ok(db) => return Ok(Store::from_db(db)),
                Err(source) if lock_held(path) => {
                    if started.elapsed() >= LOCK_WAIT {
                        return Err(StoreError::Locked { path: path.to_path_buf(), waited: LOCK_WAIT, source });
                    }
                    std::thread::sleep(LOCK_POLL);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A database in memory, removed when dropped (tests, benchmarks).
    pub fn temporary() -> Result<Self, StoreError> {
        Ok(Store::from_db(sled::Config::new().temporary(true).open()?))
    }

    /// Wraps an open sled database.
    pub fn from_db(db: sled::Db) -> Self {
        Store { db, flush: Arc::default() }
    }

    /// The database, for reads and atomic batches.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Opens (creating) the tree `name`.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every write applied before this call durable (group commit; see the module).
    /// The future owns what it needs, so a caller can keep it in flight while it goes on
    /// writing.
    pub fn flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let db = self.db.clone();
        let group = self.flush.clone();
        // Flushes that started before this call may have missed the caller's writes.
        let ticket = group.started.load(Ordering::SeqCst);
        async move {
            let _turn = group.one_at_a_time.lock().await;
            if group.completed.load(Ordering::SeqCst) > ticket {
                return Ok(());
            }
            let number = group.started.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::task::spawn_blocking(move || db.flush()).await??;
            group.completed.store(number, Ordering::SeqCst);
            Ok(())
        }
    }

    /// [`Store::flush`] from synchronous code (not on an async worker thread).
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Reads a big-endian `u64` value (counters, sequences); absent reads as `None`.
pub fn read_u64(value: Option<sled::IVec>, what: &str) -> Result<Option<u64>, StoreError> {
    value
        .map(|v| {
            <[u8; 8]>::try_from(v.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, not 8", v.len())))
        })
        .transpose()
}

/// Whether sled's database file in `dir` is locked by another handle, asked with the same
/// `flock` sled takes (a lock held by this process through another handle counts too).
fn lock_held(dir: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("db")) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; a lock we obtain is released with the file.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_waited_for_then_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let started = std::time::Instant::now();
        let err = Store::open(dir.path()).err().expect("the second open waits, then fails");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(started.elapsed() >= LOCK_WAIT);
        drop(first);
        // Once the first handle is gone the lock goes with it.
        let reopened = Store::open(dir.path()).unwrap();
        drop(reopened);
    }

    #[test]
    fn a_lock_released_while_waiting_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        first.db().insert("k", "v").unwrap();
        let path = dir.path().to_path_buf();
        let opener = std::thread::spawn(move || Store::open(path).map(|s| s.db().get("k").unwrap()));
        std::thread::sleep(LOCK_POLL * 3);
        first.flush_blocking().unwrap();
        drop(first);
        let value = opener.join().unwrap().unwrap();
        assert_eq!(value.as_deref(), Some(&b"v"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_are_grouped_and_each_covers_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..64u64 {
            let store = store.clone();
            tasks.spawn(async move {
                store.db().insert(i.to_be_bytes(), &i.to_be_bytes()).unwrap();
                store.flush().await.unwrap();
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let flushes = store.flush.completed.load(Ordering::SeqCst);
        assert!((1..=64).contains(&flushes), "{flushes} flushes for 64 callers");
        drop(store);
        let reopened = Store::open(dir.path()).unwrap();
        assert_eq!(reopened.db().len(), 64);
    }

    #[test]
    fn u64_values_round_trip_and_a_wrong_length_is_corrupt() {
        let store = Store::temporary().unwrap();
        assert_eq!(read_u64(store.db().get("n").unwrap(), "n").unwrap(), None);
        store.db().insert("n", &7u64.to_be_bytes()).unwrap();
        assert_eq!(read_u64(store.db().get("n").unwrap(), "n").unwrap(), Some(7));
        store.db().insert("n", "short").unwrap();
        assert!(matches!(read_u64(store.db().get("n").unwrap(), "n"), Err(StoreError::Corrupt(_))));
    }
}
