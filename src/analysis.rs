//! Analysis from the application's own signals: `prometheus` and `probe` triggers, and the
//! `[[services.verify]]` checks that gate a flip.
//!
//! Each `prometheus` or `probe` trigger of a service with automatic rollback enabled gets its own
//! task ([`run`] starts and stops them as the config and the live colors change). The task
//! evaluates the trigger every `interval` against the live color (templating the query, or
//! probing the color's upstreams) and keeps the last reading in the trigger's [`Slot`], tagged with
//! the generation it was taken for. The rollback watcher reads it twice a second as an
//! [`External`] measurement, so these triggers obey every rule of the engine
//! ([`crate::rollback`]): armed only within `watch_for`, `for` held at every reading (and
//! counted between readings: a reading seen again adds no time), one
//! flip per episode, `rollback_blocked`, `dry_run`. A reading taken for another generation (a
//! flip happened since) is not used: the trigger waits for a reading of the new live color, and
//! the task is woken at once to take it.
//!
//! Missing data is a state, never a silent pass or fail: an empty result is
//! `insufficient_data` (unless `on_empty = "fail"`); an error or timeout is `inconclusive` with
//! its text (a breach already pending stays pending over it, and fires on no error);
//! `max_errors` consecutive errors then follow `on_error` (`hold`: the trigger cannot
//! fire and `switchyard_analysis_blind` says so; `fail`: it breaches). A result that is neither a
//! scalar nor a one-element vector is an error of the query itself (`config_error` in the
//! status, with the query).
//!
//! This module sits below the app: the trigger tasks reach the live snapshot through [`Host`]
//! (which the app implements), and [`verify`] takes the analysis state and `[analysis]` config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde_json::{json, Value};
use tokio::sync::{Notify, OnceCell};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{
    AnalysisConfig, Bound, Color, ProbeCheck, ProbeCondition, ProbeTarget, PromCheck, Protocol,
    TriggerConfig, TriggerKind, VerifyCheck,
};
use crate::http::client::{fetch_once, hyper_client};
use crate::rollback::{fmt_exact, fmt_num, fmt_num_beside, External, Fire, Measured};
use crate::routing::{Service, Snapshot};

pub const ANALYSIS_BLIND: &str = "switchyard_analysis_blind";
pub const ANALYSIS_VALUE: &str = "switchyard_analysis_value";
pub const ANALYSIS_ERRORS_TOTAL: &str = "switchyard_analysis_errors_total";
pub const ANALYSIS_STATE: &str = "switchyard_analysis_state";

/// The states a `prometheus` or `probe` trigger can be in (`switchyard_analysis_state`).
pub const ANALYSIS_STATES: [&str; 5] = [
    "ok",
    "breaching",
    "insufficient_data",
    "inconclusive",
    "fired",
];

/// The largest answer read from Prometheus or a probe.
const MAX_BODY: usize = 4 << 20;
/// How often [`run`] reconciles the tasks with the snapshot.
const SYNC_INTERVAL: Duration = Duration::from_millis(250);

/// What one evaluation of a check found.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `prometheus`: the query's value; `probe`: the fraction of probed upstreams failing.
    /// `detail`: e.g. which upstream failed and how.
    Value { value: f64, detail: Option<String> },
    /// `prometheus`: no series (or NaN).
    Empty { detail: String },
    /// No usable answer. `config`: the query itself is wrong (result shape, bad query).
    Error { error: String, config: bool },
}

/// The most of an outcome's `error` or `detail` kept, in bytes: they carry text from outside (a
/// Prometheus error, a probed body's value), which goes into every `/api/status`, log line,
/// event and 409 after; a page of it is cut to this, with `…`.
const MAX_TEXT: usize = 512;

