//! The persisted live state: per service the active and previous color and the generation
//! ([`ServiceState`]), the [`Backend`] trait and its two backends, [`file`](mod@file) and
//! [`etcd`], and the record of a change ([`event`]) that is stored together with it.
//!
//! This layer knows nothing of routing or the app: the app (the one writer) calls
//! [`StateStore::load`]/[`StateStore::save`], and the etcd backend delivers other replicas'
//! changes through a channel ([`etcd::sync`]) that the app drains.

pub mod etcd;
pub mod event;
pub mod file;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::Color;

pub use file::{move_aside, remove_stale_temps, write_atomic, FileStore};

/// A service's live state: what the state store persists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    pub active: Color,
    #[serde(default)]
    pub previous: Option<Color>,
    #[serde(default, deserialize_with = "generation")]
    pub generation: u64,
    /// RFC 3339 time of the last change of the live color.
    #[serde(default)]
    pub updated_at: Option<String>,
    /// Automatic rollback paused by an operator.
    #[serde(default)]
    pub paused: bool,
    /// The color an automatic rollback left; auto-rollback stays disarmed until a manual flip.
    #[serde(default)]
    pub failed: Option<Color>,
}

/// The largest generation a state may hold: 2^53 - 1, the largest integer every JSON reader
/// (the dashboard's JavaScript, a float gauge) holds exactly. A file or etcd key holding more
/// is refused as unreadable, not served, and a flip from it is refused, so a stored state
/// never goes past it (nor wraps to 0, which means "never changed").
pub const MAX_GENERATION: u64 = (1 << 53) - 1;

fn generation<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let n = u64::deserialize(d)?;
    if n > MAX_GENERATION {
        return Err(serde::de::Error::custom(format!(
            "generation {n} is past {MAX_GENERATION}, the largest a state may hold"
        )));
    }
    Ok(n)
}

impl ServiceState {
    pub fn initial(active: Color) -> Self {
        ServiceState {
            active,
            previous: None,
            generation: 0,
            updated_at: None,
            paused: false,
            failed: None,
        }
    }

    /// When the live color last changed, from `updated_at`, mapped onto the monotonic clock.
    pub fn flipped_at(&self) -> Option<Instant> {
        let t = humantime::parse_rfc3339(self.updated_at.as_deref()?).ok()?;
        let ago = SystemTime::now()
            .duration_since(t)
            .unwrap_or(Duration::ZERO);
        Instant::now().checked_sub(ago)
    }
}

/// A state backend: reads the stored state, and stores a change of it.
pub trait Backend {
    /// The stored state per service; empty when nothing was stored yet.
    fn load(
        &self,
    ) -> impl std::future::Future<Output = Result<HashMap<String, ServiceState>, StateError>> + Send;

    /// Stores the live state after a change of the services named in `changed`; `states` holds
    /// every service, `previous` the state the change was computed from.
    fn save(
        &self,
        states: &HashMap<String, ServiceState>,
        previous: &HashMap<String, ServiceState>,
        changed: &[String],
    ) -> impl std::future::Future<Output = Result<(), StateError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state file {path} is unreadable or corrupt ({reason}); fix or remove it, or start with --reset-state to move it aside and use the config's colors"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot write state file {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    /// A write the path will never take (a mount point: `file::unreplaceable`).
    #[error("cannot replace the state file {path}: {reason}")]
    Unreplaceable { path: PathBuf, reason: String },
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
    Etcd(std::sync::Arc<etcd::EtcdStore>),
}

impl StateStore {
    pub fn file(path: impl Into<PathBuf>) -> StateStore {
        StateStore::File(FileStore::new(path.into()))
    }

    /// The store `[state]` describes. With etcd, `path` is the last-known-state cache.
    pub fn from_config(cfg: &crate::config::StateConfig) -> StateStore {
        match cfg.backend {
            crate::config::StateBackend::File => StateStore::file(&cfg.path),
            crate::config::StateBackend::Etcd => StateStore::Etcd(etcd::EtcdStore::with_options(
                &cfg.etcd_endpoints,
                &cfg.etcd_prefix,
                etcd::EtcdOptions {
                    timeout: cfg.etcd_timeout,
                    progress_interval: cfg.etcd_progress_interval,
                    cache: Some(cfg.path.clone()),
                },
            )),
        }
    }

    /// The file whose temp files are cleaned up at start: the state file, or etcd's cache.
    pub fn local_path(&self) -> Option<PathBuf> {
        match self {
            StateStore::File(f) => Some(f.path().to_path_buf()),
            StateStore::Etcd(e) => e.options().cache.clone(),
        }
    }

    /// The stored state per service; empty when nothing was stored yet.
    pub async fn load(&self) -> Result<HashMap<String, ServiceState>, StateError> {
        match self {
            StateStore::File(f) => Backend::load(f).await,
            StateStore::Etcd(e) => Backend::load(&**e).await,
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
            StateStore::File(f) => Backend::save(f, states, previous, changed).await,
            StateStore::Etcd(e) => Backend::save(&**e, states, previous, changed).await,
        }
    }

    /// The local audit log: beside the state file, or in the working directory for etcd.
    pub fn audit_path(&self) -> Option<PathBuf> {
        match self {
            StateStore::File(f) => Some(f.path().with_extension("events.jsonl")),
            StateStore::Etcd(_) => None,
        }
    }

    pub fn as_etcd(&self) -> Option<&std::sync::Arc<etcd::EtcdStore>> {
        match self {
            StateStore::Etcd(e) => Some(e),
            StateStore::File(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A directory is never moved aside.
        std::fs::create_dir(&path).expect("mkdir");
        let err = move_aside(&path).expect_err("a directory");
        assert!(err.to_string().contains("is a directory"), "{err}");
        assert!(path.is_dir());
    }

    /// A generation a flip could wrap to 0 (u64::MAX in a hand-edited file answered the next
    /// flip with generation 0) is refused when read, saying which; the largest exact JSON
    /// integer is read as it is.
    #[tokio::test]
    async fn a_generation_past_the_largest_exact_json_integer_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let store = StateStore::file(&path);
        let file = |g: u64| {
            format!("{{\"version\": 1, \"services\": {{\"api\": {{\"active\": \"green\", \"generation\": {g}}}}}}}")
        };
        for g in [u64::MAX, MAX_GENERATION + 1] {
            std::fs::write(&path, file(g)).expect("write");
            let err = store.load().await.expect_err("refused");
            assert!(
                err.to_string().contains(&format!("generation {g} is past")),
                "{err}"
            );
        }
        std::fs::write(&path, file(MAX_GENERATION)).expect("write");
        let read = store.load().await.expect("the largest is read");
        assert_eq!(read["api"].generation, MAX_GENERATION);
    }
}
