//! Automatic rollback: the pure decision engine.
//!
//! This module does no I/O and reads no clock. The caller (a task that runs at least once a
//! second per service) measures every trigger over that trigger's own window `over` on the live
//! color, passes the numbers in an [`Evaluation`] together with `now`, and performs whatever
//! [`Decision`] comes back. One [`ServiceWatch`] per service.
//!
//! # Invariants
//!
//! 1. **Only window totals matter.** The engine sees nothing but the totals of each window, so
//!    the same failures in a burst or spread over the window reach the same decision.
//! 2. **Minimum traffic.** An `error_rate` or `p95_latency` trigger whose window holds fewer than
//!    `min_requests` requests (or none at all) is `InsufficientData`: it never fires, and such an
//!    evaluation breaks its `for` like any evaluation without the condition. `critical_5xx` and
//!    `unhealthy` ignore `min_requests`.
//! 3. **Conditions are strict.** `error_rate`: failures / requests > above; `p95_latency`:
//!    p95 > above; `critical_5xx`: failures > above; `unhealthy`: no healthy upstream.
//! 4. **`for` as in a Prometheus alerting rule.** A breach starts at the first reading with
//!    the condition (`since`); it must hold at every reading after that; one reading without
//!    it resets. The trigger is *due* at the first reading with the condition taken at or after
//!    `since + for`, so a breach starting at T fires at the first evaluation at or after
//!    T + for; `for = 0` fires at the first breaching reading. The built-in triggers take a
//!    reading at every evaluation; a `prometheus` or `probe` trigger's reading is its task's
//!    last one, taken every `interval` and seen again at each evaluation until the next: a
//!    repeated reading adds no time to its breach, so with `for > 0` it fires only on a second
//!    breaching reading taken at least `for` after the first (as an alert with `for > 0` never
//!    fires on one evaluation).
//! 5. **Arming gates only the decision.** Breach tracking runs whether armed or not (status shows
//!    it, and a resume after a pause fires at once if the condition held all along). Not armed
//!    (or `enabled = false`) always yields [`Decision::None`].
//! 6. **Episodes.** An episode begins with a breach and ends at the first evaluation at which no
//!    trigger is breaching. While armed and some trigger is due, the first due one in config
//!    order decides: with `dry_run`, [`Decision::WouldRollback`] once per episode and never a
//!    rollback; else with an unhealthy rollback target, [`Decision::Blocked`] once per episode
//!    (no repeats while it stays blocked) and [`Decision::Rollback`] as soon as the target heals
//!    while still due; else `Rollback`.
//! 7. **Exactly one flip.** After `Rollback` the firing trigger is `Fired` and the engine answers
//!    `None` until [`ServiceWatch::reset`], however often it is evaluated. After a reset nothing
//!    fires until a condition holds for its full `for` again.
//! 8. **Signals from outside** (`prometheus`, `probe`; their I/O is in [`crate::analysis`]).
//!    Each is read from its own task's last reading ([`External`]), taken for the live color.
//!    A value breaches by its strict bound (a probe: the fraction of failing upstreams >
//!    `above_fraction`). No reading yet or an empty result (unless `on_empty = "fail"`) is
//!    `InsufficientData`. An error below `max_errors` consecutive ones changes nothing about a
//!    breach (it stays pending, `since` kept, as Prometheus keeps a pending alert over a
//!    failed evaluation) and fires nothing itself; without a breach it is `Inconclusive`. At
//!    `max_errors` consecutive errors `on_error = "hold"` is `Inconclusive` (blind: never fires,
//!    a breach is broken) while `"fail"` breaches. From there every rule above applies
//!    unchanged (arming, `for`, episodes, one flip, blocked, dry run).
//! 9. **Never panics.** Zero requests, failures above requests, a missing measurement or one of
//!    the wrong kind (counted as no data: `InsufficientData { requests: 0 }`), a trigger list
//!    that changed under it (its trigger states start fresh), time going backwards: all are
//!    answered, none panics.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::config::{Bound, OnEmpty, OnError, RollbackConfig, TriggerConfig, TriggerKind};

/// What the I/O side measured for one trigger at one evaluation, over that trigger's own window
/// `over`, on the live color.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Measured {
    /// `error_rate`: all requests and failed requests in the window.
    Rate { requests: u64, failures: u64 },
    /// `p95_latency`: all requests in the window and their p95 (None: no latency samples).
    Latency {
        requests: u64,
        p95: Option<Duration>,
    },
    /// `critical_5xx`: failures on the trigger's paths in the window; `requests` = all requests
    /// of the live color in that window (only for the event detail).
    Count { requests: u64, failures: u64 },
    /// `unhealthy`: the live pool's healthy and total upstreams.
    Health {
        healthy_upstreams: usize,
        total: usize,
    },
    /// `prometheus` and `probe`: the last reading of the trigger's own task, and when it was
    /// taken (None: no reading yet).
    External(External, Option<Instant>),
}

/// The last reading of a `prometheus` or `probe` trigger, taken for the live color.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum External {
    /// No reading for this live color yet.
    Pending,
    /// `prometheus`: the query's value; `probe`: the fraction of probed upstreams failing.
    Value(f64),
    /// `prometheus`: the query returned no series (or NaN).
    Empty,
    /// This many consecutive errors: no answer, a bad answer, a result of the wrong shape.
    Error { consecutive: u32 },
}

/// One evaluation of one service.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation<'a> {
    pub now: Instant,
    /// Computed by the caller: a flip less than `watch_for` ago, a previous color, enabled, not
    /// paused.
    pub armed: bool,
    /// The previous color's pool has at least one healthy upstream.
    pub rollback_target_healthy: bool,
    /// One per trigger, in the order of `cfg.triggers`.
    pub measured: &'a [Measured],
    /// The seconds since the live color went live (counting the flip's own), which cut every
    /// window (`None`: live since before this process knew): a fire's `over` is what was read.
    pub live_secs: Option<u64>,
}

/// A trigger's state, for `/api/status`. `value` is in engine units: a ratio for `error_rate`,
/// seconds for `p95_latency`, a failure count for `critical_5xx`, the number of healthy
/// upstreams for `unhealthy`. `requests` is the window's request count (None for `unhealthy`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TriggerState {
    /// The condition does not hold. `value` is None before the first evaluation, or for
    /// `p95_latency` when the window has requests but no latency sample.
    Ok {
        value: Option<f64>,
        requests: Option<u64>,
    },
    /// The condition has held at every reading since the one taken at `since`; `last`: when
    /// the latest of them was taken (the evaluation's time for the built-in triggers).
    Breaching {
        since: Instant,
        last: Instant,
        value: f64,
        requests: Option<u64>,
    },
    /// Fewer than `min_requests` requests in the window (rate and latency triggers), or no
    /// value (`prometheus`, `probe`: no reading yet, an empty result).
    InsufficientData { requests: u64 },
    /// `prometheus` and `probe`: the last evaluation failed. `blind`: `max_errors` consecutive
    /// errors with `on_error = "hold"`: the trigger cannot fire until it reads a value again.
    Inconclusive { blind: bool },
    /// This trigger caused the rollback at `at`; it stays so until [`ServiceWatch::reset`].
    Fired {
        at: Instant,
        value: f64,
        requests: Option<u64>,
    },
}

/// What the caller must do after an evaluation.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    None,
    /// Flip back to the previous color now (then call [`ServiceWatch::reset`]).
    Rollback(Fire),
    /// A trigger is due but the previous color's pool has no healthy upstream: record
    /// `rollback_blocked`, flip nothing.
    Blocked(Fire),
    /// Dry run: record `would_rollback`, flip nothing.
    WouldRollback(Fire),
}

/// The trigger that decided, with everything the event needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Fire {
    /// Index into `cfg.triggers`.
    pub trigger_index: usize,
    /// `error_rate`, `p95_latency`, `critical_5xx` or `unhealthy`.
    pub kind: &'static str,
    /// A ratio, seconds, a count, or 0 for `unhealthy`.
    pub threshold: f64,
    pub threshold_text: String,
    /// Same units as `threshold` (the number of healthy upstreams for `unhealthy`).
    pub value: f64,
    pub value_text: String,
    pub over: Duration,
    pub for_: Duration,
    /// Requests in the window (None for `unhealthy`).
    pub requests: Option<u64>,
    /// One human line, e.g. `error_rate 0.312 > 0.05 over 1m for 2m (412 requests in window)`.
    pub detail: String,
    /// `prometheus` and `probe`: the query or probe, last error and detail (added by the
    /// caller from [`crate::analysis`]) for the event.
    pub extra: Option<Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Episode {
    blocked: bool,
    would_rollback: bool,
}