/// `s` cut to at most [`MAX_TEXT`] bytes (at a character boundary), marked with `…` when cut.
fn clipped(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl Outcome {
    /// With its texts cut to [`MAX_TEXT`].
    fn clipped(self) -> Outcome {
        match self {
            Outcome::Value { value, detail } => Outcome::Value {
                value,
                detail: detail.map(clipped),
            },
            Outcome::Empty { detail } => Outcome::Empty {
                detail: clipped(detail),
            },
            Outcome::Error { error, config } => Outcome::Error {
                error: clipped(error),
                config,
            },
        }
    }
}

/// How often a trigger that stays inconclusive with the same error is logged again.
const WARN_AGAIN: Duration = Duration::from_secs(60);

/// Whether an inconclusive check's `error` is logged: the first of a run, one that differs from
/// the last logged, or the same again [`WARN_AGAIN`] after it was.
fn warn_due(warned: Option<&(String, Instant)>, error: &str, now: Instant) -> bool {
    warned.is_none_or(|(said, at)| said != error || now.duration_since(*at) >= WARN_AGAIN)
}

/// The last reading of one trigger, for `/api/status` and the engine.
#[derive(Clone, Debug, Default)]
pub struct Last {
    /// The generation and live color the reading was taken for.
    pub generation: Option<u64>,
    pub color: Option<Color>,
    pub value: Option<f64>,
    pub empty: bool,
    pub error: Option<String>,
    pub config_error: bool,
    pub detail: Option<String>,
    pub consecutive_errors: u32,
    pub evaluated_at: Option<SystemTime>,
    /// When the reading was taken, on the clock the engine reads (a breach's `for` counts the
    /// time between readings, not between evaluations that see the same one again).
    pub taken: Option<Instant>,
    /// The query as sent (templated), or the probed URLs.
    pub target: Option<String>,
}

impl Last {
    /// Folds one outcome in (the consecutive error count is the state machine's memory).
    pub fn record(&mut self, generation: u64, color: Color, target: String, o: Outcome) {
        if self.generation != Some(generation) {
            // The last value measured belongs to the color the reading was for.
            self.consecutive_errors = 0;
            self.value = None;
        }
        self.generation = Some(generation);
        self.color = Some(color);
        self.target = Some(target);
        self.evaluated_at = Some(SystemTime::now());
        self.taken = Some(Instant::now());
        match o {
            Outcome::Value { value, detail } => {
                self.value = Some(value);
                self.empty = false;
                self.error = None;
                self.config_error = false;
                self.detail = detail;
                self.consecutive_errors = 0;
            }
            Outcome::Empty { detail } => {
                self.value = None;
                self.empty = true;
                self.error = None;
                self.config_error = false;
                self.detail = Some(detail);
                self.consecutive_errors = 0;
            }
            Outcome::Error { error, config } => {
                // No answer: `value` stays the last one measured (for this generation); the
                // engine reads the error, not the value.
                self.empty = false;
                self.error = Some(error);
                self.config_error = config;
                self.detail = None;
                self.consecutive_errors = self.consecutive_errors.saturating_add(1);
            }
        }
    }

    /// The engine's view, for the live color at `generation`.
    pub fn reading(&self, generation: u64) -> External {
        if self.generation != Some(generation) {
            return External::Pending;
        }
        if self.error.is_some() {
            External::Error {
                consecutive: self.consecutive_errors,
            }
        } else if self.empty {
            External::Empty
        } else {
            match self.value {
                Some(v) => External::Value(v),
                None => External::Pending,
            }
        }
    }
}

/// One trigger's task and its last reading.
pub struct Slot {
    trigger: TriggerConfig,
    last: Mutex<Last>,
    wake: Notify,
    stop: CancellationToken,
    /// The generation the supervisor last saw for the service.
    seen_generation: Mutex<u64>,
    /// When its task ended without being stopped (a panic): [`sync`] starts another.
    ended: Mutex<Option<Instant>>,
}

/// Marks the slot's task ended when it is dropped: on return and on a panic's unwinding.
struct Ended(Arc<Slot>);

impl Drop for Ended {
    fn drop(&mut self) {
        if let Ok(mut e) = self.0.ended.lock() {
            *e = Some(Instant::now());
        }
    }
}

impl Slot {
    fn last(&self) -> Last {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

type Key = (String, usize);

/// The analysis side of the app: the trigger tasks' slots, the HTTP client, the metrics.
pub struct Analysis {
    slots: Mutex<HashMap<Key, Arc<Slot>>>,
    /// Built at the first `https://` request that succeeds in building it (a failure, e.g. a
    /// CA file not there yet, is tried again at the next request).
    tls: OnceCell<Arc<rustls::ClientConfig>>,
    /// h2c (prior knowledge) for probes of `protocol = "h2"` pools, made at the first.
    h2: OnceLock<Client<HttpConnector, Empty<Bytes>>>,
    blind: IntGaugeVec,
    value: GaugeVec,
    errors_total: IntCounterVec,
    state: IntGaugeVec,
    /// Trigger tasks started again after a panic.
    restarts: IntCounter,
}

impl Analysis {
    /// Registers the analysis metrics in `registry`; `restarts` counts trigger tasks started
    /// again after a panic.
    pub fn new(registry: &Registry, restarts: IntCounter) -> Analysis {
        let labels = &["service", "trigger", "kind"];
        let blind = IntGaugeVec::new(
            Opts::new(
                ANALYSIS_BLIND,
                "1 while a prometheus or probe trigger with on_error = \"hold\" has failed max_errors consecutive evaluations: it cannot fire (analysis is blind); with \"fail\" the errors count as a breach, and it stays 0.",
            ),
            labels,
        )
        .unwrap_or_else(|e| unreachable!("static gauge definition: {e}"));
        let value = GaugeVec::new(
            Opts::new(
                ANALYSIS_VALUE,
                "The last value of a prometheus trigger's query, or of a probe trigger the fraction of live upstreams failing it.",
            ),
            labels,
        )
        .unwrap_or_else(|e| unreachable!("static gauge definition: {e}"));
        let errors_total = IntCounterVec::new(
            Opts::new(
                ANALYSIS_ERRORS_TOTAL,
                "Evaluations of a prometheus or probe trigger that failed (no answer, a bad answer, a result of the wrong shape).",
            ),
            labels,
        )
        .unwrap_or_else(|e| unreachable!("static counter definition: {e}"));
        let state = IntGaugeVec::new(
            Opts::new(
                ANALYSIS_STATE,
                "1 for the state a prometheus or probe trigger is in (ok, breaching, insufficient_data, inconclusive, fired), 0 for the others.",
            ),
            &["service", "trigger", "kind", "state"],
        )
        .unwrap_or_else(|e| unreachable!("static gauge definition: {e}"));
        for c in [
            Box::new(blind.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(value.clone()),
            Box::new(errors_total.clone()),
            Box::new(state.clone()),
        ] {
            // The names are unique constants and the registry is the app's own.
            let _ = registry.register(c);
        }
        Analysis {
            slots: Mutex::new(HashMap::new()),
            tls: OnceCell::new(),
            h2: OnceLock::new(),
            blind,
            value,
            errors_total,
            state,
            restarts,
        }
    }

    fn slot(&self, service: &str, index: usize, trigger: &TriggerConfig) -> Option<Arc<Slot>> {
        let slots = self.slots.lock().ok()?;
        slots
            .get(&(service.to_string(), index))
            .filter(|s| s.trigger == *trigger)
            .cloned()
    }

    /// Replaces the `External(Pending)` placeholders of `measured` (one per trigger of `svc`)
    /// with the last readings taken for the service's current generation.
    pub fn fill(&self, svc: &Service, measured: &mut [Measured]) {
        for (i, t) in svc.config.rollback.triggers.iter().enumerate() {
            if t.kind.interval().is_none() {
                continue;
            }
            if let (Some(m), Some(slot)) = (measured.get_mut(i), self.slot(svc.name(), i, t)) {
                let last = slot.last();
                *m = Measured::External(last.reading(svc.state.generation), last.taken);
            }
        }
    }

    /// The status fields of a `prometheus` or `probe` trigger: `query` (or `probe`), `error`,
    /// `evaluated_at`, and more; merged into the engine's JSON for the trigger. Also sets the
    /// trigger's `switchyard_analysis_state` to the engine's `state` there.
    pub fn status_fields(&self, svc: &Service, index: usize, t: &TriggerConfig, out: &mut Value) {
        self.state_gauge(svc, index, t, out);
        self.trigger_fields(svc, index, t, out, true);
    }

    /// The triggers of `svc` that are blind for its live generation (`max_errors` consecutive
    /// failed evaluations with `on_error = "hold"`: they cannot fire), each as
    /// `trigger[i] (kind): last error`. A release does not pass a phase or end `complete` on
    /// them unnoticed.
    pub fn blind(&self, svc: &Service) -> Vec<String> {
        let mut out = Vec::new();
        for (i, t) in svc.config.rollback.triggers.iter().enumerate() {
            let (max, on_error) = match &t.kind {
                TriggerKind::Prometheus(p) => (p.max_errors, p.on_error),
                TriggerKind::Probe(p) => (p.max_errors, p.on_error),
                _ => continue,
            };
            if on_error != crate::config::OnError::Hold {
                continue;
            }
            let Some(last) = self.slot(svc.name(), i, t).map(|s| s.last()) else {
                continue;
            };
            if last.generation == Some(svc.state.generation) && last.consecutive_errors >= max {
                out.push(format!(
                    "trigger[{i}] ({}): {}",
                    t.kind.name(),
                    last.error.as_deref().unwrap_or("no answer")
                ));
            }
        }
        out
    }

    /// `switchyard_analysis_state` from the state in `out` (the watcher's, at its evaluation).
    fn state_gauge(&self, svc: &Service, index: usize, t: &TriggerConfig, out: &Value) {
        // Under the slots lock, and only while the trigger's task runs: [`sync`] removes the
        // series of a trigger it stops under the same lock, so none outlives its trigger.
        if let Ok(slots) = self.slots.lock() {
            let running = slots
                .get(&(svc.name().to_string(), index))
                .is_some_and(|s| s.trigger == *t);
            if running {
                let state = out.get("state").and_then(Value::as_str).unwrap_or("");
                let index = index.to_string();
                for s in ANALYSIS_STATES {
                    self.state
                        .with_label_values(&[svc.name(), &index, t.kind.name(), s])
                        .set((s == state) as i64);
                }
            }
        }
    }

    /// The fields of a `prometheus` or `probe` trigger's state in `/api/status`: its query or
    /// probe and, with `reading`, its last reading for the live generation (without, as none:
    /// the state of a trigger the engine has not evaluated yet after a flip must not show a
    /// value its state does not account for); nothing for the other kinds. Changes no metric.
    pub fn trigger_fields(
        &self,
        svc: &Service,
        index: usize,
        t: &TriggerConfig,
        out: &mut Value,
        reading: bool,
    ) {
        let Some(obj) = out.as_object_mut() else {
            return;
        };
        let last = reading
            .then(|| self.slot(svc.name(), index, t))
            .flatten()
            .map(|s| s.last())
            .filter(|l| l.generation == Some(svc.state.generation))
            .unwrap_or_default();
        match &t.kind {
            TriggerKind::Prometheus(p) => {
                obj.insert("query".into(), json!(p.query));
                obj.insert("comparison".into(), json!(p.bound.key()));
                obj.insert("on_empty".into(), json!(on_empty_name(p)));
                obj.insert("on_error".into(), json!(on_error_name(p.on_error)));
                obj.insert("max_errors".into(), json!(p.max_errors));
                obj.insert("interval_secs".into(), secs(p.interval));
                obj.insert(
                    "blind".into(),
                    json!(blind(&last, p.max_errors, p.on_error)),
                );
            }
            TriggerKind::Probe(p) => {
                obj.insert("probe".into(), json!(probe_text(p)));
                obj.insert("comparison".into(), json!("above_fraction"));
                obj.insert("on_error".into(), json!(on_error_name(p.on_error)));
                obj.insert("max_errors".into(), json!(p.max_errors));
                obj.insert("interval_secs".into(), secs(p.interval));
                obj.insert(
                    "blind".into(),
                    json!(blind(&last, p.max_errors, p.on_error)),
                );
            }
            _ => return,
        }
        // `value` is the last one measured, for the color and time `color` and `evaluated_at`
        // name (an error since keeps it). A `fired` trigger's service is on the other color
        // now: the value it fired on is `fired_value`.
        if obj.get("state").and_then(Value::as_str) == Some("fired") {
            let fired = obj.get("value").cloned().unwrap_or(Value::Null);
            obj.insert("fired_value".into(), fired);
        }
        obj.insert(
            "value".into(),
            last.value
                .filter(|v| v.is_finite())
                .map(|v| json!(v))
                .unwrap_or(Value::Null),
        );
        obj.insert("error".into(), json!(last.error));
        obj.insert("config_error".into(), json!(last.config_error));
        obj.insert("consecutive_errors".into(), json!(last.consecutive_errors));
        obj.insert("detail".into(), json!(last.detail));
        obj.insert(
            "evaluated_at".into(),
            json!(last
                .evaluated_at
                .map(|t| humantime::format_rfc3339_millis(t).to_string())),
        );
        obj.insert("evaluated".into(), json!(last.target));
        obj.insert("color".into(), json!(last.color));
    }

    /// Adds the query (or probe), the last error and detail to a fire of a `prometheus` or
    /// `probe` trigger, for the event.
    pub fn annotate(&self, svc: &Service, fire: &mut Fire) {
        let Some(t) = svc.config.rollback.triggers.get(fire.trigger_index) else {
            return;
        };
        let what = match &t.kind {
            TriggerKind::Prometheus(p) => format!("query {}", p.query),
            TriggerKind::Probe(p) => format!("probe {}", probe_text(p)),
            _ => return,
        };
        let last = self
            .slot(svc.name(), fire.trigger_index, t)
            .map(|s| s.last())
            .unwrap_or_default();
        let mut detail = format!("{}; {what}", fire.detail);
        if let Some(d) = &last.detail {
            detail.push_str(&format!("; {d}"));
        }
        if let Some(e) = &last.error {
            detail.push_str(&format!("; last error: {e}"));
        }
        fire.detail = detail;
        fire.extra = Some(json!({
            "query": last.target,
            "error": last.error,
            "detail": last.detail,
            "evaluated_at": last.evaluated_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        }));
    }

    fn publish(&self, service: &str, index: usize, t: &TriggerConfig, last: &Last) {
        let labels = [service, &index.to_string(), t.kind.name()];
        let (max, on_error) = match &t.kind {
            TriggerKind::Prometheus(p) => (p.max_errors, p.on_error),
            TriggerKind::Probe(p) => (p.max_errors, p.on_error),
            _ => return,
        };
        self.blind
            .with_label_values(&labels)
            .set(blind(last, max, on_error) as i64);
        let errors = self.errors_total.with_label_values(&labels);
        if last.error.is_some() {
            errors.inc();
        }
        match last.value {
            Some(v) => self.value.with_label_values(&labels).set(v),
            None => {
                let _ = self.value.remove_label_values(&labels);
            }
        }
    }

    fn forget(&self, service: &str, index: usize, kind: &str) {
        let labels = [service, &index.to_string(), kind];
        let _ = self.blind.remove_label_values(&labels);
        let _ = self.value.remove_label_values(&labels);
        let _ = self.errors_total.remove_label_values(&labels);
        for s in ANALYSIS_STATES {
            let _ = self
                .state
                .remove_label_values(&[labels[0], labels[1], labels[2], s]);
        }
    }

    /// The rustls client config for `https://`, built once: `ca_file`, else the system bundle.
    async fn tls(&self, cfg: &AnalysisConfig) -> Result<Arc<rustls::ClientConfig>, String> {
        let ca = cfg.ca_file.clone();
        self.tls
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    crate::tls::client_config(ca.as_deref(), "set [analysis] ca_file to a PEM file")
                })
                .await
                .unwrap_or_else(|e| Err(format!("TLS setup task failed: {e}")))
            })
            .await
            .cloned()
    }
}

