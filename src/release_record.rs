//! The record of releases: the running one and the last [`RECENT`], their metrics, and the form
//! a running release is stored in (beside the state file, or in etcd). The app owns the record
//! (the admin API and the watcher read it); `crate::release` drives a release and is its only
//! writer. It sits below the app so that the app can own it without importing the driver.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::plan::{parse, PhasePlan};
use crate::config::Color;
use crate::events::now_rfc3339;
use crate::routing::Service;
use crate::state::etcd::ReleaseRead;

pub const RELEASE_PHASE: &str = "switchyard_release_phase";
pub const RELEASE_STATE: &str = "switchyard_release_state";
pub const RELEASES_TOTAL: &str = "switchyard_releases_total";

/// Every release state, as `switchyard_release_state{state}` labels.
pub const STATES: [&str; 6] = [
    "running",
    "waiting",
    "validating",
    "complete",
    "rolled_back",
    "aborted",
];
/// Every `result` of `switchyard_releases_total`.
pub const RESULTS: [&str; 3] = ["complete", "rolled_back", "aborted"];
/// Ended releases kept for `GET /api/releases`.
pub const RECENT: usize = 20;

// ---------------------------------------------------------------------------------------------
// A running release
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub(crate) struct PhaseRun {
    pub(crate) plan: PhasePlan,
    /// Each service and the color this phase sends it to.
    pub(crate) targets: Vec<(String, Color)>,
    pub(crate) state: &'static str,
    pub(crate) started_at: Option<String>,
    pub(crate) bake_ends_at: Option<String>,
    pub(crate) bake_deadline: Option<Instant>,
    /// Wall clock (ms since the epoch) when the bake started: a restart resumes from it.
    pub(crate) bake_started_ms: Option<u64>,
    pub(crate) ended_at: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Release {
    pub id: String,
    pub name: String,
    pub state: &'static str,
    pub phase: usize,
    pub(crate) phases: Vec<PhaseRun>,
    pub(crate) started_at: String,
    pub(crate) ended_at: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) validate: Duration,
    pub(crate) validate_ends_at: Option<String>,
    pub(crate) validate_deadline: Option<Instant>,
    pub(crate) validate_started_ms: Option<u64>,
    /// The plan as submitted (stored, so a restart can resume the release).
    pub(crate) plan_json: Value,
    /// Each service of the plan and its color when the release started.
    pub(crate) pre: BTreeMap<String, Color>,
    /// The services the release has flipped so far (in order).
    pub(crate) flipped: Vec<String>,
    /// Why the release does not advance by itself any more (a forced manual change).
    pub(crate) paused: Option<String>,
    pub(crate) actor: String,
    /// With the etcd backend, the revision at which etcd stored this release's end (its
    /// history key's create revision): `recent` is ordered by it, not by `ended_at`, which is
    /// the ending replica's own clock. None until known (a local end etcd has not shown yet,
    /// and always with the file backend).
    pub(crate) end_rev: Option<i64>,
}

impl Release {
    /// The release's own end: its result, why, and when (returned for its phases).
    fn end(&mut self, result: &'static str, reason: String) -> String {
        let now = now_rfc3339();
        self.state = result;
        self.reason = Some(reason);
        self.ended_at = Some(now.clone());
        now
    }

    /// Marks it ended now with `result`: its phases' states and end times as an end leaves
    /// them.
    pub(crate) fn finish(&mut self, result: &'static str, reason: String) {
        let now = self.end(result, reason);
        for p in &mut self.phases {
            if matches!(p.state, "baking" | "waiting") {
                p.state = if result == "complete" {
                    "passed"
                } else {
                    "rolled_back"
                };
                p.ended_at = Some(now.clone());
                p.bake_deadline = None;
            }
        }
        if result != "complete" {
            // Every phase that flipped something went back.
            for p in &mut self.phases {
                if p.state == "passed" {
                    p.state = "rolled_back";
                }
            }
        }
    }

    /// Marks it ended now with `result` where nothing of it was returned (`serve` ended it at
    /// startup: the state was reset or missing): each phase keeps the state it had, a bake or
    /// a gate it was in is over (its end time set, no time left); none is `rolled_back`, since
    /// nothing was flipped back.
    pub(crate) fn end_in_place(&mut self, result: &'static str, reason: String) {
        let now = self.end(result, reason);
        for p in &mut self.phases {
            if matches!(p.state, "baking" | "waiting") {
                p.ended_at = Some(now.clone());
                p.bake_deadline = None;
            }
        }
    }

