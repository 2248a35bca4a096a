//! The file backend: the whole state in one JSON file, rewritten on every change through a temp
//! file, fsync and rename, so a crash leaves either the old or the new file, never a torn one. A
//! state file that cannot be read stops startup: silently falling back to the config's `active`
//! could send production traffic to a color that was rolled back.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::state::{Backend, ServiceState, StateError, StateFile};

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(path: PathBuf) -> FileStore {
        FileStore { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Backend for FileStore {
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

    async fn save(
        &self,
        states: &HashMap<String, ServiceState>,
        _previous: &HashMap<String, ServiceState>,
        _changed: &[String],
    ) -> Result<(), StateError> {
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
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // A full disk fails every write: each would leave one more temp file behind.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
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

/// `--reset-state`: moves an unreadable state file aside so startup can proceed. A readable
/// one is kept (None, as for no file): it holds the answered flips, and moving it aside would
/// drop them.
/// A directory there is an error, never moved: it is not a state file, and may hold anything.
pub fn move_aside(path: &Path) -> std::io::Result<Option<PathBuf>> {
    if path.is_dir() {
        return Err(std::io::Error::other(format!(
            "{} is a directory, not a state file; nothing was moved (state.path must name a file)",
            path.display()
        )));
    }
    if !path.exists() || read_state(path).is_ok() {
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

    fn temps(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect()
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        // A directory where the file should be: the temp file is written, the rename fails.
        std::fs::create_dir(&path).expect("mkdir");
        std::fs::write(path.join("x"), b"x").expect("write");
        for _ in 0..3 {
            assert!(write_atomic(&path, b"{}").is_err());
        }
        assert_eq!(temps(dir.path()), Vec::<String>::new());
        std::fs::remove_dir_all(&path).expect("rmdir");
        write_atomic(&path, b"{}").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"{}\n");
        assert_eq!(temps(dir.path()), Vec::<String>::new());
    }
}