fn secs(d: Duration) -> Value {
    if d.subsec_nanos() == 0 {
        json!(d.as_secs())
    } else {
        json!(d.as_secs_f64())
    }
}

fn on_empty_name(p: &PromCheck) -> &'static str {
    match p.on_empty {
        crate::config::OnEmpty::InsufficientData => "insufficient_data",
        crate::config::OnEmpty::Fail => "fail",
    }
}

/// Blind: `max_errors` evaluations in a row failed and `on_error = "hold"` keeps the trigger
/// from firing. With `"fail"` the errors count as a breach: it fires, it is not blind.
fn blind(last: &Last, max_errors: u32, on_error: crate::config::OnError) -> bool {
    on_error == crate::config::OnError::Hold && last.consecutive_errors >= max_errors
}

fn on_error_name(o: crate::config::OnError) -> &'static str {
    match o {
        crate::config::OnError::Hold => "hold",
        crate::config::OnError::Fail => "fail",
    }
}

/// `GET /health/deps: /database == "ok"` for the status and events.
pub fn probe_text(p: &ProbeCheck) -> String {
    let target = match &p.target {
        ProbeTarget::Path(path) => format!("GET {path}"),
        ProbeTarget::Url(url) => format!("GET {url}"),
    };
    let ptr = p.json_pointer.as_deref().unwrap_or("");
    match &p.condition {
        ProbeCondition::Status => format!("{target}: 2xx"),
        ProbeCondition::Equals(v) => format!("{target}: {ptr} == {v}"),
        ProbeCondition::Bound(b) => {
            format!(
                "{target}: {ptr} not {} {}",
                b.op(),
                fmt_exact(b.threshold())
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: one connection per request (a check runs every few seconds), http or https by scheme
// ---------------------------------------------------------------------------------------------

/// GET `uri` within `timeout`: the status and body, or why not.
async fn http_get(
    an: &Analysis,
    cfg: &AnalysisConfig,
    uri: &http::Uri,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
    let limit = humantime::format_duration(timeout);
    match tokio::time::timeout(timeout, http_get_inner(an, cfg, uri, bearer)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {limit}")),
    }
}

async fn http_get_inner(
    an: &Analysis,
    cfg: &AnalysisConfig,
    uri: &http::Uri,
    bearer: Option<&str>,
) -> Result<(http::StatusCode, Bytes), String> {
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        other => return Err(format!("unsupported URL scheme {other:?}")),
    };
    let auth = uri
        .authority()
        .ok_or_else(|| format!("URL {uri} has no host"))?
        .clone();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    // Host is host[:port], never the userinfo an authority may carry.
    let host_header = match auth.port() {
        Some(p) => format!("{}:{p}", auth.host()),
        None => auth.host().to_string(),
    };
    let mut req = http::Request::get(path)
        .header(http::header::HOST, host_header)
        .header(http::header::USER_AGENT, "switchyard-analysis")
        .header(http::header::ACCEPT, "application/json");
    if let Some(t) = bearer {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request for {uri}: {e}"))?;
    let tls = if https {
        Some(an.tls(cfg).await?)
    } else {
        None
    };
    Ok(fetch_once(&auth, tls, req, MAX_BODY).await?)
}

// ---------------------------------------------------------------------------------------------
// Prometheus
// ---------------------------------------------------------------------------------------------

/// The color a check looks at: its name, addresses and the service's name.
pub struct Target<'a> {
    pub service: &'a str,
    pub color: Color,
    pub svc: &'a Service,
}

/// The live color's (or a flip target's) addresses as an anchored-alternation regex for a
/// label matcher (`instance=~"{{upstreams}}"`): regex metacharacters are put in brackets, so the
/// text needs no backslashes and works inside any PromQL string quoting.
pub fn upstreams_regex(addrs: &[String]) -> String {
    addrs
        .iter()
        .map(|a| {
            let mut out = String::with_capacity(a.len() + 8);
            for ch in a.chars() {
                match ch {
                    ']' => out.push_str("[]]"),
                    '.' | '[' | '+' | '*' | '?' | '(' | ')' | '|' | '{' | '}' | '$' => {
                        out.push('[');
                        out.push(ch);
                        out.push(']');
                    }
                    _ => out.push(ch),
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// The distinct hosts of `host:port` addresses, in order (`[::1]:80` -> `[::1]`): for matching
/// an `instance` label when the metrics port differs from the traffic port.
fn hosts_of(addrs: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = Vec::new();
    for a in addrs {
        let host = a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a).to_string();
        if !hosts.contains(&host) {
            hosts.push(host);
        }
    }
    hosts
}

/// Fills `{{service}}`, `{{color}}`, `{{upstreams}}` and `{{upstream_hosts}}` (spaces inside
/// the braces allowed).
pub fn render(template: &str, service: &str, color: Color, upstreams: &[String]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        match after[..end].trim() {
            "service" => out.push_str(service),
            "color" => out.push_str(color.as_str()),
            "upstreams" => out.push_str(&upstreams_regex(upstreams)),
            "upstream_hosts" => out.push_str(&upstreams_regex(&hosts_of(upstreams))),
            _ => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `application/x-www-form-urlencoded` value encoding.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Reads a Prometheus `/api/v1/query` answer.
pub fn parse_prometheus(status: http::StatusCode, body: &[u8]) -> Outcome {
    let err = |error: String, config: bool| Outcome::Error { error, config };
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return err(
                format!(
                    "HTTP {}: not a Prometheus API answer: {}",
                    status.as_u16(),
                    text.trim()
                ),
                false,
            );
        }
    };
    if v["status"] != "success" {
        let kind = v["errorType"].as_str().unwrap_or("error");
        let msg = v["error"].as_str().unwrap_or("no error text");
        // bad_data: the query does not parse or type-check; it will not get better by itself.
        return err(
            format!("HTTP {}: {kind}: {msg}", status.as_u16()),
            kind == "bad_data",
        );
    }
    // A non-2xx answer is an error whatever its body says: a proxy or gateway in front of
    // Prometheus (or a broken one) answering 500 with a cached or canned "success" body is no
    // measurement, and taken as one it could fire a rollback.
    if !status.is_success() {
        return err(
            format!(
                "HTTP {}: an error status with a \"success\" body; not taken as a value",
                status.as_u16()
            ),
            false,
        );
    }
    let data = &v["data"];
    let sample = |pair: &Value| -> Result<f64, String> {
        let text = pair
            .get(1)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("malformed sample {pair}"))?;
        text.parse::<f64>()
            .map_err(|_| format!("malformed sample value {text:?}"))
    };
    let value = match data["resultType"].as_str() {
        Some("scalar") => sample(&data["result"]),
        Some("vector") => {
            let series = data["result"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            match series {
                [] => {
                    return Outcome::Empty {
                        detail: "the query returned no series".to_string(),
                    }
                }
                [one] => sample(&one["value"]),
                many => {
                    return err(
                        format!(
                            "configuration error: the query returned {} series; it must return a scalar or a single series (aggregate it, e.g. with sum() or max())",
                            many.len()
                        ),
                        true,
                    )
                }
            }
        }
        Some(other) => {
            return err(
                format!(
                    "configuration error: the query returned a {other}; it must return a scalar or a single series (an instant vector)"
                ),
                true,
            )
        }
        None => Err("the answer has no resultType".to_string()),
    };
    match value {
        Ok(v) if v.is_nan() => Outcome::Empty {
            detail: "the query returned NaN".to_string(),
        },
        // JSON has no infinity: the status shows `value` null, and this says why.
        Ok(v) if v.is_infinite() => Outcome::Value {
            value: v,
            detail: Some(format!("the query returned {}", fmt_num(v))),
        },
        Ok(v) => Outcome::Value {
            value: v,
            detail: None,
        },
        Err(e) => err(e, false),
    }
}

/// Evaluates a query for `target`: (the query as sent, the outcome).
pub async fn query(
    analysis: &Analysis,
    cfg: &AnalysisConfig,
    p: &PromCheck,
    target: &Target<'_>,
) -> (String, Outcome) {
    let addrs: Vec<String> = target
        .svc
        .pool(target.color)
        .upstreams
        .iter()
        .map(|u| u.addr_label.clone())
        .collect();
    let q = render(&p.query, target.service, target.color, &addrs);
    let Some(base) = &cfg.prometheus_url else {
        return (
            q,
            Outcome::Error {
                error: "no [analysis] prometheus_url".to_string(),
                config: true,
            },
        );
    };
    let url = format!(
        "{}/api/v1/query?query={}",
        base.trim_end_matches('/'),
        form_encode(&q)
    );
    let uri = match url.parse::<http::Uri>() {
        Ok(u) => u,
        Err(e) => {
            return (
                q,
                Outcome::Error {
                    error: format!("bad query URL: {e}"),
                    config: true,
                },
            )
        }
    };
    let token = cfg
        .prometheus_token_env
        .as_deref()
        .and_then(|k| std::env::var(k).ok());
    // As the admin token: one trailing line end off (`check` refuses what cannot be sent).
    let token = token
        .as_deref()
        .and_then(|t| crate::http::headers::bearer_token(t).ok())
        .filter(|t| !t.is_empty());
    let outcome = match http_get(analysis, cfg, &uri, token, cfg.timeout).await {
        Ok((status, body)) => parse_prometheus(status, &body),
        Err(e) => Outcome::Error {
            error: format!("prometheus {}: {e}", base),
            config: false,
        },
    };
    (q, outcome)
}

// ---------------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------------

/// What one probed URL answered, judged by the check.
#[derive(Debug, PartialEq)]
pub enum ProbeResult {
    Pass,
    Fail(String),
    Error(String),
}

/// Judges one answer: a 2xx, then the value at `json_pointer` if the check has a condition.
pub fn judge(p: &ProbeCheck, status: http::StatusCode, body: &[u8]) -> ProbeResult {
    if !status.is_success() {
        return ProbeResult::Fail(format!("answered {}", status.as_u16()));
    }
    let Some(ptr) = &p.json_pointer else {
        return ProbeResult::Pass;
    };
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return ProbeResult::Fail(format!("answer is not JSON: {e}")),
    };
    let Some(found) = doc.pointer(ptr) else {
        return ProbeResult::Fail(format!("no value at {ptr}"));
    };
    match &p.condition {
        ProbeCondition::Status => ProbeResult::Pass,
        ProbeCondition::Equals(want) => {
            if json_equal(found, want) {
                ProbeResult::Pass
            } else {
                ProbeResult::Fail(format!("{ptr} = {found} (want {want})"))
            }
        }
        ProbeCondition::Bound(b) => match found.as_f64() {
            Some(v) if b.breached_by(v) => ProbeResult::Fail(format!(
                "{ptr} = {} {} {}",
                fmt_num_beside(v, b.threshold()),
                b.op(),
                fmt_exact(b.threshold())
            )),
            Some(_) => ProbeResult::Pass,
            None => ProbeResult::Fail(format!("{ptr} = {found} is not a number")),
        },
    }
}

/// Numbers compare by value (`1` equals `1.0`); everything else exactly.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Sums per-URL results: the failing fraction of those that answered; all errors is an error.
pub fn probe_outcome(results: &[(String, ProbeResult)]) -> Outcome {
    let (mut pass, mut fail) = (0usize, 0usize);
    let mut notes = Vec::new();
    let mut errors = Vec::new();
    for (url, r) in results {
        match r {
            ProbeResult::Pass => pass += 1,
            ProbeResult::Fail(why) => {
                fail += 1;
                notes.push(format!("{url}: {why}"));
            }
            ProbeResult::Error(why) => errors.push(format!("{url}: {why}")),
        }
    }
    if pass + fail == 0 {
        let error = if errors.is_empty() {
            "nothing to probe".to_string()
        } else {
            errors.join("; ")
        };
        return Outcome::Error {
            error,
            config: false,
        };
    }
    notes.extend(errors.iter().map(|e| format!("{e} (not counted)")));
    let mut detail = format!("{fail} of {} failing", pass + fail);
    if !notes.is_empty() {
        detail.push_str(": ");
        detail.push_str(&notes.join("; "));
    }
    Outcome::Value {
        value: fail as f64 / (pass + fail) as f64,
        detail: Some(detail),
    }
}

/// The URLs a probe GETs for `target`, each with whether its upstream is healthy: `path` on
/// every upstream of the color (as the contract says: one that health checks took out is still
/// part of the color, and its deep health is what the rule is about), or `url`.
fn probe_urls(p: &ProbeCheck, target: &Target<'_>) -> Vec<(String, bool)> {
    match &p.target {
        ProbeTarget::Url(u) => vec![(render(u, target.service, target.color, &[]), true)],
        ProbeTarget::Path(path) => target
            .svc
            .pool(target.color)
            .upstreams
            .iter()
            .map(|u| (format!("http://{}{path}", u.addr_label), u.is_healthy()))
            .collect(),
    }
}

/// Probes `target`: (the URLs probed, the outcome).
pub async fn probe(
    analysis: &Analysis,
    cfg: &AnalysisConfig,
    p: &ProbeCheck,
    target: &Target<'_>,
) -> (String, Outcome) {
    let urls = probe_urls(p, target);
    if urls.is_empty() {
        return (
            String::new(),
            Outcome::Error {
                error: format!("the {} pool has no upstream to probe", target.color),
                config: false,
            },
        );
    }
    // `path` on the upstreams of an h2 pool: in their protocol (an h2c-only upstream, such as a
    // gRPC server, refuses HTTP/1.1).
    let h2 = matches!(p.target, ProbeTarget::Path(_))
        && target.svc.pool(target.color).protocol == Protocol::H2;
    // An upstream that does not answer is not counted (a blip, or one pod restarting, is no
    // verdict on the release), unless none answered and every one is taken out by health
    // checks or passive ejection: the color is down, and that reads as failing, not as a probe
    // that cannot see (`blind`).
    let all_down = urls.iter().all(|(_, healthy)| !healthy);
    let one = |(url, _healthy): (String, bool)| async move {
        let r = match url.parse::<http::Uri>() {
            Err(e) => ProbeResult::Error(format!("bad URL: {e}")),
            Ok(uri) if h2 => match h2_get(analysis, uri, cfg.timeout).await {
                Ok((status, body)) => judge(p, status, &body),
                Err(e) => ProbeResult::Error(e),
            },
            Ok(uri) => match http_get(analysis, cfg, &uri, None, cfg.timeout).await {
                Ok((status, body)) => judge(p, status, &body),
                Err(e) => ProbeResult::Error(e),
            },
        };
        (url, r)
    };
    let probed = urls
        .iter()
        .map(|(u, _)| u.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let mut results: Vec<(String, ProbeResult)> =
        futures_join_all(urls.into_iter().map(one).collect()).await;
    if all_down
        && results
            .iter()
            .all(|(_, r)| matches!(r, ProbeResult::Error(_)))
    {
        for (_, r) in &mut results {
            if let ProbeResult::Error(e) = r {
                *r = ProbeResult::Fail(format!("{e}, and the upstream is marked unhealthy"));
            }
        }
    }
    (probed, probe_outcome(&results))
}

/// GET `uri` over h2c with prior knowledge within `timeout`: the status and the body, read up
/// to [`MAX_BODY`].
async fn h2_get(
    an: &Analysis,
    uri: http::Uri,
    timeout: Duration,
) -> Result<(http::StatusCode, Bytes), String> {
    // Built once: its own connect timeout is only a backstop, the call's `timeout` (read at
    // each call, so a reload's applies) bounds connect and answer alike.
    let client = an.h2.get_or_init(|| {
        hyper_client(
            Duration::from_secs(3600),
            Duration::from_secs(30),
            Some(4),
            true,
        )
    });
    let req = http::Request::get(uri)
        .header(http::header::USER_AGENT, "switchyard-analysis")
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let fetch = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| match e.is_connect() {
                true => "connection failed".to_string(),
                false => format!("request failed: {e}"),
            })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "timed out after {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// Runs futures concurrently on this task and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

// ---------------------------------------------------------------------------------------------
// The trigger tasks
// ---------------------------------------------------------------------------------------------

/// What the trigger tasks need from the app (which implements it): the live snapshot and the
/// analysis state it holds. Analysis sits below the app and never names it.
pub trait Host: Send + Sync + 'static {
    fn snapshot(&self) -> Arc<Snapshot>;
    fn analysis(&self) -> &Analysis;
}

/// Keeps one task per `prometheus`/`probe` trigger of every service with automatic rollback
/// enabled, and wakes a trigger's task when its service's live color changes; stops them all
/// when `shutdown` is cancelled.
pub async fn run<H: Host>(app: Arc<H>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SYNC_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        sync(&app);
    }
    let mut slots = app
        .analysis()
        .slots
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (_, s) in slots.drain() {
        s.stop.cancel();
    }
}

fn sync<H: Host>(app: &Arc<H>) {
    let snap = app.snapshot();
    let mut wanted: HashMap<Key, (TriggerConfig, u64)> = HashMap::new();
    for svc in &snap.services {
        let r = &svc.config.rollback;
        if !r.enabled {
            continue;
        }
        for (i, t) in r.triggers.iter().enumerate() {
            if t.kind.interval().is_some() {
                wanted.insert(
                    (svc.name().to_string(), i),
                    (t.clone(), svc.state.generation),
                );
            }
        }
    }
    // A panic elsewhere while the map was held leaves it as it was: still the slots.
    let mut slots = app
        .analysis()
        .slots
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    slots.retain(|key, slot| {
        let mut keep = wanted.get(key).is_some_and(|(t, _)| *t == slot.trigger);
        // A task that ended while wanted panicked: another is started below, after a pause of
        // its interval (at least a second), so that an answer it cannot take is not asked
        // again at once.
        let ended = slot.ended.lock().map(|e| *e).unwrap_or(None);
        if let (true, Some(at)) = (keep, ended) {
            let pause = slot.trigger.kind.interval().unwrap_or_default();
            if now.saturating_duration_since(at) >= pause.max(Duration::from_secs(1)) {
                tracing::error!(service = %key.0, trigger = key.1, kind = slot.trigger.kind.name(), "an analysis trigger's task ended unexpectedly (a panic); starting it again");
                app.analysis().restarts.inc();
                keep = false;
            }
        }
        if !keep {
            slot.stop.cancel();
            app.analysis()
                .forget(&key.0, key.1, slot.trigger.kind.name());
        }
        keep
    });
    for (key, (trigger, generation)) in wanted {
        match slots.get(&key) {
            Some(slot) => {
                if let Ok(mut seen) = slot.seen_generation.lock() {
                    if *seen != generation {
                        *seen = generation;
                        slot.wake.notify_one();
                    }
                }
            }
            None => {
                let slot = Arc::new(Slot {
                    trigger,
                    last: Mutex::new(Last::default()),
                    wake: Notify::new(),
                    stop: CancellationToken::new(),
                    seen_generation: Mutex::new(generation),
                    ended: Mutex::new(None),
                });
                tokio::spawn(trigger_task(
                    app.clone(),
                    key.0.clone(),
                    key.1,
                    slot.clone(),
                ));
                slots.insert(key, slot);
            }
        }
    }
}

async fn trigger_task<H: Host>(app: Arc<H>, service: String, index: usize, slot: Arc<Slot>) {
    let _ended = Ended(slot.clone());
    let Some(interval) = slot.trigger.kind.interval() else {
        return;
    };
    // The error last logged, and when.
    let mut warned: Option<(String, Instant)> = None;
    loop {
        let snap = app.snapshot();
        let Some(svc) = snap.service(&service).cloned() else {
            return;
        };
        let cfg = snap.config.analysis.clone();
        drop(snap);
        let generation = svc.state.generation;
        let color = svc.state.active;
        let target = Target {
            service: &service,
            color,
            svc: &svc,
        };
        let evaluated = tokio::select! {
            r = evaluate(app.analysis(), &cfg, &slot.trigger.kind, &target) => r,
            _ = slot.stop.cancelled() => return,
        };
        if slot.stop.is_cancelled() {
            return;
        }
        if let Some((text, outcome)) = evaluated {
            // Said when it starts, when its error changes, and once a minute while it lasts
            // (not at every `interval`), and when the check answers again.
            match &outcome {
                Outcome::Error { error, .. } => {
                    let now = Instant::now();
                    if warn_due(warned.as_ref(), error, now) {
                        tracing::warn!(service = %service, trigger = index, kind = slot.trigger.kind.name(), error = %error, "analysis check failed: the trigger is inconclusive");
                        warned = Some((error.clone(), now));
                    }
                }
                _ => {
                    if warned.take().is_some() {
                        tracing::info!(service = %service, trigger = index, kind = slot.trigger.kind.name(), "analysis check answers again");
                    }
                }
            }
            let last = match slot.last.lock() {
                Ok(mut l) => {
                    l.record(generation, color, text, outcome);
                    l.clone()
                }
                Err(_) => return,
            };
            app.analysis()
                .publish(&service, index, &slot.trigger, &last);
        }
        drop(svc);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = slot.wake.notified() => {}
            _ = slot.stop.cancelled() => return,
        }
    }
}

async fn evaluate(
    analysis: &Analysis,
    cfg: &AnalysisConfig,
    kind: &TriggerKind,
    target: &Target<'_>,
) -> Option<(String, Outcome)> {
    match kind {
        TriggerKind::Prometheus(p) => {
            let (q, o) = query(analysis, cfg, p, target).await;
            Some((q, o.clipped()))
        }
        TriggerKind::Probe(p) => {
            let (u, o) = probe(analysis, cfg, p, target).await;
            Some((u, o.clipped()))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Verify checks (before a flip)
// ---------------------------------------------------------------------------------------------

/// A verify check that did not pass, for the 409.
#[derive(Clone, Debug)]
pub struct VerifyFailure {
    pub index: usize,
    pub kind: &'static str,
    /// The query as sent, or the probed URLs.
    pub evaluated: String,
    pub reason: String,
}

/// Runs every `[[services.verify]]` check of `svc` against `to`, in order; the first failure.
/// `cfg` is the live config's `[analysis]`. `unknown_refuses`: false for a manual rollback,
/// the way back when the analysis itself is down: a check with no data or an error does not
/// refuse it (a value that fails still does).
pub async fn verify(
    analysis: &Analysis,
    cfg: &AnalysisConfig,
    svc: &Service,
    to: Color,
    unknown_refuses: bool,
) -> Result<(), VerifyFailure> {
    if svc.config.verify.is_empty() {
        return Ok(());
    }
    let target = Target {
        service: svc.name(),
        color: to,
        svc,
    };
    for (index, check) in svc.config.verify.iter().enumerate() {
        let (evaluated, outcome, bound) = match check {
            VerifyCheck::Prometheus(p) => {
                let (q, o) = query(analysis, cfg, p, &target).await;
                (q, o.clipped(), p.bound)
            }
            VerifyCheck::Probe(p) => {
                let (u, o) = probe(analysis, cfg, p, &target).await;
                (u, o.clipped(), Bound::Above(p.above_fraction))
            }
        };
        let fail = |reason: String| VerifyFailure {
            index,
            kind: check.name(),
            evaluated: evaluated.clone(),
            reason,
        };
        match outcome {
            Outcome::Value { value, detail } if bound.breached_by(value) => {
                let what = match check {
                    VerifyCheck::Prometheus(_) => format!(
                        "value {} {} {}",
                        fmt_num_beside(value, bound.threshold()),
                        bound.op(),
                        fmt_exact(bound.threshold())
                    ),
                    VerifyCheck::Probe(_) => detail.unwrap_or_else(|| "failing".to_string()),
                };
                return Err(fail(what));
            }
            Outcome::Value { .. } => {}
            Outcome::Empty { detail } if !unknown_refuses => {
                tracing::warn!(service = %svc.name(), check = index, %detail, "verify check has no data; not refusing the rollback");
            }
            Outcome::Error { error, .. } if !unknown_refuses => {
                tracing::warn!(service = %svc.name(), check = index, %error, "verify check failed to evaluate; not refusing the rollback");
            }
            Outcome::Empty { detail } => {
                return Err(fail(format!("no data: {detail}")));
            }
            Outcome::Error { error, .. } => return Err(fail(format!("error: {error}"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A Prometheus error page or a probed value of megabytes is kept (in the status, the logs,
    /// the events, a 409) as its first [`MAX_TEXT`] bytes and `…`, cut at a character boundary.
    #[test]
    fn outside_text_is_clipped() {
        let body = format!(
            r#"{{"status":"error","errorType":"execution","error":"{}"}}"#,
            "é".repeat(1_500_000)
        );
        let o = parse_prometheus(http::StatusCode::BAD_REQUEST, body.as_bytes()).clipped();
        let Outcome::Error { error, .. } = o else {
            panic!("{o:?}")
        };
        assert!(error.len() <= MAX_TEXT + '…'.len_utf8(), "{}", error.len());
        assert!(error.starts_with("HTTP 400: execution: éé") && error.ends_with("é…"));
        let short = Outcome::Empty {
            detail: "the query returned no series".into(),
        };
        assert_eq!(short.clone().clipped(), short);
        let value = Outcome::Value {
            value: 1.0,
            detail: Some("x".repeat(10_000)),
        };
        let Outcome::Value {
            detail: Some(d), ..
        } = value.clipped()
        else {
            panic!()
        };
        assert_eq!(d, format!("{}…", "x".repeat(MAX_TEXT)));
    }

    /// An inconclusive trigger is logged when it starts, when its error changes and once a
    /// minute while it lasts, not at every evaluation.
    #[tokio::test(start_paused = true)]
    async fn an_inconclusive_trigger_is_logged_once_a_minute() {
        let t0 = Instant::now();
        assert!(super::warn_due(None, "timeout", t0));
        let said = ("timeout".to_string(), t0);
        assert!(!super::warn_due(
            Some(&said),
            "timeout",
            t0 + Duration::from_secs(1)
        ));
        assert!(!super::warn_due(
            Some(&said),
            "timeout",
            t0 + Duration::from_secs(59)
        ));
        assert!(super::warn_due(
            Some(&said),
            "timeout",
            t0 + Duration::from_secs(60)
        ));
        assert!(super::warn_due(
            Some(&said),
            "HTTP 503",
            t0 + Duration::from_secs(1)
        ));
    }
    use super::*;

    /// A host with one service and one `prometheus` trigger (nothing answers its URL).
    struct OneTrigger {
        snap: Arc<Snapshot>,
        analysis: Analysis,
        restarts: IntCounter,
    }

    impl Host for OneTrigger {
        fn snapshot(&self) -> Arc<Snapshot> {
            self.snap.clone()
        }
        fn analysis(&self) -> &Analysis {
            &self.analysis
        }
    }

    fn one_trigger() -> Arc<OneTrigger> {
        let cfg = crate::config::from_toml_str(
            "[analysis]\nprometheus_url = \"http://127.0.0.1:9\"\n\
             [[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:1\"] }\n\
             green = { upstreams = [\"127.0.0.1:2\"] }\n[services.rollback]\n\
             [[services.rollback.triggers]]\nkind = \"prometheus\"\nquery = \"up\"\nabove = 0.5\n\
             interval = \"1s\"\n",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let metrics = crate::metrics::Metrics::new();
        let snap = crate::routing::build_snapshot(Arc::new(cfg), &HashMap::new(), None, &metrics);
        let restarts = IntCounter::new("r", "r").unwrap_or_else(|e| panic!("{e}"));
        Arc::new(OneTrigger {
            snap: Arc::new(snap),
            analysis: Analysis::new(&prometheus::Registry::new(), restarts.clone()),
            restarts,
        })
    }

    /// A trigger's task that ends while its trigger is still wanted (a panic) is started again,
    /// once its interval has passed, and counted; one that runs is left alone.
    #[tokio::test(start_paused = true)]
    async fn a_trigger_task_that_died_is_started_again() {
        let host = one_trigger();
        sync(&host);
        let first = host
            .analysis
            .slots
            .lock()
            .map(|s| s.values().next().cloned());
        let first = first.ok().flatten().unwrap_or_else(|| panic!("no slot"));
        sync(&host);
        assert_eq!(host.restarts.get(), 0);
        // Its task died (as a panic's unwinding would mark it).
        first.stop.cancel();
        if let Ok(mut e) = first.ended.lock() {
            *e = Some(Instant::now());
        }
        // `stop` stands for the death here; a real one leaves it uncancelled.
        let dead = Arc::new(Slot {
            trigger: first.trigger.clone(),
            last: Mutex::new(Last::default()),
            wake: Notify::new(),
            stop: CancellationToken::new(),
            seen_generation: Mutex::new(0),
            ended: Mutex::new(Some(Instant::now())),
        });
        if let Ok(mut slots) = host.analysis.slots.lock() {
            let key = slots
                .keys()
                .next()
                .cloned()
                .unwrap_or_else(|| panic!("key"));
            slots.insert(key, dead.clone());
        }
        // Not within its interval...
        sync(&host);
        assert_eq!(host.restarts.get(), 0);
        // ...but after it.
        tokio::time::advance(Duration::from_millis(1100)).await;
        sync(&host);
        assert_eq!(host.restarts.get(), 1);
        let now = host
            .analysis
            .slots
            .lock()
            .map(|s| s.values().next().cloned());
        let now = now.ok().flatten().unwrap_or_else(|| panic!("no slot"));
        assert!(!Arc::ptr_eq(&now, &dead), "the dead slot was kept");
        assert!(dead.stop.is_cancelled());
        assert!(now.ended.lock().map(|e| e.is_none()).unwrap_or(false));
        now.stop.cancel();
    }

    fn probe_check(ptr: Option<&str>, condition: ProbeCondition) -> ProbeCheck {
        ProbeCheck {
            target: ProbeTarget::Path("/health/deps".into()),
            json_pointer: ptr.map(str::to_string),
            condition,
            above_fraction: 0.0,
            interval: Duration::from_secs(5),
            on_error: crate::config::OnError::Hold,
            max_errors: 3,
        }
    }

    #[test]
    fn upstreams_become_a_regex_without_backslashes() {
        let r = upstreams_regex(&["127.0.0.1:3001".into(), "[::1]:3002".into()]);
        assert_eq!(r, "127[.]0[.]0[.]1:3001|[[]::1[]]:3002");
        assert!(!r.contains('\\'));
        // tests/analysis.rs asks a real Prometheus what this one matches.
        assert_eq!(
            upstreams_regex(&["[::1]:3002".into(), "10.0.0.1:80".into()]),
            "[[]::1[]]:3002|10[.]0[.]0[.]1:80"
        );
    }

    #[test]
    fn templates_fill_known_placeholders() {
        let q = render(
            r#"sum(rate(x{svc="{{service}}",color="{{ color }}",instance=~"{{upstreams}}"}[1m]))"#,
            "api",
            Color::Green,
            &["10.0.0.1:80".into()],
        );
        assert_eq!(
            q,
            r#"sum(rate(x{svc="api",color="green",instance=~"10[.]0[.]0[.]1:80"}[1m]))"#
        );
        let hosts = render(
            "{{upstream_hosts}}",
            "api",
            Color::Blue,
            &[
                "10.0.0.1:80".into(),
                "10.0.0.1:81".into(),
                "[::1]:80".into(),
            ],
        );
        assert_eq!(hosts, "10[.]0[.]0[.]1|[[]::1[]]");
        // An unknown one (rejected by `check`) is left as written.
        assert_eq!(render("a{{x}}b", "s", Color::Blue, &[]), "a{{x}}b");
        assert_eq!(render("a{{b", "s", Color::Blue, &[]), "a{{b");
        assert_eq!(form_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }

    #[test]
    fn prometheus_answers() {
        let ok = http::StatusCode::OK;
        let v = |s: &str| parse_prometheus(ok, s.as_bytes());
        assert_eq!(
            v(r#"{"status":"success","data":{"resultType":"scalar","result":[1,"0.5"]}}"#),
            Outcome::Value {
                value: 0.5,
                detail: None
            }
        );
        assert_eq!(
            v(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"+Inf"]}]}}"#
            ),
            Outcome::Value {
                value: f64::INFINITY,
                detail: Some("the query returned +Inf".into())
            }
        );
        assert_eq!(fmt_num(f64::NEG_INFINITY), "-Inf");
        assert!(matches!(
            v(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#),
            Outcome::Empty { .. }
        ));
        assert!(matches!(
            v(
                r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#
            ),
            Outcome::Empty { .. }
        ));
        match v(
            r#"{"status":"success","data":{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}}"#,
        ) {
            Outcome::Error {
                error,
                config: true,
            } => assert!(error.contains("2 series"), "{error}"),
            o => panic!("{o:?}"),
        }
        match v(r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#) {
            Outcome::Error {
                error,
                config: true,
            } => assert!(error.contains("matrix"), "{error}"),
            o => panic!("{o:?}"),
        }
        match parse_prometheus(
            http::StatusCode::BAD_REQUEST,
            br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#,
        ) {
            Outcome::Error {
                error,
                config: true,
            } => {
                assert_eq!(error, "HTTP 400: bad_data: parse error")
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            parse_prometheus(http::StatusCode::BAD_GATEWAY, b"<html>bad gateway</html>"),
            Outcome::Error { config: false, .. }
        ));
        // A 500 with a "success" body (rev17 t04 status500ok) is an error, never a value.
        match parse_prometheus(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            br#"{"status":"success","data":{"resultType":"scalar","result":[1,"9"]}}"#,
        ) {
            Outcome::Error {
                error,
                config: false,
            } => assert!(error.starts_with("HTTP 500"), "{error}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn probe_judgement() {
        let ok = http::StatusCode::OK;
        let eq = probe_check(Some("/database"), ProbeCondition::Equals(json!("ok")));
        assert_eq!(judge(&eq, ok, br#"{"database":"ok"}"#), ProbeResult::Pass);
        assert_eq!(
            judge(&eq, ok, br#"{"database":"down"}"#),
            ProbeResult::Fail(r#"/database = "down" (want "ok")"#.into())
        );
        assert!(matches!(judge(&eq, ok, b"{}"), ProbeResult::Fail(_)));
        assert!(matches!(judge(&eq, ok, b"nope"), ProbeResult::Fail(_)));
        assert!(matches!(
            judge(
                &eq,
                http::StatusCode::SERVICE_UNAVAILABLE,
                br#"{"database":"ok"}"#
            ),
            ProbeResult::Fail(_)
        ));
        let above = probe_check(Some("/pool"), ProbeCondition::Bound(Bound::Above(0.9)));
        assert_eq!(judge(&above, ok, br#"{"pool":0.5}"#), ProbeResult::Pass);
        assert_eq!(
            judge(&above, ok, br#"{"pool":0.95}"#),
            ProbeResult::Fail("/pool = 0.95 > 0.9".into())
        );
        let num = probe_check(Some("/n"), ProbeCondition::Equals(json!(1)));
        assert_eq!(judge(&num, ok, br#"{"n":1.0}"#), ProbeResult::Pass);
        let status = probe_check(None, ProbeCondition::Status);
        assert_eq!(judge(&status, ok, b"anything"), ProbeResult::Pass);
    }

    #[test]
    fn probe_fraction_counts_answers_only() {
        let r = probe_outcome(&[
            ("a".into(), ProbeResult::Pass),
            ("b".into(), ProbeResult::Fail("x".into())),
            ("c".into(), ProbeResult::Error("refused".into())),
        ]);
        match r {
            Outcome::Value { value, detail } => {
                assert_eq!(value, 0.5);
                let d = detail.unwrap_or_default();
                assert!(d.starts_with("1 of 2 failing: b: x"), "{d}");
                assert!(d.contains("c: refused (not counted)"), "{d}");
            }
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            probe_outcome(&[("c".into(), ProbeResult::Error("refused".into()))]),
            Outcome::Error { .. }
        ));
    }

    /// The per-trigger state machine: consecutive errors count up and reset on any answer; a
    /// reading for another generation is Pending.
    #[test]
    fn last_reading_state_machine() {
        let mut l = Last::default();
        assert_eq!(l.reading(1), External::Pending);
        let e = || Outcome::Error {
            error: "timed out".into(),
            config: false,
        };
        l.record(1, Color::Green, "q".into(), e());
        l.record(1, Color::Green, "q".into(), e());
        assert_eq!(l.reading(1), External::Error { consecutive: 2 });
        assert_eq!(l.reading(2), External::Pending);
        l.record(
            1,
            Color::Green,
            "q".into(),
            Outcome::Empty {
                detail: "none".into(),
            },
        );
        assert_eq!(l.reading(1), External::Empty);
        l.record(1, Color::Green, "q".into(), e());
        assert_eq!(l.reading(1), External::Error { consecutive: 1 });
        l.record(
            1,
            Color::Green,
            "q".into(),
            Outcome::Value {
                value: 0.7,
                detail: None,
            },
        );
        assert_eq!(l.reading(1), External::Value(0.7));
        assert_eq!(l.error, None);
        // An error keeps the last value measured (for /api/status and the metric).
        l.record(1, Color::Green, "q".into(), e());
        assert_eq!(l.reading(1), External::Error { consecutive: 1 });
        assert_eq!(l.value, Some(0.7));
        // A new generation starts the error count afresh, and forgets the other color's value.
        l.record(2, Color::Blue, "q".into(), e());
        assert_eq!(l.reading(2), External::Error { consecutive: 1 });
        assert_eq!(l.value, None);
    }
}
