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
}

/// Starts a release from a plan (JSON value); answers the release as JSON.
pub async fn start(app: &Arc<App>, plan: &Value, actor: &str) -> Result<Value, StartError> {
    let snap = app.snapshot();
    let plan_value = &resolve_plan(plan, &snap.config)?;
    let plan = parse(plan_value, Some(&snap.config)).map_err(StartError::Invalid)?;
    let rel = &app.releases;
    let _op = rel.op.lock().await;
    if let Some(cur) = rel.lock().current.as_ref() {
        return Err(StartError::Conflict(format!(
            "release {:?} ({}) is {} (phase {}); one release runs at a time: wait for it, promote it or abort it",
            cur.name, cur.id, cur.state, cur.phase
        )));
    }
    let snap = app.snapshot();
    let mut errs = Vec::new();
    let mut pre = BTreeMap::new();
    let mut phases = Vec::new();
    let mut longest_watch = Duration::ZERO;
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
            longest_watch = longest_watch.max(svc.config.rollback.watch_for);
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
    let answer = release.to_json();
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
            "release {:?} ({id}) started: {}",
            plan.name,
            plan.phases
                .iter()
                .map(|p| format!("{} [{}]", p.name, p.services.join(", ")))
                .collect::<Vec<_>>()
                .join(" -> ")
        ),
    ))
    .await;
    start_driver(app, id, cancel, 0, None);
    Ok(answer)
}

