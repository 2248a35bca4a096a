//! The audit log: every flip, rollback, blocked rollback and reload, kept in a bounded ring for
//! `/api/events`, appended as JSON lines to a file beside the state, and handed to the webhooks.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::config::Color;
use crate::notify::Notifier;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub service: String,
    pub from: Option<Color>,
    pub to: Option<Color>,
    /// `manual`, `flip_all`, `rollback`, `auto_rollback`, `rollback_blocked`, `would_rollback`,
    /// `reload`, `pause`, `resume`, `health`.
    pub reason: String,
    pub actor: String,
    pub detail: String,
    /// The service's generation after the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// For rollback decisions: trigger kind, threshold, measured value, window, requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<serde_json::Value>,
}

impl Event {
    pub fn new(service: &str, reason: &str, actor: &str, detail: impl Into<String>) -> Event {
        Event {
            time: now_rfc3339(),
            service: service.to_string(),
            from: None,
            to: None,
            reason: reason.to_string(),
            actor: actor.to_string(),
            detail: detail.into(),
            generation: None,
            trigger: None,
        }
    }

    pub fn colors(mut self, from: Color, to: Color) -> Event {
        self.from = Some(from);
        self.to = Some(to);
        self
    }

    pub fn generation(mut self, g: u64) -> Event {
        self.generation = Some(g);
        self
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub const RING_CAPACITY: usize = 1000;

/// Events a person should look at: the proxy changed or wanted to change traffic on its own.
/// Logged at WARN; every other event (manual flips, reloads, pauses) at INFO.
pub fn is_warning(reason: &str) -> bool {
    matches!(
        reason,
        "auto_rollback" | "rollback_blocked" | "release_rollback"
    )
}

pub struct EventLog {
    ring: Mutex<VecDeque<Event>>,
    audit: Option<PathBuf>,
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
    notifier: Option<Notifier>,
}

impl EventLog {
    /// Opens the log; the last events of an existing audit file are loaded so `/api/events`
    /// survives restarts.
    pub fn new(audit: Option<PathBuf>, notifier: Option<Notifier>) -> EventLog {
        let mut ring = VecDeque::with_capacity(RING_CAPACITY);
        if let Some(path) = &audit {
            if let Ok(text) = std::fs::read_to_string(path) {
                for line in text.lines() {
                    if let Ok(ev) = serde_json::from_str::<Event>(line) {
                        if ring.len() == RING_CAPACITY {
                            ring.pop_front();
                        }
                        ring.push_back(ev);
                    }
                }
            }
        }
        EventLog {
            ring: Mutex::new(ring),
            audit,
            file: tokio::sync::Mutex::new(None),
            notifier,
        }
    }

    pub async fn record(&self, ev: Event) {
        // Colors by their names (`green`); absent fields are left out rather than `None`.
        let (from, to) = (
            ev.from.map(tracing::field::display),
            ev.to.map(tracing::field::display),
        );
        if is_warning(&ev.reason) {
            tracing::warn!(
                service = %ev.service,
                reason = %ev.reason,
                from,
                to,
                actor = %ev.actor,
                generation = ev.generation,
                "{}",
                ev.detail
            );
        } else {
            tracing::info!(
                service = %ev.service,
                reason = %ev.reason,
                from,
                to,
                actor = %ev.actor,
                generation = ev.generation,
                "{}",
                ev.detail
            );
        }
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() == RING_CAPACITY {
                ring.pop_front();
            }
            ring.push_back(ev.clone());
        }
        if let Some(path) = &self.audit {
            if let Err(e) = self.append(path, &ev).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot append to the audit log; the event is kept in memory only");
            }
        }
        if let Some(n) = &self.notifier {
            n.send(&ev);
        }
    }

    async fn append(&self, path: &PathBuf, ev: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            if let Some(dir) = path.parent() {
                if !dir.as_os_str().is_empty() {
                    tokio::fs::create_dir_all(dir).await?;
                }
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?;
            *guard = Some(f);
        }
        if let Some(f) = guard.as_mut() {
            f.write_all(&line).await?;
            f.flush().await?;
        }
        Ok(())
    }

    /// Newest last.
    pub fn list(&self) -> Vec<Event> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}
