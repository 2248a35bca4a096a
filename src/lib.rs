//! Switchyard: a blue-green traffic-switching reverse proxy that watches a fresh release and
//! rolls it back on its own when it misbehaves.
//!
//! The modules follow the request and the operator: [`config`] (file → validated config),
//! `http` (HTTP/1.1 server, upstream client and codec; it knows nothing of the proxy; hyper
//! serves h2), `upstream` (addresses, health flags, pools, counters), `routing` (the live
//! snapshot), `proxy` (the request path), `health`, `stats` (windowed histograms),
//! `rollback` (the decision engine) and `watcher` (its I/O loop), `analysis`
//! (`prometheus` and `probe` triggers, verify checks), `app` (the one writer), `admin`,
//! `state`, `events`, `notify`, `metrics`, `tls`, `server` (listeners and
//! lifecycle), `upgrade` (handing the listeners to a new process), `resolve` (upstreams by
//! name) and `dns_watch` (re-resolving them while running), `access_log`, plus the `demo` and `ctl` subcommands.
//!
//! The modules are private: the public surface is [`config`], [`out`] (the CLI's stdout and
//! stderr, which a closed pipe does not turn into a panic) and the re-exports below, which
//! is what the binary (`src/main.rs`), `tests/`, `benches/` and `fuzz/` use.

#![forbid(unsafe_code)]

mod access_log;
mod admin;
mod analysis;
mod app;
pub mod config;
mod config_watch;
mod ctl;
mod ctl_client;
mod demo;
mod dns_watch;
mod events;
mod guard;
mod health;
mod healthcheck;
mod http;
pub mod log_writer;
mod metrics;
mod notify;
pub mod out;
mod passive;
mod proxy;
mod release;
mod release_ctl;
mod release_record;
mod resolve;
mod rollback;
mod routing;
mod server;
mod shutdown;
mod state;
mod stats;
mod supervise;
pub use supervise::panic_text;
mod tls;
mod upgrade;
mod upstream;
mod watcher;

// Starting, running and stopping the proxy (the binary's `serve`, the end-to-end tests).
pub use app::{App, ReloadError};
pub use health::ensure as ensure_health_checks;
pub use server::{
    config_file_problems, file_problems, file_warnings, start, start_with, Options, Running,
};
pub use state::{move_aside as move_state_aside, StateStore};
pub use upgrade::{
    request as request_upgrade, sd_notify, spawn_successor, state_held_by, Inherited,
};
// `check`: upstream names (DNS) and release plans; the states a release can be in.
pub use release::{
    end_stored_on_missing_state as end_release_on_missing_state,
    end_stored_on_reset as end_release_on_state_reset, load as load_release_plan,
    move_stored_aside_if_unreadable as move_release_file_aside_if_unreadable, unwatched_note,
    STATES as RELEASE_STATES,
};
// `serve` and `ctl`: the admin token as stored, ready to send or compare.
pub use http::headers::bearer_token;
pub use resolve::{check_warnings as name_warnings, has_names, resolve as resolve_names};
// The `demo` and `ctl` subcommands.
pub use ctl::{run as run_ctl, Ctl};
pub use demo::{run as run_demo, DemoArgs};
pub use healthcheck::{HealthcheckArgs, Target as HealthcheckTarget};
// Types the end-to-end tests inspect through `App`.
pub use events::{Event, Reason as EventReason};
pub use upstream::Upstream;
// What benches/ and fuzz/ drive directly: the HTTP/1 head parser, header rewriting, the routing
// snapshot, windowed histograms.
pub use http::headers::strip_hop_by_hop;
pub use http::server::{parse_head, Limits};
pub use metrics::Metrics;
pub use proxy::{add_forwarded, ConnInfo, Forwarded, Mode};
pub use routing::build_snapshot;
pub use stats::Window;
