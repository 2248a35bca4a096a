//! With `[state] backend = "etcd"`: the running release lives in etcd, so every replica sees it
//! and any replica can end it.
//!
//! One key, `<etcd_prefix>release`, holds the current (or the last ended) release as JSON:
//! `{"release": <stored release>, "driver": <replica id>, "promote": bool, "beat_ms": ..,
//! "write_id": ..}`. Every write is a compare-and-swap on the key's mod_revision
//! ([`EtcdStore::cas_release`]); a replica that loses re-reads, applies what it read, and
//! decides again. So:
//!
//! - exactly one replica drives the release (`driver`): it runs the phases, and writes every
//!   change and a heartbeat (`beat_ms`, every `[state] etcd_progress_interval`). Before a phase
//!   flips its services the driver's write of the phase's `baking` state must be applied: if
//!   another replica changed the release first (ended it, took it over), nothing flips;
//! - the others follow: they read the key every half interval and mirror the release (status,
//!   metrics, triggers armed on the services it flipped);
//! - any replica ends the release (a trigger, an abort) by one compare-and-swap to its end
//!   state; the winner returns the services (one state write, one event), every other replica
//!   sees the ended release and stops;
//! - when the key has not changed for three heartbeats (the driver died or was cut off), a
//!   follower takes the release over by a compare-and-swap of `driver`, and resumes it where the
//!   record says, with the time already spent in a bake counted;
//! - promote and a forced pause from a follower are compare-and-swapped into the record; the
//!   driver picks them up on its next read (or when its own write loses to them).
//!
//! An etcd that does not answer a write is never taken for a refusal: the outcome is read back
//! (and fenced), and reported as unknown (503) when even that fails.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::{wall_ms, Release, StartError};
use crate::app::{App, ChangeError};
use crate::release_record::sort_recent;
use crate::state::etcd::{new_write_id, EtcdStore, ReleaseCas, ReleaseRead};

/// This replica (its app: one per process, several in one test process), as the `driver` of a
/// release.
pub(super) fn replica_id(app: &App) -> &str {
    app.releases.shared.replica.get_or_init(new_write_id)
}

/// The etcd store, when the state backend is etcd.
pub(super) fn etcd(app: &App) -> Option<Arc<EtcdStore>> {
    app.store.as_etcd().cloned()
}

/// Whether this replica drives the release `id`.
pub(super) fn drives(app: &App, id: &str) -> bool {
    app.releases.shared.seen().driving.as_deref() == Some(id)
}

fn record(r: &Release, promote: bool, driver: Option<&str>, write_id: &str) -> Value {
    json!({
        "release": r.stored(),
        "driver": driver,
        "promote": promote,
        "beat_ms": wall_ms(),
        "write_id": write_id,
    })
}

fn live_state(s: &str) -> bool {
    matches!(s, "running" | "waiting" | "validating")
}

/// Compare-and-swap of the key from what this replica last saw; keeps `seen` current.
async fn cas(app: &App, store: &EtcdStore, value: Value) -> ReleaseCas {
    cas_id(app, store, value, &new_write_id()).await
}

async fn cas_id(app: &App, store: &EtcdStore, value: Value, write_id: &str) -> ReleaseCas {
    cas_ending(app, store, value, write_id, None).await
}

/// [`cas_id`] that, with `ended`, also adds that ended release to the history in etcd (the
/// same transaction: [`EtcdStore::cas_release_ending`]).
async fn cas_ending(
    app: &App,
    store: &EtcdStore,
    mut value: Value,
    write_id: &str,
    ended: Option<(&str, &Value)>,
) -> ReleaseCas {
    if let Some(o) = value.as_object_mut() {
        o.insert("write_id".to_string(), json!(write_id));
    }
    let expected = app.releases.shared.seen().rev;
    let out = store
        .cas_release_ending(expected, &value, write_id, ended)
        .await;
    let shared = &app.releases.shared;
    match &out {
        ReleaseCas::Applied(rev) => {
            let mut s = shared.seen();
            s.rev = *rev;
            let value = Some(value);
            shared.note_value(&s.value, &value);
            s.value = value;
            s.changed_at = Some(Instant::now());
            s.wrote_at = Some(Instant::now());
        }
        // Ours landed but another write replaced it since: `seen` is what etcd holds now (not
        // ours, which would take it back behind a newer write the watch may have delivered).
        ReleaseCas::Replaced { now, .. } => {
            shared.record_read(now);
            shared.seen().wrote_at = Some(Instant::now());
        }
        ReleaseCas::Lost(read) => shared.record_read(read),
        ReleaseCas::Unknown(_) => {}
    }
    out
}

/// Marks `id` as the release this replica stopped driving because etcd did not store a step
/// of it: it resumes it itself once etcd answers.
fn cut_off(app: &App, id: &str) {
    app.releases.shared.seen().cut_off = Some(id.to_string());
}

fn forget_cut_off(app: &App) {
    app.releases.shared.seen().cut_off = None;
}

/// Stops driving (another replica ended or took over the release, or etcd cannot tell).
fn stop_driving(app: &App) {
    app.releases.shared.seen().driving = None;
    if let Some(c) = app.releases.lock().cancel.take() {
        c.cancel();
    }
}

