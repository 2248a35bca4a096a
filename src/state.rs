//! The persisted live state: per service the active and previous color and the generation.
//!
//! The file backend writes the whole state on every change through a temp file, fsync and
//! rename, so a crash leaves either the old or the new file, never a torn one. A state file that
//! cannot be read stops startup: silently falling back to the config's `active` could send
//! production traffic to a color that was rolled back.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::routing::ServiceState;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state file {path} is unreadable or corrupt ({reason}); fix or remove it, or start with --reset-state to move it aside and use the config's colors"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("state backend unavailable: {0}")]
    Unavailable(String),
    /// Another replica changed the state first (etcd compare-and-swap lost).
    #[error("{0}")]
    Conflict(String),
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StateFile {
    pub version: u32,
    pub services: BTreeMap<String, ServiceState>,
}

/// Where the live state is kept. The etcd backend shares it between replicas.
pub enum StateStore {
    File(FileStore),
    Etcd(std::sync::Arc<crate::etcd::EtcdStore>),
}

impl StateStore {
    pub fn file(path: impl Into<PathBuf>) -> StateStore {
        StateStore::File(FileStore { path: path.into() })
    }

    pub fn etcd(endpoints: &[String], prefix: &str) -> StateStore {
        StateStore::Etcd(crate::etcd::EtcdStore::new(endpoints, prefix))
    }

    /// The store `[state]` describes. With etcd, `path` is the last-known-state cache.
    pub fn from_config(cfg: &crate::config::StateConfig) -> StateStore {
        match cfg.backend {
            crate::config::StateBackend::File => StateStore::file(&cfg.path),
            crate::config::StateBackend::Etcd => {
                StateStore::Etcd(crate::etcd::EtcdStore::with_options(
                    &cfg.etcd_endpoints,
                    &cfg.etcd_prefix,
                    crate::etcd::EtcdOptions {
                        timeout: cfg.etcd_timeout,
                        progress_interval: cfg.etcd_progress_interval,
                        cache: Some(cfg.path.clone()),
                    },
                ))
            }
        }
    }

    /// The file whose temp files are cleaned up at start: the state file, or etcd's cache.
    pub fn local_path(&self) -> Option<PathBuf> {
        match self {
            StateStore::File(f) => Some(f.path.clone()),
            StateStore::Etcd(e) => e.options().cache.clone(),
        }
    }

    /// The stored state per service; empty when nothing was stored yet.
    pub async fn load(&self) -> Result<HashMap<String, ServiceState>, StateError> {
        match self {
            StateStore::File(f) => f.load().await,
            StateStore::Etcd(e) => e.load().await.map(|l| l.states),
        }
    }

    /// Stores the live state after a change of the services named in `changed`; `states` holds
    /// every service. The file backend rewrites the whole file; etcd writes only the changed
    /// keys, in one compare-and-swap transaction.
    /// `previous` is the state the change was computed from (etcd compares against it).
    pub async fn save(
        &self,
        states: &HashMap<String, ServiceState>,
        previous: &HashMap<String, ServiceState>,
        changed: &[String],
    ) -> Result<(), StateError> {
        match self {
            StateStore::File(f) => f.save(states).await,
            StateStore::Etcd(e) => e.save(states, previous, changed).await,
        }
    }

    /// The local audit log: beside the state file, or in the working directory for etcd.
    pub fn audit_path(&self) -> Option<PathBuf> {
        match self {
            StateStore::File(f) => Some(f.path.with_extension("events.jsonl")),
            StateStore::Etcd(_) => None,
        }
    }

    pub fn as_etcd(&self) -> Option<&std::sync::Arc<crate::etcd::EtcdStore>> {
        match self {
            StateStore::Etcd(e) => Some(e),
            StateStore::File(_) => None,
        }
    }
}

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    async fn load(&self) -> Result<HashMap<String, ServiceState>, StateError> {
        let path = self.path.clone();
        let res = tokio::task::spawn_blocking(move || read_state(&path)).await;
        match res {
            Ok(r) => r,
            Err(e) => Err(StateError::Corrupt {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
        }
    }

    async fn save(&self, states: &HashMap<String, ServiceState>) -> Result<(), StateError> {
        let file = StateFile {
            version: 1,
            services: states.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| StateError::Write {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let path = self.path.clone();
        let res = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes)).await;
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StateError::Write {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
            Err(e) => Err(StateError::Write {
                path: self.path.clone(),
                reason: e.to_string(),
            }),
        }
    }
}

fn read_state(path: &Path) -> Result<HashMap<String, ServiceState>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => {
            return Err(StateError::Corrupt {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        }
    };
    let file: StateFile = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(file.services.into_iter().collect())
}

/// temp file in the same directory, fsync, rename over the target, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".to_string());
    // Unique per write: replicas in one process (tests) may share a directory.
    let tmp = dir.join(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

static TEMP_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Removes the temp files a crash between write and rename left beside `path` (`.NAME.tmp.*`);
/// returns how many. Call at start, before anything writes.
pub fn remove_stale_temps(path: &Path) -> usize {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    let prefix = format!(".{name}.tmp.");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(&prefix)
            && e.file_type().map(|t| t.is_file()).unwrap_or(false);
        if stale && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!(path = %e.path().display(), "removed a stale temp file left by a crash");
            removed += 1;
        }
    }
    removed
}

/// `--reset-state`: moves an unreadable state file aside so startup can proceed.
pub fn move_aside(path: &Path) -> std::io::Result<Option<PathBuf>> {
    if !path.exists() {
        return Ok(None);
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-");
    let aside = path.with_extension(format!("json.corrupt-{stamp}"));
    std::fs::rename(path, &aside)?;
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Color;

    #[tokio::test]
    async fn round_trip_and_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        let store = StateStore::file(&path);
        assert!(store.load().await.expect("missing is empty").is_empty());
        let mut m = HashMap::new();
        let mut s = ServiceState::initial(Color::Green);
        s.previous = Some(Color::Blue);
        s.generation = 7;
        m.insert("api".to_string(), s.clone());
        store
            .save(&m, &HashMap::new(), &["api".to_string()])
            .await
            .expect("save");
        assert_eq!(store.load().await.expect("load").get("api"), Some(&s));
        std::fs::write(&path, b"{not json").expect("write");
        let err = store.load().await.expect_err("corrupt");
        assert!(err.to_string().contains("--reset-state"), "{err}");
        assert!(move_aside(&path).expect("aside").is_some());
        assert!(store.load().await.expect("empty again").is_empty());
    }
}