/// The rollback engine of one service.
#[derive(Clone, Debug)]
pub struct ServiceWatch {
    /// The triggers the states belong to; a different list in `evaluate` starts them fresh.
    triggers: Vec<TriggerConfig>,
    states: Vec<TriggerState>,
    episode: Episode,
    rolled_back: bool,
}

const FRESH: TriggerState = TriggerState::Ok {
    value: None,
    requests: None,
};

impl ServiceWatch {
    pub fn new(cfg: &RollbackConfig) -> Self {
        ServiceWatch {
            triggers: cfg.triggers.clone(),
            states: vec![FRESH; cfg.triggers.len()],
            episode: Episode::default(),
            rolled_back: false,
        }
    }

    /// Called at least once a second. Updates every trigger's state and returns what to do.
    pub fn evaluate(&mut self, cfg: &RollbackConfig, ev: &Evaluation) -> Decision {
        if self.triggers != cfg.triggers {
            self.triggers = cfg.triggers.clone();
            self.states = vec![FRESH; cfg.triggers.len()];
            self.episode = Episode::default();
        }

        // Triggers whose reading this time is an error below `max_errors`: a breach they hold
        // is kept, but is not due on this reading.
        let mut kept = vec![false; self.states.len()];
        for ((i, t), state) in cfg.triggers.iter().enumerate().zip(self.states.iter_mut()) {
            if matches!(state, TriggerState::Fired { .. }) {
                continue;
            }
            *state = match observe(cfg.min_requests, t, ev.measured.get(i), ev.now) {
                Obs::NoData { requests } => TriggerState::InsufficientData { requests },
                Obs::Inconclusive { blind } => TriggerState::Inconclusive { blind },
                Obs::Error => match *state {
                    TriggerState::Breaching { .. } => {
                        kept[i] = true;
                        *state
                    }
                    _ => TriggerState::Inconclusive { blind: false },
                },
                Obs::Clear { value, requests } => TriggerState::Ok { value, requests },
                Obs::Breach {
                    value,
                    requests,
                    at,
                } => match *state {
                    TriggerState::Breaching { since, .. } => TriggerState::Breaching {
                        since,
                        last: at,
                        value,
                        requests,
                    },
                    _ => TriggerState::Breaching {
                        since: at,
                        last: at,
                        value,
                        requests,
                    },
                },
            };
        }

        if !self
            .states
            .iter()
            .any(|s| matches!(s, TriggerState::Breaching { .. }))
        {
            self.episode = Episode::default();
        }

        if self.rolled_back || !ev.armed || !cfg.enabled {
            return Decision::None;
        }

        let due = cfg
            .triggers
            .iter()
            .zip(self.states.iter_mut())
            .enumerate()
            .find(|(i, (t, s))| match **s {
                TriggerState::Breaching { since, last, .. } => {
                    !kept[*i] && last.saturating_duration_since(since) >= t.for_
                }
                _ => false,
            });
        let Some((i, (t, state))) = due else {
            return Decision::None;
        };
        let TriggerState::Breaching {
            value, requests, ..
        } = *state
        else {
            return Decision::None;
        };
        let fire = build_fire(i, t, value, requests, ev.measured.get(i), ev.live_secs);

        if cfg.dry_run {
            if self.episode.would_rollback {
                return Decision::None;
            }
            self.episode.would_rollback = true;
            return Decision::WouldRollback(fire);
        }
        if !ev.rollback_target_healthy {
            if self.episode.blocked {
                return Decision::None;
            }
            self.episode.blocked = true;
            return Decision::Blocked(fire);
        }
        *state = TriggerState::Fired {
            at: ev.now,
            value,
            requests,
        };
        self.rolled_back = true;
        Decision::Rollback(fire)
    }

    /// The caller performed the rollback (or the live color changed for any reason, e.g. a
    /// manual flip or a reload): start fresh.
    pub fn reset(&mut self) {
        self.states = vec![FRESH; self.triggers.len()];
        self.episode = Episode::default();
        self.rolled_back = false;
    }

    /// One per trigger, in config order (for `/api/status`).
    pub fn states(&self) -> &[TriggerState] {
        &self.states
    }

    /// The current episode reported `Blocked` and has not rolled back since.
    pub fn blocked(&self) -> bool {
        self.episode.blocked && !self.rolled_back
    }

    /// A `Rollback` was returned and `reset` has not been called since.
    #[cfg(test)]
    pub fn rolled_back(&self) -> bool {
        self.rolled_back
    }
}

enum Obs {
    NoData {
        requests: u64,
    },
    Inconclusive {
        blind: bool,
    },
    /// An error below `max_errors` consecutive ones.
    Error,
    Clear {
        value: Option<f64>,
        requests: Option<u64>,
    },
    /// `at`: when the reading was taken.
    Breach {
        value: f64,
        requests: Option<u64>,
        at: Instant,
    },
}

/// `now`: the evaluation's time, when the built-in triggers' readings are taken.
fn observe(min_requests: u64, t: &TriggerConfig, m: Option<&Measured>, now: Instant) -> Obs {
    let reading = |value: f64, requests: Option<u64>, breaching: bool| {
        if breaching {
            Obs::Breach {
                value,
                requests,
                at: now,
            }
        } else {
            Obs::Clear {
                value: Some(value),
                requests,
            }
        }
    };
    match (&t.kind, m) {
        (TriggerKind::ErrorRate { above, .. }, Some(&Measured::Rate { requests, failures })) => {
            if requests == 0 || requests < min_requests {
                return Obs::NoData { requests };
            }
            let ratio = failures.min(requests) as f64 / requests as f64;
            reading(ratio, Some(requests), ratio > *above)
        }
        (TriggerKind::P95Latency { above, .. }, Some(&Measured::Latency { requests, p95 })) => {
            if requests == 0 || requests < min_requests {
                return Obs::NoData { requests };
            }
            match p95 {
                Some(p) => reading(p.as_secs_f64(), Some(requests), p > *above),
                None => Obs::Clear {
                    value: None,
                    requests: Some(requests),
                },
            }
        }
        (TriggerKind::Critical5xx { above, .. }, Some(&Measured::Count { requests, failures })) => {
            reading(failures as f64, Some(requests), failures > *above)
        }
        (
            TriggerKind::Unhealthy,
            Some(&Measured::Health {
                healthy_upstreams, ..
            }),
        ) => reading(healthy_upstreams as f64, None, healthy_upstreams == 0),
        (TriggerKind::Prometheus(p), Some(&Measured::External(r, at))) => external(
            r,
            at.unwrap_or(now),
            p.bound,
            p.on_empty,
            p.on_error,
            p.max_errors,
        ),
        (TriggerKind::Probe(p), Some(&Measured::External(r, at))) => external(
            r,
            at.unwrap_or(now),
            Bound::Above(p.above_fraction),
            OnEmpty::InsufficientData,
            p.on_error,
            p.max_errors,
        ),
        _ => Obs::NoData { requests: 0 },
    }
}

/// Invariant 8. A failure without a value (empty, errors) breaches with `value` NaN (shown as
/// null). `at`: when the reading was taken.
fn external(
    r: External,
    at: Instant,
    bound: Bound,
    on_empty: OnEmpty,
    on_error: OnError,
    max: u32,
) -> Obs {
    match r {
        External::Pending => Obs::NoData { requests: 0 },
        External::Value(v) if v.is_nan() => Obs::NoData { requests: 0 },
        External::Value(v) if bound.breached_by(v) => Obs::Breach {
            value: v,
            requests: None,
            at,
        },
        External::Value(v) => Obs::Clear {
            value: Some(v),
            requests: None,
        },
        External::Empty if on_empty == OnEmpty::Fail => Obs::Breach {
            value: f64::NAN,
            requests: None,
            at,
        },
        External::Empty => Obs::NoData { requests: 0 },
        External::Error { consecutive } if consecutive >= max.max(1) => match on_error {
            OnError::Fail => Obs::Breach {
                value: f64::NAN,
                requests: None,
                at,
            },
            OnError::Hold => Obs::Inconclusive { blind: true },
        },
        External::Error { .. } => Obs::Error,
    }
}