    pub(crate) fn live(&self) -> bool {
        matches!(self.state, "running" | "waiting" | "validating")
    }

    pub(crate) fn involves(&self, service: &str) -> bool {
        self.pre.contains_key(service)
    }

    pub fn to_json(&self) -> Value {
        let now = Instant::now();
        let left = |d: Option<Instant>| d.map(|d| d.saturating_duration_since(now).as_secs_f64());
        let phases: Vec<Value> = self
            .phases
            .iter()
            .map(|p| {
                let colors: Vec<Color> = p.targets.iter().map(|(_, c)| *c).collect();
                let to = match colors.first() {
                    Some(c) if colors.iter().all(|x| x == c) => json!(c),
                    _ => json!(p
                        .targets
                        .iter()
                        .map(|(s, c)| (s.clone(), json!(c)))
                        .collect::<serde_json::Map<_, _>>()),
                };
                json!({
                    "name": p.plan.name,
                    "services": p.plan.services,
                    "to": to,
                    "gate": p.plan.gate.as_str(),
                    "bake_secs": p.plan.bake.as_secs_f64(),
                    "state": p.state,
                    "started_at": p.started_at,
                    "bake_ends_at": p.bake_ends_at,
                    "bake_left_secs": if p.state == "baking" { left(p.bake_deadline) } else { None },
                    "ended_at": p.ended_at,
                })
            })
            .collect();
        json!({
            "id": self.id,
            "name": self.name,
            "state": self.state,
            "phase": self.phase,
            "phases": phases,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "reason": self.reason,
            "validate_secs": self.validate.as_secs_f64(),
            "validate_ends_at": self.validate_ends_at,
            "validate_left_secs": if self.state == "validating" { left(self.validate_deadline) } else { None },
            "pre_release": self.pre,
            "flipped": self.flipped,
            "paused": self.paused,
            "actor": self.actor,
        })
    }
}

pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn wall_after(d: Duration) -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now() + d).to_string()
}

pub(crate) struct ReleaseMetrics {
    pub(crate) phase: IntGauge,
    pub(crate) state: IntGaugeVec,
    pub(crate) total: IntCounterVec,
}

impl ReleaseMetrics {
    pub(crate) fn new(r: &Registry) -> ReleaseMetrics {
        let phase = IntGauge::new(
            RELEASE_PHASE,
            "Index of the running release's current phase (from 0); -1 without a release.",
        )
        .unwrap_or_else(|e| unreachable!("static gauge definition: {e}"));
        let state = IntGaugeVec::new(
            Opts::new(
                RELEASE_STATE,
                "1 for the running release's state, 0 for the others.",
            ),
            &["state"],
        )
        .unwrap_or_else(|e| unreachable!("static gauge definition: {e}"));
        let total = IntCounterVec::new(
            Opts::new(RELEASES_TOTAL, "Releases ended, by result."),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("static counter definition: {e}"));
        // The registry is the app's own and fresh: the names cannot collide.
        let _ = r.register(Box::new(phase.clone()));
        let _ = r.register(Box::new(state.clone()));
        let _ = r.register(Box::new(total.clone()));
        phase.set(-1);
        for s in STATES {
            state.with_label_values(&[s]).set(0);
        }
        for s in RESULTS {
            total.with_label_values(&[s]);
        }
        ReleaseMetrics {
            phase,
            state,
            total,
        }
    }
}

#[derive(Default)]
pub(crate) struct Inner {
    pub(crate) current: Option<Release>,
    /// Newest first.
    pub(crate) recent: VecDeque<Release>,
    pub(crate) cancel: Option<CancellationToken>,
    pub(crate) promote: bool,
    /// The id of a release whose driver was given up on (it failed too often): a promote of it
    /// would be answered and never carried out.
    pub(crate) undriven: Option<String>,
}

