//! Releases: a named, ordered list of phases, each flipping one or more services in one atomic
//! step, baking, and passing an `auto` or `manual` gate; after the last phase a `validate`
//! window. From the first flip until the end of that window, any rollback trigger that fires on a
//! service the release flipped returns EVERY service it flipped to its pre-release color in one
//! atomic step, with one `release_rollback` event ([`triggered`]); `abort` does the same by hand.
//!
//! One release runs at a time. Its driver is one task ([`drive`]); a phase flip and a whole
//! release rollback are serialized by `Releases::op`, so an abort can never be overtaken by the
//! next phase's flip. Lock order: `op`, then the app's writer lock; the plain mutex around the
//! release's data is never held across an await.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{App, ChangeError, FlipKind};
use crate::config::{Color, Config, ConfigError, ConfigErrors};
use crate::events::{now_rfc3339, Event};

pub use crate::config::plan::{load, parse, value_from_toml, Gate, PhasePlan};
use crate::release_record::{wall_after, wall_ms, PhaseRun};
pub use crate::release_record::{Release, RECENT, STATES};

/// With the etcd backend, the release lives in etcd.
mod store;

/// `{"plan": "NAME"}`: the body of a start by name (and the name).
fn plan_name(body: &Value) -> Option<&str> {
    let o = body.as_object()?;
    (o.len() == 1).then(|| o.get("plan")?.as_str())?
}

