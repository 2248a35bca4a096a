//! The record of one change (or wanted change) of the live state: what `/api/events` lists, the
//! audit file holds and the webhooks receive. It lives with the state because a change is stored
//! together with its events (one etcd transaction, one audit-log `pending` line); the log that
//! keeps and publishes them is [`crate::events`].

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Color;

/// Why an event was recorded; serialised as the snake_case names `/api/events`, the audit file,
/// the webhooks and the `reason` label of `switchyard_flips_total` use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// An operator's flip (one service, or each service of a flip-all).
    Manual,
    /// An operator's rollback to the previous color.
    Rollback,
    /// The rollback engine flipped back on its own.
    AutoRollback,
    /// The rollback engine wanted to roll back but could not (no healthy previous pool, latch).
    RollbackBlocked,
    /// A trigger fired in dry-run mode.
    WouldRollback,
    /// The automatic rollback lost a race with another change.
    RollbackConflict,
    /// A config reload.
    Reload,
    /// Automatic rollback paused by an operator.
    Pause,
    /// Automatic rollback resumed by an operator.
    Resume,
    ReleaseStart,
    ReleasePhase,
    ReleasePromote,
    ReleaseComplete,
    ReleaseRollback,
    ReleaseAbort,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Manual => "manual",
            Reason::Rollback => "rollback",
            Reason::AutoRollback => "auto_rollback",
            Reason::RollbackBlocked => "rollback_blocked",
            Reason::WouldRollback => "would_rollback",
            Reason::RollbackConflict => "rollback_conflict",
            Reason::Reload => "reload",
            Reason::Pause => "pause",
            Reason::Resume => "resume",
            Reason::ReleaseStart => "release_start",
            Reason::ReleasePhase => "release_phase",
            Reason::ReleasePromote => "release_promote",
            Reason::ReleaseComplete => "release_complete",
            Reason::ReleaseRollback => "release_rollback",
            Reason::ReleaseAbort => "release_abort",
        }
    }

    /// Events a person should look at: the proxy changed or wanted to change traffic on its own.
    /// Logged at WARN; every other event (manual flips, reloads, pauses) at INFO.
    pub fn is_warning(self) -> bool {
        matches!(
            self,
            Reason::AutoRollback | Reason::RollbackBlocked | Reason::ReleaseRollback
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub service: String,
    pub from: Option<Color>,
    pub to: Option<Color>,
    pub reason: Reason,
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
    pub fn new(service: &str, reason: Reason, actor: &str, detail: impl Into<String>) -> Event {
        Event {
            time: now_rfc3339(),
            service: service.to_string(),
            from: None,
            to: None,
            reason,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_serialise_as_their_names() {
        for r in [
            Reason::Manual,
            Reason::Rollback,
            Reason::AutoRollback,
            Reason::RollbackBlocked,
            Reason::WouldRollback,
            Reason::RollbackConflict,
            Reason::Reload,
            Reason::Pause,
            Reason::Resume,
            Reason::ReleaseStart,
            Reason::ReleasePhase,
            Reason::ReleasePromote,
            Reason::ReleaseComplete,
            Reason::ReleaseRollback,
            Reason::ReleaseAbort,
        ] {
            let json = serde_json::to_string(&r).expect("serialise");
            assert_eq!(json, format!("\"{}\"", r.as_str()));
            assert_eq!(serde_json::from_str::<Reason>(&json).expect("parse"), r);
        }
    }

    #[test]
    fn the_flip_metric_reasons_are_reasons() {
        for name in crate::metrics::FLIP_REASONS {
            let r: Reason = serde_json::from_value(serde_json::json!(name)).expect(name);
            assert_eq!(r.as_str(), name);
        }
    }
}