/// Applies the release key as read: mirrors a release driven elsewhere, merges a follower's
/// promote or pause into the release this replica drives, ends the local copy of an ended one.
fn apply(app: &App, read: &ReleaseRead) {
    let rels = &app.releases;
    let before = rels.shared.seen().rev;
    // Older than what this replica knows (a poll's read that was on its way while this replica
    // wrote): it would take `seen` back to a record etcd no longer holds. The same older read
    // twice in a row is what etcd holds, and is applied.
    {
        let mut seen = rels.shared.seen();
        if read.mod_revision != 0
            && read.mod_revision < before
            && seen.older_read != read.mod_revision
        {
            seen.older_read = read.mod_revision;
            return;
        }
        seen.older_read = 0;
    }
    rels.shared.record_read(read);
    let Some(v) = read.value.as_ref() else { return };
    if v["release"].is_null() {
        return;
    }
    let Some(mut r) = Release::from_stored(&v["release"]) else {
        tracing::warn!("the release stored in etcd is unreadable; ignored");
        return;
    };
    r.ended_at = v["release"]["ended_at"].as_str().map(str::to_string);
    r.reason = v["release"]["reason"].as_str().map(str::to_string);
    r.set_deadlines();
    let driver = v["driver"].as_str();
    let mut driving = rels.shared.seen().driving.clone();
    // The key moved on to another release (a read no older than what this replica knew: a
    // compare-and-swap's answer, or a poll's): the one this replica drove is over, ended by a
    // write whose answer it never had (its end read back, or lost). Its heartbeat or next step
    // would otherwise write its stale copy over the newer release.
    if read.mod_revision >= before && driving.as_deref().is_some_and(|d| d != r.id) {
        tracing::warn!(release = ?driving, newer = %r.id, "the release key holds another release now; this replica stops driving its own");
        stop_driving(app);
        driving = None;
    }
    if !live_state(r.state) {
        if driving.as_deref() == Some(r.id.as_str()) {
            stop_driving(app);
        }
        let mut inner = rels.lock();
        if inner.current.as_ref().is_some_and(|c| c.id == r.id) {
            inner.current = None;
            if let Some(c) = inner.cancel.take() {
                c.cancel();
            }
            inner.promote = false;
            rels.metrics.total.with_label_values(&[r.state]).inc();
        } else {
            // A local copy of another release is over too (etcd moved past it): its end is in
            // the history, which the next pass reads (`note_value` marked it stale).
            if inner
                .current
                .as_ref()
                .is_some_and(|c| c.id != r.id && driving.as_deref() != Some(c.id.as_str()))
            {
                inner.current = None;
                if let Some(c) = inner.cancel.take() {
                    c.cancel();
                }
                inner.promote = false;
            }
            if let Some(x) = inner.recent.iter_mut().find(|x| x.id == r.id) {
                // Ended here: the key's revision orders it until the history's is read.
                if x.end_rev.is_none() {
                    x.end_rev = Some(read.mod_revision);
                    sort_recent(&mut inner.recent);
                }
                rels.publish(&inner);
                return;
            }
        }
        for p in &mut r.phases {
            p.bake_deadline = None;
        }
        // The end and its history entry are one transaction: the key's revision is the entry's
        // (later only if a fence rewrote the key since, which no other end can come between).
        r.end_rev = Some(read.mod_revision);
        inner.recent.retain(|x| x.id != r.id);
        inner.recent.push_front(r);
        sort_recent(&mut inner.recent);
        inner.recent.truncate(super::RECENT);
        rels.publish(&inner);
        return;
    }
    if driving.as_deref() == Some(r.id.as_str()) {
        if driver == Some(replica_id(app)) {
            // Ours: take what followers wrote into it.
            let promote = v["promote"].as_bool() == Some(true);
            let mut inner = rels.lock();
            if promote {
                inner.promote = true;
            }
            if let Some(cur) = inner.current.as_mut().filter(|c| c.id == r.id) {
                if cur.paused.is_none() && r.paused.is_some() {
                    cur.paused = r.paused.clone();
                }
            }
            drop(inner);
            if promote {
                rels.wake.notify_one();
            }
            return;
        }
        tracing::warn!(release = %r.id, driver = ?driver, "another replica took the release over; following it");
        stop_driving(app);
    }
    let mut inner = rels.lock();
    inner.current = Some(r);
    rels.publish(&inner);
}

/// The release as it ended (what etcd stores): phase states and end times as
/// `Releases::end` sets them locally.
fn ended_copy(cur: &Release, result: &'static str, reason: &str) -> Release {
    let mut e = cur.clone();
    let now = crate::events::now_rfc3339();
    e.state = result;
    e.reason = Some(reason.to_string());
    e.ended_at = Some(now.clone());
    for p in &mut e.phases {
        if matches!(p.state, "baking" | "waiting") {
            p.ended_at = Some(now.clone());
        }
        if matches!(p.state, "baking" | "waiting") || (result != "complete" && p.state == "passed")
        {
            p.state = if result == "complete" {
                "passed"
            } else {
                "rolled_back"
            };
        }
    }
    e
}

