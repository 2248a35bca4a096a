//! `[admin] watch_config = true`: reload when the config file's content changes, without a
//! signal. Made for Kubernetes ConfigMaps: the kubelet updates a mounted ConfigMap by writing a
//! new timestamped directory and swapping the `..data` symlink, so the file's inode, mtime and
//! directory entries are not a reliable signal across runtimes and volume types. The content is:
//! the file is read (through its symlinks) once per [`POLL_INTERVAL`] and compared with the last
//! content seen. A config is a few KiB, so no hashing or inotify is needed.
//!
//! A changed content is reloaded once it reads the same on two consecutive polls, so a file an
//! editor is still writing is not reloaded half-written. The reload is the one `SIGHUP` and
//! `POST /api/reload` run ([`App::reload`]): all or nothing, an invalid file changes nothing,
//! counted in `switchyard_config_reloads_total{result="error"}` and logged; that content is not
//! retried until the file changes again.
//!
//! The flag is read from the live config on every poll, so turning it on or off is itself a
//! reload away.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;

/// How often the file is read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The actor recorded in the `reload` event.
pub const ACTOR: &str = "config-watch";

/// The poll's memory: the content last acted on, and the content read by the previous poll.
#[derive(Default)]
struct Seen {
    applied: Option<Vec<u8>>,
    pending: Option<Vec<u8>>,
    /// A read error is logged once until the file reads again.
    failing: bool,
}

/// What a poll decided.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Nothing,
    Reload,
}

impl Seen {
    fn observe(&mut self, content: Vec<u8>) -> Step {
        let Some(applied) = &self.applied else {
            // The first read is the baseline: the running config came from this file.
            self.applied = Some(content);
            return Step::Nothing;
        };
        if *applied == content {
            self.pending = None;
            return Step::Nothing;
        }
        if self.pending.as_ref() == Some(&content) {
            self.pending = None;
            self.applied = Some(content);
            return Step::Reload;
        }
        self.pending = Some(content);
        Step::Nothing
    }
}

/// The file's content as the app starts (read before the listeners serve, so a change right
/// after the start is not taken for the baseline); `None` when the watch is off or the file
/// cannot be read.
pub async fn baseline(app: &App) -> Option<Vec<u8>> {
    let path = app.config_path.clone()?;
    if !app.snapshot().config.admin.watch_config {
        return None;
    }
    read(path).await.ok()
}

/// Runs until shutdown. Does nothing for an app started without a config file.
pub async fn run(app: Arc<App>, baseline: Option<Vec<u8>>) {
    let Some(path) = app.config_path.clone() else {
        return;
    };
    let mut seen = Seen {
        applied: baseline,
        ..Seen::default()
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = app.shutdown.cancelled() => return,
        }
        if !app.snapshot().config.admin.watch_config {
            // Off: forget the file, so turning it on takes the content of that moment as the
            // baseline (that reload already applied it).
            seen = Seen::default();
            continue;
        }
        let content = match read(path.clone()).await {
            Ok(c) => {
                seen.failing = false;
                c
            }
            Err(e) => {
                if !seen.failing {
                    tracing::warn!(path = %path.display(), error = %e, "watch_config: cannot read the config file; the running config is unchanged");
                    seen.failing = true;
                }
                continue;
            }
        };
        if seen.observe(content) == Step::Nothing {
            continue;
        }
        tracing::info!(path = %path.display(), "watch_config: the config file changed; reloading");
        match app.reload(ACTOR).await {
            Ok(o) => {
                crate::health::ensure(&app);
                tracing::info!("{}", o.message);
            }
            // `App::reload` logged every error of a refused config and counted it.
            Err(crate::app::ReloadError::Invalid(_)) => {}
            Err(e) => tracing::error!(error = %e, "reload on a config file change refused"),
        }
    }
}

/// File I/O off the runtime's threads.
async fn read(path: PathBuf) -> std::io::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_a_change_once_it_is_stable() {
        let mut s = Seen::default();
        assert_eq!(s.observe(b"a".to_vec()), Step::Nothing, "baseline");
        assert_eq!(s.observe(b"a".to_vec()), Step::Nothing);
        assert_eq!(s.observe(b"b".to_vec()), Step::Nothing, "first sight");
        assert_eq!(s.observe(b"b".to_vec()), Step::Reload, "stable");
        assert_eq!(s.observe(b"b".to_vec()), Step::Nothing, "applied");
    }

    /// Started again after a panic (an empty baseline: nothing applied is known), the file as
    /// it is is reloaded once it reads the same twice.
    #[test]
    fn an_empty_baseline_reloads_the_file_once() {
        let mut s = Seen {
            applied: Some(Vec::new()),
            ..Seen::default()
        };
        assert_eq!(s.observe(b"a".to_vec()), Step::Nothing, "first sight");
        assert_eq!(s.observe(b"a".to_vec()), Step::Reload, "stable");
        assert_eq!(s.observe(b"a".to_vec()), Step::Nothing, "applied");
    }

    #[test]
    fn a_half_written_file_is_not_reloaded() {
        let mut s = Seen::default();
        s.observe(b"a".to_vec());
        assert_eq!(s.observe(b"a-partial".to_vec()), Step::Nothing);
        assert_eq!(s.observe(b"a-complete".to_vec()), Step::Nothing);
        assert_eq!(s.observe(b"a-complete".to_vec()), Step::Reload);
    }

    #[test]
    fn a_change_back_before_it_settled_does_nothing() {
        let mut s = Seen::default();
        s.observe(b"a".to_vec());
        assert_eq!(s.observe(b"b".to_vec()), Step::Nothing);
        assert_eq!(s.observe(b"a".to_vec()), Step::Nothing);
        assert_eq!(s.observe(b"a".to_vec()), Step::Nothing);
    }
}