/// The plan a start body stands for: the body itself, or the config's plan it names.
fn resolve_plan(body: &Value, cfg: &Config) -> Result<Value, StartError> {
    let Some(name) = plan_name(body) else {
        return Ok(body.clone());
    };
    match cfg.release_plans.get(name) {
        Some(p) => Ok(p.clone()),
        None => {
            let known: Vec<&str> = cfg.release_plans.keys().map(String::as_str).collect();
            Err(StartError::Invalid(ConfigErrors(vec![ConfigError {
                key: "plan".to_string(),
                message: format!(
                    "unknown plan {name:?}: the config names {}",
                    if known.is_empty() {
                        "no plans ([release_plans.NAME])".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            }])))
        }
    }
}

/// Why a release did not start.
#[derive(Debug)]
pub enum StartError {
    /// 400: every problem of the plan.
    Invalid(ConfigErrors),
    /// 409: a release is running.
    Conflict(String),
    /// 503: etcd did not answer whether the release was stored.
    Unknown(String),
    /// 503: the services' colors could not be read from etcd; nothing was started.
    Unavailable(String),
}

/// Starts a release from a plan (JSON value); answers `{"release": ...}`, with `unwatched` and
/// a `warning` when a service of it has no automatic rollback.
pub async fn start(app: &Arc<App>, plan: &Value, actor: &str) -> Result<Value, StartError> {
    let snap = app.snapshot();
    let plan_value = &resolve_plan(plan, &snap.config)?;
    let plan = parse(plan_value, Some(&snap.config)).map_err(StartError::Invalid)?;
    let rel = &app.releases;
    let _op = rel.op.lock().await;
    // Its driver reads back whether etcd stored the completion, then records it; a release
    // stored over it meanwhile would leave the record to another replica. Nothing is started.
    if rel.completing.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(StartError::Conflict(
            "the last release is completing: whether etcd stored its end is being read back; try again once it shows ended".to_string(),
        ));
    }
    if let Some(cur) = rel.lock().current.as_ref() {
        return Err(StartError::Conflict(format!(
            "release {:?} ({}) is {} (phase {}); one release runs at a time: wait for it, promote it or abort it",
            cur.name, cur.id, cur.state, cur.phase
        )));
    }
    // The colors the release starts from (and returns to) are etcd's: this replica's copy may
    // be behind another replica's change (its watch stalled, its reads backing off).
    app.catch_up_with_etcd()
        .await
        .map_err(|e| StartError::Unavailable(format!("{e}; nothing was started")))?;
    let snap = app.snapshot();
    // A service whose automatic rollback is paused would be released with no trigger armed
    // (the release arms only unpaused ones) and end `complete` whatever happened: refused.
    let paused: Vec<&str> = plan
        .phases
        .iter()
        .flat_map(|p| &p.services)
        .filter(|name| snap.service(name).is_some_and(|s| s.state.paused))
        .map(String::as_str)
        .collect();
    if !paused.is_empty() {
        return Err(StartError::Conflict(format!(
            "automatic rollback of {} is paused: the release would run without its protection; resume it first ({}), then start the release",
            paused.join(", "),
            paused
                .iter()
                .map(|s| format!("ctl resume {s}"))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    let mut errs = Vec::new();
    let mut pre = BTreeMap::new();
    let mut phases = Vec::new();
    let mut longest_watch = Duration::ZERO;
    let unwatched = plan.unwatched(&snap.config);
    for (i, p) in plan.phases.iter().enumerate() {
        let mut targets = Vec::new();
        for (j, name) in p.services.iter().enumerate() {
            let Some(svc) = snap.service(name) else {
                errs.push(ConfigError {
                    key: format!("phases[{i}].services[{j}]"),
                    message: format!("unknown service {name:?}"),
                });
                continue;
            };
            let from = svc.state.active;
            let to = p.to.unwrap_or(from.other());
            if to == from {
                errs.push(ConfigError {
                    key: format!("phases[{i}].to"),
                    message: format!("{name} is already on {to}; nothing to release"),
                });
            }
            // Only a service whose triggers can roll the release back is watched: one with
            // automatic rollback off (no trigger, or a dry run) waits through no window of
            // its own.
            if svc.config.rollback.acts() {
                longest_watch = longest_watch.max(svc.config.rollback.watch_for);
            }
            pre.insert(name.clone(), from);
            targets.push((name.clone(), to));
        }
        phases.push(PhaseRun {
            plan: p.clone(),
            targets,
            state: "pending",
            started_at: None,
            bake_ends_at: None,
            bake_deadline: None,
            bake_started_ms: None,
            ended_at: None,
        });
    }
    if !errs.is_empty() {
        return Err(StartError::Invalid(ConfigErrors(errs)));
    }
    // Phase 0 flips at once: its pre-flip checks (a manual flip's: health, smoke paths, verify)
    // decide now whether the release can start at all. Failing, nothing starts and the 409 says
    // why, rather than a release that is accepted and then ends `rolled_back` having flipped
    // nothing. (The driver runs them again before it flips.)
    if let Some(first) = phases.first() {
        for (name, to) in &first.targets {
            if let Some(svc) = snap.service(name) {
                if let Err(e) = app.preflight(svc, *to).await {
                    return Err(StartError::Conflict(format!(
                        "phase 0 {:?} cannot flip: {}; nothing was started",
                        first.plan.name,
                        e.to_string().replace(crate::app::FORCE_HINT, "")
                    )));
                }
            }
        }
    }
    let started = std::time::SystemTime::now();
    let id = format!(
        "r-{}",
        started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
    );
    let release = Release {
        id: id.clone(),
        name: plan.name.clone(),
        state: "running",
        phase: 0,
        phases,
        started_at: now_rfc3339(),
        ended_at: None,
        reason: None,
        validate: plan.validate.unwrap_or(longest_watch),
        validate_ends_at: None,
        validate_deadline: None,
        validate_started_ms: None,
        plan_json: plan_value.clone(),
        pre,
        flipped: Vec::new(),
        paused: None,
        actor: actor.to_string(),
        end_rev: None,
    };
    if let Some(etcd) = store::etcd(app) {
        // Shared through etcd: stored first (a compare-and-swap), then driven by this replica.
        store::create(app, &etcd, &release).await?;
    }
    // A shutdown stops the driver without ending the release: a restart resumes it.
    let cancel = app.shutdown.child_token();
    let mut answer = release.to_json();
    // Said, not refused: a release may carry a service nothing watches (a static panel), but
    // nobody should believe a trigger protects it.
    let unwatched_note = unwatched_note(&unwatched);
    answer = json!({ "release": answer });
    if let Some(note) = &unwatched_note {
        answer["unwatched"] = json!(unwatched);
        answer["warning"] = json!(note);
        tracing::warn!(release = %id, "{note}");
    }
    {
        let mut inner = rel.lock();
        inner.current = Some(release);
        inner.cancel = Some(cancel.clone());
        inner.promote = false;
        rel.publish(&inner);
    }
    app.record(Event::new(
        "*",
        crate::events::Reason::ReleaseStart,
        actor,
        format!(
            "release {:?} ({id}) started: {}{}",
            plan.name,
            plan.phases
                .iter()
                .map(|p| format!("{} [{}]", p.name, p.services.join(", ")))
                .collect::<Vec<_>>()
                .join(" -> "),
            unwatched_note.map(|n| format!("; {n}")).unwrap_or_default()
        ),
    ))
    .await;
    start_driver(app, id, cancel, 0, None);
    Ok(answer)
}

/// Passes the manual gate (or resumes a paused release).
pub async fn promote(app: &Arc<App>, actor: &str) -> Result<Value, ChangeError> {
    let rel = &app.releases;
    // Never onto a state the release no longer holds: a service it flipped was moved off its
    // release color outside it (a forced rollback by hand, say). Checked under `op`: not
    // between a phase's claim and its flip.
    {
        let _op = rel.op.lock().await;
        let moved = match rel.current() {
            Some(r) => moved_off_confirmed(app, &r, false).await?.map(|m| (r, m)),
            None => None,
        };
        if let Some((cur, m)) = moved {
            return Err(ChangeError::Refused(format!(
                "release {:?} ({}) cannot advance: {}; the release flipped {} to {} and no longer holds it there. Abort the release (ctl release abort: every service it flipped goes back), or flip {} to {} again (force) and promote",
                cur.name, cur.id, m.reason, m.service, m.to, m.service, m.to
            )));
        }
    }
    if let Some(etcd) = store::etcd(app) {
        if let Some(cur) = rel.current().filter(|r| !store::drives(app, &r.id)) {
            return promote_follower(app, &etcd, cur, actor).await;
        }
    }
    let (id, name, phase) = {
        let inner = rel.lock();
        let Some(r) = inner.current.as_ref() else {
            return Err(ChangeError::Refused("no release is running".to_string()));
        };
        if inner.undriven.as_deref() == Some(r.id.as_str()) {
            return Err(ChangeError::Refused(format!(
                "release {:?} ({}) is no longer driven: its driver failed {MAX_DRIVER_RESTARTS} times; abort it (ctl release abort), or restart Switchyard to resume it",
                r.name, r.id
            )));
        }
        if r.state != "waiting" && r.paused.is_none() {
            return Err(ChangeError::Refused(format!(
                "release {:?} is {} (phase {}), not waiting at a manual gate",
                r.name, r.state, r.phase
            )));
        }
        (r.id.clone(), r.name.clone(), r.phase)
    };
    // With etcd, the driver stores the promote before it counts (a 200 means stored): a
    // replica that takes the release over then still finds it. Until `_held` drops, no other
    // write of the record can clear it.
    let _held = match store::etcd(app) {
        Some(etcd) => match store::promote_driving(app, &etcd, &id).await? {
            Some(guard) => Some(guard),
            // Taken over meanwhile: the promote goes into the record of the new driver.
            None => match rel.current().filter(|r| r.id == id) {
                Some(cur) => return promote_follower(app, &etcd, cur, actor).await,
                None => return Err(ChangeError::Refused("no release is running".to_string())),
            },
        },
        None => None,
    };
    // Recorded before the driver can see it: the gate's "passed" comes after this event.
    app.record(Event::new(
        "*",
        crate::events::Reason::ReleasePromote,
        actor,
        format!("release {name:?} ({id}) promoted at phase {phase}"),
    ))
    .await;
    {
        let mut inner = rel.lock();
        if inner.current.as_ref().is_some_and(|r| r.id == id) {
            inner.promote = true;
        }
    }
    drop(_held);
    rel.wake.notify_one();
    Ok(json!({ "id": id, "message": format!("release {name:?} promoted") }))
}

/// A promote of the release driven by another replica: it goes into the shared record.
async fn promote_follower(
    app: &Arc<App>,
    etcd: &crate::state::etcd::EtcdStore,
    cur: Release,
    actor: &str,
) -> Result<Value, ChangeError> {
    store::change(app, etcd, &cur.id, |v| {
        let r = &v["release"];
        if r["state"] != "waiting" && r["paused"].is_null() {
            return Err(ChangeError::Refused(format!(
                "release {:?} is {} (phase {}), not waiting at a manual gate",
                cur.name,
                r["state"].as_str().unwrap_or(""),
                r["phase"]
            )));
        }
        v["promote"] = json!(true);
        Ok(())
    })
    .await?;
    app.record(Event::new(
        "*",
        crate::events::Reason::ReleasePromote,
        actor,
        format!(
            "release {:?} ({}) promoted at phase {}",
            cur.name, cur.id, cur.phase
        ),
    ))
    .await;
    Ok(json!({ "id": cur.id, "message": format!("release {:?} promoted", cur.name) }))
}

/// Returns every service the release flipped to its pre-release color in one step.
pub async fn abort(app: &Arc<App>, actor: &str) -> Result<Value, ChangeError> {
    let Some(cur) = app.releases.current() else {
        return Err(ChangeError::Refused("no release is running".to_string()));
    };
    let reason = format!("aborted by {actor}");
    let (returned, skipped) = roll_back(
        app,
        &cur.id,
        "aborted",
        FlipKind::ManualRollback,
        reason.clone(),
        {
            let actor = actor.to_string();
            move |ev: &mut Event| {
                ev.reason = crate::events::Reason::ReleaseAbort;
                ev.actor = actor;
            }
        },
    )
    .await?
    .ok_or_else(|| ChangeError::Refused("the release ended while aborting".to_string()))?;
    Ok(json!({
        "id": cur.id,
        "message": format!("release {:?} aborted: {} service(s) returned in one step", cur.name, returned.len()),
        "returned": returned,
        "not_returned": skipped,
    }))
}

/// A rollback trigger fired on `service`, a service the running release flipped: the whole
/// release goes back. Ok(true) when this call rolled it back.
///
/// `measured`: the color and generation the trigger measured. Checked against etcd first: a
/// replica whose copy is behind (its watch stalled) measures a color that is no longer live,
/// and a release is never rolled back for that old color failing (Ok(false): nothing done).
pub async fn triggered(
    app: &Arc<App>,
    service: &str,
    measured: (Color, u64),
    detail: &str,
    trigger: Value,
) -> Result<bool, ChangeError> {
    let Some(cur) = app.releases.current().filter(|r| r.live()) else {
        return Ok(false);
    };
    if !cur.flipped.iter().any(|s| s == service) {
        return Ok(false);
    }
    app.catch_up_with_etcd().await?;
    let live = app
        .snapshot()
        .service(service)
        .map(|s| (s.state.active, s.state.generation));
    if live != Some(measured) {
        return Ok(false);
    }
    let reason = format!("trigger fired on {service}: {detail}");
    let mut t = trigger;
    if let Some(o) = t.as_object_mut() {
        o.insert("service".to_string(), json!(service));
    }
    let done = roll_back(
        app,
        &cur.id,
        "rolled_back",
        FlipKind::AutoRollback,
        reason,
        {
            let service = service.to_string();
            move |ev: &mut Event| {
                ev.service = service;
                ev.trigger = Some(t);
            }
        },
    )
    .await?;
    Ok(done.is_some())
}

/// The one whole-release rollback: under `op` (no phase flip can land after it), one
/// [`App::return_set`], one event; the release ends with `result`.
async fn roll_back(
    app: &Arc<App>,
    id: &str,
    result: &'static str,
    kind: FlipKind,
    reason: String,
    shape: impl FnOnce(&mut Event) + Send + 'static,
) -> Result<Option<(Vec<crate::app::FlipOutcome>, Vec<String>)>, ChangeError> {
    roll_back_if(app, id, result, kind, reason, shape, |_| true).await
}

/// [`roll_back`], only if `still` holds of the release under `op`.
async fn roll_back_if(
    app: &Arc<App>,
    id: &str,
    result: &'static str,
    kind: FlipKind,
    reason: String,
    shape: impl FnOnce(&mut Event) + Send + 'static,
    still: impl FnOnce(&Release) -> bool,
) -> Result<Option<(Vec<crate::app::FlipOutcome>, Vec<String>)>, ChangeError> {
    let _op = app.releases.op.lock().await;
    roll_back_held(app, id, result, kind, reason, shape, still).await
}

/// [`roll_back_if`], the caller holding `op`.
async fn roll_back_held(
    app: &Arc<App>,
    id: &str,
    result: &'static str,
    kind: FlipKind,
    reason: String,
    shape: impl FnOnce(&mut Event) + Send + 'static,
    still: impl FnOnce(&Release) -> bool,
) -> Result<Option<(Vec<crate::app::FlipOutcome>, Vec<String>)>, ChangeError> {
    let rel = &app.releases;
    let Some(mut cur) = rel.current().filter(|r| r.id == id && r.live() && still(r)) else {
        return Ok(None);
    };
    if let Some(etcd) = store::etcd(app) {
        // One replica ends it: the compare-and-swap decides; a loser finds it ended.
        match store::end(app, &etcd, id, result, &reason).await? {
            store::Ended::Won(c) => cur = *c,
            store::Ended::NotLive => return Ok(None),
            store::Ended::Unknown {
                write_id,
                expected,
                message,
            } => {
                // Settled later: if the end turns out stored, this replica returns the
                // services then (it won); if not, the release goes on (a trigger fires again).
                let app2 = app.clone();
                tokio::spawn(async move {
                    if store::settle(&app2, &etcd, &write_id, expected).await == Some(true) {
                        let _op = app2.releases.op.lock().await;
                        let id = cur.id.clone();
                        // The end landed, but a newer release may have started since (the
                        // release key moved on): its services are that release's now, and
                        // returning them to this one's colors would undo its flips.
                        if let Some(newer) = app2.releases.current().filter(|r| r.id != id) {
                            tracing::warn!(release = %id, newer = %newer.id, "the release's end was stored in etcd after release {} started; its services are left as that release set them", newer.id);
                            return;
                        }
                        // Unless another replica took the return over meanwhile.
                        if store::claim_return(&app2, &etcd, &id, false)
                            .await
                            .is_none()
                        {
                            return;
                        }
                        match finish(&app2, cur, result, kind, reason, shape).await {
                            Ok(_) => store::mark_returned(&app2, &etcd, &id).await,
                            Err(e) => {
                                tracing::error!(release = %id, error = %e, "the release ended in etcd but its services could not be returned; another replica tries again")
                            }
                        }
                    }
                });
                return Err(ChangeError::Unknown(format!(
                    "{message}; whether the release ended is unknown: if etcd stored it, its services are returned as soon as etcd answers"
                )));
            }
        }
    }
    let out = finish(app, cur, result, kind, reason, shape).await?;
    if let Some(etcd) = store::etcd(app) {
        store::mark_returned(app, &etcd, id).await;
    }
    Ok(Some(out))
}

/// What a release's start says of its services no automatic rollback watches (none: nothing).
pub fn unwatched_note(unwatched: &[String]) -> Option<String> {
    (!unwatched.is_empty()).then(|| {
        format!(
            "no automatic rollback watches {} (rollback off, no trigger, or dry run): a failure there rolls nothing back",
            unwatched.join(", ")
        )
    })
}

/// The services of an ended release back in one step ([`App::return_set`]), one event; the
/// local copy ends. Under `op`.
async fn finish(
    app: &Arc<App>,
    cur: Release,
    result: &'static str,
    kind: FlipKind,
    reason: String,
    shape: impl FnOnce(&mut Event),
) -> Result<(Vec<crate::app::FlipOutcome>, Vec<String>), ChangeError> {
    let rel = &app.releases;
    let id = cur.id.as_str();
    // A service this replica's copy shows back on its pre-release color already (behind
    // etcd) would be skipped, with no write to lose a compare, and left on the release's color.
    // (A failure here comes after the end was stored: the services stay marked unreturned,
    // and a replica returns them once etcd answers.)
    app.catch_up_with_etcd().await.map_err(|e| {
        ChangeError::Unavailable(format!(
            "release {} ended, but its services could not be returned yet ({e}); a replica returns them once etcd answers",
            cur.id
        ))
    })?;
    let targets: Vec<(String, Color)> = cur
        .flipped
        .iter()
        .filter_map(|s| cur.pre.get(s).map(|c| (s.clone(), *c)))
        .collect();
    let label = format!("release {:?} ({})", cur.name, cur.id);
    let phase = cur.phase;
    let (returned, skipped) = app
        .return_set(&targets, kind, |returned, skipped| {
            let mut detail = format!("{label} {result} at phase {phase}: {reason}");
            if returned.is_empty() {
                detail.push_str("; nothing to return");
            } else {
                detail.push_str(&format!(
                    "; returned in one step: {}",
                    returned
                        .iter()
                        .map(|o| format!("{} {} -> {}", o.service, o.from, o.to))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !skipped.is_empty() {
                detail.push_str(&format!("; NOT returned: {}", skipped.join("; ")));
            }
            let mut ev = Event::new("*", crate::events::Reason::ReleaseRollback, "release", detail);
            shape(&mut ev);
            // The colors and generation of the service the trigger fired on, when it went back
            // (none when it did not: its pre-release pool was dead, and it stayed where it was);
            // an event for the whole release ("*") has the first returned service's.
            let own = returned.iter().find(|o| o.service == ev.service);
            if let Some(o) = own.or(returned.first().filter(|_| ev.service == "*")) {
                ev.from = Some(o.from);
                ev.to = Some(o.to);
                ev.generation = Some(o.generation);
            }
            let extra = json!({
                "release": cur.id,
                "returned": returned.iter().map(|o| json!({"service": o.service, "from": o.from, "to": o.to, "generation": o.generation})).collect::<Vec<_>>(),
                "not_returned": skipped,
            });
            match ev.trigger.as_mut().and_then(Value::as_object_mut) {
                Some(o) => {
                    if let Value::Object(x) = extra {
                        o.extend(x);
                    }
                }
                None => ev.trigger = Some(extra),
            }
            ev
        })
        .await?;
    rel.end(id, result, reason);
    Ok((returned, skipped))
}

/// A manual flip, rollback or pause of `services` (`action`) while a release runs: refused (409)
/// unless `force`; a forced one goes through, and pauses the release (it stops advancing until
/// promoted) only if it changed something: `changed` names the services it changed. A forced
/// action that is refused, or changes nothing, leaves the release as it was, with no event. One
/// whose outcome is not known (etcd did not answer whether it took effect: it may have) is no
/// refusal: it pauses the release as if it changed every service of the release it names, and
/// the pause says that its outcome is not known ([`forced_changes`]).
///
/// Atomic with the release's own steps: the action and the pause run under `op`, so neither a
/// phase flip nor the rollback of a release whose service was moved outside it (which checks the
/// pause under `op`) can come between them. A release driven by another replica (etcd) is
/// paused in the shared record before the action, and that pause is taken back (only if it is
/// still this one) when the action changed nothing.
pub async fn guarded<T, Fut>(
    app: &Arc<App>,
    services: &[&str],
    force: bool,
    what: &str,
    actor: &str,
    action: impl FnOnce() -> Fut,
    changed: impl FnOnce(&T) -> Vec<String>,
) -> Result<T, ChangeError>
where
    Fut: std::future::Future<Output = Result<T, ChangeError>>,
{
    let involved = app.releases.current().filter(Release::live).and_then(|r| {
        let hit: Vec<String> = services
            .iter()
            .filter(|s| r.involves(s))
            .map(|s| s.to_string())
            .collect();
        (!hit.is_empty()).then_some((r.id, r.name, hit))
    });
    let Some((id, name, hit)) = involved else {
        return action().await;
    };
    if !force {
        return Err(ChangeError::Refused(format!(
            "{} {} part of the running release {name:?} ({id}); pass \"force\": true to {what} anyway (the release then pauses), or abort the release",
            hit.join(", "),
            if hit.len() == 1 { "is" } else { "are" }
        )));
    }
    let why = |names: &[String], unknown: bool| {
        format!(
            "paused: forced {what} of {} by {actor}{}",
            names.join(", "),
            if unknown { OUTCOME_NOT_KNOWN } else { "" }
        )
    };
    let _op = app.releases.op.lock().await;
    if app
        .releases
        .completing
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(ChangeError::Unavailable(format!(
            "the release {name:?} ({id}) is completing: whether etcd stored its end is being read back; try again once it shows"
        )));
    }
    let (out, changed, unknown) = match store::etcd(app).filter(|_| !store::drives(app, &id)) {
        // Driven by another replica: its driver does not take this replica's `op`, so the pause
        // goes into the shared record first.
        Some(etcd) => {
            let first = why(&hit, false);
            store::change(app, &etcd, &id, |v| {
                v["release"]["paused"] = json!(first);
                Ok(())
            })
            .await?;
            let done = action().await;
            let (changed, unknown) = forced_changes(&done, &hit, changed);
            let now = if changed.is_empty() {
                None
            } else {
                Some(why(&changed, unknown))
            };
            let stored = store::change(app, &etcd, &id, |v| {
                if v["release"]["paused"] == json!(first) {
                    v["release"]["paused"] = json!(now);
                }
                Ok(())
            })
            .await;
            if let Err(e) = stored {
                tracing::warn!(release = %id, error = %e, "cannot correct the release's pause after a forced change");
            }
            (done, changed, unknown)
        }
        None => {
            let done = action().await;
            let (changed, unknown) = forced_changes(&done, &hit, changed);
            if !changed.is_empty() {
                let w = why(&changed, unknown);
                app.releases.update(&id, |r| r.paused = Some(w));
            }
            (done, changed, unknown)
        }
    };
    drop(_op);
    if !changed.is_empty() {
        app.record(Event::new(
            "*",
            crate::events::Reason::ReleasePhase,
            actor,
            format!(
                "release {name:?} ({id}) {}; it advances again on promote",
                why(&changed, unknown)
            ),
        ))
        .await;
    }
    out
}

/// Said in the pause of a release after a forced action whose outcome is not known.
const OUTCOME_NOT_KNOWN: &str =
    " (its outcome is not known: etcd did not answer whether it took effect)";

/// What a forced action (its result `done`) changed of `hit`, the services of the release it
/// names, and whether its outcome is not known: the ones it says it changed; every one of
/// `hit` when it is not known (it may have changed any of them: never taken for a refusal);
/// none when it was refused or failed.
fn forced_changes<T>(
    done: &Result<T, ChangeError>,
    hit: &[String],
    changed: impl FnOnce(&T) -> Vec<String>,
) -> (Vec<String>, bool) {
    match done {
        Ok(o) => (
            changed(o).into_iter().filter(|s| hit.contains(s)).collect(),
            false,
        ),
        Err(ChangeError::Unknown(_)) => (hit.to_vec(), true),
        Err(_) => (Vec::new(), false),
    }
}

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

/// Runs the release `id` to its end: phases, gates, the validate window, `complete`.
/// A restarted release resumes in phase `from` at one of these points.
#[derive(Debug)]
enum Resume {
    /// The phase's services are flipped; this much of the bake is left.
    Bake(Duration),
    /// The bake is over; the phase waits at its gate.
    Gate,
    /// Every phase passed; this much of the validate window is left.
    Validate(Duration),
}

async fn drive(
    app: Arc<App>,
    id: String,
    cancel: CancellationToken,
    from: usize,
    mut resume: Option<Resume>,
) {
    let rel = &app.releases;
    let Some(count) = rel.update(&id, |r| r.phases.len()) else {
        return;
    };
    let mut validate_left = None;
    if let Some(Resume::Validate(d)) = resume {
        validate_left = Some(d);
        resume = None;
    }
    let first = if validate_left.is_some() { count } else { from };
    for i in first..count {
        if cancel.is_cancelled() {
            return;
        }
        #[cfg(test)]
        tests::fail_point(&app, i);
        let Some((targets, plan, label)) = rel.update(&id, |r| {
            r.phase = i;
            r.state = "running";
            (
                r.phases[i].targets.clone(),
                r.phases[i].plan.clone(),
                format!(
                    "release {:?} ({}) phase {i} {:?}",
                    r.name, r.id, r.phases[i].plan.name
                ),
            )
        }) else {
            return;
        };
        let resumed = if i == from { resume.take() } else { None };
        // Resumed at its gate: the event that resumed it said "waiting for promote" already.
        let at_gate = matches!(resumed, Some(Resume::Gate));
        let bake = match resumed {
            Some(Resume::Bake(left)) => left,
            Some(Resume::Gate) => Duration::ZERO,
            _ => loop {
                match run_phase(&app, &id, &cancel, i, &targets, &plan, &label).await {
                    Ran::Flipped => break plan.bake,
                    Ran::Ended => return,
                    // A service was moved off its release color and the rollback did not go
                    // through: paused, saying so; the phase runs once promoted (if the release
                    // holds its state again by then).
                    Ran::Held => {
                        if !pass_gate(&app, &id, i, &label, &cancel, true).await {
                            return;
                        }
                    }
                }
            },
        };
        if !sleep_or_cancel(&app, &id, bake, &cancel).await {
            return;
        }
        pause_if_blind(&app, &id).await;
        if (plan.gate == Gate::Manual || paused(&app, &id))
            && !pass_gate(&app, &id, i, &label, &cancel, !at_gate).await
        {
            return;
        }
        let ended_at = now_rfc3339();
        let pass = |r: &mut Release| {
            let p = &mut r.phases[i];
            p.state = "passed";
            p.ended_at = Some(ended_at.clone());
            p.bake_deadline = None;
        };
        match store::etcd(&app) {
            // Only while this replica still drives the release (a compare-and-swap): a driver
            // that was stopped mid-bake and taken over never passes the phase a second time.
            Some(etcd) => {
                if !store::step(&app, &etcd, &id, &cancel, pass).await {
                    tracing::warn!(release = %id, phase = i, "the phase passed, but this replica no longer drives the release (or etcd did not store it); not recorded here");
                    return;
                }
            }
            None => {
                rel.update(&id, pass);
            }
        }
        record_phase(&app, format!("{label} passed")).await;
    }
    #[cfg(test)]
    tests::fail_point(&app, count);
    // Validation: every trigger of every flipped service still rolls the whole release back.
    let name = rel.update(&id, |r| r.name.clone()).unwrap_or_default();
    let validate = match validate_left {
        Some(left) => left,
        None => {
            let Some(validate) = rel.update(&id, |r| {
                r.state = "validating";
                r.validate_ends_at = Some(wall_after(r.validate));
                r.validate_deadline = Some(Instant::now() + r.validate);
                r.validate_started_ms = Some(wall_ms());
                r.validate
            }) else {
                return;
            };
            record_phase(
                &app,
                format!(
                    "release {name:?} ({id}) validating for {}",
                    humantime::format_duration(validate)
                ),
            )
            .await;
            validate
        }
    };
    if !sleep_or_cancel(&app, &id, validate, &cancel).await {
        return;
    }
    pause_if_blind(&app, &id).await;
    let ended = loop {
        if cancel.is_cancelled() {
            return;
        }
        if paused(&app, &id) && !pass_gate(&app, &id, count - 1, &name, &cancel, true).await {
            return;
        }
        let _op = rel.op.lock().await;
        // Never `complete` with a service the release flipped off its release color.
        match roll_back_if_moved_held(&app, &id).await {
            Holding::Holds => {}
            Holding::Ended => return,
            Holding::Failed(why) => {
                rel.update(&id, |r| r.paused = Some(why));
                continue;
            }
        }
        const WHY: &str = "every phase passed and the validate window ended";
        let Some(etcd) = store::etcd(&app) else {
            break !cancel.is_cancelled() && rel.end(&id, "complete", WHY.to_string());
        };
        if cancel.is_cancelled() {
            break false;
        }
        match store::end(&app, &etcd, &id, "complete", WHY).await {
            // The key's poll (or `end` itself, when another write followed ours) can apply the
            // stored end before its answer comes back, moving the local copy to `recent` and
            // cancelling the release's token: the end is this replica's all the same.
            Ok(store::Ended::Won(_)) => {
                rel.end(&id, "complete", WHY.to_string());
                break true;
            }
            Ok(store::Ended::NotLive) => break false,
            // Never given up on: the release would stay live in etcd with this replica's
            // heartbeat on it and nobody to end it. Found out outside `op` (an abort may come).
            Ok(store::Ended::Unknown {
                write_id,
                expected,
                message,
            }) => {
                // Set before `op` goes: no forced change can come between.
                let completing = Completing::start(&rel.completing);
                drop(_op);
                tracing::warn!(release = %id, error = %message, "whether etcd stored the release's completion is not known; reading it back");
                // Not bounded by the release's token: the key's poll cancels it when it reads
                // the end (ours or not) before the answer; only stopping ends the reading.
                let mut stored = None;
                while stored.is_none() && !app.shutdown.is_cancelled() {
                    stored = store::settle(&app, &etcd, &write_id, expected).await;
                }
                match stored {
                    Some(true) => {
                        let _op = rel.op.lock().await;
                        drop(completing);
                        rel.end(&id, "complete", WHY.to_string());
                        // Recorded here unless another replica took that over meanwhile (it
                        // found this one silent for as long as a stopped driver is).
                        // Or when a newer release was stored over its mark since: nobody
                        // else knows it is not recorded.
                        let claimed = store::claim_return(&app, &etcd, &id, false).await;
                        break claimed.is_some() || !store::key_holds(&app, &id);
                    }
                    // Not stored (a fence decided it, or another write moved the key on): the
                    // next pass ends it again, or finds it ended elsewhere.
                    Some(false) => {}
                    // Stopping, still not known: the next start reads the key.
                    None => return,
                }
            }
            Err(e) => {
                drop(_op);
                tracing::warn!(release = %id, error = %e, "cannot store the release's completion in etcd; trying again");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    if ended {
        // A newer release was stored over it since (its answer came late): recorded once in
        // etcd, whichever of this replica and the one that stored the newer release comes first.
        if let Some(etcd) = store::etcd(&app).filter(|_| !store::key_holds(&app, &id)) {
            return store::record_completion(&app, &etcd, &name, &id, "").await;
        }
        // With etcd, its mark goes once the event is stored there (not stored: the mark stays,
        // and a replica records it after three heartbeats).
        let stored = app
            .record_once(
                Event::new(
                    "*",
                    crate::events::Reason::ReleaseComplete,
                    "release",
                    format!("release {name:?} ({id}) complete"),
                ),
                &store::completion_once(&id),
                true,
            )
            .await;
        if let Some(etcd) = store::etcd(&app).filter(|_| stored) {
            store::mark_returned(&app, &etcd, &id).await;
        }
    }
}

/// [`Releases::completing`](crate::release_record::Releases) set while it lives.
struct Completing<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Completing<'a> {
    fn start(flag: &'a std::sync::atomic::AtomicBool) -> Completing<'a> {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        Completing(flag)
    }
}

impl Drop for Completing<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What became of [`run_phase`].
enum Ran {
    /// The phase's services are flipped: it bakes.
    Flipped,
    /// The release ended (rolled back), or this driver stopped.
    Ended,
    /// A service the release flipped was moved off its release color and the release's
    /// rollback did not go through: nothing flipped, the release paused saying so.
    Held,
}

/// A phase's checks and its one atomic flip.
async fn run_phase(
    app: &Arc<App>,
    id: &str,
    cancel: &CancellationToken,
    i: usize,
    targets: &[(String, Color)],
    plan: &PhasePlan,
    label: &str,
) -> Ran {
    let rel = &app.releases;
    {
        // The pre-flip checks on every service of the phase, outside every lock.
        let snap = app.snapshot();
        let mut failed = None;
        for (name, to) in targets {
            match snap.service(name) {
                Some(svc) => {
                    if let Err(e) = app.preflight(svc, *to).await {
                        failed = Some(e.to_string().replace(crate::app::FORCE_HINT, ""));
                        break;
                    }
                }
                None => {
                    failed = Some(format!("{name} is no longer configured"));
                    break;
                }
            }
        }
        if let Some(why) = failed {
            let reason = format!("the checks before phase {i} {:?} failed: {why}", plan.name);
            give_up(app, id, reason).await;
            return Ran::Ended;
        }
        // One atomic flip of the phase's services, never after an abort or rollback.
        let outcomes;
        {
            let _op = rel.op.lock().await;
            if cancel.is_cancelled() {
                return Ran::Ended;
            }
            // Never onto a state the release no longer holds, whatever path came here (a
            // promote that a change raced, an automatic gate): checked under `op`, so no change
            // by hand can come between this check and the flip.
            match roll_back_if_moved_held(app, id).await {
                Holding::Holds => {}
                Holding::Ended => return Ran::Ended,
                Holding::Failed(why) => {
                    rel.update(id, |r| r.paused = Some(why));
                    return Ran::Held;
                }
            }
            if let Some(etcd) = store::etcd(app) {
                // Claim the phase in etcd before flipping anything: if another replica ended
                // or took over the release meanwhile, this write loses and nothing flips.
                // The phase shows `baking` only once its claim is stored (until then it stays
                // `pending`: nothing flipped).
                let (started_at, ends_at) = (now_rfc3339(), wall_after(plan.bake));
                let (deadline, started_ms) = (Instant::now() + plan.bake, wall_ms());
                let claim = |r: &mut Release| {
                    let p = &mut r.phases[i];
                    p.state = "baking";
                    p.started_at = Some(started_at.clone());
                    p.bake_ends_at = Some(ends_at.clone());
                    p.bake_deadline = Some(deadline);
                    p.bake_started_ms = Some(started_ms);
                    for (s, _) in targets {
                        if !r.flipped.contains(s) {
                            r.flipped.push(s.clone());
                        }
                    }
                };
                if !store::step(app, &etcd, id, cancel, claim).await {
                    tracing::warn!(release = %id, phase = i, "the phase's claim in etcd did not apply; nothing flipped");
                    return Ran::Ended;
                }
            }
            let pre = rel.update(id, |r| r.pre.clone()).unwrap_or_default();
            let mut flip = app.flip_set(targets, "release", label).await;
            if let Err(ChangeError::Conflict(_)) = &flip {
                // This replica's copy of a service was behind etcd. It serves what etcd holds
                // now (the lost compare applied the read): the flip is tried once more from
                // there (a service already on its color is not flipped). (Not checked for
                // "moved off" here: the claim already counts this phase's services as flipped,
                // and those not flipped yet would look moved.)
                flip = app.flip_set(targets, "release", label).await;
            }
            match flip {
                Ok(o) => outcomes = o,
                Err(e) => {
                    drop(_op);
                    let e = e.to_string().replace(crate::app::FORCE_HINT, "");
                    give_up(app, id, format!("the flip of phase {i} failed: {e}")).await;
                    return Ran::Ended;
                }
            }
            if let Some(etcd) = store::etcd(app) {
                if !store::confirm(app, &etcd, id).await {
                    // Another replica ended the release between this phase's claim and its
                    // flip (it returned what it knew was flipped): this flip goes back too.
                    let back: Vec<(String, Color)> = targets
                        .iter()
                        .filter_map(|(s, _)| pre.get(s).map(|c| (s.clone(), *c)))
                        .collect();
                    let what = format!("{label}: the release ended on another replica while this phase flipped; the phase's flip is undone");
                    if let Err(e) = app
                        .return_set(&back, FlipKind::AutoRollback, |returned, skipped| {
                            let mut d = what.clone();
                            for o in returned {
                                d.push_str(&format!("; {} {} -> {}", o.service, o.from, o.to));
                            }
                            if !skipped.is_empty() {
                                d.push_str(&format!("; NOT returned: {}", skipped.join("; ")));
                            }
                            let mut ev =
                                Event::new("*", crate::events::Reason::ReleasePhase, "release", d);
                            // Named, so that `switchyard_flips_total` counts each return.
                            ev.trigger = Some(json!({
                                "release": id,
                                "returned": returned.iter().map(|o| json!({"service": o.service, "from": o.from, "to": o.to, "generation": o.generation})).collect::<Vec<_>>(),
                                "not_returned": skipped,
                            }));
                            ev
                        })
                        .await
                    {
                        tracing::error!(release = %id, error = %e, "cannot undo a phase flip that landed after the release ended");
                    }
                    return Ran::Ended;
                }
            }
            let deadline = Instant::now() + plan.bake;
            rel.update(id, |r| {
                let p = &mut r.phases[i];
                // (With etcd the bake started with the phase's claim, before the flip.)
                if p.state != "baking" {
                    p.state = "baking";
                    p.started_at = Some(now_rfc3339());
                    p.bake_ends_at = Some(wall_after(plan.bake));
                    p.bake_deadline = Some(deadline);
                    p.bake_started_ms = Some(wall_ms());
                }
                for (s, _) in targets {
                    if !r.flipped.contains(s) {
                        r.flipped.push(s.clone());
                    }
                }
            });
        }
        record_phase(
            app,
            if targets.is_empty() {
                format!(
                    "{label}: verification, nothing flipped; watching {}",
                    humantime::format_duration(plan.bake)
                )
            } else {
                // What the flip did: a service already on its color (moved there since the
                // release started) was not flipped, and is said so.
                let flipped: Vec<String> = outcomes
                    .iter()
                    .map(|o| format!("{} {} -> {}", o.service, o.from, o.to))
                    .collect();
                let already: Vec<String> = targets
                    .iter()
                    .filter(|(s, _)| !outcomes.iter().any(|o| &o.service == s))
                    .map(|(s, c)| format!("{s} already on {c}"))
                    .collect();
                let mut said = if flipped.is_empty() {
                    "nothing flipped".to_string()
                } else {
                    format!("{} flipped in one step", flipped.join(", "))
                };
                if !already.is_empty() {
                    said.push_str(&format!(" ({}, not flipped)", already.join(", ")));
                }
                format!(
                    "{label}: {said}; baking {}",
                    humantime::format_duration(plan.bake)
                )
            },
        )
        .await;
        Ran::Flipped
    }
}

fn paused(app: &App, id: &str) -> bool {
    app.releases
        .update(id, |r| r.paused.is_some())
        .unwrap_or(false)
}

/// Waits at a gate (manual, or a paused release) for promote; false when the release ended.
/// `say`: records that it waits (not when the event that resumed it there said so).
async fn gate(
    app: &Arc<App>,
    id: &str,
    i: usize,
    label: &str,
    cancel: &CancellationToken,
    say: bool,
) -> bool {
    let rel = &app.releases;
    let why = rel.update(id, |r| {
        r.state = "waiting";
        if r.phases[i].state == "baking" {
            r.phases[i].state = "waiting";
            r.phases[i].bake_deadline = None;
        }
        r.paused.clone()
    });
    let Some(why) = why else { return false };
    if say {
        record_phase(
            app,
            format!(
                "{label} waiting for promote{}",
                why.map(|w| format!(" ({w})")).unwrap_or_default()
            ),
        )
        .await;
    }
    loop {
        {
            let mut inner = rel.lock();
            if inner.promote {
                inner.promote = false;
                drop(inner);
                rel.update(id, |r| {
                    r.paused = None;
                    r.state = "running";
                });
                return true;
            }
        }
        tokio::select! {
            _ = rel.wake.notified() => {}
            _ = tokio::time::sleep(CHECK_EVERY) => {
                if removed_by_reload(app, id).await {
                    return false;
                }
            }
            _ = cancel.cancelled() => return false,
        }
    }
}

/// How often a waiting driver checks that a reload did not remove one of its services.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Sleeps `d` unless the release ends first (false), or a reload removed one of its services
/// (then the release is aborted: everything it flipped goes back; false).
async fn sleep_or_cancel(
    app: &Arc<App>,
    id: &str,
    d: Duration,
    cancel: &CancellationToken,
) -> bool {
    let deadline = Instant::now() + d;
    loop {
        let step = deadline
            .saturating_duration_since(Instant::now())
            .min(CHECK_EVERY);
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            // A promote of a paused release takes effect at once, not at the next tick.
            _ = app.releases.wake.notified() => {}
            _ = cancel.cancelled() => return false,
        }
        if removed_by_reload(app, id).await || !resume_if_promoted(app, id).await {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
    }
}

/// A promote that arrives while a paused release is still baking (or validating) resumes it
/// there and then. Left for the gate, it would also pass the phase's manual gate, which
/// nobody promoted, and the release would show as paused until the bake ended.
///
/// The driver decides, under `op`: a promote is accepted against what the replica that took it
/// saw, and a change by hand can land after that (it paused the release again, or was made on
/// another replica): if a service the release flipped is off its release color now, the whole
/// release rolls back at once ([`roll_back_if_moved_held`]) instead of resuming. False when the
/// release ended.
async fn resume_if_promoted(app: &Arc<App>, id: &str) -> bool {
    let rel = &app.releases;
    let due = || {
        let inner = rel.lock();
        inner.promote
            && inner
                .current
                .as_ref()
                .is_some_and(|r| r.id == id && r.paused.is_some() && r.state != "waiting")
    };
    if !due() {
        return true;
    }
    let _op = rel.op.lock().await;
    if !due() {
        return true;
    }
    let held = roll_back_if_moved_held(app, id).await;
    let mut inner = rel.lock();
    inner.promote = false;
    let Some(r) = inner.current.as_mut().filter(|r| r.id == id) else {
        return false;
    };
    match held {
        Holding::Holds => r.paused = None,
        Holding::Ended => return false,
        // Paused still, saying why; a promote is refused while the service is off its color.
        Holding::Failed(why) => r.paused = Some(why),
    }
    rel.publish(&inner);
    true
}

/// The color the release last sent `service` to (the latest phase of it that ran).
fn release_color(r: &Release, service: &str) -> Option<Color> {
    r.phases
        .iter()
        .filter(|p| p.state != "pending")
        .flat_map(|p| p.targets.iter())
        .rev()
        .find(|(s, _)| s == service)
        .map(|(_, c)| *c)
}

/// A service the release flipped that is no longer on the color the release sent it to, and
/// what moved it, said as it happened.
struct Moved {
    service: String,
    /// The color the release sent it to.
    to: Color,
    /// `api was rolled back by hand (forced) by ops: green -> blue outside this release
    /// (generation 3)`.
    reason: String,
    /// The `trigger.kind` of the `release_rollback` event: `manual_rollback`, `manual_flip`,
    /// `auto_rollback` (this replica's engine), `remote_rollback` (another replica's, applied
    /// from etcd), `outside_change` (no record of it here).
    kind: &'static str,
    actor: Option<String>,
}

/// The first service the release flipped that is no longer on its release color (a rollback or
/// flip by hand, or a rollback engine's, this replica's or another's); `latched_only`: only one
/// that a rollback left latched as failed on that color.
fn moved_off(app: &App, r: &Release, latched_only: bool) -> Option<Moved> {
    use crate::events::Reason;
    let snap = app.snapshot();
    let (svc, to) = r.flipped.iter().find_map(|name| {
        let to = release_color(r, name)?;
        let svc = snap.service(name)?;
        let moved = svc.state.active != to && (!latched_only || svc.state.failed == Some(to));
        moved.then(|| (svc.clone(), to))
    })?;
    let name = svc.name().to_string();
    let generation = svc.state.generation;
    // The change that made this generation, as recorded here (a change applied from another
    // replica has no event in this replica's log).
    let ev = app.events.list().into_iter().rev().find(|e| {
        e.service == name
            && e.generation == Some(generation)
            && matches!(
                e.reason,
                Reason::Manual | Reason::Rollback | Reason::AutoRollback
            )
    });
    let forced = |e: &Event| {
        if e.detail.contains("(forced)") {
            " (forced)"
        } else {
            ""
        }
    };
    let (how, kind, actor) = match &ev {
        Some(e) if e.reason == Reason::Rollback => (
            format!("rolled back by hand{} by {}", forced(e), e.actor),
            "manual_rollback",
            Some(e.actor.clone()),
        ),
        Some(e) if e.reason == Reason::Manual => (
            format!("flipped by hand{} by {}", forced(e), e.actor),
            "manual_flip",
            Some(e.actor.clone()),
        ),
        Some(e) => (
            format!(
                "rolled back by this replica's automatic rollback ({})",
                e.detail
            ),
            "auto_rollback",
            Some(e.actor.clone()),
        ),
        None if app.store.as_etcd().is_some() && svc.state.failed == Some(to) => (
            "rolled back by another replica's automatic rollback".to_string(),
            "remote_rollback",
            None,
        ),
        None => (
            "changed with no record of the change here".to_string(),
            "outside_change",
            None,
        ),
    };
    Some(Moved {
        reason: format!(
            "{name} was {how}: {to} -> {} outside this release (generation {generation})",
            svc.state.active
        ),
        service: name,
        to,
        kind,
        actor,
    })
}

/// The `release_rollback` event of a release rolled back because `m` moved one of its services
/// off its release color: the service, and what moved it (`trigger.kind`, `actor`).
fn moved_shape(m: Moved) -> (String, impl FnOnce(&mut Event) + Send + 'static) {
    let Moved {
        service,
        reason,
        kind,
        actor,
        ..
    } = m;
    (reason, move |ev: &mut Event| {
        ev.service = service.clone();
        ev.trigger = Some(json!({ "kind": kind, "service": service, "actor": actor }));
    })
}

/// Rolls the release back because `m` moved one of its services off its release color
/// (`unless_paused`: not if the release is paused by then, checked under `op`).
async fn roll_back_moved(app: &Arc<App>, id: &str, m: Moved, unless_paused: bool) -> bool {
    let (reason, shape) = moved_shape(m);
    match roll_back_if(
        app,
        id,
        "rolled_back",
        FlipKind::AutoRollback,
        reason,
        shape,
        |r| !unless_paused || r.paused.is_none(),
    )
    .await
    {
        Ok(done) => done.is_some(),
        Err(e) => {
            tracing::error!(release = %id, error = %e, "cannot roll the release back after one of its services was moved outside it; will retry");
            false
        }
    }
}

/// What the driver found, under `op`, of the services the release flipped.
enum Holding {
    /// Every one is on the color the release sent it to.
    Holds,
    /// One was moved off it: the release rolled back (or it had ended already).
    Ended,
    /// One was moved off it and the release's rollback did not go through: the pause that
    /// says so.
    Failed(String),
}

/// [`moved_off`], confirmed with etcd when this replica's copy says a service moved: the copy
/// may be behind (a watch stalled, reads backing off after an outage) and show a service still
/// on its pre-release color that the release did flip, and a release is never rolled back, nor
/// a promote refused, for a change that never happened.
async fn moved_off_confirmed(
    app: &App,
    r: &Release,
    latched_only: bool,
) -> Result<Option<Moved>, ChangeError> {
    if moved_off(app, r, latched_only).is_none() {
        return Ok(None);
    }
    app.catch_up_with_etcd().await?;
    Ok(moved_off(app, r, latched_only))
}

/// The caller holds `op`. A service the release flipped is off the color the release sent it
/// to ([`moved_off`]: a change by hand, or a rollback, outside the release): the whole release
/// rolls back at once, its reason and event saying what moved the service, before the driver
/// flips anything else or ends the release `complete`.
async fn roll_back_if_moved_held(app: &Arc<App>, id: &str) -> Holding {
    let Some(cur) = app.releases.current().filter(|r| r.id == id && r.live()) else {
        return Holding::Ended;
    };
    let m = match moved_off_confirmed(app, &cur, false).await {
        Ok(Some(m)) => m,
        Ok(None) => return Holding::Holds,
        Err(e) => {
            return Holding::Failed(format!(
                "a service of the release looks moved off its release color, and etcd could not be read to confirm it ({e}): promote to check again, or abort it"
            ))
        }
    };
    let why = m.reason.clone();
    let (reason, shape) = moved_shape(m);
    match roll_back_held(
        app,
        id,
        "rolled_back",
        FlipKind::AutoRollback,
        reason,
        shape,
        |_| true,
    )
    .await
    {
        Ok(_) => Holding::Ended,
        Err(e) => {
            tracing::error!(release = %id, error = %e, "cannot roll the release back after one of its services was moved outside it");
            Holding::Failed(rollback_not_done(&why, &e))
        }
    }
}

/// The pause of a release whose rollback (because `why`) did not go through (`e`): one whose
/// outcome is not known is said so, never as a refusal.
fn rollback_not_done(why: &str, e: &ChangeError) -> String {
    match e {
        ChangeError::Unknown(m) => format!(
            "{why}; whether the release's rollback took effect is not known ({m}): abort it"
        ),
        e => format!("{why}; the release's rollback failed ({e}): abort it"),
    }
}

/// Waits at a gate ([`gate`]) and, once promoted, checks under `op` that every service the
/// release flipped is still on its release color: one moved off it meanwhile (a promote is
/// refused while one is, so only a change that raced the promote) means the release no longer
/// holds what the next phase would build on, and it rolls back at once, saying what moved it,
/// before anything else flips ([`roll_back_if_moved_held`]; the phase's flip and the end
/// `complete` check it again). False when the release ended.
async fn pass_gate(
    app: &Arc<App>,
    id: &str,
    i: usize,
    label: &str,
    cancel: &CancellationToken,
    mut say: bool,
) -> bool {
    loop {
        if !gate(app, id, i, label, cancel, say).await {
            return false;
        }
        say = true;
        let _op = app.releases.op.lock().await;
        match roll_back_if_moved_held(app, id).await {
            Holding::Holds => return true,
            Holding::Ended => return false,
            // The rollback did not go through (the state backend refused, or did not answer):
            // waits again, paused, saying so.
            Holding::Failed(why) => {
                app.releases.update(id, |r| r.paused = Some(why));
            }
        }
    }
}

/// A service the release flipped was rolled back from its release color and latched as failed
/// by something other than this release (e.g. another replica's automatic rollback, applied
/// from etcd): the whole release goes back, its reason saying what rolled it back. Not while
/// the release is paused (a forced manual rollback here pauses it first; a promote is then
/// refused until it is undone). True when it rolled the release back.
async fn rolled_back_elsewhere(app: &Arc<App>, id: &str) -> bool {
    let Some(r) = app
        .releases
        .current()
        .filter(|r| r.id == id && r.paused.is_none())
    else {
        return false;
    };
    // (Not confirmed: checked again on the next tick.)
    let Ok(Some(m)) = moved_off_confirmed(app, &r, true).await else {
        return false;
    };
    roll_back_moved(app, id, m, true).await
}

/// A reload (or a restart with another config) removed a service of the release: abort it
/// with an event. True when it did.
async fn removed_by_reload(app: &Arc<App>, id: &str) -> bool {
    let snap = app.snapshot();
    let gone: Vec<String> = match app.releases.current().filter(|r| r.id == id) {
        Some(r) => r
            .pre
            .keys()
            .filter(|s| snap.service(s).is_none())
            .cloned()
            .collect(),
        None => return false,
    };
    if gone.is_empty() {
        return rolled_back_elsewhere(app, id).await;
    }
    // Removed while this process ran (a reload), or before it started (a resumed release).
    let reloaded = app
        .metrics
        .config_reloads_total
        .with_label_values(&["ok"])
        .get()
        > 0;
    let (reason, actor) = if reloaded {
        (
            format!("{} removed from the config by a reload", gone.join(", ")),
            "reload",
        )
    } else if app.store.as_etcd().is_some() {
        // Resumed here, or taken over from another replica (whose config had them).
        (
            format!(
                "{} not in the config this replica started with (removed while it was stopped, or its config differs from the replica that started the release)",
                gone.join(", ")
            ),
            "startup",
        )
    } else {
        (
            format!(
                "{} not in the config Switchyard started with (removed while it was stopped)",
                gone.join(", ")
            ),
            "startup",
        )
    };
    if let Err(e) = roll_back(app, id, "aborted", FlipKind::ManualRollback, reason, |ev| {
        ev.reason = crate::events::Reason::ReleaseAbort;
        ev.actor = actor.to_string();
    })
    .await
    {
        tracing::error!(release = %id, error = %e, "cannot abort the release after a reload removed its services");
        return false;
    }
    true
}

/// A phase could not run: everything the release flipped goes back (`rolled_back`).
async fn give_up(app: &Arc<App>, id: &str, reason: String) {
    tracing::warn!(release = %id, %reason, "release rolled back");
    match roll_back(
        app,
        id,
        "rolled_back",
        FlipKind::AutoRollback,
        reason.clone(),
        {
            let reason = reason.clone();
            move |ev: &mut Event| {
                ev.trigger = Some(json!({ "kind": "preflight", "detail": reason }))
            }
        },
    )
    .await
    {
        Ok(_) => {}
        Err(e) => {
            // The state backend refused: nothing was returned; the release stays as it is, and
            // an operator can abort it once the backend is back.
            tracing::error!(release = %id, error = %e, "the release's rollback failed");
            app.releases.update(id, |r| {
                r.state = "waiting";
                r.paused = Some(format!("{reason}; its rollback failed: {e}; abort it"));
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Durability: the running release and the ended ones beside the state, read back after a restart
// ---------------------------------------------------------------------------------------------

/// Where the running release and the last [`RECENT`] ended ones are kept: beside the state file
/// (with etcd, in etcd instead).
pub fn stored_path(app: &App) -> Option<std::path::PathBuf> {
    app.store
        .local_path()
        .map(|p| p.with_extension("release.json"))
}

fn write_atomic(path: &std::path::Path, v: &Value) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("release.json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(v).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Refused at startup: the release file beside `state_path` (`<state>.release.json`) exists but
/// cannot be read or is not JSON. Resumed from it, the running release would vanish without a
/// word (and a `ctl release wait` on it would see none); so, as an unreadable state file does,
/// it stops the start until an operator fixes or removes it, or `--reset-state` moves it aside
/// ([`move_stored_aside_if_unreadable`]). A missing file is no release. Blocking (startup).
pub fn check_stored_file(state_path: &std::path::Path) -> Result<(), String> {
    let path = state_path.with_extension("release.json");
    let problem = match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<Value>(&b) {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => e.to_string(),
    };
    Err(format!(
        "release file {} is unreadable or corrupt ({problem}); fix or remove it (a release it held is then not resumed: flip its services by hand), or start with --reset-state to move it aside with the state file and use the config's colors",
        path.display()
    ))
}

/// `serve --reset-state` with the file backend: a release file that [`check_stored_file`]
/// refuses is moved aside (`*.corrupt-<time>`, as the state file is), so startup can proceed;
/// the release it held (unreadable) is not resumed. The path it was moved to, if it was.
pub fn move_stored_aside_if_unreadable(
    state_path: &std::path::Path,
) -> std::io::Result<Option<std::path::PathBuf>> {
    if check_stored_file(state_path).is_ok() {
        return Ok(None);
    }
    let path = state_path.with_extension("release.json");
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-");
    let aside = path.with_extension(format!("json.corrupt-{stamp}"));
    std::fs::rename(&path, &aside)?;
    Ok(Some(aside))
}

/// Marks a release that `serve` ended before the app started (its state was reset or missing)
/// in `<state>.release.json`'s `recent`: once the app is up, [`resume`] stores the record
/// without the mark, then (that write done) records its event and counts it in
/// `switchyard_releases_total`: recorded once, even if the process dies between the two.
const UNANNOUNCED: &str = "unannounced";

/// `serve --reset-state` with the file backend, once the state file was moved aside (every
/// service back at the config's colors): a release still running in `<state>.release.json` is
/// ended there (aborted, with the reason) instead of being resumed claiming flips the new state
/// does not have. Before the app starts (plain file I/O). The release ended: its id and name.
pub fn end_stored_on_reset(
    state_path: &std::path::Path,
) -> std::io::Result<Option<(String, String)>> {
    end_stored(
        state_path,
        "not resumed: the state was reset (--reset-state) while it ran, every service is at the config's colors",
        |_| true,
    )
}

/// `serve` with the file backend and no state file (deleted, or `[state] path` changed while a
/// release ran): every service starts at the config's colors, so a release still running in
/// `<state>.release.json` that flipped a service to another color than the config's is ended
/// there (aborted, with the reason), as [`end_stored_on_reset`] does. One that flipped nothing
/// the config's colors contradict (e.g. the first release of a new install, stopped before its
/// first flip) is resumed as usual. Nothing when the state file exists or its presence cannot
/// be told (its load then says why). Before the app starts.
pub fn end_stored_on_missing_state(
    state_path: &std::path::Path,
    config: &Config,
) -> std::io::Result<Option<(String, String)>> {
    if !matches!(std::fs::symlink_metadata(state_path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    {
        return Ok(None);
    }
    let reason = format!(
        "not resumed: the state file {} was missing at startup while it ran, every service is at the config's colors",
        state_path.display()
    );
    end_stored(state_path, &reason, |rel| {
        rel.flipped.iter().any(|svc| {
            let target = rel
                .phases
                .iter()
                .flat_map(|p| &p.targets)
                .rev()
                .find(|(name, _)| name == svc)
                .map(|(_, c)| *c);
            let configured = config
                .services
                .iter()
                .find(|s| &s.name == svc)
                .map(|s| s.active);
            target.is_some() && target != configured
        })
    })
}

/// Ends the live release stored beside `state_path` (aborted, `reason`) when `contradicted`
/// says the state does not have what it did: moved to `recent`, marked [`UNANNOUNCED`].
fn end_stored(
    state_path: &std::path::Path,
    reason: &str,
    contradicted: impl Fn(&Release) -> bool,
) -> std::io::Result<Option<(String, String)>> {
    let path = state_path.with_extension("release.json");
    let mut v: Value = match std::fs::read(&path) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(v) => v,
            // Not JSON: `serve` refuses to start on it ([`check_stored_file`]), or
            // `--reset-state` moves it aside.
            Err(_) => return Ok(None),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if v["current"].is_null() {
        return Ok(None);
    }
    let Some(mut rel) = Release::from_stored(&v["current"])
        .filter(Release::live)
        .filter(|r| contradicted(r))
    else {
        // Unreadable (never resumed), not running, or consistent with the state: left as it is.
        return Ok(None);
    };
    // Nothing was flipped back (the state was), so no phase says `rolled_back`.
    rel.end_in_place("aborted", reason.to_string());
    let mut recent: Vec<Value> = v["recent"].as_array().cloned().unwrap_or_default();
    recent.retain(|r| r["id"].as_str() != Some(rel.id.as_str()));
    let mut ended = rel.stored();
    ended[UNANNOUNCED] = Value::Bool(true);
    recent.insert(0, ended);
    recent.truncate(RECENT);
    v["current"] = Value::Null;
    v["recent"] = Value::Array(recent);
    write_atomic(&path, &v)?;
    Ok(Some((rel.id, rel.name)))
}

/// The releases `serve` ended before the app started ([`UNANNOUNCED`] in `recent`), once the
/// app is up and their end is stored without the marks: each one's `release_abort` event (actor
/// `startup`, the reason) and its count in `switchyard_releases_total{result}`, as an abort
/// records them. Only after that write: a process killed between the two finds the marks gone
/// and does not record them again (killed before it, the next start records them).
async fn announce_ended_at_startup(app: &Arc<App>, ended: Vec<Release>) {
    for rel in ended {
        // `serve` said so on stderr before startup; the event is its record.
        let why = rel.reason.clone().unwrap_or_default();
        app.releases
            .metrics
            .total
            .with_label_values(&[rel.state])
            .inc();
        app.record(Event::new(
            "*",
            crate::events::Reason::ReleaseAbort,
            "startup",
            format!("release {:?} ({}) {}: {why}", rel.name, rel.id, rel.state),
        ))
        .await;
    }
}

/// The first retry of a failed write while ended releases wait for it to be announced; doubled
/// after each failure up to [`WRITE_RETRY_MAX`].
const WRITE_RETRY: Duration = Duration::from_secs(1);
const WRITE_RETRY_MAX: Duration = Duration::from_secs(30);

/// At startup: lists the ended releases stored beside the state again, resumes the release that
/// was running when the process stopped (a bake resumes with the time already spent counted),
/// then keeps the stored copy current.
pub async fn resume(app: &Arc<App>) {
    if let Some(etcd) = store::etcd(app) {
        // Shared through etcd: followed, driven, taken over there (src/release_store.rs).
        tokio::spawn(store::run(app.clone(), etcd));
        return;
    }
    let Some(path) = stored_path(app) else { return };
    let p2 = path.clone();
    // `serve` checked it before startup ([`check_stored_file`]): a failure here is a change
    // made since, said as such, never a release vanishing without a word.
    let stored = match tokio::task::spawn_blocking(move || std::fs::read(&p2)).await {
        Ok(Ok(b)) => match serde_json::from_slice::<Value>(&b) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "the release file is corrupt; the release it held is not resumed and the file is rewritten on the next release change (flip its services by hand)");
                None
            }
        },
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
        Ok(Err(e)) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read the release file; the release it held is not resumed (flip its services by hand)");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "the read of the release file failed; the release it held is not resumed");
            None
        }
    };
    let (tx, mut rx) = tokio::sync::watch::channel(None::<Value>);
    if app.releases.persist.set(tx).is_err() {
        return;
    }
    // The releases `serve` ended before startup, announced once their end is stored unmarked.
    let mut unannounced: Vec<Release> = Vec::new();
    if let Some(v) = &stored {
        // Before the running release is adopted: its first write must carry them along.
        let recent = v["recent"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let readable: Vec<Release> = recent.iter().filter_map(Release::from_stored).collect();
        if readable.len() < recent.len() {
            tracing::warn!(path = %path.display(), unreadable = recent.len() - readable.len(), "some ended releases stored beside the state are unreadable; they are not listed");
        }
        app.releases.restore_recent(readable);
        unannounced = recent
            .iter()
            .filter(|r| r[UNANNOUNCED] == Value::Bool(true))
            .filter_map(Release::from_stored)
            .collect();
        if !unannounced.is_empty() {
            // The file as it is, without the marks (nothing else writes it yet).
            let mut unmarked = v.clone();
            if let Some(list) = unmarked["recent"].as_array_mut() {
                for r in list.iter_mut().filter_map(Value::as_object_mut) {
                    r.remove(UNANNOUNCED);
                }
            }
            let p3 = path.clone();
            match tokio::task::spawn_blocking(move || write_atomic(&p3, &unmarked)).await {
                Ok(Ok(())) => {
                    announce_ended_at_startup(app, std::mem::take(&mut unannounced)).await
                }
                Ok(Err(e)) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot store the end of the release ended at startup; it is recorded once it is stored (retried)")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the write of the release ended at startup failed; it is recorded once it is stored (retried)")
                }
            }
        }
    }
    let shutdown = app.shutdown.child_token();
    let wpath = path.clone();
    let app2 = app.clone();
    tokio::spawn(async move {
        let mut retry = WRITE_RETRY;
        loop {
            tokio::select! {
                biased;
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(retry), if !unannounced.is_empty() => {}
                () = shutdown.cancelled() => return,
            }
            rx.borrow_and_update();
            // The whole record as it is now: the ended releases too.
            let record = crate::release_record::persisted(&app2.releases);
            let path = wpath.clone();
            let written = tokio::task::spawn_blocking(move || write_atomic(&path, &record)).await;
            match written {
                Ok(Ok(())) => {
                    // Stored without the startup marks: only now are those ends recorded.
                    if !unannounced.is_empty() {
                        announce_ended_at_startup(&app2, std::mem::take(&mut unannounced)).await;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot store the releases; a restart would not resume the running one nor list the ended ones");
                    retry = (retry * 2).min(WRITE_RETRY_MAX);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the write of the releases failed");
                    retry = (retry * 2).min(WRITE_RETRY_MAX);
                }
            }
        }
    });
    let Some(v) = stored else { return };
    if v["current"].is_null() {
        return;
    }
    let Some(rel) = Release::from_stored(&v["current"]) else {
        tracing::error!(path = %path.display(), "the stored release is unreadable; it is not resumed (abort it by hand: flip its services back)");
        return;
    };
    adopt(app, rel, "resumed after a restart").await;
}

/// Drives a release read back (after a restart, or taken over from another replica) from
/// where it was: a bake resumes with the time already spent counted.
/// The "phase passed" event (`detail`) of a phase etcd holds as passed: recorded here when no
/// replica recorded it (looked for in etcd's events, every replica's). Its driver records it
/// only once its step is stored; a step whose write etcd did not answer (and committed) left
/// the release passed in etcd with no event, and the driver stopped driving.
async fn passed_recorded(app: &Arc<App>, detail: String) {
    let said = app.events_list().await.iter().any(|e| e.detail == detail);
    if !said {
        record_phase(app, detail).await;
    }
}

/// A service the release flipped whose analysis is blind (a `prometheus` or `probe` trigger
/// with `on_error = "hold"` past `max_errors` failed evaluations: it could not have fired)
/// pauses the release at the end of a phase's bake or of the validate window, saying which,
/// rather than pass it unverified (as Argo Rollouts pauses on an inconclusive analysis): a
/// promote goes on without it, an abort rolls the release back. Not for a service whose
/// triggers could not act anyway (`dry_run`, automatic rollback paused), and not over a pause
/// already there (its reason stays).
async fn pause_if_blind(app: &App, id: &str) {
    let Some(flipped) = app.releases.update(id, |r| r.flipped.clone()) else {
        return;
    };
    let snap = app.snapshot();
    let blind: Vec<String> = flipped
        .iter()
        .filter_map(|s| snap.service(s))
        .filter(|svc| !svc.config.rollback.dry_run && app.releases.arms(svc))
        .flat_map(|svc| {
            let name = svc.name().to_string();
            app.analysis
                .blind(svc)
                .into_iter()
                .map(move |b| format!("{name} {b}"))
        })
        .collect();
    if blind.is_empty() {
        return;
    }
    let why = format!(
        "analysis is blind for {}: promote to go on without it, or abort to roll the release back",
        blind.join("; ")
    );
    // The gate it now waits at records the event, with this reason.
    app.releases.update(id, |r| {
        r.paused.get_or_insert(why);
    });
}

/// A release's step in the audit log (actor `release`).
async fn record_phase(app: &App, detail: String) {
    app.record(Event::new(
        "*",
        crate::events::Reason::ReleasePhase,
        "release",
        detail,
    ))
    .await;
}

async fn adopt(app: &Arc<App>, mut rel: Release, how: &str) {
    let (i, resume, passed, detail) = resume_point(&mut rel, how);
    tracing::info!(release = %rel.id, phase = i, resume = ?resume, "resuming the release that was running");
    let id = rel.id.clone();
    let cancel = app.shutdown.child_token();
    {
        let rels = &app.releases;
        let mut inner = rels.lock();
        // Taken over from etcd: not if it ended (or was taken by another replica) meanwhile.
        if inner.recent.iter().any(|r| r.id == id)
            || (store::etcd(app).is_some() && !store::drives(app, &id))
        {
            return;
        }
        inner.current = Some(rel);
        inner.cancel = Some(cancel.clone());
        rels.publish(&inner);
    }
    if let Some(etcd) = store::etcd(app) {
        store::start_recorded(app, &etcd, &id).await;
    }
    if let Some(detail) = passed {
        passed_recorded(app, detail).await;
    }
    record_phase(app, detail).await;
    start_driver(app, id, cancel, i, resume);
}

/// Where a release read back (or whose driver died) goes on: its phase, the point in it
/// ([`Resume`]), the "phase passed" event of a phase stored as passed before the next one's
/// claim (that next phase starts), and the event that says so (`how` it came to be resumed).
/// Sets the deadlines of a bake or a validate window left with the time already spent counted.
fn resume_point(rel: &mut Release, how: &str) -> (usize, Option<Resume>, Option<String>, String) {
    let now = wall_ms();
    let elapsed =
        |started: Option<u64>| Duration::from_millis(now.saturating_sub(started.unwrap_or(now)));
    let mut i = rel.phase.min(rel.phases.len().saturating_sub(1));
    // Stored with its phase passed, before the next phase's claim: the next phase starts; the
    // last one passed, before `validating`: the validate window starts (`i` past the phases,
    // `rel.phase` left at the last).
    let mut passed = None;
    if rel.state == "running" && rel.phases.get(i).is_some_and(|p| p.state == "passed") {
        passed = Some(format!(
            "release {:?} ({}) phase {i} {:?} passed",
            rel.name, rel.id, rel.phases[i].plan.name
        ));
        i += 1;
        if i < rel.phases.len() {
            rel.phase = i;
        }
    }
    let resume = match (rel.state, rel.phases.get(i).map(|p| p.state)) {
        ("validating", _) | ("waiting", Some("passed")) => {
            let left = rel
                .validate
                .saturating_sub(elapsed(rel.validate_started_ms));
            rel.validate_deadline = Some(Instant::now() + left);
            Some(Resume::Validate(left))
        }
        (_, Some("baking")) => {
            let p = &mut rel.phases[i];
            let left = p.plan.bake.saturating_sub(elapsed(p.bake_started_ms));
            p.bake_deadline = Some(Instant::now() + left);
            Some(Resume::Bake(left))
        }
        (_, Some("waiting")) => Some(Resume::Gate),
        _ => None,
    };
    let id = &rel.id;
    let detail = format!(
        "release {:?} ({id}) {how} at phase {} ({})",
        rel.name,
        rel.phase,
        match &resume {
            None if i >= rel.phases.len() => {
                "every phase passed; the validate window starts".to_string()
            }
            Some(Resume::Bake(d)) => format!("{} of the bake left", to_the_ms(*d)),
            Some(Resume::Validate(d)) => {
                format!("{} of the validate window left", to_the_ms(*d))
            }
            Some(Resume::Gate) => "waiting for promote".to_string(),
            None => "the phase starts again".to_string(),
        }
    );
    (i, resume, passed, detail)
}

/// A time left, said to the millisecond ("658ms", "4s 342ms"): whole seconds said a bake with
/// most of a second left as "0s".
fn to_the_ms(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
    ))
}

/// Starts release `id`'s driver at phase `from`, supervised: a panic in it (a bug) would leave
/// the release in its phase for good, undriven and unanswerable but by an abort. It is started
/// again from where the release stands, as after a restart ([`resume_point`]), said as a
/// release event and counted (`switchyard_task_restarts_total{task="release_driver"}`).
fn start_driver(
    app: &Arc<App>,
    id: String,
    cancel: CancellationToken,
    from: usize,
    resume: Option<Resume>,
) {
    let mut first = Some((from, resume));
    let mut restarts = 0;
    let app2 = app.clone();
    tokio::spawn(app.supervised("release_driver", move || {
        let (app, id, cancel) = (app2.clone(), id.clone(), cancel.clone());
        let first = first.take();
        if first.is_none() {
            restarts += 1;
        }
        let restarts = restarts;
        async move {
            match first {
                Some((from, resume)) => drive(app, id, cancel, from, resume).await,
                None if restarts > MAX_DRIVER_RESTARTS => give_up_driving(&app, &id).await,
                None => drive_again(app, id, cancel).await,
            }
        }
    }));
}

/// How often a release's driver is started again after a panic before it is left undriven: a
/// bug that panics at the same point every time would otherwise record an event (and call
/// every webhook) every 30 s for as long as nobody aborts.
const MAX_DRIVER_RESTARTS: u32 = 5;

/// Said once when the driver stops being started again: the release stays where it stands,
/// for a person to abort (or to resume with a restart, once the bug is fixed).
async fn give_up_driving(app: &Arc<App>, id: &str) {
    let Some(name) = app.releases.update(id, |r| r.name.clone()) else {
        return;
    };
    app.releases.lock().undriven = Some(id.to_string());
    tracing::error!(release = %id, "the release's driver failed {MAX_DRIVER_RESTARTS} times after its start; it is no longer driven");
    record_phase(
        app,
        format!(
            "release {name:?} ({id}) is no longer driven: its driver failed {MAX_DRIVER_RESTARTS} times after its start (a bug: see the ERROR lines); abort it (ctl release abort), or restart Switchyard to resume it"
        ),
    )
    .await;
}

/// A driver started again after a panic: from where the running release `id` stands, unless
/// it ended, was aborted or is another replica's to drive meanwhile.
async fn drive_again(app: Arc<App>, id: String, cancel: CancellationToken) {
    if cancel.is_cancelled() || (store::etcd(&app).is_some() && !store::drives(&app, &id)) {
        return;
    }
    let point = app.releases.update(&id, |rel| {
        rel.live()
            .then(|| resume_point(rel, "resumed after its driver failed"))
    });
    let Some((i, resume, passed, detail)) = point.flatten() else {
        return;
    };
    if let Some(passed) = passed {
        passed_recorded(&app, passed).await;
    }
    record_phase(&app, detail).await;
    drive(app, id, cancel, i, resume).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[proxy]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[[services]]
name = "api"
path_prefix = "/api"
blue = { upstreams = ["127.0.0.1:9"] }
green = { upstreams = ["127.0.0.1:9"] }
[services.rollback]
watch_for = "45m"
[[services.rollback.triggers]]
kind = "error_rate"
above = 0.05
over = "2m"
for = "2m"
[[services]]
name = "panel"
path_prefix = "/panel"
blue = { upstreams = ["127.0.0.1:9"] }
green = { upstreams = ["127.0.0.1:9"] }
"#;

    async fn app(dir: &std::path::Path) -> Arc<App> {
        let cfg = crate::config::from_toml_str_with_env(CONFIG, Some(Default::default()))
            .unwrap_or_else(|e| panic!("{e}"));
        App::new(
            cfg,
            None,
            crate::state::StateStore::file(dir.join("state.json")),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn plan(text: &str) -> Value {
        value_from_toml(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn active(app: &App, name: &str) -> Color {
        app.snapshot()
            .service(name)
            .map(|s| s.state.active)
            .unwrap_or_else(|| panic!("no service {name}"))
    }

    fn current(app: &App) -> Value {
        app.releases.to_json()["current"].clone()
    }

    fn reasons(app: &App, reason: &str) -> Vec<Event> {
        app.events
            .list()
            .into_iter()
            .filter(|e| e.reason.as_str() == reason)
            .collect()
    }

    /// The app (by address: each test has its own; release ids may repeat across tests run at
    /// once) whose release driver panics as it comes to this phase (once; the phase count:
    /// after the last phase passed): a bug's stand-in.
    static FAIL_AT: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

    fn fail_at(app: &Arc<App>, phase: usize) {
        FAIL_AT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Arc::as_ptr(app) as usize, phase));
    }

    pub(super) fn fail_point(app: &Arc<App>, phase: usize) {
        let mut at = FAIL_AT.lock().unwrap_or_else(|p| p.into_inner());
        let here = (Arc::as_ptr(app) as usize, phase);
        if let Some(i) = at.iter().position(|x| *x == here) {
            at.remove(i);
            drop(at);
            panic!("the driver's stand-in bug at phase {phase}");
        }
    }

    /// A driver that panics (a bug) is started again from where the release stands, as after
    /// a restart: the phase it was coming to starts, the passed one is not said twice, the
    /// restart is an event and counted, and the release runs to its end.
    #[tokio::test(start_paused = true)]
    async fn a_driver_that_panics_is_started_again_where_the_release_stands() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        let answer = start(&app, &plan(TWO), "test").await.expect("start");
        assert!(answer["release"]["id"].is_string(), "{answer}");
        fail_at(&app, 1);
        tokio::time::sleep(Duration::from_secs(15 * 60 + 5)).await;
        let restarts = app
            .metrics
            .task_restarts_total
            .with_label_values(&["release_driver"]);
        assert_eq!(restarts.get(), 1);
        let c = current(&app);
        assert_eq!(c["phase"], 1, "{c}");
        assert_eq!(c["phases"][0]["state"], "passed", "{c}");
        assert_eq!(c["phases"][1]["state"], "baking", "{c}");
        assert_eq!(active(&app, "panel"), Color::Green);
        let phases = reasons(&app, "release_phase");
        let said = |text: &str| phases.iter().filter(|e| e.detail.contains(text)).count();
        assert_eq!(said("phase 0 \"backend\" passed"), 1, "{phases:?}");
        assert_eq!(
            said("resumed after its driver failed at phase 1"),
            1,
            "{phases:?}"
        );

        tokio::time::sleep(Duration::from_secs(3600)).await;
        promote(&app, "test").await.expect("promote");
        tokio::time::sleep(Duration::from_secs(31 * 60)).await;
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "complete", "{all}");
        assert_eq!(restarts.get(), 1);
    }

    /// A driver that panics after the last phase passed, before the validate window: started
    /// again, it starts the window; the last phase is neither flipped nor baked again, nor said
    /// passed twice.
    #[tokio::test(start_paused = true)]
    async fn a_driver_that_panics_after_the_last_phase_starts_the_validate_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        let plan_text = TWO.replace("gate = \"manual\"\n", "");
        start(&app, &plan(&plan_text), "test").await.expect("start");
        fail_at(&app, 2);
        tokio::time::sleep(Duration::from_secs(25 * 60 + 5)).await;
        let restarts = app
            .metrics
            .task_restarts_total
            .with_label_values(&["release_driver"]);
        assert_eq!(restarts.get(), 1);
        let c = current(&app);
        assert_eq!(c["state"], "validating", "{c}");
        assert_eq!(c["phase"], 1, "{c}");
        let phases = reasons(&app, "release_phase");
        let said = |text: &str| phases.iter().filter(|e| e.detail.contains(text)).count();
        assert_eq!(said("phase 1 \"frontend\" passed"), 1, "{phases:?}");
        assert_eq!(
            said("every phase passed; the validate window starts"),
            1,
            "{phases:?}"
        );
        assert_eq!(said("validating for 30m"), 1, "{phases:?}");
        assert_eq!(said("frontend\": panel"), 1, "{phases:?}");
        tokio::time::sleep(Duration::from_secs(31 * 60)).await;
        let all = app.releases.to_json();
        assert_eq!(all["recent"][0]["state"], "complete", "{all}");
    }

    /// A driver that panics at the same point every time is started again a bounded number of
    /// times, then left undriven with one event saying so; the release can still be aborted.
    #[tokio::test(start_paused = true)]
    async fn a_driver_that_keeps_panicking_is_given_up_with_one_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        for _ in 0..=MAX_DRIVER_RESTARTS {
            fail_at(&app, 1);
        }
        tokio::time::sleep(Duration::from_secs(15 * 60 + 600)).await;
        let restarts = app
            .metrics
            .task_restarts_total
            .with_label_values(&["release_driver"]);
        assert_eq!(restarts.get(), u64::from(MAX_DRIVER_RESTARTS) + 1);
        let phases = reasons(&app, "release_phase");
        let said = |text: &str| phases.iter().filter(|e| e.detail.contains(text)).count();
        assert_eq!(said("is no longer driven"), 1, "{phases:?}");
        assert_eq!(
            said("resumed after its driver failed"),
            MAX_DRIVER_RESTARTS as usize,
            "{phases:?}"
        );
        assert_eq!(active(&app, "panel"), Color::Blue);
        // A promote would be answered and never carried out: refused, saying why.
        match promote(&app, "test").await {
            Err(ChangeError::Refused(m)) => assert!(m.contains("no longer driven"), "{m}"),
            other => panic!("promote of an undriven release: {other:?}"),
        }
        abort(&app, "test").await.expect("abort");
        assert_eq!(active(&app, "api"), Color::Blue);
        assert!(app.releases.to_json()["current"].is_null());
    }

    /// The time left in a resumed bake is said to the millisecond, not rounded down to whole
    /// seconds ("0s of the bake left" with 658 ms left).
    #[tokio::test(start_paused = true)]
    async fn a_resumed_bake_says_its_time_left_to_the_millisecond() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut rel = app.releases.current().expect("running");
        assert_eq!(rel.phases[0].state, "baking");
        // 15 min bake, 658 ms of it left (by the wall clock, as after a restart).
        let spent = Duration::from_secs(15 * 60) - Duration::from_millis(658);
        rel.phases[0].bake_started_ms = Some(wall_ms() - spent.as_millis() as u64);
        let (_, resume, _, detail) = resume_point(&mut rel, "resumed after a restart");
        let Some(Resume::Bake(left)) = resume else {
            panic!("{resume:?}");
        };
        assert!(left <= Duration::from_millis(658), "{left:?}");
        assert!(detail.ends_with("ms of the bake left)"), "{detail}");
        assert!(!detail.contains("(0s of"), "{detail}");
    }

    const TWO: &str = r#"
name = "feature"
validate = "30m"
[[phases]]
name = "backend"
services = ["api"]
bake = "15m"
[[phases]]
name = "frontend"
services = ["panel"]
bake = "10m"
gate = "manual"
"#;

    #[tokio::test(start_paused = true)]
    async fn phases_bake_wait_at_the_gate_validate_and_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        assert_eq!(app.releases.metrics.phase.get(), -1);
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = current(&app);
        assert_eq!(c["state"], "running", "{c}");
        assert_eq!(c["phase"], 0);
        assert_eq!(c["phases"][0]["state"], "baking");
        assert_eq!(c["phases"][1]["state"], "pending");
        let left = c["phases"][0]["bake_left_secs"].as_f64().expect("left");
        assert!(left > 890.0 && left <= 900.0, "{left}");
        assert_eq!(active(&app, "api"), Color::Green);
        assert_eq!(active(&app, "panel"), Color::Blue);
        // Default validate window: the longest watch_for; this plan sets 30m.
        assert_eq!(c["validate_secs"], 1800.0);

        tokio::time::sleep(Duration::from_secs(15 * 60)).await;
        let c = current(&app);
        assert_eq!(c["phase"], 1, "{c}");
        assert_eq!(c["phases"][0]["state"], "passed");
        assert_eq!(c["phases"][1]["state"], "baking");
        assert_eq!(active(&app, "panel"), Color::Green);
        assert_eq!(app.releases.metrics.phase.get(), 1);

        // The manual gate holds for as long as nobody promotes.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let c = current(&app);
        assert_eq!(c["state"], "waiting", "{c}");
        assert_eq!(c["phases"][1]["state"], "waiting");
        assert_eq!(
            app.releases
                .metrics
                .state
                .with_label_values(&["waiting"])
                .get(),
            1
        );
        promote(&app, "test").await.expect("promote");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = current(&app);
        assert_eq!(c["state"], "validating", "{c}");
        assert_eq!(c["phases"][1]["state"], "passed");
        // Promote is refused when nothing waits.
        assert!(promote(&app, "test").await.is_err());

        tokio::time::sleep(Duration::from_secs(30 * 60)).await;
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "complete");
        assert_eq!(reasons(&app, "release_complete").len(), 1);
        assert_eq!(
            app.releases
                .metrics
                .total
                .with_label_values(&["complete"])
                .get(),
            1
        );
        assert_eq!(app.releases.metrics.phase.get(), -1);
        assert_eq!(active(&app, "api"), Color::Green);
        assert_eq!(active(&app, "panel"), Color::Green);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trigger_returns_every_flipped_service_in_one_step_with_one_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(15 * 60 + 1)).await;
        assert_eq!(current(&app)["phase"], 1);
        let gen_before: u64 = app
            .snapshot()
            .services
            .iter()
            .map(|s| s.state.generation)
            .sum();
        // A second release is refused while this one runs, naming it.
        match start(&app, &plan(TWO), "test").await {
            Err(StartError::Conflict(m)) => assert!(m.contains("\"feature\""), "{m}"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        // Not a service of the release: nothing happens.
        assert!(!app.releases.owns("other"));
        assert!(app.releases.owns("api"));
        let live = app
            .snapshot()
            .service("api")
            .map(|s| (s.state.active, s.state.generation))
            .expect("api");
        assert_eq!(live.0, Color::Green);
        // Measured on a color that is not live (a copy behind etcd): nothing rolls back.
        let stale = (Color::Blue, live.1 - 1);
        let t = json!({"kind": "error_rate"});
        assert!(!triggered(&app, "api", stale, "x", t).await.expect("no-op"));
        assert_eq!(active(&app, "panel"), Color::Green);
        let fired = triggered(
            &app,
            "api",
            live,
            "error rate 0.2 above 0.05",
            json!({"kind": "error_rate", "threshold": 0.05, "value": 0.2}),
        )
        .await
        .expect("rollback");
        assert!(fired);
        assert_eq!(active(&app, "api"), Color::Blue);
        assert_eq!(active(&app, "panel"), Color::Blue);
        let gen_after: u64 = app
            .snapshot()
            .services
            .iter()
            .map(|s| s.state.generation)
            .sum();
        assert_eq!(gen_after, gen_before + 2);
        let evs = reasons(&app, "release_rollback");
        assert_eq!(evs.len(), 1, "{evs:?}");
        let t = evs[0].trigger.clone().expect("trigger");
        assert_eq!(t["service"], "api");
        assert_eq!(t["threshold"], 0.05);
        assert_eq!(t["value"], 0.2);
        assert_eq!(t["returned"].as_array().map(Vec::len), Some(2), "{t}");
        assert_eq!(evs[0].service, "api");
        let all = app.releases.to_json();
        assert!(all["current"].is_null());
        assert_eq!(all["recent"][0]["state"], "rolled_back");
        assert_eq!(all["recent"][0]["phases"][0]["state"], "rolled_back");
        assert_eq!(all["recent"][0]["phases"][1]["state"], "rolled_back");
        // The driver stopped: nothing flips forward again.
        tokio::time::sleep(Duration::from_secs(3 * 3600)).await;
        assert_eq!(active(&app, "panel"), Color::Blue);
        assert_eq!(reasons(&app, "release_rollback").len(), 1);
        // A trigger after the end changes nothing.
        assert!(!triggered(&app, "api", live, "x", json!({}))
            .await
            .expect("no-op"));
    }

    #[tokio::test(start_paused = true)]
    async fn abort_before_the_second_phase_returns_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        let v = abort(&app, "ops").await.expect("abort");
        assert_eq!(v["returned"].as_array().map(Vec::len), Some(1), "{v}");
        assert_eq!(active(&app, "api"), Color::Blue);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(active(&app, "panel"), Color::Blue, "phase 2 must never run");
        assert_eq!(reasons(&app, "release_abort").len(), 1);
        assert_eq!(app.releases.to_json()["recent"][0]["state"], "aborted");
        assert!(abort(&app, "ops").await.is_err());
    }

    /// A release `serve` ends at startup (state reset or missing) had nothing flipped back: its
    /// phases keep the states they had (the passed one `passed`, the one baking `baking`, its
    /// bake over), none `rolled_back`; the release is `aborted`.
    #[tokio::test(start_paused = true)]
    async fn a_release_ended_at_startup_lists_no_phase_rolled_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(16 * 60)).await;
        let c = current(&app);
        assert_eq!(c["phases"][0]["state"], "passed", "{c}");
        assert_eq!(c["phases"][1]["state"], "baking", "{c}");
        let state = dir.path().join("state.json");
        let stored = state.with_extension("release.json");
        let record = crate::release_record::persisted(&app.releases);
        std::fs::write(&stored, record.to_string()).expect("write");
        let ended = end_stored_on_reset(&state).expect("end").expect("ended");
        assert_eq!(Some(ended.0.as_str()), c["id"].as_str());
        let v: Value =
            serde_json::from_slice(&std::fs::read(&stored).expect("read")).expect("json");
        assert!(v["current"].is_null(), "{v}");
        let r = Release::from_stored(&v["recent"][0])
            .expect("readable")
            .to_json();
        assert_eq!(r["state"], "aborted", "{r}");
        assert_eq!(r["phases"][0]["state"], "passed", "{r}");
        assert_eq!(r["phases"][1]["state"], "baking", "{r}");
        assert!(r["phases"][1]["ended_at"].is_string(), "{r}");
        assert!(r["phases"][1]["bake_left_secs"].is_null(), "{r}");
    }

    /// A release `serve` ended at startup is recorded (its `release_abort` event, its count)
    /// only once its end is stored without the startup mark: while that write fails (its
    /// temporary file's path is a directory) nothing is recorded and the file keeps the mark, as
    /// a process killed between the two leaves it, so the next start records it; once the
    /// retried write succeeds it is recorded, and a restart does not record it again.
    #[tokio::test]
    async fn a_release_ended_at_startup_is_recorded_only_once_its_end_is_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state.json");
        let stored = state.with_extension("release.json");
        let marked = || {
            let v: Value =
                serde_json::from_slice(&std::fs::read(&stored).expect("read")).expect("json");
            v["recent"][0][UNANNOUNCED] == Value::Bool(true)
        };
        let aborted = |app: &App| {
            app.releases
                .metrics
                .total
                .with_label_values(&["aborted"])
                .get()
        };
        // A release running when the process stopped, then ended before the next start.
        let first = app(dir.path()).await;
        start(&first, &plan(TWO), "test").await.expect("start");
        let record = crate::release_record::persisted(&first.releases);
        first.shutdown.cancel();
        drop(first);
        std::fs::write(&stored, record.to_string()).expect("write");
        end_stored_on_reset(&state).expect("end").expect("ended");
        assert!(marked());
        // The release file cannot be written (write_atomic's temporary file).
        let blocker = stored.with_extension("release.json.tmp");
        std::fs::create_dir(&blocker).expect("block");
        std::fs::write(blocker.join("x"), b"x").expect("write");

        let second = app(dir.path()).await;
        resume(&second).await;
        assert!(reasons(&second, "release_abort").is_empty());
        assert_eq!(aborted(&second), 0);
        assert!(marked(), "the mark went without a write");
        std::fs::remove_dir_all(&blocker).expect("unblock");
        let mut recorded = false;
        for _ in 0..400 {
            if !reasons(&second, "release_abort").is_empty() {
                recorded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(recorded, "not recorded once its end could be stored");
        assert!(!marked());
        assert_eq!(reasons(&second, "release_abort").len(), 1);
        assert_eq!(aborted(&second), 1);
        second.shutdown.cancel();
        drop(second);

        // Restarted: listed from the audit log, not recorded again.
        let third = app(dir.path()).await;
        resume(&third).await;
        assert_eq!(reasons(&third, "release_abort").len(), 1);
        assert_eq!(aborted(&third), 0);
        third.shutdown.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollback_applied_from_another_replica_rolls_the_whole_release_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(15 * 60 + 1)).await;
        assert_eq!(active(&app, "panel"), Color::Green);
        // Another replica rolled `api` back on its own trigger (as the etcd watch applies it).
        let api = app
            .snapshot()
            .service("api")
            .map(|s| s.state.clone())
            .expect("api");
        let mut remote = std::collections::HashMap::new();
        remote.insert(
            "api".to_string(),
            crate::state::ServiceState {
                active: Color::Blue,
                previous: Some(Color::Green),
                generation: api.generation + 1,
                updated_at: Some(now_rfc3339()),
                paused: false,
                failed: Some(Color::Green),
            },
        );
        app.apply_remote(remote).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(active(&app, "panel"), Color::Blue, "panel follows api back");
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "rolled_back");
        let evs = reasons(&app, "release_rollback");
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert_eq!(evs[0].service, "api");
    }

    /// A forced rollback by hand of a service the release flipped pauses the release; a
    /// promote then is refused (409, naming the service and who rolled it back) instead of
    /// passing the phase and flipping the next one forward onto a state the release no longer
    /// holds; flipped forward again by hand, the release goes on.
    #[tokio::test(start_paused = true)]
    async fn a_promote_after_a_forced_rollback_by_hand_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        guarded(
            &app,
            &["api"],
            true,
            "roll back",
            "ops",
            || app.rollback("api", true, "ops"),
            |o| vec![o.service.clone()],
        )
        .await
        .expect("rollback");
        assert!(current(&app)["paused"].is_string());
        assert_eq!(active(&app, "api"), Color::Blue);
        tokio::time::sleep(Duration::from_secs(15 * 60)).await;
        assert_eq!(current(&app)["state"], "waiting");
        match promote(&app, "test").await {
            Err(ChangeError::Refused(m)) => {
                assert!(
                    m.contains("api was rolled back by hand (forced) by ops"),
                    "{m}"
                );
                assert!(m.contains("abort"), "{m}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(active(&app, "panel"), Color::Blue, "never flipped forward");
        assert_eq!(current(&app)["state"], "waiting");
        assert!(reasons(&app, "release_rollback").is_empty());
        // Flipped forward again by hand: the release holds its state again and goes on.
        guarded(
            &app,
            &["api"],
            true,
            "flip",
            "ops",
            || app.flip("api", Color::Green, true, FlipKind::Manual, "ops"),
            |o| vec![o.service.clone()],
        )
        .await
        .expect("flip");
        promote(&app, "test").await.expect("promote");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c = current(&app);
        assert_eq!(c["phase"], 1, "{c}");
        assert_eq!(c["phases"][1]["state"], "baking", "{c}");
        assert_eq!(active(&app, "panel"), Color::Green);
    }

    /// A rollback by hand that lands after a promote was accepted (it raced it) ends the
    /// release rolled back at once, before the next phase flips anything, and the reason says
    /// what happened (a rollback by hand, by whom), not another replica's automatic rollback.
    #[tokio::test(start_paused = true)]
    async fn a_rollback_racing_a_promote_ends_the_release_before_the_next_flip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        let gated = TWO.replacen("bake = \"15m\"", "bake = \"15m\"\ngate = \"manual\"", 1);
        start(&app, &plan(&gated), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(15 * 60 + 1)).await;
        assert_eq!(current(&app)["state"], "waiting");
        // The rollback lands (not through the API's guard: as if it raced the promote's check),
        // then the promote reaches the driver.
        app.rollback("api", true, "ops").await.expect("rollback");
        {
            let mut inner = app.releases.lock();
            inner.promote = true;
        }
        app.releases.wake.notify_one();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let flipped_panel = reasons(&app, "release_phase")
            .iter()
            .any(|e| e.detail.contains("panel -> green"));
        assert!(!flipped_panel, "the next phase flipped first");
        assert_eq!(active(&app, "panel"), Color::Blue);
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "rolled_back");
        let reason = all["recent"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("api was rolled back by hand (forced) by ops"),
            "{reason}"
        );
        let evs = reasons(&app, "release_rollback");
        assert_eq!(evs.len(), 1, "{evs:?}");
        let t = evs[0].trigger.clone().expect("trigger");
        assert_eq!(t["kind"], "manual_rollback", "{t}");
        assert_eq!(t["actor"], "ops", "{t}");
    }

    /// Starts release TWO and, a minute into phase 0's bake, pauses it by a forced pause of
    /// `api` through the API's guard.
    async fn paused_mid_bake(app: &Arc<App>) {
        start(app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        guarded(
            app,
            &["api"],
            true,
            "pause",
            "ops",
            || app.set_paused("api", true, "ops"),
            |_| vec!["api".to_string()],
        )
        .await
        .expect("pause");
        assert!(current(app)["paused"].is_string());
    }

    /// The mid-bake twin of the race above. A release paused mid-bake (a forced pause) is
    /// promoted; a forced flip by hand of a service it flipped lands between the promote's
    /// check (nothing moved then) and the promote reaching the driver. The flip paused the
    /// release again, with its own reason: the driver, resuming the bake on the promote, finds
    /// the service off its release color and rolls the whole release back there and then
    /// (never clearing the newer pause and flipping the next phase), saying what moved it.
    #[tokio::test(start_paused = true)]
    async fn a_flip_racing_a_promote_of_a_paused_bake_rolls_the_release_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        paused_mid_bake(&app).await;
        // The promote's check passes here (nothing moved yet) ...
        assert!(moved_off(&app, &app.releases.current().expect("cur"), false).is_none());
        // ... then the forced flip by hand lands, through the API's guard: it pauses the
        // release again, naming the flip ...
        guarded(
            &app,
            &["api"],
            true,
            "flip",
            "ops",
            || app.flip("api", Color::Blue, true, FlipKind::Manual, "ops"),
            |o| vec![o.service.clone()],
        )
        .await
        .expect("flip");
        let paused = current(&app)["paused"].clone();
        assert!(
            paused.as_str().unwrap_or("").contains("forced flip of api"),
            "{paused}"
        );
        // ... then the promote reaches the driver.
        {
            let mut inner = app.releases.lock();
            inner.promote = true;
        }
        app.releases.wake.notify_one();
        // At once, mid-bake (14 minutes of it left): not at the next phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "rolled_back", "{all}");
        let reason = all["recent"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("api was flipped by hand (forced) by ops"),
            "{reason}"
        );
        let evs = reasons(&app, "release_rollback");
        assert_eq!(evs.len(), 1, "{evs:?}");
        let t = evs[0].trigger.clone().expect("trigger");
        assert_eq!(t["kind"], "manual_flip", "{t}");
        assert_eq!(t["actor"], "ops", "{t}");
        tokio::time::sleep(Duration::from_secs(20 * 60)).await;
        let all = app.releases.to_json();
        assert_eq!(active(&app, "api"), Color::Blue);
        assert_eq!(
            active(&app, "panel"),
            Color::Blue,
            "the next phase flipped onto a state the release no longer holds: {all}"
        );
    }

    /// A flip by hand of a service the release flipped that reaches neither a pause nor a gate
    /// (the guard bypassed, as a change that raced it would) never has the next phase flip onto
    /// it: the driver checks, under `op`, before the phase's flip, and rolls the whole release
    /// back, saying what moved the service.
    #[tokio::test(start_paused = true)]
    async fn a_flip_outside_the_release_rolls_it_back_before_the_next_phase_flips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        app.flip("api", Color::Blue, true, FlipKind::Manual, "ops")
            .await
            .expect("flip");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let flipped_panel = reasons(&app, "release_phase")
            .iter()
            .any(|e| e.detail.contains("panel -> green"));
        assert!(!flipped_panel, "the next phase flipped first");
        assert_eq!(active(&app, "panel"), Color::Blue);
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "rolled_back", "{all}");
        let reason = all["recent"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("api was flipped by hand (forced) by ops"),
            "{reason}"
        );
        let evs = reasons(&app, "release_rollback");
        assert_eq!(evs.len(), 1, "{evs:?}");
        assert_eq!(
            evs[0].trigger.as_ref().map(|t| t["kind"].clone()),
            Some(json!("manual_flip"))
        );
    }

    /// Nor does a release end `complete` with a service it flipped moved off its color during
    /// the validate window (the guard bypassed): it rolls back, saying what moved it.
    #[tokio::test(start_paused = true)]
    async fn a_flip_outside_the_release_during_validation_never_ends_it_complete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        let one = "name = \"one\"\nvalidate = \"30m\"\n[[phases]]\nname = \"backend\"\nservices = [\"api\"]\nbake = \"1m\"\n";
        start(&app, &plan(one), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(2 * 60)).await;
        assert_eq!(current(&app)["state"], "validating");
        app.flip("api", Color::Blue, true, FlipKind::Manual, "ops")
            .await
            .expect("flip");
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["state"], "rolled_back", "{all}");
        let reason = all["recent"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("api was flipped by hand (forced) by ops"),
            "{reason}"
        );
        assert!(reasons(&app, "release_complete").is_empty());
    }

    /// A forced flip whose outcome is not known (etcd stored it but did not answer in time:
    /// emulated by an action that flips, then answers `Unknown`) is never taken for a refusal:
    /// it answers `Unknown` and pauses the release, the pause saying so, and the release never
    /// goes on onto the service it may have moved.
    #[tokio::test(start_paused = true)]
    async fn a_forced_flip_whose_outcome_is_not_known_pauses_the_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        let out = guarded(
            &app,
            &["api"],
            true,
            "flip",
            "ops",
            || async {
                app.flip("api", Color::Blue, true, FlipKind::Manual, "ops")
                    .await?;
                Err::<crate::app::FlipOutcome, _>(ChangeError::Unknown(
                    "outcome unknown: etcd did not answer".to_string(),
                ))
            },
            |o| vec![o.service.clone()],
        )
        .await;
        assert!(matches!(out, Err(ChangeError::Unknown(_))), "{out:?}");
        let paused = current(&app)["paused"].clone();
        let p = paused.as_str().unwrap_or_default();
        assert!(p.contains("forced flip of api by ops"), "{paused}");
        assert!(p.contains("outcome is not known"), "{paused}");
        let said = reasons(&app, "release_phase").iter().any(|e| {
            e.detail.contains("paused: forced flip of api") && e.detail.contains("not known")
        });
        assert!(said, "{:?}", reasons(&app, "release_phase"));
        // Paused: it waits at the end of the bake, and a promote is refused while api is off
        // its release color.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let c = current(&app);
        assert_eq!(c["state"], "waiting", "{c}");
        assert_eq!(active(&app, "panel"), Color::Blue);
        assert!(matches!(
            promote(&app, "test").await,
            Err(ChangeError::Refused(_))
        ));
    }

    /// Rolled back by hand without the release pausing (the guard bypassed), the release
    /// rolls back with a reason that says so, never "another replica's automatic rollback".
    #[tokio::test(start_paused = true)]
    async fn a_rollback_outside_the_release_is_named_as_it_happened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        app.rollback("api", true, "ops").await.expect("rollback");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let all = app.releases.to_json();
        assert!(all["current"].is_null(), "{all}");
        let reason = all["recent"][0]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("rolled back by hand (forced) by ops"),
            "{reason}"
        );
        assert!(!reason.contains("another replica"), "{reason}");
        let evs = reasons(&app, "release_rollback");
        assert_eq!(
            evs[0].trigger.as_ref().map(|t| t["kind"].clone()),
            Some(json!("manual_rollback"))
        );
    }

    /// A release is refused (409) while the automatic rollback of one of its services is paused:
    /// it would run unprotected and end `complete` whatever happened. Resumed, it starts.
    #[tokio::test(start_paused = true)]
    async fn a_release_of_a_service_with_rollback_paused_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        app.set_paused("api", true, "ops").await.expect("pause");
        match start(&app, &plan(TWO), "test").await {
            Err(StartError::Conflict(m)) => {
                assert!(m.contains("automatic rollback of api is paused"), "{m}");
                assert!(m.contains("ctl resume api"), "{m}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(current(&app).is_null());
        assert_eq!(active(&app, "api"), Color::Blue);
        app.set_paused("api", false, "ops").await.expect("resume");
        start(&app, &plan(TWO), "test").await.expect("start");
    }

    /// A promote of a release paused mid-bake resumes it at once, not at the driver's next
    /// one-second check.
    #[tokio::test(start_paused = true)]
    async fn a_promote_during_a_paused_bake_resumes_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        paused_mid_bake(&app).await;
        // Mid-way between two of the driver's checks.
        tokio::time::sleep(Duration::from_millis(300)).await;
        promote(&app, "test").await.expect("promote");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let c = current(&app);
        assert!(c["paused"].is_null(), "{c}");
        assert_eq!(c["phases"][0]["state"], "baking", "{c}");
    }

    /// A phase whose service is already on its color when the phase runs (moved there since
    /// the release started) says so; its event never claims a flip that did not happen.
    #[tokio::test(start_paused = true)]
    async fn a_phase_whose_service_is_already_on_its_color_says_nothing_flipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        start(&app, &plan(TWO), "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(60)).await;
        // panel is not the release's yet (its phase has not run): moved to green meanwhile.
        app.flip("panel", Color::Green, true, FlipKind::Manual, "ops")
            .await
            .expect("flip");
        let generation = app.snapshot().service("panel").map(|s| s.state.generation);
        tokio::time::sleep(Duration::from_secs(15 * 60)).await;
        assert_eq!(current(&app)["phase"], 1);
        let phase1: Vec<Event> = reasons(&app, "release_phase")
            .into_iter()
            .filter(|e| e.detail.contains("phase 1") && e.detail.contains("baking"))
            .collect();
        assert_eq!(phase1.len(), 1, "{phase1:?}");
        let d = &phase1[0].detail;
        assert!(!d.contains("flipped in one step"), "{d}");
        assert!(
            d.contains("nothing flipped (panel already on green, not flipped)"),
            "{d}"
        );
        assert_eq!(
            app.snapshot().service("panel").map(|s| s.state.generation),
            generation
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_verification_phase_flips_nothing_and_waits_for_promote() {
        let dir = tempfile::tempdir().expect("tempdir");
        let app = app(dir.path()).await;
        let p = plan(
            "name = \"v\"\n[[phases]]\nname = \"backend\"\nservices = [\"api\"]\nbake = \"1m\"\n[[phases]]\nname = \"verification\"\nservices = []\nbake = \"15m\"\ngate = \"manual\"\n",
        );
        start(&app, &p, "test").await.expect("start");
        tokio::time::sleep(Duration::from_secs(61)).await;
        let c = current(&app);
        assert_eq!(c["phase"], 1, "{c}");
        assert_eq!(c["phases"][1]["state"], "baking");
        assert_eq!(active(&app, "panel"), Color::Blue);
        tokio::time::sleep(Duration::from_secs(15 * 60)).await;
        assert_eq!(current(&app)["state"], "waiting");
        promote(&app, "test").await.expect("promote");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let c = current(&app);
        assert_eq!(c["state"], "validating", "{c}");
        // Default validate window: the longest watch_for of the plan's services (api: 45m).
        assert_eq!(c["validate_secs"], 2700.0);
        assert_eq!(active(&app, "panel"), Color::Blue);
        assert_eq!(active(&app, "api"), Color::Green);
    }

    #[test]
    fn every_plan_error_has_its_key() {
        let bad = plan(
            r#"
validate = 5
extra = 1
[[phases]]
services = ["api", "api"]
bake = "1x"
[[phases]]
name = "b"
services = ["ghost"]
to = "red"
bake = "1m"
gate = "sometimes"
"#,
        );
        let cfg = crate::config::from_toml_str_with_env(CONFIG, Some(Default::default()))
            .unwrap_or_else(|e| panic!("{e}"));
        let errs = parse(&bad, Some(&cfg)).expect_err("invalid").0;
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "extra",
            "name",
            "validate",
            "phases[0].name",
            "phases[0].services[1]",
            "phases[0].bake",
            "phases[1].services[0]",
            "phases[1].to",
            "phases[1].gate",
        ] {
            assert!(keys.contains(&k), "{k} missing in {keys:?}");
        }
        assert!(parse(&json!({"name": "x"}), None).is_err());
        let ok = parse(&plan(TWO), Some(&cfg)).expect("valid");
        assert_eq!(ok.phases[1].gate, Gate::Manual);
        assert_eq!(ok.validate, Some(Duration::from_secs(1800)));
    }
}