/// Stores a new release `r` (this replica drives it). 409 when one is live in etcd.
pub(super) async fn create(
    app: &Arc<App>,
    store: &EtcdStore,
    r: &Release,
) -> Result<(), StartError> {
    let shared = &app.releases.shared;
    // A completion not recorded yet: its driver records it within moments (the mark goes
    // then); one still there after a heartbeat's time is recorded by this start (it stores
    // the new release over the mark, and nobody else would know).
    let waited_until = Instant::now() + store.options().progress_interval;
    // Nothing read yet (a start right after this replica started): read first.
    let mut fresh = shared.seen().rev == 0;
    loop {
        let marked = shared
            .seen()
            .value
            .as_ref()
            .is_some_and(|v| v[UNANNOUNCED] == json!(true) && ended_record(v));
        if !fresh && (!marked || Instant::now() >= waited_until) {
            break;
        }
        if marked {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Read under `io` (a read never goes back behind this replica's own write).
        fresh = false;
        let _io = shared.io.lock().await;
        match store.read_release().await {
            Ok(read) => apply(app, &read),
            Err(_) => break,
        }
    }
    let _io = shared.io.lock().await;
    for _ in 0..5 {
        if let Some(cur) = app.releases.current() {
            return Err(StartError::Conflict(format!(
                "release {:?} ({}) is {} (phase {}) on the replicas sharing this etcd; one release runs at a time",
                cur.name, cur.id, cur.state, cur.phase
            )));
        }
        if let Some(v) = shared.seen().value.as_ref().filter(|v| unreturned(v)) {
            return Err(StartError::Conflict(format!(
                "release {} ({}) ended {}, but the services it flipped are not returned yet (a replica returns them); try again in a few seconds",
                v["release"]["name"], v["release"]["id"].as_str().unwrap_or(""), v["release"]["state"].as_str().unwrap_or("")
            )));
        }
        let unannounced = shared
            .seen()
            .value
            .as_ref()
            .filter(|v| v[UNANNOUNCED] == json!(true) && ended_record(v))
            .and_then(|v| Release::from_stored(&v["release"]));
        let (write_id, expected) = (new_write_id(), shared.seen().rev);
        let value = record(r, false, Some(replica_id(app)), "");
        let stored = match cas_id(app, store, value, &write_id).await {
            ReleaseCas::Applied(_) => {
                shared.seen().driving = Some(r.id.clone());
                true
            }
            ReleaseCas::Replaced { now, .. } => {
                // Stored, then changed by another replica: it is followed from there (a
                // takeover or an end stops this replica driving it).
                shared.seen().driving = Some(r.id.clone());
                apply(app, &now);
                true
            }
            ReleaseCas::Lost(read) => {
                apply(app, &read);
                false
            }
            ReleaseCas::Unknown(m) => {
                if let Some(done) = unannounced {
                    record_overwritten(app, done, Some((write_id, expected)));
                }
                return Err(StartError::Unknown(format!(
                    "{m}; whether the release was stored is unknown: check `ctl release status` before starting again"
                )));
            }
        };
        if stored {
            if let Some(done) = unannounced {
                tracing::warn!(release = %done.id, "release {} completed, but its release_complete was not recorded yet; the start of release {} records it", done.id, r.id);
                record_overwritten(app, done, None);
            }
            return Ok(());
        }
    }
    Err(StartError::Conflict(
        "the release record in etcd kept changing; try again".to_string(),
    ))
}

/// Records the completion of `done`, whose `unannounced` mark a start stored its release over
/// (nobody else sees the mark again); with `unsettled` (the start's write id and compared
/// revision, its answer not known), once that write is known stored (fenced: a write still on
/// its way cannot land after).
fn record_overwritten(app: &Arc<App>, done: Release, unsettled: Option<(String, i64)>) {
    let app = app.clone();
    tokio::spawn(async move {
        let Some(store) = etcd(&app) else { return };
        if let Some((write_id, expected)) = unsettled {
            if settle(&app, &store, &write_id, expected).await != Some(true) {
                return;
            }
        }
        let note = "; recorded by the replica that started the next release";
        record_completion(&app, &store, &done.name, &done.id, note).await;
    });
}

/// A step of the release this replica drives that must be stored before it shows (a phase's
/// claim, a phase passed): the record with `edit` applied is compare-and-swapped into etcd, and
/// only once it is stored does the local copy take `edit`. False when it was not stored (the
/// local copy unchanged): another replica took the release over or ended it, or etcd did not
/// answer (then this replica stops driving until it reads the key again, and resumes its own
/// release from what etcd holds).
pub(super) async fn step(
    app: &App,
    store: &EtcdStore,
    id: &str,
    cancel: &tokio_util::sync::CancellationToken,
    edit: impl Fn(&mut Release),
) -> bool {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    // `drives` is this replica's; `cancel` is the driver task's: one that stopped driving (and
    // was replaced by a new one when this replica resumed) never stores a step.
    let ours = || drives(app, id) && !cancel.is_cancelled();
    for _ in 0..5 {
        if !ours() {
            return false;
        }
        let (mut cur, promote) = {
            let inner = app.releases.lock();
            match inner.current.as_ref().filter(|c| c.id == id && c.live()) {
                Some(c) => (c.clone(), inner.promote),
                None => return false,
            }
        };
        edit(&mut cur);
        let stored = match cas(app, store, record(&cur, promote, Some(replica_id(app)), "")).await {
            ReleaseCas::Applied(_) => true,
            // Stored, then replaced: it counts only while this replica still drives (a
            // follower's promote or pause on top of it), not after a takeover or an end.
            ReleaseCas::Replaced { now, .. } => {
                apply(app, &now);
                ours()
            }
            ReleaseCas::Lost(read) => {
                apply(app, &read);
                continue;
            }
            ReleaseCas::Unknown(m) => {
                tracing::error!(release = %id, error = %m, "cannot store the release's next step in etcd; this replica stops driving it until etcd answers");
                cut_off(app, id);
                stop_driving(app);
                return false;
            }
        };
        let stored = stored && !cancel.is_cancelled();
        if stored {
            app.releases.update(id, edit);
        }
        return stored;
    }
    false
}

/// A promote on the replica that drives the release: stored in etcd (the record with
/// `promote: true`) before it counts. `Ok(Some(guard))`: stored; until the guard drops no other
/// write of the record can clear it, so the caller records the promote, then lets the gate see
/// it. `Ok(None)`: this replica no longer drives the release (the follower's path applies).
/// Unknown when etcd did not answer (503: whether it was stored is unknown).
pub(super) async fn promote_driving<'a>(
    app: &'a App,
    store: &EtcdStore,
    id: &str,
) -> Result<Option<tokio::sync::MutexGuard<'a, ()>>, ChangeError> {
    let shared = &app.releases.shared;
    let io = shared.io.lock().await;
    for _ in 0..5 {
        if !drives(app, id) {
            return Ok(None);
        }
        let cur = {
            let inner = app.releases.lock();
            match inner.current.as_ref().filter(|c| c.id == id && c.live()) {
                Some(c) => c.clone(),
                None => {
                    return Err(ChangeError::Refused(
                        "the release is no longer running".to_string(),
                    ))
                }
            }
        };
        match cas(app, store, record(&cur, true, Some(replica_id(app)), "")).await {
            ReleaseCas::Applied(_) => return Ok(Some(io)),
            ReleaseCas::Replaced { now, .. } => {
                // Stored; replaced since by another write, which keeps it unless it ended the
                // release or (a takeover) copied it along.
                apply(app, &now);
                return Ok(drives(app, id).then_some(io));
            }
            ReleaseCas::Lost(read) => apply(app, &read),
            ReleaseCas::Unknown(m) => {
                return Err(ChangeError::Unknown(format!(
                    "{m}; whether the promote was stored is unknown: check `ctl release status`"
                )))
            }
        }
    }
    Err(ChangeError::Unavailable(
        "the release record in etcd kept changing under this promote; retry".to_string(),
    ))
}

/// Writes the release this replica drives (every change, and the heartbeat). True when
/// written; false when this replica does not (or no longer) drive it. A write etcd does not
/// answer leaves this replica driving (the next beat writes the whole record again). etcd
/// being down is no sign that another replica took over: followers count a driver stale only
/// over time they could read etcd, and the next write that loses the compare (or the next read)
/// shows a takeover that did happen.
async fn persist_or(app: &App, store: &EtcdStore, id: &str) -> bool {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    for _ in 0..5 {
        if !drives(app, id) {
            return false;
        }
        let (cur, promote) = {
            let inner = app.releases.lock();
            match inner.current.as_ref().filter(|c| c.id == id && c.live()) {
                Some(c) => (c.clone(), inner.promote),
                None => return false,
            }
        };
        match cas(app, store, record(&cur, promote, Some(replica_id(app)), "")).await {
            ReleaseCas::Applied(_) => return true,
            // Written, then replaced: still driving only if the newer write keeps this replica
            // the driver (a follower's promote or pause), not after another one took over.
            ReleaseCas::Replaced { now, .. } => {
                apply(app, &now);
                return drives(app, id);
            }
            ReleaseCas::Lost(read) => apply(app, &read),
            ReleaseCas::Unknown(m) => {
                tracing::debug!(release = %id, error = %m, "cannot store the release's heartbeat in etcd; tried again at the next beat");
                return false;
            }
        }
    }
    false
}

/// What became of [`end`].
pub(super) enum Ended {
    /// This replica ended it: the release as it was (it returns the services).
    Won(Box<Release>),
    /// It is no longer live (another replica ended it first).
    NotLive,
    /// etcd did not answer: [`settle`] finds out whether write `write_id` was stored.
    Unknown {
        write_id: String,
        expected: i64,
        message: String,
    },
}

