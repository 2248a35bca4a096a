//! Switchyard: a blue-green traffic-switching reverse proxy that watches a fresh release and
//! rolls it back on its own when it misbehaves.
//!
//! The modules follow the request and the operator: [`config`] (file → validated config),
//! [`http`] (HTTP/1.1 server, upstream client and codec; it knows nothing of the proxy; hyper
//! serves h2), [`upstream`] (addresses, health flags, pools, counters), [`routing`] (the live
//! snapshot), [`proxy`] (the request path), [`health`], [`stats`] (windowed histograms),
//! [`rollback`] (the decision engine) and [`watcher`] (its I/O loop), [`analysis`]
//! (`prometheus` and `probe` triggers, verify checks), [`app`] (the one writer), [`admin`],
//! [`state`], [`events`], [`notify`], [`metrics`], [`tls`], [`server`] (listeners and
//! lifecycle), [`upgrade`] (handing the listeners to a new process), [`resolve`] (upstreams by
//! name) and [`dns_watch`] (re-resolving them while running), [`access_log`], plus the [`demo`] and [`ctl`] subcommands.

pub mod access_log;
pub mod admin;
pub mod analysis;
pub mod app;
pub mod config;
pub mod config_watch;
pub mod ctl;
pub mod ctl_client;
pub mod demo;
pub mod dns_watch;
pub mod events;
pub mod guard;
pub mod health;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod passive;
pub mod proxy;
pub mod release;
pub mod release_ctl;
pub mod release_record;
pub mod resolve;
pub mod rollback;
pub mod routing;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod stats;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod watcher;