/// Passes the manual gate (or resumes a paused release).
pub async fn promote(app: &Arc<App>, actor: &str) -> Result<Value, ChangeError> {
    let rel = &app.releases;
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
pub async fn triggered(
    app: &Arc<App>,
    service: &str,
    detail: &str,
    trigger: Value,
) -> Result<bool, ChangeError> {
    let Some(cur) = app.releases.current().filter(|r| r.live()) else {
        return Ok(false);
    };
    if !cur.flipped.iter().any(|s| s == service) {
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
    let rel = &app.releases;
    let _op = rel.op.lock().await;
    let Some(mut cur) = rel.current().filter(|r| r.id == id && r.live()) else {
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
                    if store::settle(&app2, &etcd, &write_id, expected).await {
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

/// A manual flip, rollback or pause of `services` while a release runs: refused (409) unless
/// `force`; a forced one pauses the release (it stops advancing until promoted).
pub async fn guard_manual(
    app: &Arc<App>,
    services: &[&str],
    force: bool,
    what: &str,
    actor: &str,
) -> Result<(), ChangeError> {
    let (id, name, hit) = {
        let inner = app.releases.lock();
        let Some(r) = inner.current.as_ref().filter(|r| r.live()) else {
            return Ok(());
        };
        let hit: Vec<String> = services
            .iter()
            .filter(|s| r.involves(s))
            .map(|s| s.to_string())
            .collect();
        if hit.is_empty() {
            return Ok(());
        }
        (r.id.clone(), r.name.clone(), hit)
    };
    if !force {
        return Err(ChangeError::Refused(format!(
            "{} {} part of the running release {name:?} ({id}); pass \"force\": true to {what} anyway (the release then pauses), or abort the release",
            hit.join(", "),
            if hit.len() == 1 { "is" } else { "are" }
        )));
    }
    let why = format!("paused: forced {what} of {} by {actor}", hit.join(", "));
    match store::etcd(app).filter(|_| !store::drives(app, &id)) {
        // Driven by another replica: the pause goes into the shared record.
        Some(etcd) => {
            store::change(app, &etcd, &id, |v| {
                v["release"]["paused"] = json!(why);
                Ok(())
            })
            .await?
        }
        None => {
            app.releases.update(&id, |r| r.paused = Some(why.clone()));
        }
    }
    app.record(Event::new(
        "*",
        crate::events::Reason::ReleasePhase,
        actor,
        format!("release {name:?} ({id}) {why}; it advances again on promote"),
    ))
    .await;
    Ok(())
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
        tests::fail_point(&id, i);
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
            _ => match run_phase(&app, &id, &cancel, i, &targets, &plan, &label).await {
                Some(()) => plan.bake,
                None => return,
            },
        };
        if !sleep_or_cancel(&app, &id, bake, &cancel).await {
            return;
        }
        if (plan.gate == Gate::Manual || paused(&app, &id))
            && !gate(&app, &id, i, &label, &cancel, !at_gate).await
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
    if paused(&app, &id) && !gate(&app, &id, count - 1, &name, &cancel, true).await {
        return;
    }
    let ended = {
        let _op = rel.op.lock().await;
        const WHY: &str = "every phase passed and the validate window ended";
        match store::etcd(&app) {
            Some(etcd) if !cancel.is_cancelled() => {
                let won = matches!(
                    store::end(&app, &etcd, &id, "complete", WHY).await,
                    Ok(store::Ended::Won(_))
                );
                // The key's poll can read the stored end before its answer comes back and move
                // the local copy to `recent` first: the end is this replica's all the same.
                // (`end` cancels the release's token: read it first.)
                let ours = won && !cancel.is_cancelled();
                if won {
                    rel.end(&id, "complete", WHY.to_string());
                }
                ours
            }
            Some(_) => false,
            None => !cancel.is_cancelled() && rel.end(&id, "complete", WHY.to_string()),
        }
    };
    if ended {
        app.record(Event::new(
            "*",
            crate::events::Reason::ReleaseComplete,
            "release",
            format!("release {name:?} ({id}) complete"),
        ))
        .await;
    }
}

/// A phase's checks and its one atomic flip; None when the release ended (rolled back).
async fn run_phase(
    app: &Arc<App>,
    id: &str,
    cancel: &CancellationToken,
    i: usize,
    targets: &[(String, Color)],
    plan: &PhasePlan,
    label: &str,
) -> Option<()> {
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
            return None;
        }
        // One atomic flip of the phase's services, never after an abort or rollback.
        {
            let _op = rel.op.lock().await;
            if cancel.is_cancelled() {
                return None;
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
                    return None;
                }
            }
            let pre = rel.update(id, |r| r.pre.clone()).unwrap_or_default();
            if let Err(e) = app.flip_set(targets, "release", label).await {
                drop(_op);
                let e = e.to_string().replace(crate::app::FORCE_HINT, "");
                give_up(app, id, format!("the flip of phase {i} failed: {e}")).await;
                return None;
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
                    return None;
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
                format!(
                    "{label}: {} flipped in one step; baking {}",
                    targets
                        .iter()
                        .map(|(s, c)| format!("{s} -> {c}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    humantime::format_duration(plan.bake)
                )
            },
        )
        .await;
        Some(())
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
            _ = cancel.cancelled() => return false,
        }
        if removed_by_reload(app, id).await {
            return false;
        }
        resume_if_promoted(app, id);
        if Instant::now() >= deadline {
            return true;
        }
    }
}

/// A promote that arrives while a paused release is still baking (or validating) resumes it
/// there and then. Left for the gate, it would also pass the phase's manual gate, which
/// nobody promoted, and the release would show as paused until the bake ended.
fn resume_if_promoted(app: &App, id: &str) {
    let rel = &app.releases;
    let mut inner = rel.lock();
    if !inner.promote {
        return;
    }
    let Some(r) = inner
        .current
        .as_mut()
        .filter(|r| r.id == id && r.paused.is_some() && r.state != "waiting")
    else {
        return;
    };
    r.paused = None;
    inner.promote = false;
    rel.publish(&inner);
}

/// A service the release flipped was rolled back from its release color and latched as failed
/// by something other than this release (another replica's automatic rollback, applied from
/// etcd): the whole release goes back. Not while the release is paused (a forced manual
/// rollback here pauses it first). True when it rolled the release back.
async fn rolled_back_elsewhere(app: &Arc<App>, id: &str) -> bool {
    let snap = app.snapshot();
    let Some(r) = app
        .releases
        .current()
        .filter(|r| r.id == id && r.paused.is_none())
    else {
        return false;
    };
    let target = |name: &str| {
        r.phases
            .iter()
            .flat_map(|p| p.targets.iter())
            .find(|(s, _)| s == name)
            .map(|(_, c)| *c)
    };
    let Some(svc) = r.flipped.iter().find_map(|name| {
        let to = target(name)?;
        let svc = snap.service(name)?;
        (svc.state.active != to && svc.state.failed == Some(to)).then(|| svc.clone())
    }) else {
        return false;
    };
    let reason = format!(
        "{} was rolled back {} -> {} outside this release (generation {}: another replica's automatic rollback)",
        svc.name(),
        svc.state.failed.map(|c| c.to_string()).unwrap_or_default(),
        svc.state.active,
        svc.state.generation
    );
    let name = svc.name().to_string();
    match roll_back(
        app,
        id,
        "rolled_back",
        FlipKind::AutoRollback,
        reason,
        move |ev: &mut Event| {
            ev.service = name.clone();
            ev.trigger = Some(json!({ "kind": "remote_rollback", "service": name }));
        },
    )
    .await
    {
        Ok(done) => done.is_some(),
        Err(e) => {
            tracing::error!(release = %id, error = %e, "cannot roll the release back after a rollback elsewhere; will retry");
            false
        }
    }
}

/// A reload removed a service of the release: abort it with an event. True when it did.
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
    let reason = format!("{} removed from the config by a reload", gone.join(", "));
    if let Err(e) = roll_back(app, id, "aborted", FlipKind::ManualRollback, reason, |ev| {
        ev.reason = crate::events::Reason::ReleaseAbort;
        ev.actor = "reload".to_string();
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
            // Unreadable: nothing is resumed from it anyway.
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
    let stored = tokio::task::spawn_blocking(move || std::fs::read(&p2))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
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
    // Stored with its phase passed, before the next phase's claim: the next phase starts.
    let mut passed = None;
    if rel.state == "running"
        && rel.phases.get(i).is_some_and(|p| p.state == "passed")
        && i + 1 < rel.phases.len()
    {
        passed = Some(format!(
            "release {:?} ({}) phase {i} {:?} passed",
            rel.name, rel.id, rel.phases[i].plan.name
        ));
        i += 1;
        rel.phase = i;
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
        "release {:?} ({id}) {how} at phase {i} ({})",
        rel.name,
        match &resume {
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
    let app2 = app.clone();
    tokio::spawn(app.supervised("release_driver", move || {
        let (app, id, cancel) = (app2.clone(), id.clone(), cancel.clone());
        let first = first.take();
        async move {
            match first {
                Some((from, resume)) => drive(app, id, cancel, from, resume).await,
                None => drive_again(app, id, cancel).await,
            }
        }
    }));
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

    /// The release whose driver panics as it comes to this phase (once): a bug's stand-in.
    static FAIL_AT: std::sync::Mutex<Option<(String, usize)>> = std::sync::Mutex::new(None);

    pub(super) fn fail_point(id: &str, phase: usize) {
        let mut at = FAIL_AT.lock().unwrap_or_else(|p| p.into_inner());
        if at.as_ref().is_some_and(|(i, p)| i == id && *p == phase) {
            *at = None;
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
        let id = answer["id"].as_str().expect("id").to_string();
        *FAIL_AT.lock().unwrap_or_else(|p| p.into_inner()) = Some((id.clone(), 1));
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
        let fired = triggered(
            &app,
            "api",
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
        assert!(!triggered(&app, "api", "x", json!({})).await.expect("no-op"));
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