/// Ends the live release `id` in etcd (one compare-and-swap to `result`).
pub(super) async fn end(
    app: &App,
    store: &EtcdStore,
    id: &str,
    result: &'static str,
    reason: &str,
) -> Result<Ended, ChangeError> {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    for _ in 0..8 {
        let Some(cur) = app.releases.current().filter(|c| c.id == id && c.live()) else {
            return Ok(Ended::NotLive);
        };
        // The key itself must still hold it live: a stale local copy never ends a release twice.
        let stored_live = shared.seen().value.as_ref().is_some_and(|v| {
            v["release"]["id"].as_str() == Some(id)
                && live_state(v["release"]["state"].as_str().unwrap_or(""))
        });
        if !stored_live {
            return Ok(Ended::NotLive);
        }
        let driver = shared
            .seen()
            .value
            .as_ref()
            .and_then(|v| v["driver"].as_str().map(str::to_string));
        let ended = ended_copy(&cur, result, reason);
        let write_id = new_write_id();
        let expected = shared.seen().rev;
        let mut value = record(&ended, false, driver.as_deref(), "");
        // Until this replica says its services are returned (its completion recorded), any
        // replica can do it should this one stop first ([`recover_return`]).
        let mark = if result == "complete" {
            UNANNOUNCED
        } else {
            UNRETURNED
        };
        value[mark] = json!(true);
        value[RETURNER] = json!(replica_id(app));
        let history = ended.stored();
        match cas_ending(app, store, value, &write_id, Some((id, &history))).await {
            ReleaseCas::Applied(_) => {
                shared.seen().driving = None;
                prune_history(app);
                return Ok(Ended::Won(Box::new(cur)));
            }
            ReleaseCas::Replaced { now, .. } => {
                shared.seen().driving = None;
                prune_history(app);
                apply(app, &now);
                // Ended by this replica; but when a newer release started since (running or
                // ended), its services are that release's now: they are left as it set them. (A
                // completion: its driver finds the key moved on, and records it unless the
                // replica that stored the newer release over it did.)
                if result != "complete" && !key_holds(app, id) {
                    tracing::warn!(release = %id, "the release's end was stored in etcd, then a newer release was; its services are left as that release set them");
                    return Ok(Ended::NotLive);
                }
                return Ok(Ended::Won(Box::new(cur)));
            }
            ReleaseCas::Lost(read) => apply(app, &read),
            ReleaseCas::Unknown(message) => {
                return Ok(Ended::Unknown {
                    write_id,
                    expected,
                    message,
                })
            }
        }
    }
    Err(ChangeError::Unavailable(
        "the release record in etcd kept changing under this change; retry".to_string(),
    ))
}

/// Keeps the history in etcd to the last [`super::RECENT`] (after an end this replica stored);
/// in the background, as a failure only leaves an older entry for the next end to delete.
fn prune_history(app: &App) {
    let Some(store) = etcd(app) else { return };
    tokio::spawn(async move {
        if let Err(e) = store.prune_release_history(super::RECENT).await {
            tracing::debug!(error = %e, "cannot prune the release history in etcd");
        }
    });
}