fn build_fire(
    trigger_index: usize,
    t: &TriggerConfig,
    value: f64,
    requests: Option<u64>,
    m: Option<&Measured>,
    live_secs: Option<u64>,
) -> Fire {
    let kind = t.kind.name();
    // The window read: the trigger's, cut at the flip when that is more recent.
    let over = match live_secs {
        Some(l) => t.kind.over().min(Duration::from_secs(l.max(1))),
        None => t.kind.over(),
    };
    let over_text = if over < t.kind.over() {
        format!(
            "{} (since the flip or this process's start; window {})",
            fmt_duration(over),
            fmt_duration(t.kind.over())
        )
    } else {
        fmt_duration(over)
    };
    let for_ = t.for_;
    let in_window = match requests {
        Some(n) => format!(" ({n} requests in window)"),
        None => String::new(),
    };
    let (threshold, threshold_text, value_text, detail) = match &t.kind {
        TriggerKind::ErrorRate { above, .. } => {
            let (th, v) = (
                format!("{above}"),
                beside(value, *above, fmt_ratio(value), 4),
            );
            let detail = format!(
                "{kind} {v} > {th} over {} for {}{in_window}",
                over_text,
                fmt_duration(for_)
            );
            (*above, th, v, detail)
        }
        TriggerKind::P95Latency { above, .. } => {
            let th_ms = above.as_secs_f64() * 1000.0;
            let v_ms = value * 1000.0;
            let v = beside(v_ms, th_ms, fmt_ms(value).replace("ms", ""), 2) + "ms";
            let th = fmt_ms(above.as_secs_f64());
            let detail = format!(
                "{kind} {v} > {th} over {} for {}{in_window}",
                over_text,
                fmt_duration(for_)
            );
            (above.as_secs_f64(), th, v, detail)
        }
        TriggerKind::Critical5xx { paths, above, .. } => {
            let (th, v) = (above.to_string(), format!("{value:.0}"));
            let detail = format!(
                "{kind} {v} > {th} failures on {} over {} for {}{in_window}",
                paths.join(","),
                over_text,
                fmt_duration(for_)
            );
            (*above as f64, th, v, detail)
        }
        TriggerKind::Unhealthy => {
            let v = match m {
                Some(Measured::Health {
                    healthy_upstreams,
                    total,
                }) => format!("{healthy_upstreams} of {total} live upstreams healthy"),
                _ => format!("{value:.0} live upstreams healthy"),
            };
            let detail = format!("{kind}: {v} for {}", fmt_duration(for_));
            (0.0, "no healthy upstream".to_string(), v, detail)
        }
        TriggerKind::Prometheus(p) => {
            let threshold = p.bound.threshold();
            let th = fmt_exact(threshold);
            let v = match m {
                Some(Measured::External(External::Empty, _)) => "empty result".to_string(),
                Some(Measured::External(External::Error { consecutive }, _)) => {
                    format!("{consecutive} consecutive errors")
                }
                _ => fmt_num_beside(value, threshold),
            };
            let detail = if value.is_nan() {
                format!(
                    "{kind}: {v} (on_{} = \"fail\") for {}",
                    if v == "empty result" {
                        "empty"
                    } else {
                        "error"
                    },
                    fmt_duration(for_)
                )
            } else {
                format!(
                    "{kind} {v} {} {th} for {}",
                    p.bound.op(),
                    fmt_duration(for_)
                )
            };
            (p.bound.threshold(), th, v, detail)
        }
        TriggerKind::Probe(p) => {
            let th_pct = p.above_fraction * 100.0;
            let th = format!("{}%", fmt_exact(th_pct));
            let v = match m {
                Some(Measured::External(External::Error { consecutive }, _)) => {
                    format!("{consecutive} consecutive errors")
                }
                _ => {
                    let pct = value * 100.0;
                    format!("{}%", fmt_num_beside(pct, th_pct))
                }
            };
            let detail = if value.is_nan() {
                format!(
                    "{kind}: {v} (on_error = \"fail\") for {}",
                    fmt_duration(for_)
                )
            } else {
                format!(
                    "{kind}: {v} of the live upstreams failing > {th} for {}",
                    fmt_duration(for_)
                )
            };
            (p.above_fraction, th, v, detail)
        }
    };
    Fire {
        trigger_index,
        kind,
        threshold,
        threshold_text,
        value,
        value_text,
        over,
        for_,
        requests,
        detail,
        extra: None,
    }
}

impl TriggerState {
    /// `ok`, `breaching`, `insufficient_data` or `fired`.
    pub fn name(&self) -> &'static str {
        match self {
            TriggerState::Ok { .. } => "ok",
            TriggerState::Breaching { .. } => "breaching",
            TriggerState::InsufficientData { .. } => "insufficient_data",
            TriggerState::Fired { .. } => "fired",
            TriggerState::Inconclusive { .. } => "inconclusive",
        }
    }

    /// The state for `/api/status`: `kind`, `state`, `threshold` (a ratio, milliseconds for
    /// p95, a count; null for unhealthy), `value` (same units; healthy upstreams for unhealthy;
    /// null when unknown), `since` (breach start or fire time, through `to_wall`; else null),
    /// `held_secs` (from `since` to the latest breaching reading, else null), `over_secs`, `for_secs`,
    /// `requests` (null when unknown or for unhealthy).
    pub fn to_json(self, trigger: &TriggerConfig, to_wall: impl Fn(Instant) -> String) -> Value {
        let (value, since, requests) = match self {
            TriggerState::Ok { value, requests } => (value, None, requests),
            TriggerState::Breaching {
                since,
                value,
                requests,
                ..
            } => (Some(value), Some(since), requests),
            TriggerState::InsufficientData { requests } => (None, None, Some(requests)),
            TriggerState::Inconclusive { .. } => (None, None, None),
            TriggerState::Fired {
                at,
                value,
                requests,
            } => (Some(value), Some(at), requests),
        };
        // As long as the readings show it held (the latest one's time, not now: between a
        // `prometheus` or `probe` trigger's readings, and over errors, no more of `for` passes).
        let held = match self {
            TriggerState::Breaching { since, last, .. } => {
                secs_json(last.saturating_duration_since(since))
            }
            _ => Value::Null,
        };
        let (threshold, value) = match &trigger.kind {
            TriggerKind::ErrorRate { above, .. } => (num(*above), value.map(num)),
            TriggerKind::P95Latency { above, .. } => {
                (ms_json(above.as_secs_f64()), value.map(ms_json))
            }
            TriggerKind::Critical5xx { above, .. } => (json!(above), value.map(num)),
            TriggerKind::Unhealthy => (Value::Null, value.map(num)),
            TriggerKind::Prometheus(p) => (num(p.bound.threshold()), value.map(num)),
            TriggerKind::Probe(p) => (num(p.above_fraction), value.map(num)),
        };
        json!({
            "kind": trigger.kind.name(),
            "state": self.name(),
            "threshold": threshold,
            "value": value,
            "since": since.map(to_wall),
            "held_secs": held,
            "over_secs": secs_json(trigger.kind.over()),
            "for_secs": secs_json(trigger.for_),
            "requests": requests,
        })
    }
}

/// The state in `/api/status` of a trigger the engine has not evaluated yet for the live
/// color's generation (from a flip until the watcher's next evaluation, at most 0.5 s later):
/// `insufficient_data`, with no value and no
/// request count, as no reading of the new live color has been taken.
pub fn unevaluated_json(trigger: &TriggerConfig) -> Value {
    let mut v = TriggerState::InsufficientData { requests: 0 }.to_json(trigger, |_| String::new());
    if let Some(obj) = v.as_object_mut() {
        obj.insert("requests".into(), Value::Null);
    }
    v
}

/// A number as short as it reads: `0.5`, `12`, `0.333`; infinities as Prometheus writes them
/// (`+Inf`, `-Inf`).
pub fn fmt_num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.is_finite() {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "0" || s == "-0" {
            format!("{v:e}")
        } else {
            s.to_string()
        }
    } else if v == f64::INFINITY {
        "+Inf".to_string()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        v.to_string()
    }
}

/// A threshold as it was written: every digit it has (`0.12345`, `1`, `+Inf`).
pub fn fmt_exact(v: f64) -> String {
    if v.is_finite() && v.fract() != 0.0 {
        // The shortest text that reads back as this very number.
        format!("{v}")
    } else {
        fmt_num(v)
    }
}