/// The release machinery of one app: the running release, the last [`RECENT`] ones.
pub struct Releases {
    pub(crate) inner: Mutex<Inner>,
    /// Serializes phase flips and whole-release rollbacks (taken before the app's writer lock).
    pub(crate) op: tokio::sync::Mutex<()>,
    pub(crate) wake: tokio::sync::Notify,
    pub(crate) metrics: ReleaseMetrics,
    /// The running release, to the task that stores it (`crate::release::resume`), on every
    /// change of the record: the file backend's writer stores the whole record then
    /// ([`persisted`]), etcd's the running release.
    pub(crate) persist: std::sync::OnceLock<tokio::sync::watch::Sender<Option<Value>>>,
    /// With the etcd backend: what this replica knows of the release key.
    pub(crate) shared: Shared,
    /// The driver is reading back a completion whose write etcd did not answer in time, outside
    /// `op`: a forced change of a release service waits (503) rather than land beside it.
    pub(crate) completing: std::sync::atomic::AtomicBool,
}

impl Releases {
    pub fn new(registry: &Registry) -> Releases {
        Releases {
            inner: Mutex::new(Inner::default()),
            op: tokio::sync::Mutex::new(()),
            wake: tokio::sync::Notify::new(),
            metrics: ReleaseMetrics::new(registry),
            persist: std::sync::OnceLock::new(),
            shared: Shared::default(),
            completing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `{"current": ..., "recent": [...]}` for `GET /api/releases`.
    pub fn to_json(&self) -> Value {
        let inner = self.lock();
        json!({
            "current": inner.current.as_ref().map(Release::to_json),
            "recent": inner.recent.iter().map(Release::to_json).collect::<Vec<_>>(),
        })
    }

    /// The running release, if any.
    pub fn current(&self) -> Option<Release> {
        self.lock().current.clone()
    }

    /// Whether `service` was flipped by the running release (its triggers roll it all back).
    pub fn owns(&self, service: &str) -> bool {
        self.lock()
            .current
            .as_ref()
            .is_some_and(|r| r.live() && r.flipped.iter().any(|s| s == service))
    }

    /// Whether the running release keeps `svc`'s triggers armed: from its flip until the end
    /// of the release's validate window, whatever `watch_for` says (a bake may be longer).
    pub fn arms(&self, svc: &Service) -> bool {
        svc.config.rollback.watches()
            && svc.state.previous.is_some()
            && !svc.state.paused
            && svc.state.failed.is_none()
            && self.owns(svc.name())
    }

    /// Whether `svc`'s triggers are armed now: by its own flip (`watch_for`) or by the running
    /// release. The one answer the watcher acts on and every view shows (`/api/status`,
    /// `switchyard_rollback_armed`, `ctl status`, the dashboard).
    pub fn armed(&self, svc: &Service, now: Instant) -> bool {
        svc.armed(now) || self.arms(svc)
    }

    pub(crate) fn publish(&self, inner: &Inner) {
        if let Some(tx) = self.persist.get() {
            tx.send_replace(inner.current.as_ref().map(Release::stored));
        }
        let state = inner.current.as_ref().map(|r| r.state);
        self.metrics
            .phase
            .set(inner.current.as_ref().map_or(-1, |r| r.phase as i64));
        for s in STATES {
            self.metrics
                .state
                .with_label_values(&[s])
                .set(i64::from(state == Some(s)));
        }
    }

    /// Changes the running release `id` (if it is still the running one); publishes metrics.
    pub(crate) fn update<T>(&self, id: &str, f: impl FnOnce(&mut Release) -> T) -> Option<T> {
        let mut inner = self.lock();
        let r = inner.current.as_mut().filter(|r| r.id == id)?;
        let out = f(r);
        self.publish(&inner);
        Some(out)
    }

    /// Adds ended releases read back from the state backend (after a restart, or written by
    /// another replica) to `recent`: one entry per id (the one already here stays, taking the
    /// etcd revision of its end when it lacked it), newest end first, at most [`RECENT`].
    /// Nothing is written back: they came from there.
    pub(crate) fn restore_recent(&self, ended: impl IntoIterator<Item = Release>) {
        let mut inner = self.lock();
        for r in ended {
            if r.live() {
                continue;
            }
            if let Some(x) = inner.recent.iter_mut().find(|x| x.id == r.id) {
                if r.end_rev.is_some() {
                    x.end_rev = r.end_rev;
                }
                continue;
            }
            // The local copy still runs it: its end is read from the key, where it is whole.
            if inner.current.as_ref().is_some_and(|c| c.id == r.id) {
                continue;
            }
            inner.recent.push_back(r);
        }
        sort_recent(&mut inner.recent);
        inner.recent.truncate(RECENT);
    }

    /// Ends the running release `id` with `result`; it moves to `recent`.
    pub(crate) fn end(&self, id: &str, result: &'static str, reason: String) -> bool {
        let mut inner = self.lock();
        let Some(mut r) = inner.current.take_if(|r| r.id == id) else {
            return false;
        };
        r.finish(result, reason);
        if let Some(c) = inner.cancel.take() {
            c.cancel();
        }
        inner.promote = false;
        inner.recent.retain(|x| x.id != r.id);
        inner.recent.push_front(r);
        inner.recent.truncate(RECENT);
        self.metrics.total.with_label_values(&[result]).inc();
        self.publish(&inner);
        true
    }
}

/// Newest end first. With etcd, by the revision at which etcd stored each end (one order for
/// every replica, whatever their clocks say); an end etcd has not shown yet is the newest (it
/// just happened here). Otherwise (the file backend: one clock) by `ended_at`, RFC 3339 UTC
/// with milliseconds (`now_rfc3339`), whose strings order as the times do.
pub(crate) fn sort_recent(recent: &mut std::collections::VecDeque<Release>) {
    recent.make_contiguous().sort_by(|a, b| {
        let rev = |r: &Release| r.end_rev.unwrap_or(i64::MAX);
        rev(b)
            .cmp(&rev(a))
            .then_with(|| b.ended_at.cmp(&a.ended_at))
    });
}

/// What the file backend keeps beside the state file (`<state>.release.json`): the running
/// release, to resume it, and the ended ones, so that `recent` survives a restart. A file
/// written before `recent` was kept has only `current`; it reads as no ended release.
pub(crate) fn persisted(releases: &Releases) -> Value {
    let inner = releases.lock();
    json!({
        "current": inner.current.as_ref().map(Release::stored),
        "recent": inner.recent.iter().map(Release::stored).collect::<Vec<_>>(),
    })
}

pub(crate) const PHASE_STATES: [&str; 5] =
    ["pending", "baking", "waiting", "passed", "rolled_back"];

pub(crate) fn known(list: &[&'static str], v: &Value) -> Option<&'static str> {
    let s = v.as_str()?;
    list.iter().copied().find(|x| *x == s)
}

pub(crate) fn opt_str(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

impl Release {
    /// What is stored: enough to resume (plan, phase, bake start, pre-release colors).
    pub(crate) fn stored(&self) -> Value {
        json!({
            "version": 1,
            "plan": self.plan_json,
            "id": self.id,
            "state": self.state,
            "phase": self.phase,
            "phases": self.phases.iter().map(|p| json!({
                "targets": p.targets,
                "state": p.state,
                "started_at": p.started_at,
                "bake_ends_at": p.bake_ends_at,
                "bake_started_ms": p.bake_started_ms,
                "ended_at": p.ended_at,
            })).collect::<Vec<_>>(),
            "started_at": self.started_at,
            "validate_ms": self.validate.as_millis() as u64,
            "validate_ends_at": self.validate_ends_at,
            "validate_started_ms": self.validate_started_ms,
            "pre": self.pre,
            "flipped": self.flipped,
            "paused": self.paused,
            "actor": self.actor,
            "ended_at": self.ended_at,
            "reason": self.reason,
        })
    }

    /// The monotonic deadlines of a release read back, from the wall-clock start times stored
    /// with it (the time already spent in a bake or the validate window counts).
    pub(crate) fn set_deadlines(&mut self) {
        let now = wall_ms();
        let elapsed = |started: Option<u64>| {
            Duration::from_millis(now.saturating_sub(started.unwrap_or(now)))
        };
        for p in &mut self.phases {
            p.bake_deadline = (p.state == "baking")
                .then(|| Instant::now() + p.plan.bake.saturating_sub(elapsed(p.bake_started_ms)));
        }
        self.validate_deadline = (self.state == "validating").then(|| {
            Instant::now()
                + self
                    .validate
                    .saturating_sub(elapsed(self.validate_started_ms))
        });
    }

    pub(crate) fn from_stored(v: &Value) -> Option<Release> {
        let plan = parse(&v["plan"], None).ok()?;
        let stored: &[Value] = v["phases"].as_array()?;
        if stored.len() != plan.phases.len() {
            return None;
        }
        let mut phases = Vec::new();
        for (p, st) in plan.phases.iter().zip(stored) {
            let targets: Vec<(String, Color)> =
                serde_json::from_value(st["targets"].clone()).ok()?;
            phases.push(PhaseRun {
                plan: p.clone(),
                targets,
                state: known(&PHASE_STATES, &st["state"])?,
                started_at: opt_str(&st["started_at"]),
                bake_ends_at: opt_str(&st["bake_ends_at"]),
                bake_deadline: None,
                bake_started_ms: st["bake_started_ms"].as_u64(),
                ended_at: opt_str(&st["ended_at"]),
            });
        }
        Some(Release {
            id: v["id"].as_str()?.to_string(),
            name: plan.name.clone(),
            state: known(&STATES, &v["state"])?,
            phase: v["phase"].as_u64()? as usize,
            phases,
            started_at: opt_str(&v["started_at"]).unwrap_or_default(),
            ended_at: opt_str(&v["ended_at"]),
            reason: opt_str(&v["reason"]),
            validate: Duration::from_millis(v["validate_ms"].as_u64()?),
            validate_ends_at: opt_str(&v["validate_ends_at"]),
            validate_deadline: None,
            validate_started_ms: v["validate_started_ms"].as_u64(),
            plan_json: v["plan"].clone(),
            pre: serde_json::from_value(v["pre"].clone()).ok()?,
            flipped: serde_json::from_value(v["flipped"].clone()).ok()?,
            paused: opt_str(&v["paused"]),
            actor: opt_str(&v["actor"]).unwrap_or_default(),
            end_rev: None,
        })
    }
}

/// What this replica knows of the release key.
#[derive(Default)]
pub(crate) struct Seen {
    /// The key's mod_revision as last read or written (0: never seen / absent).
    pub(crate) rev: i64,
    pub(crate) value: Option<Value>,
    /// When `rev` last changed (a driver that stopped writing is taken over after a while).
    pub(crate) changed_at: Option<Instant>,
    /// The id of the release this replica drives.
    pub(crate) driving: Option<String>,
    /// When this replica last wrote the key.
    pub(crate) wrote_at: Option<Instant>,
    /// The release this replica stopped driving because etcd did not store a step of it: it
    /// resumes it once etcd answers, not as a takeover (the stored driver is this replica;
    /// per app, as several replicas of one test process share `replica_id`).
    pub(crate) cut_off: Option<String>,
    /// The revision of the last read older than `rev` that was not applied (a poll's read on its
    /// way while this replica wrote). Read again, it is what etcd holds (restored from a backup
    /// with revisions set back) and is applied.
    pub(crate) older_read: i64,
}

/// The etcd side of one app's releases.
#[derive(Default)]
pub(crate) struct Shared {
    /// Serializes this replica's writes of the key (each reads `seen.rev` under it).
    pub(crate) io: tokio::sync::Mutex<()>,
    pub(crate) seen: Mutex<Seen>,
    /// The history of ended releases in etcd may hold one `recent` lacks: the key changed to
    /// another release, or to an ended one, by any path (a read, this replica's own write).
    pub(crate) history_stale: std::sync::atomic::AtomicBool,
    /// This replica's id as the `driver` of a release, made on first use.
    pub(crate) replica: std::sync::OnceLock<String>,
}

impl Shared {
    pub(crate) fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_read(&self, r: &ReleaseRead) {
        let mut s = self.seen();
        if r.mod_revision != s.rev {
            s.changed_at = Some(Instant::now());
        }
        s.rev = r.mod_revision;
        self.note_value(&s.value, &r.value);
        s.value = r.value.clone();
    }

    /// Marks the history stale when the key moves from `old` to `new` across releases or to
    /// an ended one: two ends (or an end and a start) between two reads would otherwise leave a
    /// release out of `recent`.
    pub(crate) fn note_value(&self, old: &Option<Value>, new: &Option<Value>) {
        let id = |v: &Option<Value>| {
            v.as_ref()
                .and_then(|v| v["release"]["id"].as_str().map(str::to_string))
        };
        let ended = new.as_ref().is_some_and(|v| {
            !v["release"].is_null()
                && !matches!(
                    v["release"]["state"].as_str(),
                    Some("running" | "waiting" | "validating")
                )
        });
        if ended || id(old) != id(new) {
            self.history_stale
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