/// Reads the history of ended releases from etcd into `recent`; the error when etcd did not
/// answer.
async fn load_history(app: &App, store: &EtcdStore) -> Result<(), String> {
    match store.release_history(super::RECENT).await {
        Ok(values) => {
            let ended: Vec<Release> = values
                .iter()
                .filter_map(|(rev, v)| {
                    let mut r = Release::from_stored(v)?;
                    r.end_rev = Some(*rev);
                    Some(r)
                })
                .collect();
            if ended.len() < values.len() {
                tracing::warn!(
                    unreadable = values.len() - ended.len(),
                    "some ended releases in etcd are unreadable; they are not listed"
                );
            }
            app.releases.restore_recent(ended);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// A follower's staleness clock (`changed_at`, the last change of the release key it saw) once
/// its reads answer again at `now` after failing since `since`: moved on by the outage's length,
/// so only time the key could be read counts, and never past `now`. Unknown: `now`.
fn outage_skipped(changed_at: Option<Instant>, since: Instant, now: Instant) -> Instant {
    changed_at
        .and_then(|c| c.checked_add(now.saturating_duration_since(since)))
        .map_or(now, |c| c.min(now))
}

/// The longest wait between two tries of a periodic etcd read that keeps failing.
const READ_RETRY_MAX: Duration = Duration::from_secs(30);

/// The wait before the next try of a read after `failures` (at least 1) in a row: `first`,
/// doubled at each further failure, at most [`READ_RETRY_MAX`] (or `first`, when longer).
fn read_retry(first: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    first
        .saturating_mul(1 << doublings)
        .min(READ_RETRY_MAX.max(first))
}

/// One periodic read of etcd (the release key, the history) through an outage: the wait before
/// its next try is `first` while it answers, then grows after each failure in a row (doubled, up
/// to [`READ_RETRY_MAX`]), so an outage costs a few requests, not one every poll; and the log
/// says it once each way: one WARN when the reads start failing, one INFO when one answers
/// again, nothing for each try between.
struct ReadRetry {
    first: Duration,
    failures: u32,
    /// When the first failure in a row happened (none while the reads answer).
    since: Option<Instant>,
    /// The WARN, then the INFO.
    failing: &'static str,
    again: &'static str,
}

impl ReadRetry {
    fn new(first: Duration, failing: &'static str, again: &'static str) -> ReadRetry {
        ReadRetry {
            first,
            failures: 0,
            since: None,
            failing,
            again,
        }
    }

    /// When the failures in a row began (the last try failed), else `None`.
    fn failing_since(&self) -> Option<Instant> {
        self.since
    }

    fn answered(&mut self) {
        if self.failures > 0 {
            tracing::info!(tries = self.failures + 1, "{}", self.again);
        }
        self.failures = 0;
        self.since = None;
    }

    fn failed(&mut self, e: &dyn std::fmt::Display) {
        self.failures = self.failures.saturating_add(1);
        if self.failures == 1 {
            self.since = Some(Instant::now());
            tracing::warn!(error = %e, "{}", self.failing);
        }
    }

    /// Until the next try.
    fn wait(&self) -> Duration {
        match self.failures {
            0 => self.first,
            n => read_retry(self.first, n),
        }
    }
}

/// Reads the history ([`load_history`]) each time `wanted` is notified (a notification during a
/// read makes one more read after it), until shutdown. A read etcd does not answer is tried
/// again as [`ReadRetry`] says, from `first`, until it answers (a notification during the wait,
/// from a read of the key that etcd answered, tries at once, the wait still growing).
async fn history_reader(
    app: &App,
    store: &EtcdStore,
    wanted: &tokio::sync::Notify,
    first: Duration,
) {
    loop {
        tokio::select! {
            _ = wanted.notified() => {}
            _ = app.shutdown.cancelled() => return,
        }
        let mut retry = ReadRetry::new(
            first,
            "cannot read the release history from etcd; `recent` may miss releases until it answers (tried again with a growing wait, up to 30s)",
            "the release history is read from etcd again",
        );
        loop {
            let read = tokio::select! {
                r = load_history(app, store) => r,
                _ = app.shutdown.cancelled() => return,
            };
            match read {
                Ok(()) => {
                    retry.answered();
                    break;
                }
                Err(e) => retry.failed(&e),
            }
            // A notification meanwhile (a read of the key saw it move: etcd answers that one)
            // tries at once, the wait still growing.
            tokio::select! {
                _ = tokio::time::sleep(retry.wait()) => {}
                _ = wanted.notified() => {}
                _ = app.shutdown.cancelled() => return,
            }
        }
    }
}

/// After a phase's flip: whether this replica still drives the live release `id` (a fresh read
/// of the key). When etcd does not answer, the last known answer stands.
pub(super) async fn confirm(app: &App, store: &EtcdStore, id: &str) -> bool {
    if let Ok(read) = store.read_release().await {
        apply(app, &read);
    }
    drives(app, id)
        && app
            .releases
            .current()
            .is_some_and(|c| c.id == id && c.live())
}

/// After an end whose outcome was unknown: reads the key until etcd answers (for at most ten
/// minutes). `Some(true)` when write `write_id` is what etcd stored: the caller won and returns
/// the services; `Some(false)` when it can never land (the key moved on, or a fence under the
/// same compare won); `None` when still not known (the ten minutes passed, or this process is
/// stopping).
pub(super) async fn settle(
    app: &App,
    store: &EtcdStore,
    write_id: &str,
    expected: i64,
) -> Option<bool> {
    let ours =
        |r: &ReleaseRead| r.value.as_ref().and_then(|v| v["write_id"].as_str()) == Some(write_id);
    let deadline = Instant::now() + Duration::from_secs(600);
    while Instant::now() < deadline && !app.shutdown.is_cancelled() {
        if let Ok(read) = store.read_release().await {
            if ours(&read) {
                return Some(true);
            }
            if read.mod_revision != expected {
                // Moved on: the key's history says whether ours was the write that moved it
                // (and was replaced since) or another one beat it.
                match store.release_landed(expected, write_id).await {
                    Ok(landed) => return Some(landed.is_some()),
                    // The key's history from `expected` on is gone (compacted): it can never
                    // be known, nor can the write land now (the compare is past). Taken as not
                    // stored: the caller ends it again, or finds it ended.
                    Err(e) if e.to_string().contains("compacted") => {
                        tracing::warn!(error = %e, write_id, "whether etcd stored the release write cannot be known (its history is compacted); taken as not stored");
                        return Some(false);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            // Unchanged: the write may still be on its way; a fence under the same compare
            // decides it for good.
            let mut fence = read.value.clone().unwrap_or(json!({ "release": null }));
            let fence_id = format!("fence-{write_id}");
            if let Some(o) = fence.as_object_mut() {
                o.insert("write_id".to_string(), json!(fence_id));
            }
            match store.cas_release(expected, &fence, &fence_id).await {
                ReleaseCas::Applied(_) | ReleaseCas::Replaced { .. } => return Some(false),
                ReleaseCas::Lost(r) if ours(&r) => return Some(true),
                ReleaseCas::Lost(_) => {
                    if let Ok(landed) = store.release_landed(expected, write_id).await {
                        return Some(landed.is_some());
                    }
                }
                ReleaseCas::Unknown(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    None
}

/// A change a follower makes to the release driven elsewhere (promote, a forced pause):
/// compare-and-swapped into the record; `f` refuses (Err) or changes the record.
pub(super) async fn change(
    app: &App,
    store: &EtcdStore,
    id: &str,
    f: impl Fn(&mut Value) -> Result<(), ChangeError>,
) -> Result<(), ChangeError> {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    for _ in 0..8 {
        let mut v = shared.seen().value.clone().unwrap_or(Value::Null);
        if v["release"]["id"].as_str() != Some(id)
            || !live_state(v["release"]["state"].as_str().unwrap_or(""))
        {
            return Err(ChangeError::Refused(
                "the release is no longer running".to_string(),
            ));
        }
        f(&mut v)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("beat_ms".to_string(), json!(wall_ms()));
        }
        match cas(app, store, v).await {
            ReleaseCas::Applied(_) => {
                let read = {
                    let s = shared.seen();
                    ReleaseRead {
                        value: s.value.clone(),
                        mod_revision: s.rev,
                    }
                };
                apply(app, &read);
                return Ok(());
            }
            ReleaseCas::Replaced { now, .. } => {
                apply(app, &now);
                return Ok(());
            }
            ReleaseCas::Lost(read) => apply(app, &read),
            ReleaseCas::Unknown(m) => {
                return Err(ChangeError::Unknown(format!(
                    "{m}; whether the change was stored is unknown: check `ctl release status`"
                )))
            }
        }
    }
    Err(ChangeError::Unavailable(
        "the release record in etcd kept changing under this change; retry".to_string(),
    ))
}

/// This replica's copy of the states brought up to etcd's; false (logged) when etcd could not
/// be read: a takeover or resume waits for the next read.
async fn caught_up(app: &App) -> bool {
    match app.catch_up_with_etcd().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the states from etcd; the release is resumed or taken over once they are read");
            false
        }
    }
}

/// Takes over a release whose driver stopped writing; true when this replica drives it now.
async fn take_over(app: &Arc<App>, store: &EtcdStore) -> Option<Release> {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    let mut v = shared.seen().value.clone()?;
    let r = Release::from_stored(&v["release"]).filter(|r| r.live())?;
    if let Some(o) = v.as_object_mut() {
        o.insert("driver".to_string(), json!(replica_id(app)));
        o.insert("beat_ms".to_string(), json!(wall_ms()));
    }
    match cas(app, store, v).await {
        ReleaseCas::Applied(_) => {
            shared.seen().driving = Some(r.id.clone());
            Some(r)
        }
        ReleaseCas::Replaced { now, .. } => {
            // Taken over, then changed again: driving only if this replica still is the driver.
            shared.seen().driving = Some(r.id.clone());
            apply(app, &now);
            drives(app, &r.id).then_some(r)
        }
        ReleaseCas::Lost(read) => {
            apply(app, &read);
            None
        }
        ReleaseCas::Unknown(_) => None,
    }
}

/// A release this replica resumes after etcd did not answer, or takes over from a replica that
/// stopped: a phase whose claim etcd may have stored while its driver, not knowing (its answer
/// came late) or stopped before the flip, flipped nothing (its services are not on the phase's
/// colors) starts again (`pending`) instead of baking what never flipped. Decided on a copy of
/// the states just read from etcd ([`caught_up`]).
fn unflipped_phase_pending(app: &App, mut r: Release) -> Release {
    let snap = app.snapshot();
    let i = r.phase.min(r.phases.len().saturating_sub(1));
    let paused = r.paused.is_some();
    if let Some(p) = r
        .phases
        .get_mut(i)
        .filter(|p| p.state == "baking" && !paused)
    {
        let flipped = p.targets.iter().all(|(name, to)| {
            snap.service(name)
                .is_some_and(|svc| svc.state.active == *to)
        });
        if !flipped {
            p.state = "pending";
            p.started_at = None;
            p.bake_ends_at = None;
            p.bake_deadline = None;
            p.bake_started_ms = None;
        }
    }
    r
}

/// The release key's mark of an ended release whose services are not returned yet (an abort or
/// a rollback stores the end first, then returns them): removed by [`mark_returned`] once they
/// are. Absent on a `complete` end and on records stored before it existed.
const UNRETURNED: &str = "unreturned";
/// The same for a `complete` end whose `release_complete` event is not recorded yet (the
/// replica that stored it stopped before it knew the write landed). Its own name: a replica of
/// an older version, which knows only [`UNRETURNED`], would roll a completed release back.
const UNANNOUNCED: &str = "unannounced";
/// The replica that returns them (records it): the one that ended it, or one that took over.
const RETURNER: &str = "returner";

/// Services to return: a new release waits for them.
fn unreturned(v: &Value) -> bool {
    v[UNRETURNED] == json!(true) && ended_record(v)
}

/// Services to return, or a completion to record.
fn unfinished(v: &Value) -> bool {
    (v[UNRETURNED] == json!(true) || v[UNANNOUNCED] == json!(true)) && ended_record(v)
}

fn ended_record(v: &Value) -> bool {
    !v["release"].is_null() && !live_state(v["release"]["state"].as_str().unwrap_or(""))
}

/// The services of the ended release `id` are returned: its record loses the mark (a
/// compare-and-swap; a write etcd does not answer leaves it, and the replica that takes the
/// return over finds them returned and only marks it).
pub(super) async fn mark_returned(app: &App, store: &EtcdStore, id: &str) {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    for _ in 0..5 {
        let Some(mut v) = shared.seen().value.clone() else {
            return;
        };
        if v["release"]["id"].as_str() != Some(id) || !unfinished(&v) {
            return;
        }
        if let Some(o) = v.as_object_mut() {
            o.remove(UNRETURNED);
            o.remove(UNANNOUNCED);
            o.remove(RETURNER);
        }
        match cas(app, store, v).await {
            ReleaseCas::Applied(_) => return,
            ReleaseCas::Replaced { now, .. } => return apply(app, &now),
            ReleaseCas::Lost(read) => apply(app, &read),
            ReleaseCas::Unknown(m) => {
                tracing::debug!(release = %id, error = %m, "cannot mark the release's services returned in etcd; a replica finds them returned later");
                return;
            }
        }
    }
}

/// Makes this replica the one that returns the services of the ended release `id` (a
/// compare-and-swap of [`RETURNER`], from a fresh read): the release as stored, or None when
/// they are returned already, another replica returns them, or etcd did not store the claim.
/// `takeover`: even when another replica was to return them (it stopped writing).
pub(super) async fn claim_return(
    app: &App,
    store: &EtcdStore,
    id: &str,
    takeover: bool,
) -> Option<Release> {
    let shared = &app.releases.shared;
    let _io = shared.io.lock().await;
    if let Ok(read) = store.read_release().await {
        apply(app, &read);
    }
    let mut v = shared.seen().value.clone()?;
    if v["release"]["id"].as_str() != Some(id) || !unfinished(&v) {
        return None;
    }
    if !takeover && v[RETURNER].as_str() != Some(replica_id(app)) {
        return None;
    }
    let r = Release::from_stored(&v["release"])?;
    v[RETURNER] = json!(replica_id(app));
    v["beat_ms"] = json!(wall_ms());
    match cas(app, store, v).await {
        ReleaseCas::Applied(_) => Some(r),
        ReleaseCas::Replaced { now, .. } | ReleaseCas::Lost(now) => {
            apply(app, &now);
            None
        }
        ReleaseCas::Unknown(_) => None,
    }
}

/// The ended release in the key, its services not returned, and the replica that was to return
/// them silent for as long as a stopped driver is taken over after: this replica returns them.
async fn recover_return(app: &Arc<App>, store: &EtcdStore) {
    let id = {
        let s = app.releases.shared.seen();
        match s.value.as_ref().filter(|v| unfinished(v)) {
            Some(v) => v["release"]["id"].as_str().unwrap_or("").to_string(),
            None => return,
        }
    };
    let _op = app.releases.op.lock().await;
    let Some(r) = claim_return(app, store, &id, true).await else {
        return;
    };
    if r.state == "complete" {
        tracing::warn!(release = %id, "the release completed in etcd, but the replica that completed it stopped before recording it; this replica records it");
        return announce_completed(app, store, r).await;
    }
    tracing::warn!(release = %id, "the release ended in etcd, but the replica that ended it did not return its services; this replica returns them");
    return_ended(app, store, r).await;
}

/// The `release_complete` event of the completed release `r` (this replica claimed it), when
/// etcd's events hold none (the replica that stored the end stopped before it knew the write
/// landed); then marks it done. Nothing when etcd's events cannot be read (tried again).
async fn announce_completed(app: &App, store: &EtcdStore, r: Release) {
    let note = "; recorded by another replica (the one that completed it stopped first)";
    if completion_recorded(app, store, &r.name, &r.id, note, true).await {
        mark_returned(app, store, &r.id).await;
    }
}

/// Records `release_complete` for the completed release `id` unless etcd holds it already
/// (listed in its events, or its once-mark: two replicas recording it at the same moment store
/// one). True once it is in etcd; false when etcd's events cannot be read or the event not
/// stored (the caller tries again, or leaves the mark for another replica).
async fn completion_recorded(
    app: &App,
    store: &EtcdStore,
    name: &str,
    id: &str,
    note: &str,
    keep: bool,
) -> bool {
    use crate::events::{Event, Reason};
    let said = format!("({id}) complete");
    match store.events(crate::events::RING_CAPACITY).await {
        Ok(evs)
            if evs.iter().any(|e| {
                matches!(e.reason, Reason::ReleaseComplete) && e.detail.contains(&said)
            }) =>
        {
            true
        }
        Ok(_) => {
            app.record_once(
                Event::new(
                    "*",
                    Reason::ReleaseComplete,
                    "release",
                    format!("release {name:?} {said}{note}"),
                ),
                &completion_once(id),
                keep,
            )
            .await
        }
        Err(e) => {
            tracing::warn!(release = %id, error = %e, "cannot read the events in etcd to record the release's completion; tried again");
            false
        }
    }
}

/// What makes the `release_complete` of release `id` one event in etcd, whichever replicas
/// record it ([`App::record_once`]).
pub(super) fn completion_once(id: &str) -> String {
    format!("release_complete-{id}")
}

/// [`completion_recorded`] until it is (for at most ten minutes, and not past this process's
/// stop): for a completion nobody else will record, as the release key moved on past its mark
/// (a newer release was stored over it).
pub(super) async fn record_completion(
    app: &App,
    store: &EtcdStore,
    name: &str,
    id: &str,
    note: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = true;
    while !completion_recorded(app, store, name, id, note, std::mem::take(&mut first)).await {
        if Instant::now() >= deadline || app.shutdown.is_cancelled() {
            tracing::error!(release = %id, "the release completed in etcd, but its release_complete event could not be stored there");
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether the release key, as this replica last saw it, holds the release `id`.
pub(super) fn key_holds(app: &App, id: &str) -> bool {
    app.releases
        .shared
        .seen()
        .value
        .as_ref()
        .is_some_and(|v| v["release"]["id"].as_str() == Some(id))
}

/// Returns the services of the ended release `r` (this replica claimed it) as its end would
/// have: one state write (compare-and-swapped, so a change another replica made first wins),
/// one `release_abort` or `release_rollback` event; then marks it done. Only services still on
/// the color the release flipped them to and unchanged since it ended: a manual flip or a newer
/// change since is left as it is. When the event is in etcd already (the return was written,
/// only the mark was not), it only marks it.
async fn return_ended(app: &Arc<App>, store: &EtcdStore, r: Release) {
    use crate::events::Reason;
    let id = r.id.clone();
    let done = app.events_list().await.iter().any(|e| {
        matches!(e.reason, Reason::ReleaseAbort | Reason::ReleaseRollback)
            && e.trigger
                .as_ref()
                .is_some_and(|t| t["release"].as_str() == Some(id.as_str()))
    });
    if !done {
        // Which services are still on the release's colors, as etcd holds them.
        if let Err(e) = app.catch_up_with_etcd().await {
            tracing::error!(release = %id, error = %e, "cannot read the states from etcd to return the services of the ended release; tried again later");
            return;
        }
        let snap = app.snapshot();
        let ended_at = r.ended_at.clone().unwrap_or_default();
        let target = |name: &str| {
            r.phases
                .iter()
                .flat_map(|p| p.targets.iter())
                .rev()
                .find(|(s, _)| s == name)
                .map(|(_, c)| *c)
        };
        let mut back = r.clone();
        let mut left = Vec::new();
        back.flipped.retain(|name| {
            let Some(svc) = snap.service(name) else {
                // Said by the return ("no longer configured").
                return true;
            };
            let on_release = target(name) == Some(svc.state.active);
            let since = svc
                .state
                .updated_at
                .as_deref()
                .is_some_and(|u| u > ended_at.as_str());
            if on_release && since {
                left.push(format!("{name} (changed since the end)"));
            }
            on_release && !since
        });
        let mut reason = format!(
            "{}; returned by another replica (the one that ended it stopped before returning them)",
            r.reason.clone().unwrap_or_default()
        );
        if !left.is_empty() {
            reason.push_str(&format!("; left as they are: {}", left.join(", ")));
        }
        let (kind, what) = if r.state == "aborted" {
            (crate::app::FlipKind::ManualRollback, Reason::ReleaseAbort)
        } else {
            (crate::app::FlipKind::AutoRollback, Reason::ReleaseRollback)
        };
        let state = r.state;
        if let Err(e) = super::finish(app, back, state, kind, reason, move |ev| {
            ev.reason = what;
        })
        .await
        {
            tracing::error!(release = %id, error = %e, "cannot return the services of the ended release; tried again later");
            return;
        }
    }
    mark_returned(app, store, &id).await;
}

/// The `release_start` event of the release `id` this replica resumes or took over, recorded
/// here when etcd's events hold none: a start whose answer etcd did not give in time (503,
/// outcome unknown) was stored but never recorded by the replica that started it. Its detail
/// as [`super::start`] words it. Nothing when etcd's events cannot be read.
pub(super) async fn start_recorded(app: &App, store: &EtcdStore, id: &str) {
    use crate::events::{Event, Reason};
    let Some(r) = app.releases.current().filter(|r| r.id == id) else {
        return;
    };
    let said = format!("({id}) started: ");
    match store.events(crate::events::RING_CAPACITY).await {
        Ok(evs)
            if !evs
                .iter()
                .any(|e| matches!(e.reason, Reason::ReleaseStart) && e.detail.contains(&said)) => {}
        _ => return,
    }
    let phases = r
        .phases
        .iter()
        .map(|p| format!("{} [{}]", p.plan.name, p.plan.services.join(", ")))
        .collect::<Vec<_>>()
        .join(" -> ");
    let snap = app.snapshot();
    let mut unwatched: Vec<String> = Vec::new();
    for name in r.phases.iter().flat_map(|p| &p.plan.services) {
        let watched = snap.service(name).is_none_or(|s| s.config.rollback.acts());
        if !watched && !unwatched.contains(name) {
            unwatched.push(name.clone());
        }
    }
    let note = super::unwatched_note(&unwatched)
        .map(|n| format!("; {n}"))
        .unwrap_or_default();
    app.record(Event::new(
        "*",
        Reason::ReleaseStart,
        &r.actor,
        format!("release {:?} {said}{phases}{note}", r.name),
    ))
    .await;
}

/// With the etcd backend, instead of the local file: keeps the release in step with etcd
/// (see the module's doc) until shutdown.
pub(super) async fn run(app: Arc<App>, store: Arc<EtcdStore>) {
    let (tx, mut rx) = tokio::sync::watch::channel(None::<Value>);
    if app.releases.persist.set(tx).is_err() {
        return;
    }
    let beat = store.options().progress_interval;
    let poll = (beat / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let stale = beat * 3 + store.options().timeout;
    // The driver's writer: every change of the release it drives.
    {
        let app = app.clone();
        let store = store.clone();
        let shutdown = app.shutdown.child_token();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    r = rx.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                let id = rx
                    .borrow_and_update()
                    .as_ref()
                    .and_then(|v| v["id"].as_str().map(str::to_string));
                if let Some(id) = id {
                    if drives(&app, &id) {
                        persist_or(&app, &store, &id).await;
                    }
                }
            }
        });
    }
    // The ended releases: read at start, and again whenever the key moved to another release or
    // to an ended one (two ends between two reads of the key would otherwise show only the last).
    // In their own task: a history read etcd does not answer (each try can take up to
    // `etcd_timeout`, and a failing one is retried) never delays this loop's reads of the key,
    // the driver's heartbeat or a takeover.
    let history = Arc::new(tokio::sync::Notify::new());
    {
        let app = app.clone();
        let store = store.clone();
        let history = history.clone();
        tokio::spawn(async move { history_reader(&app, &store, &history, poll).await });
    }
    history.notify_one();
    // Read every `poll` while etcd answers; through an outage, with a growing wait (the
    // heartbeat and a takeover wait with it: etcd would not take them either).
    let mut key_reads = ReadRetry::new(
        poll,
        "cannot read the release from etcd; a release driven elsewhere is not followed nor taken over until it answers (tried again with a growing wait, up to 30s)",
        "the release is read from etcd again",
    );
    loop {
        let read_ok = match store.read_release().await {
            Ok(read) => {
                if let Some(since) = key_reads.failing_since() {
                    // The driver's staleness counts only time this replica could read etcd:
                    // through an outage the driver could not write either, so its clock is
                    // moved on by the outage's length (not started again: reads failing every
                    // other time would then keep a dead driver from ever being taken over).
                    let mut seen = app.releases.shared.seen();
                    seen.changed_at = Some(outage_skipped(seen.changed_at, since, Instant::now()));
                }
                key_reads.answered();
                if read.mod_revision != app.releases.shared.seen().rev {
                    apply(&app, &read);
                }
                true
            }
            Err(e) => {
                key_reads.failed(&e);
                false
            }
        };
        // Whatever path saw the key move on (this read, this replica's own end or start).
        if app
            .releases
            .shared
            .history_stale
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            history.notify_one();
        }
        let (driving, wrote_at, changed_at, live, ours) = {
            let s = app.releases.shared.seen();
            let live = s
                .value
                .as_ref()
                .is_some_and(|v| live_state(v["release"]["state"].as_str().unwrap_or("")));
            let ours = s.value.as_ref().is_some_and(|v| {
                v["driver"].as_str() == Some(replica_id(&app))
                    && s.cut_off
                        .as_deref()
                        .is_some_and(|c| v["release"]["id"].as_str() == Some(c))
            });
            (s.driving.clone(), s.wrote_at, s.changed_at, live, ours)
        };
        // An ended release whose services the replica that ended it did not say returned, for
        // as long as a stopped driver is taken over after: any replica returns them.
        if driving.is_none() && read_ok && !live && changed_at.is_none_or(|t| t.elapsed() >= stale)
        {
            recover_return(&app, &store).await;
        }
        match driving {
            Some(id) if wrote_at.is_none_or(|t| t.elapsed() >= beat) => {
                persist_or(&app, &store, &id).await;
            }
            Some(_) => {}
            // Never while the reads fail: what the driver wrote cannot be seen.
            // This replica's own release, which it stopped driving when etcd did not store a
            // step of it: it resumes it once etcd answers (no takeover: nobody else stopped).
            // Either only once this replica's copy of the states is etcd's (read just now):
            // what flipped is decided from it ([`unflipped_phase_pending`]), and a copy behind
            // etcd after an outage would start a flipped phase again.
            None if read_ok && live && ours => 'ours: {
                // (Not read: tried again at the next read, still as this replica's own.)
                if !caught_up(&app).await {
                    break 'ours;
                }
                forget_cut_off(&app);
                if let Some(r) = take_over(&app, &store).await {
                    tracing::warn!(release = %r.id, "etcd answers again: this replica resumes driving its release from what etcd holds");
                    let promote = app
                        .releases
                        .shared
                        .seen()
                        .value
                        .as_ref()
                        .is_some_and(|v| v["promote"].as_bool() == Some(true));
                    let r = unflipped_phase_pending(&app, r);
                    super::adopt(
                        &app,
                        r,
                        "resumed by the replica that drives it, after etcd did not store a step",
                    )
                    .await;
                    if promote {
                        app.releases.lock().promote = true;
                        app.releases.wake.notify_one();
                    }
                }
            }
            None if read_ok
                && live
                && changed_at.is_none_or(|t| t.elapsed() >= stale)
                && caught_up(&app).await =>
            {
                if let Some(r) = take_over(&app, &store).await {
                    tracing::warn!(release = %r.id, "the release's driver stopped writing to etcd; this replica takes it over");
                    // A promote stored before the takeover still passes the gate.
                    let promote = app
                        .releases
                        .shared
                        .seen()
                        .value
                        .as_ref()
                        .is_some_and(|v| v["promote"].as_bool() == Some(true));
                    // Its driver may have stopped right after etcd stored a phase's claim,
                    // before it flipped anything: that phase starts again.
                    let r = unflipped_phase_pending(&app, r);
                    super::adopt(&app, r, "taken over from a replica that stopped").await;
                    if promote {
                        app.releases.lock().promote = true;
                        app.releases.wake.notify_one();
                    }
                }
            }
            None => {}
        }
        // The driver tries its heartbeat at least every beat through an outage: a follower
        // takes over `stale` after its reads come back, and a driver still waiting out a long
        // backoff then would lose a release it never stopped driving. So does a driver cut
        // off by a step etcd did not store, while etcd last named it the driver: it reads
        // again every beat to resume it.
        let wait = if app.releases.shared.seen().driving.is_some() || ours {
            key_reads.wait().min(beat)
        } else {
            key_reads.wait()
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_read_waits_longer_each_time_up_to_the_cap() {
        let ms = Duration::from_millis;
        let waits: Vec<Duration> = (1..=6).map(|n| read_retry(ms(100), n)).collect();
        assert_eq!(
            waits,
            [ms(100), ms(200), ms(400), ms(800), ms(1600), ms(3200)]
        );
        assert_eq!(read_retry(ms(100), 10), READ_RETRY_MAX);
        assert_eq!(read_retry(ms(100), u32::MAX), READ_RETRY_MAX);
        assert_eq!(read_retry(Duration::from_secs(1), 6), READ_RETRY_MAX);
    }

    #[test]
    fn an_outage_moves_the_staleness_clock_on_by_its_length_only() {
        let s = Duration::from_secs;
        let t0 = Instant::now();
        // Changed at t0, reads failing from t0+10 s to t0+15 s: 10 s of readable time counted.
        assert_eq!(outage_skipped(Some(t0), t0 + s(10), t0 + s(15)), t0 + s(5));
        // Capped at now (changed after the first failure, by this replica's own write).
        assert_eq!(
            outage_skipped(Some(t0 + s(14)), t0 + s(10), t0 + s(15)),
            t0 + s(15)
        );
        assert_eq!(outage_skipped(None, t0 + s(10), t0 + s(15)), t0 + s(15));
        // Every other read failing (1 s answered, 1 s failing): the clock still advances by
        // the answered seconds, so a dead driver is taken over after `stale` of them.
        let mut changed = Some(t0);
        let mut now = t0;
        for _ in 0..10 {
            let since = now + s(1);
            now = since + s(1);
            changed = Some(outage_skipped(changed, since, now));
        }
        assert_eq!(now.saturating_duration_since(changed.unwrap_or(now)), s(10));
    }
}