/// `text`, a rounding of `value`, unless it reads as equal to `threshold` (or as past it on the
/// other side) while `value` is not: then `value` with more decimals (from `decimals` up), the
/// fewest that read on its side of the threshold, so a reason never says `1 > 1` or
/// `0.050 > 0.05`.
fn beside(value: f64, threshold: f64, text: String, decimals: usize) -> String {
    let reads_right = |t: &str| {
        t.parse::<f64>()
            .is_ok_and(|r| r.partial_cmp(&threshold) == value.partial_cmp(&threshold))
    };
    if !value.is_finite() || !threshold.is_finite() || reads_right(&text) {
        return text;
    }
    (decimals..=17)
        .map(|d| format!("{value:.d$}"))
        .find(|t| reads_right(t))
        // The shortest text that reads back as this very number.
        .unwrap_or_else(|| format!("{value}"))
}

/// A value compared with `threshold`, as [`fmt_num`] writes it, or with the decimals it takes
/// to read on its side of the threshold ([`beside`]).
pub fn fmt_num_beside(value: f64, threshold: f64) -> String {
    beside(value, threshold, fmt_num(value), 4)
}

/// A ratio with 3 decimals: `0.312`.
pub fn fmt_ratio(ratio: f64) -> String {
    format!("{ratio:.3}")
}

/// Seconds as milliseconds: `1000ms`, `12.5ms`.
pub fn fmt_ms(secs: f64) -> String {
    let ms = secs * 1000.0;
    if (ms - ms.round()).abs() < 1e-6 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.1}ms")
    }
}

