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
            Ok(Err(e)) => Err(match unreplaceable(&e) {
                Some(why) => StateError::Unreplaceable {
                    path: self.path.clone(),
                    reason: format!("{e}: {why}"),
                },
                None => StateError::Write {
                    path: self.path.clone(),
                    reason: e.to_string(),
                },
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

/// Why a write through [`write_atomic`] that ended in `e` will never succeed at this path, or
/// None for a failure that may pass (a full disk, a permission, an I/O error): the rename over
/// it is refused because the path is a mount point (`EBUSY`: a file bind-mounted on its own, as
/// `docker run -v $PWD/switchyard.json:/var/lib/switchyard/switchyard.json` does) or on another
/// filesystem than its directory (`EXDEV`).
pub fn unreplaceable(e: &std::io::Error) -> Option<&'static str> {
    match e.kind() {
        std::io::ErrorKind::ResourceBusy | std::io::ErrorKind::CrossesDevices => Some(
            "every change is written to a temp file beside the state file and renamed over it, and the path refuses that rename: it is a mount point (a file bind-mounted on its own). Mount the directory that holds it instead (docker: -v $PWD/state:/var/lib/switchyard, not -v $PWD/state/switchyard.json:/var/lib/switchyard/switchyard.json)",
        ),
        _ => None,
    }
}

/// The file `path` names, through symlinks (a relative link read against its own directory):
/// `path` itself when it is no link, or when the links go round.
pub fn resolve_links(path: &Path) -> PathBuf {
    let mut p = path.to_path_buf();
    // The kernel's own limit on links followed in one lookup.
    for _ in 0..40 {
        let is_link = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            return p;
        }
        let Ok(target) = std::fs::read_link(&p) else {
            return p;
        };
        p = match p.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    path.to_path_buf()
}

/// temp file in the same directory, fsync, rename over the target, fsync the directory. A
/// symlink at `path` is written through: the temp file goes beside the file it names (resolved
/// once), renamed over that file, and the link stays (a state file kept on another volume
/// through a link keeps being updated there).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let path = &resolve_links(path);
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
    // Written beside the file a link names (write_atomic).
    let path = &resolve_links(path);
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
    // The file a link names: the link stays, and the next write recreates that file.
    let path = &resolve_links(path);
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

    /// A state path the rename in [`write_atomic`] will never replace (a mount point: `EBUSY`,
    /// or another filesystem: `EXDEV`) is told apart from a failure that may pass, which stays
    /// a warning at startup; the reason says what to do.
    #[test]
    fn only_a_path_no_rename_replaces_is_unreplaceable() {
        use std::io::Error;
        for code in [rustix::io::Errno::BUSY, rustix::io::Errno::XDEV] {
            let e = Error::from_raw_os_error(code.raw_os_error());
            let why = unreplaceable(&e).unwrap_or_else(|| panic!("{e} not classified"));
            assert!(
                why.contains("mount point") && why.contains("Mount the directory"),
                "{why}"
            );
        }
        for code in [
            rustix::io::Errno::NOSPC,
            rustix::io::Errno::ACCESS,
            rustix::io::Errno::PERM,
            rustix::io::Errno::ROFS,
            rustix::io::Errno::IO,
            rustix::io::Errno::DQUOT,
        ] {
            let e = Error::from_raw_os_error(code.raw_os_error());
            assert_eq!(unreplaceable(&e), None, "{e}");
        }
    }

    /// `state.path` a symlink (to a file on a persistent volume): the first write replaced the
    /// link by a regular file, and the file it named kept the old colors. Writes now go through
    /// the link, a relative one or a chain of them, to the file it names, and the link stays;
    /// a link to a file not there yet creates that file; stale temps are looked for there.
    #[tokio::test]
    async fn a_symlinked_state_file_is_written_through_the_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let persist = dir.path().join("persist");
        let run = dir.path().join("run");
        std::fs::create_dir_all(&persist).expect("mkdir");
        std::fs::create_dir_all(&run).expect("mkdir");
        let target = persist.join("sy.json");
        std::fs::write(&target, b"{\"version\":1,\"services\":{}}\n").expect("write");
        // run/sy.json -> run/hop.json -> ../persist/sy.json
        std::os::unix::fs::symlink("../persist/sy.json", run.join("hop.json")).expect("ln");
        std::os::unix::fs::symlink(run.join("hop.json"), run.join("sy.json")).expect("ln");
        let link = run.join("sy.json");
        let store = FileStore::new(link.clone());
        let mut states = HashMap::new();
        states.insert(
            "api".to_string(),
            ServiceState::initial(crate::config::Color::Green),
        );
        store
            .save(&states, &HashMap::new(), &["api".to_string()])
            .await
            .expect("save");
        for l in [&link, &run.join("hop.json")] {
            let m = std::fs::symlink_metadata(l).expect("link");
            assert!(m.file_type().is_symlink(), "{} replaced", l.display());
        }
        let held = read_state(&target).expect("target read");
        assert_eq!(
            held.get("api"),
            states.get("api"),
            "the link's target updated"
        );
        assert_eq!(store.load().await.expect("load"), states);
        assert_eq!(temps(&run), Vec::<String>::new());
        assert_eq!(temps(&persist), Vec::<String>::new());
        // Stale temps are beside the target.
        std::fs::write(persist.join(".sy.json.tmp.1.1"), b"x").expect("write");
        assert_eq!(remove_stale_temps(&link), 1);
        // A dangling link: the file it names is created.
        std::fs::remove_file(&target).expect("rm");
        write_atomic(&link, b"{}").expect("write");
        assert!(std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).expect("created"), b"{}\n");
    }
}
