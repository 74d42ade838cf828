//! The outbox's store, reopened after a storage fault instead of failing until a restart.
//!
//! sled keeps the first I/O error it meets (a full disk, a file system remounted read-only)
//! and returns it from every later call of that handle, even once the disk has room again.
//! So a fault is healed here by letting go of the broken handle and opening the store again
//! from its directory, which recovers everything that was acknowledged before the fault.
//!
//! Opening costs a recovery, so it is tried only once a probe shows the directory takes
//! writes again (a small file written, synced and removed): every event produced after the
//! disk is fixed is stored, and a still-broken disk costs each event one failed probe, not
//! a store recovery. Holders of the old handle (the forwarder's consumer) notice the new
//! generation and let go of it, since sled's lock is held until the last clone is dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use chorus_backbone::embedded::EmbeddedBackbone;
use chorus_backbone::BackboneError;

/// Whether an error of the embedded store means its handle is broken and must be reopened
/// (an I/O failure, a writer that stopped), rather than a refused call.
pub(crate) fn is_storage_fault(e: &BackboneError) -> bool {
    matches!(e, BackboneError::Storage { .. } | BackboneError::Closed)
}

/// An embedded store that is reopened after a storage fault.
pub(crate) struct HealingStore {
    path: PathBuf,
    /// The open store and its generation; `None` while broken.
    current: RwLock<Option<(u64, EmbeddedBackbone)>>,
    generation: AtomicU64,
    /// Why the store is broken, while it is.
    fault: Mutex<Option<String>>,
    /// One reopening at a time.
    reopening: tokio::sync::Mutex<()>,
    /// Faults met since start.
    pub faults: AtomicU64,
}

impl HealingStore {
    pub(crate) fn new(store: EmbeddedBackbone) -> Self {
        HealingStore {
            path: store.path().to_path_buf(),
            current: RwLock::new(Some((0, store))),
            generation: AtomicU64::new(0),
            fault: Mutex::new(None),
            reopening: tokio::sync::Mutex::new(()),
            faults: AtomicU64::new(0),
        }
    }

    /// Generation of the open store: it changes when a fault lets go of a handle.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Why the store cannot be written, while it cannot.
    pub(crate) fn fault(&self) -> Option<String> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The open store, or `None` while it is broken (use [`HealingStore::heal`]).
    pub(crate) fn open(&self) -> Option<(u64, EmbeddedBackbone)> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records that the store of `generation` failed with `error`; when it is a storage fault
    /// and that store is still the current one, its handle is let go of so that the store can
    /// be reopened. Returns whether it was a storage fault.
    pub(crate) fn failed(&self, generation: u64, error: &BackboneError) -> bool {
        if !is_storage_fault(error) {
            return false;
        }
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if matches!(&*current, Some((g, _)) if *g == generation) {
            // Dropped here, outside no other lock: the last clone joins the writer thread.
            let broken = current.take();
            self.generation.fetch_add(1, Ordering::SeqCst);
            self.faults.fetch_add(1, Ordering::Relaxed);
            *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
            tracing::error!(
                store = %self.path.display(),
                error = %error,
                "the outbox cannot store events; it is reopened once its directory takes writes again"
            );
            drop(current);
            drop(broken);
        }
        true
    }

    /// The store, reopened when it is broken and its directory takes writes again. Errors
    /// name the fault when it is not healed yet.
    pub(crate) async fn heal(&self) -> Result<(u64, EmbeddedBackbone), BackboneError> {
        if let Some(open) = self.open() {
            return Ok(open);
        }
        let _one = self.reopening.lock().await;
        if let Some(open) = self.open() {
            return Ok(open);
        }
        let path = self.path.clone();
        let reopened = tokio::task::spawn_blocking(move || {
            probe(&path).map_err(|e| BackboneError::storage(format!("writing to {}", path.display()), e))?;
            EmbeddedBackbone::open_path(&path)
        })
        .await
        .map_err(|e| BackboneError::storage("reopening the outbox", e))?;
        let store = match reopened {
            Ok(store) => store,
            Err(e) => {
                let why = self.fault().unwrap_or_default();
                return Err(BackboneError::storage(format!("outbox store broken ({why}); still"), e));
            }
        };
        let generation = self.generation();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some((generation, store.clone()));
        if let Some(was) = self.fault.lock().unwrap_or_else(|e| e.into_inner()).take() {
            tracing::info!(store = %self.path.display(), was = %was, "the outbox stores events again");
        }
        Ok((generation, store))
    }
}

/// Whether the directory takes writes: a small file written, synced and removed.
fn probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".write-probe");
    let result = (|| {
        let mut file = std::fs::File::create(&path)?;
        file.write_all(&[0u8; 4096])?;
        file.sync_all()
    })();
    // Missing when the create failed; the probe's answer is the write's, not the cleanup's.
    std::fs::remove_file(&path).ok();
    result
}
