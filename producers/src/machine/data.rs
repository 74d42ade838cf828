//! A machine's data store, as Choria's: named values that watchers put (a `kv` watcher's
//! key, an `exec` watcher's `parse_as_data` output) and read (`expression` watchers see it
//! as `data`), kept in `machine_data.json` so they survive a restart: in the machine directory
//! (Choria's place) unless the node keeps it in its state directory (the agent does, so
//! `/etc` can stay read-only). Every change replaces the file whole; a change that cannot be saved is
//! reported to the watcher that made it (which fails), and the value stays in memory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value};

/// The file's name in the machine directory (Choria's).
pub const DATA_FILE: &str = "machine_data.json";

/// The data of one machine.
#[derive(Debug)]
pub struct MachineData {
    path: PathBuf,
    values: Mutex<Map<String, Value>>,
}

impl MachineData {
    /// The store of the machine in `dir`, with what its file holds (empty when there is no
    /// file; a file that is not a JSON object is set aside with a warning, as a store that
    /// cannot be read must not stop the machine).
    pub fn load(dir: &Path) -> Self {
        Self::load_moved(dir, dir)
    }

    /// The store kept in `dir`, starting from the file in `earlier` (where an older version
    /// kept it) while `dir` has none yet.
    pub fn load_moved(dir: &Path, earlier: &Path) -> Self {
        let path = dir.join(DATA_FILE);
        let read = if path.exists() { path.clone() } else { earlier.join(DATA_FILE) };
        let values = match std::fs::read(&read) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "machine data is not a JSON object; starting empty");
                Map::new()
            }),
            Err(_) => Map::new(),
        };
        MachineData { path, values: Mutex::new(values) }
    }

    fn values(&self) -> std::sync::MutexGuard<'_, Map<String, Value>> {
        self.values.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.values().get(key).cloned()
    }

    /// Every value, a copy.
    pub fn snapshot(&self) -> Map<String, Value> {
        self.values().clone()
    }

    /// Sets `key` and saves.
    pub fn put(&self, key: &str, value: Value) -> std::io::Result<()> {
        let mut values = self.values();
        values.insert(key.to_owned(), value);
        self.save(&values)
    }

    /// Changes the value of `key` in place (it is `None` when absent) and saves: for values
    /// several watchers share, changed under one lock.
    pub fn update(&self, key: &str, change: impl FnOnce(Option<Value>) -> Value) -> std::io::Result<()> {
        let mut values = self.values();
        let value = change(values.remove(key));
        values.insert(key.to_owned(), value);
        self.save(&values)
    }

    /// Removes `key` (nothing to do when absent) and saves.
    pub fn delete(&self, key: &str) -> std::io::Result<()> {
        let mut values = self.values();
        if values.remove(key).is_none() {
            return Ok(());
        }
        self.save(&values)
    }

    fn save(&self, values: &Map<String, Value>) -> std::io::Result<()> {
        let text = serde_json::to_vec(values).map_err(std::io::Error::other)?;
        chorus_runtime::files::replace(&self.path, &text, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_survive_a_restart_and_deletes_are_saved() {
        let dir = tempfile::tempdir().unwrap();
        let data = MachineData::load(dir.path());
        assert_eq!(data.get("a"), None);
        data.put("a", json!({"spec": "foo"})).unwrap();
        data.put("b", json!(1)).unwrap();
        data.delete("b").unwrap();
        data.delete("missing").unwrap();
        let again = MachineData::load(dir.path());
        assert_eq!(again.snapshot(), json!({"a": {"spec": "foo"}}).as_object().unwrap().clone());
    }

    #[test]
    fn a_broken_file_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATA_FILE), "[1,").unwrap();
        assert!(MachineData::load(dir.path()).snapshot().is_empty());
    }
}