/// A duration as humantime writes it: `2m`, `1m 30s`, `0s`.
pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A JSON number, written as an integer when it is one.
fn num(v: f64) -> Value {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

fn ms_json(secs: f64) -> Value {
    num((secs * 1_000_000.0).round() / 1000.0)
}

fn secs_json(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        Value::from(d.as_secs())
    } else {
        Value::from(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn error_rate(above: f64, over: u64, for_: u64) -> TriggerConfig {
        TriggerConfig {
            kind: TriggerKind::ErrorRate {
                above,
                over: s(over),
            },
            for_: s(for_),
        }
    }

    fn p95(above_ms: u64, over: u64, for_: u64) -> TriggerConfig {
        TriggerConfig {
            kind: TriggerKind::P95Latency {
                above: Duration::from_millis(above_ms),
                over: s(over),
            },
            for_: s(for_),
        }
    }

    fn critical(above: u64, over: u64, for_: u64) -> TriggerConfig {
        TriggerConfig {
            kind: TriggerKind::Critical5xx {
                paths: vec!["/api/payments".into(), "/api/subscriptions".into()],
                above,
                over: s(over),
            },
            for_: s(for_),
        }
    }

    fn unhealthy(for_: u64) -> TriggerConfig {
        TriggerConfig {
            kind: TriggerKind::Unhealthy,
            for_: s(for_),
        }
    }

    fn cfg(triggers: Vec<TriggerConfig>) -> RollbackConfig {
        RollbackConfig {
            enabled: true,
            watch_for: s(7200),
            min_requests: 20,
            dry_run: false,
            triggers,
        }
    }

    fn ev(now: Instant, measured: &[Measured]) -> Evaluation<'_> {
        Evaluation {
            live_secs: None,
            now,
            armed: true,
            rollback_target_healthy: true,
            measured,
        }
    }

    fn rate(requests: u64, failures: u64) -> Measured {
        Measured::Rate { requests, failures }
    }

    const BAD: Measured = Measured::Rate {
        requests: 100,
        failures: 50,
    };
    const GOOD: Measured = Measured::Rate {
        requests: 100,
        failures: 1,
    };

    fn is_none(d: &Decision) -> bool {
        matches!(d, Decision::None)
    }

    #[test]
    fn insufficient_data_below_min_requests_never_fires() {
        let c = cfg(vec![error_rate(0.05, 60, 0), p95(100, 60, 0)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        for i in 0..100 {
            let m = [
                rate(19, 19),
                Measured::Latency {
                    requests: 19,
                    p95: Some(s(10)),
                },
            ];
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &m))));
            assert_eq!(
                w.states(),
                &[
                    TriggerState::InsufficientData { requests: 19 },
                    TriggerState::InsufficientData { requests: 19 }
                ]
            );
        }
        // At min_requests it fires at once (for = 0).
        let m = [
            rate(20, 20),
            Measured::Latency {
                requests: 0,
                p95: None,
            },
        ];
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(100), &m)),
            Decision::Rollback(Fire {
                trigger_index: 0,
                ..
            })
        ));
    }

    #[test]
    fn insufficient_data_gap_breaks_for() {
        let c = cfg(vec![error_rate(0.05, 60, 10)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        for i in 0..9 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))));
        }
        assert!(is_none(&w.evaluate(&c, &ev(t0 + s(9), &[rate(5, 5)]))));
        // The breach restarts at 10 and needs until 20.
        for i in 10..20 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))));
        }
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(20), &[BAD])),
            Decision::Rollback(_)
        ));
    }

    #[test]
    fn critical_and_unhealthy_ignore_min_requests() {
        let c = cfg(vec![critical(0, 30, 0)]);
        let mut w = ServiceWatch::new(&c);
        let m = [Measured::Count {
            requests: 1,
            failures: 1,
        }];
        assert!(matches!(
            w.evaluate(&c, &ev(Instant::now(), &m)),
            Decision::Rollback(_)
        ));

        let c = cfg(vec![unhealthy(0)]);
        let mut w = ServiceWatch::new(&c);
        let m = [Measured::Health {
            healthy_upstreams: 0,
            total: 2,
        }];
        assert!(matches!(
            w.evaluate(&c, &ev(Instant::now(), &m)),
            Decision::Rollback(_)
        ));
    }

    #[test]
    fn conditions_are_strictly_above() {
        let c = cfg(vec![
            error_rate(0.05, 60, 0),
            p95(1000, 60, 0),
            critical(2, 30, 0),
            unhealthy(0),
        ]);
        let mut w = ServiceWatch::new(&c);
        let at_threshold = [
            rate(100, 5),
            Measured::Latency {
                requests: 100,
                p95: Some(Duration::from_millis(1000)),
            },
            Measured::Count {
                requests: 100,
                failures: 2,
            },
            Measured::Health {
                healthy_upstreams: 1,
                total: 2,
            },
        ];
        assert!(is_none(&w.evaluate(&c, &ev(Instant::now(), &at_threshold))));
        assert!(w
            .states()
            .iter()
            .all(|s| matches!(s, TriggerState::Ok { value: Some(_), .. })));
        // Each one just above fires, alone.
        let above = [
            rate(100, 6),
            Measured::Latency {
                requests: 100,
                p95: Some(Duration::from_millis(1001)),
            },
            Measured::Count {
                requests: 100,
                failures: 3,
            },
            Measured::Health {
                healthy_upstreams: 0,
                total: 2,
            },
        ];
        for i in 0..4 {
            let mut m = at_threshold;
            m[i] = above[i];
            let mut w = ServiceWatch::new(&c);
            match w.evaluate(&c, &ev(Instant::now(), &m)) {
                Decision::Rollback(f) => assert_eq!(f.trigger_index, i),
                d => panic!("trigger {i}: {d:?}"),
            }
        }
    }

    #[test]
    fn breach_fires_at_first_evaluation_at_or_after_for() {
        let c = cfg(vec![error_rate(0.05, 60, 120)]);
        let t0 = Instant::now();
        // Regular evaluations: fires exactly at T + for.
        let mut w = ServiceWatch::new(&c);
        for i in 0..120 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))), "at {i}");
        }
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(120), &[BAD])),
            Decision::Rollback(_)
        ));
        // Irregular evaluations (every 700ms): the first at or after T + 120s.
        let mut w = ServiceWatch::new(&c);
        let step = Duration::from_millis(700);
        let mut now = t0;
        let fired_at = loop {
            if let Decision::Rollback(_) = w.evaluate(&c, &ev(now, &[BAD])) {
                break now;
            }
            now += step;
        };
        assert!(fired_at - t0 >= s(120));
        assert!(fired_at - t0 < s(120) + step);
        assert!(matches!(
            w.states()[0],
            TriggerState::Fired { at, .. } if at == fired_at
        ));
    }

    #[test]
    fn for_zero_fires_at_first_breaching_evaluation() {
        let c = cfg(vec![error_rate(0.05, 60, 0)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        assert!(is_none(&w.evaluate(&c, &ev(t0, &[GOOD]))));
        match w.evaluate(&c, &ev(t0 + s(1), &[BAD])) {
            Decision::Rollback(f) => {
                assert_eq!(f.value, 0.5);
                assert_eq!(f.requests, Some(100));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn one_evaluation_without_the_condition_resets_for() {
        let c = cfg(vec![error_rate(0.05, 60, 10)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))));
        }
        assert!(matches!(w.states()[0], TriggerState::Breaching { since, .. } if since == t0));
        assert!(is_none(&w.evaluate(&c, &ev(t0 + s(10), &[GOOD]))));
        assert!(matches!(w.states()[0], TriggerState::Ok { .. }));
        for i in 11..21 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))));
        }
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(21), &[BAD])),
            Decision::Rollback(_)
        ));
    }

    /// Window totals from (second, failed) request events, as the I/O side would compute them.
    fn totals(events: &[(u64, bool)], now: u64, over: u64) -> Measured {
        let inside = events.iter().filter(|(t, _)| *t <= now && *t + over > now);
        let requests = inside.clone().count() as u64;
        let failures = inside.filter(|(_, f)| *f).count() as u64;
        rate(requests, failures)
    }

    #[test]
    fn burst_or_spread_reach_the_same_decision() {
        let c = cfg(vec![error_rate(0.05, 60, 0)]);
        let t0 = Instant::now();
        // 200 requests over a minute; 12 failures in one burst at second 30, or spread evenly.
        let ok: Vec<(u64, bool)> = (0..188).map(|i| (i * 60 / 188, false)).collect();
        let mut burst = ok.clone();
        burst.extend((0..12).map(|_| (30, true)));
        let mut spread = ok;
        spread.extend((0..12).map(|i| (i * 5, true)));
        let (mb, ms) = (totals(&burst, 59, 60), totals(&spread, 59, 60));
        assert_eq!(mb, ms);
        let mut decisions = Vec::new();
        for m in [mb, ms] {
            // The same totals seen at different evaluation times decide the same.
            for at in [s(59), s(61), s(3600)] {
                let mut w = ServiceWatch::new(&c);
                decisions.push(w.evaluate(&c, &ev(t0 + at, &[m])));
            }
        }
        assert!(decisions.iter().all(|d| *d == decisions[0]));
        assert!(matches!(decisions[0], Decision::Rollback(_)));
        // And below the threshold, neither fires.
        let good: Vec<(u64, bool)> = (0..200).map(|i| (i * 60 / 200, i % 50 == 0)).collect();
        let mut w = ServiceWatch::new(&c);
        assert!(is_none(&w.evaluate(&c, &ev(t0, &[totals(&good, 59, 60)]))));
    }

    #[test]
    fn not_armed_never_fires_but_tracks_breach() {
        let c = cfg(vec![error_rate(0.05, 60, 10)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        for i in 0..100 {
            let e = Evaluation {
                live_secs: None,
                armed: false,
                ..ev(t0 + s(i), &[BAD])
            };
            assert!(is_none(&w.evaluate(&c, &e)));
        }
        assert!(matches!(w.states()[0], TriggerState::Breaching { since, .. } if since == t0));
        // Resume (armed again) with the condition held all along: fires at once.
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(100), &[BAD])),
            Decision::Rollback(_)
        ));
    }

    #[test]
    fn disabled_config_never_fires() {
        let mut c = cfg(vec![error_rate(0.05, 60, 0)]);
        c.enabled = false;
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))));
        }
    }

    #[test]
    fn exactly_one_rollback_per_episode() {
        let c = cfg(vec![error_rate(0.05, 60, 5), unhealthy(0)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        let dead = Measured::Health {
            healthy_upstreams: 0,
            total: 2,
        };
        let mut rollbacks = 0;
        for i in 0..1005 {
            let m = [BAD, dead];
            if let Decision::Rollback(_) = w.evaluate(&c, &ev(t0 + s(i), &m)) {
                rollbacks += 1;
            } else {
                assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &m))));
            }
        }
        assert_eq!(rollbacks, 1);
        assert!(w.rolled_back());
        // The second trigger fired first (for = 0) and stays Fired; the first keeps tracking.
        assert!(matches!(w.states()[1], TriggerState::Fired { at, .. } if at == t0));
        assert!(matches!(w.states()[0], TriggerState::Breaching { .. }));
    }

    #[test]
    fn reset_requires_the_condition_to_rehold_for() {
        let c = cfg(vec![error_rate(0.05, 60, 30)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        let mut fired = None;
        for i in 0..=30 {
            if let Decision::Rollback(_) = w.evaluate(&c, &ev(t0 + s(i), &[BAD])) {
                fired = Some(i);
            }
        }
        assert_eq!(fired, Some(30));
        w.reset();
        assert!(!w.rolled_back());
        assert_eq!(w.states(), &[FRESH]);
        for i in 31..61 {
            assert!(is_none(&w.evaluate(&c, &ev(t0 + s(i), &[BAD]))), "at {i}");
        }
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(61), &[BAD])),
            Decision::Rollback(_)
        ));
    }

    #[test]
    fn blocked_once_then_rollback_when_target_heals() {
        let c = cfg(vec![error_rate(0.05, 60, 0)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        let blocked = |now| Evaluation {
            live_secs: None,
            rollback_target_healthy: false,
            ..ev(now, &[BAD])
        };
        assert!(matches!(
            w.evaluate(&c, &blocked(t0)),
            Decision::Blocked(Fire {
                trigger_index: 0,
                ..
            })
        ));
        assert!(w.blocked());
        for i in 1..100 {
            assert!(is_none(&w.evaluate(&c, &blocked(t0 + s(i)))));
            assert!(w.blocked());
        }
        assert!(matches!(w.states()[0], TriggerState::Breaching { .. }));
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(100), &[BAD])),
            Decision::Rollback(_)
        ));
        assert!(!w.blocked());
        assert!(matches!(w.states()[0], TriggerState::Fired { .. }));
    }

    #[test]
    fn blocked_again_in_a_new_episode() {
        let c = cfg(vec![error_rate(0.05, 60, 0)]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        let with = |now, m: &'static [Measured]| Evaluation {
            live_secs: None,
            rollback_target_healthy: false,
            ..ev(now, m)
        };
        assert!(matches!(
            w.evaluate(&c, &with(t0, &[BAD])),
            Decision::Blocked(_)
        ));
        assert!(is_none(&w.evaluate(&c, &with(t0 + s(1), &[BAD]))));
        // The episode ends: no trigger breaching.
        assert!(is_none(&w.evaluate(&c, &with(t0 + s(2), &[GOOD]))));
        assert!(!w.blocked());
        assert!(matches!(
            w.evaluate(&c, &with(t0 + s(3), &[BAD])),
            Decision::Blocked(_)
        ));
    }

    #[test]
    fn dry_run_would_rollback_once_per_episode_never_rollback() {
        let mut c = cfg(vec![error_rate(0.05, 60, 5)]);
        c.dry_run = true;
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        let mut would = Vec::new();
        for i in 0..1000 {
            // Two episodes: bad 0..500, good at 500, bad again from 501.
            let m = if i == 500 { [GOOD] } else { [BAD] };
            match w.evaluate(&c, &ev(t0 + s(i), &m)) {
                Decision::WouldRollback(f) => {
                    assert_eq!(f.trigger_index, 0);
                    would.push(i)
                }
                Decision::None => {}
                d => panic!("at {i}: {d:?}"),
            }
        }
        assert_eq!(would, vec![5, 506]);
        assert!(!w.rolled_back());
        // Dry run with an unhealthy target still reports WouldRollback, never Blocked.
        let mut w = ServiceWatch::new(&c);
        let e = Evaluation {
            live_secs: None,
            rollback_target_healthy: false,
            ..ev(t0, &[BAD])
        };
        assert!(is_none(&w.evaluate(&c, &e)));
        let e = Evaluation {
            live_secs: None,
            now: t0 + s(5),
            ..e
        };
        assert!(matches!(w.evaluate(&c, &e), Decision::WouldRollback(_)));
    }

    #[test]
    fn first_due_trigger_in_config_order_wins() {
        let c = cfg(vec![
            p95(1000, 60, 0),
            error_rate(0.05, 60, 0),
            critical(0, 30, 0),
        ]);
        let mut w = ServiceWatch::new(&c);
        let m = [
            Measured::Latency {
                requests: 100,
                p95: Some(s(1)),
            },
            BAD,
            Measured::Count {
                requests: 100,
                failures: 7,
            },
        ];
        match w.evaluate(&c, &ev(Instant::now(), &m)) {
            Decision::Rollback(f) => {
                assert_eq!(f.trigger_index, 1);
                assert_eq!(f.kind, "error_rate");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn odd_inputs_do_not_panic() {
        let c = cfg(vec![
            error_rate(0.05, 60, 0),
            p95(1000, 60, 0),
            critical(0, 30, 0),
            unhealthy(0),
        ]);
        let t0 = Instant::now() + s(1000);
        let mut w = ServiceWatch::new(&c);
        let mut zero = c.clone();
        zero.min_requests = 0;
        // Zero requests, min_requests = 0: no data for rate and latency.
        let m = [
            rate(0, 0),
            Measured::Latency {
                requests: 0,
                p95: None,
            },
            Measured::Count {
                requests: 0,
                failures: 0,
            },
            Measured::Health {
                healthy_upstreams: 0,
                total: 0,
            },
        ];
        w.evaluate(
            &zero,
            &Evaluation {
                live_secs: None,
                armed: false,
                ..ev(t0, &m)
            },
        );
        assert_eq!(
            w.states()[0],
            TriggerState::InsufficientData { requests: 0 }
        );
        assert_eq!(
            w.states()[1],
            TriggerState::InsufficientData { requests: 0 }
        );
        // Failures above requests: the ratio is capped at 1.
        w.evaluate(
            &c,
            &Evaluation {
                live_secs: None,
                armed: false,
                ..ev(t0, &[rate(20, 50)])
            },
        );
        assert!(matches!(w.states()[0], TriggerState::Breaching { value, .. } if value == 1.0));
        // Missing and mismatched measurements: no data.
        assert_eq!(
            w.states()[1],
            TriggerState::InsufficientData { requests: 0 }
        );
        let wrong = [
            Measured::Health {
                healthy_upstreams: 0,
                total: 1,
            },
            rate(100, 100),
            rate(100, 100),
            rate(100, 100),
        ];
        assert!(is_none(&w.evaluate(&c, &ev(t0, &wrong))));
        assert!(w
            .states()
            .iter()
            .all(|s| *s == TriggerState::InsufficientData { requests: 0 }));
        // Latency with requests but no sample: ok, value unknown.
        w.evaluate(
            &c,
            &ev(
                t0,
                &[
                    GOOD,
                    Measured::Latency {
                        requests: 100,
                        p95: None,
                    },
                ],
            ),
        );
        assert_eq!(
            w.states()[1],
            TriggerState::Ok {
                value: None,
                requests: Some(100)
            }
        );
        // Time going backwards.
        let slow = cfg(vec![error_rate(0.05, 60, 10)]);
        let mut w = ServiceWatch::new(&slow);
        assert!(is_none(&w.evaluate(&slow, &ev(t0, &[BAD]))));
        assert!(is_none(&w.evaluate(&slow, &ev(t0 - s(500), &[BAD]))));
        // No triggers at all; more measurements than triggers.
        let none = cfg(vec![]);
        let mut w = ServiceWatch::new(&none);
        assert!(is_none(&w.evaluate(&none, &ev(t0, &[BAD, BAD]))));
        assert!(w.states().is_empty());
    }

    #[test]
    fn changed_trigger_list_starts_fresh() {
        let c1 = cfg(vec![error_rate(0.05, 60, 10)]);
        let c2 = cfg(vec![unhealthy(10), error_rate(0.05, 60, 10)]);
        let mut w = ServiceWatch::new(&c1);
        let t0 = Instant::now();
        for i in 0..9 {
            w.evaluate(&c1, &ev(t0 + s(i), &[BAD]));
        }
        let healthy = Measured::Health {
            healthy_upstreams: 2,
            total: 2,
        };
        assert!(is_none(&w.evaluate(&c2, &ev(t0 + s(10), &[healthy, BAD]))));
        assert_eq!(w.states().len(), 2);
        assert!(
            matches!(w.states()[1], TriggerState::Breaching { since, .. } if since == t0 + s(10))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn works_with_the_paused_tokio_clock() {
        let c = cfg(vec![error_rate(0.05, 60, 3)]);
        let mut w = ServiceWatch::new(&c);
        let mut seen = Vec::new();
        for _ in 0..5 {
            seen.push(w.evaluate(&c, &ev(Instant::now(), &[BAD])));
            tokio::time::advance(s(1)).await;
        }
        assert!(seen[..3].iter().all(is_none));
        assert!(matches!(seen[3], Decision::Rollback(_)));
        assert!(is_none(&seen[4]));
    }

    fn prom(bound: Bound, for_: u64, on_empty: OnEmpty, on_error: OnError) -> TriggerConfig {
        TriggerConfig {
            kind: TriggerKind::Prometheus(crate::config::PromCheck {
                query: "max(x)".into(),
                bound,
                interval: s(15),
                on_empty,
                on_error,
                max_errors: 3,
            }),
            for_: s(for_),
        }
    }

    /// A reading taken now.
    fn ext(r: External) -> Measured {
        Measured::External(r, Some(Instant::now()))
    }

    /// External readings obey the same `for`, arming and one-flip rules; missing data and
    /// errors break a breach and never fire unless the policy says "fail".
    #[tokio::test(start_paused = true)]
    async fn external_readings_follow_the_engine_rules() {
        let c = cfg(vec![prom(
            Bound::Above(0.5),
            3,
            OnEmpty::InsufficientData,
            OnError::Hold,
        )]);
        let mut w = ServiceWatch::new(&c);
        let mut step = |r: External| {
            let d = w.evaluate(&c, &ev(Instant::now(), &[ext(r)]));
            (d, w.states()[0])
        };
        let (d, st) = step(External::Pending);
        assert!(is_none(&d));
        assert_eq!(st, TriggerState::InsufficientData { requests: 0 });
        // Breach for 2 s, then an error at `for`: the breach stays pending, and the error
        // does not fire it.
        let t0 = Instant::now();
        step(External::Value(0.9));
        tokio::time::advance(s(2)).await;
        step(External::Value(0.9));
        tokio::time::advance(s(1)).await;
        let (d, st) = step(External::Error { consecutive: 1 });
        assert!(is_none(&d));
        assert!(matches!(st, TriggerState::Breaching { since, .. } if since == t0));
        // An empty result breaks it.
        tokio::time::advance(s(1)).await;
        let (_, st) = step(External::Empty);
        assert_eq!(st, TriggerState::InsufficientData { requests: 0 });
        // An error without a breach is inconclusive.
        let (d, st) = step(External::Error { consecutive: 1 });
        assert!(is_none(&d));
        assert_eq!(st, TriggerState::Inconclusive { blind: false });
        step(External::Value(0.9));
        tokio::time::advance(s(2)).await;
        let (_, st) = step(External::Empty);
        assert_eq!(st, TriggerState::InsufficientData { requests: 0 });
        // NaN is no data; a value at the bound is not a breach (strict).
        let (_, st) = step(External::Value(f64::NAN));
        assert_eq!(st, TriggerState::InsufficientData { requests: 0 });
        let (_, st) = step(External::Value(0.5));
        assert!(matches!(st, TriggerState::Ok { value: Some(v), .. } if v == 0.5));
        // A held breach fires at `for`, once.
        step(External::Value(0.7));
        tokio::time::advance(s(2)).await;
        assert!(is_none(&step(External::Value(0.7)).0));
        tokio::time::advance(s(1)).await;
        match step(External::Value(0.8)).0 {
            Decision::Rollback(f) => {
                assert_eq!(f.kind, "prometheus");
                assert_eq!(f.value, 0.8);
                assert_eq!(f.threshold, 0.5);
                assert_eq!(f.detail, "prometheus 0.8 > 0.5 for 3s");
            }
            d => panic!("{d:?}"),
        }
        for _ in 0..10 {
            tokio::time::advance(s(1)).await;
            assert!(is_none(&step(External::Value(0.8)).0));
        }
    }

    /// A reading taken at `at`.
    fn ext_at(r: External, at: Instant) -> Measured {
        Measured::External(r, Some(at))
    }

    /// A `prometheus` or `probe` trigger's last reading is seen again at every evaluation until
    /// the next one is taken: `for` counts from reading to reading, so one breaching reading
    /// never fires a `for` shorter than the interval, however long it is seen; the next
    /// breaching reading at or after `since + for` does.
    #[test]
    fn a_reading_seen_again_adds_no_time_to_for() {
        let c = cfg(vec![prom(
            Bound::Above(0.5),
            5,
            OnEmpty::InsufficientData,
            OnError::Hold,
        )]);
        let mut w = ServiceWatch::new(&c);
        let t0 = Instant::now();
        let half = Duration::from_millis(500);
        // Readings every 15 s; evaluations every 0.5 s.
        let first = [ext_at(External::Value(0.9), t0)];
        for i in 0..30 {
            let d = w.evaluate(&c, &ev(t0 + half * i, &first));
            assert!(is_none(&d), "fired on one reading, at {i}: {d:?}");
        }
        assert!(matches!(w.states()[0], TriggerState::Breaching { since, .. } if since == t0));
        match w.evaluate(
            &c,
            &ev(t0 + s(15), &[ext_at(External::Value(0.8), t0 + s(15))]),
        ) {
            Decision::Rollback(f) => assert_eq!(f.value, 0.8),
            d => panic!("{d:?}"),
        }
        // A second reading before `since + for` does not fire; one at it does.
        let mut w = ServiceWatch::new(&c);
        let at = |secs: u64| [ext_at(External::Value(0.9), t0 + s(secs))];
        assert!(is_none(&w.evaluate(&c, &ev(t0, &at(0)))));
        assert!(is_none(&w.evaluate(&c, &ev(t0 + s(4), &at(4)))));
        assert!(is_none(&w.evaluate(&c, &ev(t0 + s(9), &at(4)))));
        assert!(matches!(
            w.evaluate(&c, &ev(t0 + s(9), &at(5))),
            Decision::Rollback(_)
        ));
        // `for = 0` fires on the first breaching reading.
        let c0 = cfg(vec![prom(
            Bound::Above(0.5),
            0,
            OnEmpty::InsufficientData,
            OnError::Hold,
        )]);
        let mut w = ServiceWatch::new(&c0);
        assert!(matches!(
            w.evaluate(&c0, &ev(t0 + s(1), &at(0))),
            Decision::Rollback(_)
        ));
    }

    /// An error below `max_errors` keeps a pending breach (as Prometheus keeps a pending alert
    /// over a failed evaluation) and fires nothing itself: one query in four failing does not
    /// stop a trigger that breaches on every value from firing, and never shows it blind.
    #[test]
    fn an_error_below_max_errors_keeps_a_pending_breach() {
        let c = cfg(vec![prom(
            Bound::Above(0.5),
            3,
            OnEmpty::InsufficientData,
            OnError::Hold,
        )]);
        let t0 = Instant::now();
        let mut w = ServiceWatch::new(&c);
        let mut fired = None;
        let mut errors = 0;
        for i in 0..12u64 {
            let r = if i % 4 == 3 {
                errors += 1;
                External::Error { consecutive: 1 }
            } else {
                External::Value(0.9)
            };
            let now = t0 + s(i);
            let d = w.evaluate(&c, &ev(now, &[ext_at(r, now)]));
            assert!(!matches!(w.states()[0], TriggerState::Inconclusive { .. }));
            if let Decision::Rollback(f) = d {
                fired = Some((i, f));
                break;
            }
            assert!(
                matches!(w.states()[0], TriggerState::Breaching { since, .. } if since == t0),
                "at {i}: {:?}",
                w.states()[0]
            );
        }
        // Due at 3 s, an error: fired on the next value, at 4 s.
        let (i, f) = fired.expect("never fired");
        assert_eq!((i, errors), (4, 1));
        assert_eq!(f.value, 0.9);
        assert_eq!(f.detail, "prometheus 0.9 > 0.5 for 3s");
        // At `max_errors` consecutive errors, `hold` goes blind and breaks the breach.
        let mut w = ServiceWatch::new(&c);
        w.evaluate(&c, &ev(t0, &[ext_at(External::Value(0.9), t0)]));
        for n in 1..=2 {
            let now = t0 + s(n.into());
            let m = [ext_at(External::Error { consecutive: n }, now)];
            assert!(is_none(&w.evaluate(&c, &ev(now, &m))));
            assert!(matches!(w.states()[0], TriggerState::Breaching { .. }));
        }
        let m = [ext_at(External::Error { consecutive: 3 }, t0 + s(3))];
        assert!(is_none(&w.evaluate(&c, &ev(t0 + s(3), &m))));
        assert_eq!(w.states()[0], TriggerState::Inconclusive { blind: true });
        let now = t0 + s(4);
        assert!(is_none(
            &w.evaluate(&c, &ev(now, &[ext_at(External::Value(0.9), now)]))
        ));
        assert!(matches!(w.states()[0], TriggerState::Breaching { since, .. } if since == now));
    }

    #[tokio::test(start_paused = true)]
    async fn on_error_hold_is_blind_and_fail_breaches() {
        let hold = cfg(vec![prom(
            Bound::Below(10.0),
            0,
            OnEmpty::InsufficientData,
            OnError::Hold,
        )]);
        let fail = cfg(vec![prom(
            Bound::Below(10.0),
            0,
            OnEmpty::InsufficientData,
            OnError::Fail,
        )]);
        let (mut wh, mut wf) = (ServiceWatch::new(&hold), ServiceWatch::new(&fail));
        for n in 1..=2 {
            let m = [ext(External::Error { consecutive: n })];
            assert!(is_none(&wh.evaluate(&hold, &ev(Instant::now(), &m))));
            assert!(is_none(&wf.evaluate(&fail, &ev(Instant::now(), &m))));
            assert_eq!(wh.states()[0], TriggerState::Inconclusive { blind: false });
            assert_eq!(wf.states()[0], TriggerState::Inconclusive { blind: false });
        }
        for n in 3..100 {
            tokio::time::advance(s(1)).await;
            let m = [ext(External::Error { consecutive: n })];
            assert!(is_none(&wh.evaluate(&hold, &ev(Instant::now(), &m))));
            assert_eq!(wh.states()[0], TriggerState::Inconclusive { blind: true });
        }
        let m = [ext(External::Error { consecutive: 3 })];
        match wf.evaluate(&fail, &ev(Instant::now(), &m)) {
            Decision::Rollback(f) => {
                assert!(f.value.is_nan());
                assert_eq!(f.value_text, "3 consecutive errors");
                assert!(f.detail.contains("on_error = \"fail\""), "{}", f.detail);
            }
            d => panic!("{d:?}"),
        }
        // A value again ends blindness; `below` breaches under the bound.
        let m = [ext(External::Value(2.0))];
        wh.evaluate(&hold, &ev(Instant::now(), &m));
        assert!(matches!(wh.states()[0], TriggerState::Fired { .. }));
    }

    #[test]
    fn on_empty_fail_and_dry_run_and_blocked_apply() {
        let mut c = cfg(vec![prom(
            Bound::Above(1.0),
            0,
            OnEmpty::Fail,
            OnError::Hold,
        )]);
        let t0 = Instant::now();
        let empty = [ext(External::Empty)];
        let mut w = ServiceWatch::new(&c);
        match w.evaluate(&c, &ev(t0, &empty)) {
            Decision::Rollback(f) => assert_eq!(f.value_text, "empty result"),
            d => panic!("{d:?}"),
        }
        c.dry_run = true;
        let mut w = ServiceWatch::new(&c);
        assert!(matches!(
            w.evaluate(&c, &ev(t0, &empty)),
            Decision::WouldRollback(_)
        ));
        assert!(is_none(&w.evaluate(&c, &ev(t0 + s(1), &empty))));
        c.dry_run = false;
        let mut w = ServiceWatch::new(&c);
        let blocked = Evaluation {
            live_secs: None,
            rollback_target_healthy: false,
            ..ev(t0, &empty)
        };
        assert!(matches!(w.evaluate(&c, &blocked), Decision::Blocked(_)));
        let unarmed = Evaluation {
            live_secs: None,
            armed: false,
            ..ev(t0, &empty)
        };
        let mut w = ServiceWatch::new(&c);
        assert!(is_none(&w.evaluate(&c, &unarmed)));
        // The probe kind: the failing fraction against above_fraction.
        let probe = TriggerConfig {
            kind: TriggerKind::Probe(crate::config::ProbeCheck {
                target: crate::config::ProbeTarget::Path("/health/deps".into()),
                json_pointer: None,
                condition: crate::config::ProbeCondition::Status,
                above_fraction: 0.5,
                interval: s(5),
                on_error: OnError::Hold,
                max_errors: 3,
            }),
            for_: s(0),
        };
        let c = cfg(vec![probe]);
        let mut w = ServiceWatch::new(&c);
        assert!(is_none(
            &w.evaluate(&c, &ev(t0, &[ext(External::Value(0.5))]))
        ));
        match w.evaluate(&c, &ev(t0, &[ext(External::Value(1.0))])) {
            Decision::Rollback(f) => assert_eq!(
                f.detail,
                "probe: 100% of the live upstreams failing > 50% for 0s"
            ),
            d => panic!("{d:?}"),
        }
        assert_eq!(
            TriggerState::Inconclusive { blind: true }.to_json(&c.triggers[0], |_| String::new())
                ["state"],
            json!("inconclusive")
        );
    }

    #[test]
    fn fire_details() {
        let t0 = Instant::now();
        let detail = |t: TriggerConfig, m: Measured| {
            let for_ = t.for_;
            let c = cfg(vec![t]);
            let mut w = ServiceWatch::new(&c);
            let first = w.evaluate(&c, &ev(t0, &[m]));
            let d = if for_.is_zero() {
                first
            } else {
                w.evaluate(&c, &ev(t0 + for_, &[m]))
            };
            match d {
                Decision::Rollback(f) => f,
                d => panic!("{d:?}"),
            }
        };
        let f = detail(
            TriggerConfig {
                for_: s(120),
                ..error_rate(0.05, 60, 0)
            },
            rate(412, 129),
        );
        assert_eq!(f.value_text, "0.313");
        assert_eq!(f.threshold_text, "0.05");
        assert_eq!(f.threshold, 0.05);
        assert_eq!(
            f.detail,
            "error_rate 0.313 > 0.05 over 1m for 2m (412 requests in window)"
        );
        let f = detail(
            p95(1000, 60, 0),
            Measured::Latency {
                requests: 412,
                p95: Some(Duration::from_micros(1_234_500)),
            },
        );
        assert_eq!(f.threshold, 1.0);
        assert_eq!(f.value, 1.2345);
        assert_eq!(
            f.detail,
            "p95_latency 1234.5ms > 1000ms over 1m for 0s (412 requests in window)"
        );
        let f = detail(
            critical(0, 30, 0),
            Measured::Count {
                requests: 412,
                failures: 3,
            },
        );
        assert_eq!(f.threshold, 0.0);
        assert_eq!(f.value, 3.0);
        assert_eq!(
            f.detail,
            "critical_5xx 3 > 0 failures on /api/payments,/api/subscriptions over 30s for 0s (412 requests in window)"
        );
        // Ten seconds after the flip, a one-minute window has read ten: the line says so (it
        // said "over 1m"), and so does the event's `over`.
        let c = cfg(vec![error_rate(0.05, 60, 0)]);
        let mut w = ServiceWatch::new(&c);
        let m = [rate(412, 129)];
        let e = Evaluation {
            live_secs: Some(10),
            ..ev(t0, &m)
        };
        let Decision::Rollback(f) = w.evaluate(&c, &e) else {
            panic!("no rollback");
        };
        assert_eq!(
            f.detail,
            "error_rate 0.313 > 0.05 over 10s (since the flip or this process's start; window 1m) for 0s (412 requests in window)"
        );
        assert_eq!(f.over, s(10));
        let f = detail(
            unhealthy(0),
            Measured::Health {
                healthy_upstreams: 0,
                total: 2,
            },
        );
        assert_eq!(f.requests, None);
        assert_eq!(f.over, Duration::ZERO);
        assert_eq!(f.detail, "unhealthy: 0 of 2 live upstreams healthy for 0s");
        assert_eq!(fmt_duration(Duration::from_secs(90)), "1m 30s");
        assert_eq!(fmt_ratio(0.05), "0.050");
    }

    /// A reason's value never reads as equal to its threshold (or past it the other way)
    /// when it is not: it gets the decimals it needs; a value that reads right keeps its
    /// short form.
    #[test]
    fn a_value_beside_its_threshold_shows_the_digits_that_tell_them_apart() {
        let t0 = Instant::now();
        let fire = |t: TriggerConfig, m: Measured| {
            let c = cfg(vec![t]);
            match ServiceWatch::new(&c).evaluate(&c, &ev(t0, &[m])) {
                Decision::Rollback(f) => f,
                d => panic!("{d:?}"),
            }
        };
        let value = |r: f64| ext_at(External::Value(r), t0);
        let f = fire(
            prom(Bound::Above(1.0), 0, OnEmpty::Fail, OnError::Hold),
            value(1.0004),
        );
        assert_eq!(f.detail, "prometheus 1.0004 > 1 for 0s");
        assert_eq!(
            (f.value_text.as_str(), f.threshold_text.as_str()),
            ("1.0004", "1")
        );
        let f = fire(
            prom(Bound::Below(0.5), 0, OnEmpty::Fail, OnError::Hold),
            value(0.4999),
        );
        assert_eq!(f.detail, "prometheus 0.4999 < 0.5 for 0s");
        // The threshold as written; a value rounded past it the wrong way gets more digits.
        let f = fire(
            prom(Bound::Above(0.12345), 0, OnEmpty::Fail, OnError::Hold),
            value(0.12346),
        );
        assert_eq!(f.detail, "prometheus 0.1235 > 0.12345 for 0s");
        let f = fire(
            prom(Bound::Above(0.5), 0, OnEmpty::Fail, OnError::Hold),
            value(1.0 / 3.0 + 0.5),
        );
        assert_eq!(f.value_text, "0.833");
        // Tiny differences: as many digits as it takes.
        let f = fire(
            prom(Bound::Above(1.0), 0, OnEmpty::Fail, OnError::Hold),
            value(1.0 + 1e-12),
        );
        assert!(
            f.value_text.parse::<f64>().is_ok_and(|v| v > 1.0),
            "{}",
            f.value_text
        );
        let f = fire(error_rate(0.05, 60, 0), rate(219, 11));
        assert_eq!(f.value_text, "0.0502");
        assert!(
            f.detail.starts_with("error_rate 0.0502 > 0.05 "),
            "{}",
            f.detail
        );
        let f = fire(error_rate(0.05, 60, 0), rate(100, 6));
        assert_eq!(f.value_text, "0.060");
        let f = fire(
            p95(200, 60, 0),
            Measured::Latency {
                requests: 100,
                p95: Some(Duration::from_micros(200_040)),
            },
        );
        assert!(
            f.detail.starts_with("p95_latency 200.04ms > 200ms "),
            "{}",
            f.detail
        );
    }

    #[test]
    fn to_json_shapes() {
        let t0 = Instant::now();
        let wall = |i: Instant| format!("+{}s", (i - t0).as_secs());
        let lat = p95(1000, 60, 120);
        let st = TriggerState::Breaching {
            since: t0 + s(5),
            last: t0 + s(35),
            value: 1.2345,
            requests: Some(412),
        };
        assert_eq!(
            st.to_json(&lat, wall),
            json!({"kind": "p95_latency", "state": "breaching", "threshold": 1000,
                   "value": 1234.5, "since": "+5s", "held_secs": 30, "over_secs": 60,
                   "for_secs": 120, "requests": 412})
        );
        // A reading's trigger: held as long as its readings show, not up to now.
        let st = TriggerState::Breaching {
            since: t0 + s(5),
            last: t0 + s(20),
            value: 1.2345,
            requests: Some(412),
        };
        assert_eq!(st.to_json(&lat, wall)["held_secs"], json!(15));
        let er = error_rate(0.05, 60, 0);
        assert_eq!(
            TriggerState::InsufficientData { requests: 3 }.to_json(&er, wall),
            json!({"kind": "error_rate", "state": "insufficient_data", "threshold": 0.05,
                   "value": null, "since": null, "held_secs": null, "over_secs": 60,
                   "for_secs": 0, "requests": 3})
        );
        assert_eq!(FRESH.to_json(&er, wall)["state"], json!("ok"));
        let un = unhealthy(10);
        assert_eq!(
            TriggerState::Fired {
                at: t0 + s(7),
                value: 0.0,
                requests: None
            }
            .to_json(&un, wall),
            json!({"kind": "unhealthy", "state": "fired", "threshold": null, "value": 0,
                   "since": "+7s", "held_secs": null, "over_secs": 0, "for_secs": 10,
                   "requests": null})
        );
        let cr = critical(2, 30, 0);
        let v = TriggerState::Ok {
            value: Some(1.0),
            requests: Some(50),
        }
        .to_json(&cr, wall);
        assert_eq!(v["threshold"], json!(2));
        assert_eq!(v["value"], json!(1));
    }
}
