//! The file as serde reads it: every key optional, so that validation can report each missing
//! or wrong one with its key. Keys the structs do not name are collected as unknown
//! ([`super::from_toml_str_with_env`]). To add a section: its struct here, a field of
//! [`RawConfig`], and its path in [`fields_at`] (so that an unknown key in it lists its keys).

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub proxy: RawProxy,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub state: RawState,
    #[serde(default)]
    pub notify: RawNotify,
    #[serde(default)]
    pub analysis: RawAnalysis,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub services: Vec<RawService>,
    /// `[release_plans.NAME]`: release plans started by name (validated by [`super::plan`]).
    #[serde(default)]
    pub release_plans: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAnalysis {
    pub prometheus_url: Option<String>,
    pub prometheus_token_env: Option<String>,
    pub timeout: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawProxy {
    pub listen: Option<String>,
    pub tls_listen: Option<String>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub connect_timeout: Option<String>,
    pub request_timeout: Option<String>,
    pub shutdown_grace: Option<String>,
    pub workers: Option<i64>,
    pub runtime: Option<String>,
    pub preview_listen: Option<String>,
    // Extensions (README "Configuration reference").
    pub header_read_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
    pub max_connections: Option<i64>,
    pub max_headers: Option<i64>,
    pub max_header_bytes: Option<i64>,
    pub upstream_idle_timeout: Option<String>,
    pub upstream_max_idle: Option<i64>,
    pub h2_max_concurrent_streams: Option<i64>,
    pub client_send_timeout: Option<String>,
    pub upstream_send_timeout: Option<String>,
    pub h2_idle_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
    pub via: Option<bool>,
    // Retries and passive health (README "Upstream faults").
    pub retries: Option<i64>,
    pub eject_after: Option<i64>,
    pub eject_for: Option<String>,
    pub resolve_interval: Option<String>,
    pub resolve_hosts_file: Option<String>,
    pub upgrade_socket: Option<String>,
    pub upgrade_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub token_env: Option<String>,
    pub allowed_hosts: Option<Vec<String>>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub max_connections: Option<i64>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub watch_config: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawState {
    pub backend: Option<String>,
    pub path: Option<String>,
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub etcd_timeout: Option<String>,
    pub etcd_progress_interval: Option<String>,
    pub events_max_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawNotify {
    pub webhooks: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub max_attempts: Option<i64>,
    pub queue_size: Option<i64>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RawLog {
    pub access: Option<String>,
    pub access_format: Option<String>,
    pub access_buffer: Option<i64>,
    pub request_id: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RawService {
    pub name: Option<String>,
    pub hosts: Option<Vec<String>>,
    pub path_prefix: Option<String>,
    pub active: Option<String>,
    pub blue: Option<RawPool>,
    pub green: Option<RawPool>,
    pub smoke_paths: Option<Vec<String>>,
    pub health: Option<RawHealth>,
    pub rollback: Option<RawRollback>,
    #[serde(default)]
    pub verify: Vec<RawVerify>,
}

/// A `[[services.verify]]` check: the keys of a `prometheus` or `probe` trigger that mean
/// something for one attempt before a flip (no `for`, `interval` or error policy).
#[derive(Debug, Deserialize)]
pub struct RawVerify {
    pub kind: Option<String>,
    pub query: Option<String>,
    pub above: Option<serde_json::Value>,
    pub below: Option<serde_json::Value>,
    pub path: Option<String>,
    pub url: Option<String>,
    pub json_pointer: Option<String>,
    pub equals: Option<serde_json::Value>,
    pub above_fraction: Option<serde_json::Value>,
    // A trigger's keys but `for` (CONTRACT "Additions"): checked, with no effect on a check
    // that runs once.
    pub interval: Option<String>,
    pub on_empty: Option<String>,
    pub on_error: Option<String>,
    pub max_errors: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawPool {
    pub upstreams: Option<Vec<String>>,
    pub protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawHealth {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub unhealthy_after: Option<i64>,
    pub healthy_after: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct RawRollback {
    pub enabled: Option<bool>,
    pub watch_for: Option<String>,
    pub min_requests: Option<i64>,
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub triggers: Vec<RawTrigger>,
}

#[derive(Debug, Deserialize)]
pub struct RawTrigger {
    pub kind: Option<String>,
    /// A ratio, a count or a duration string depending on `kind`.
    pub above: Option<serde_json::Value>,
    pub over: Option<String>,
    #[serde(rename = "for")]
    pub for_: Option<String>,
    pub paths: Option<Vec<String>>,
    // `prometheus` and `probe` (src/analysis.rs).
    pub query: Option<String>,
    pub below: Option<serde_json::Value>,
    pub interval: Option<String>,
    pub on_empty: Option<String>,
    pub on_error: Option<String>,
    pub max_errors: Option<i64>,
    pub path: Option<String>,
    pub url: Option<String>,
    pub json_pointer: Option<String>,
    pub equals: Option<serde_json::Value>,
    pub above_fraction: Option<serde_json::Value>,
}

/// The keys serde knows in the table at `path` (`["services", "[]", "blue"]`), for the message
/// about an unknown key there; None for a path this table does not list.
pub fn fields_at(path: &[&str]) -> Option<&'static [&'static str]> {
    match path {
        [] => fields_of::<RawConfig>(),
        ["proxy"] => fields_of::<RawProxy>(),
        ["admin"] => fields_of::<RawAdmin>(),
        ["state"] => fields_of::<RawState>(),
        ["notify"] => fields_of::<RawNotify>(),
        ["analysis"] => fields_of::<RawAnalysis>(),
        ["log"] => fields_of::<RawLog>(),
        ["services", "[]"] => fields_of::<RawService>(),
        ["services", "[]", "blue" | "green"] => fields_of::<RawPool>(),
        ["services", "[]", "health"] => fields_of::<RawHealth>(),
        ["services", "[]", "rollback"] => fields_of::<RawRollback>(),
        ["services", "[]", "rollback", "triggers", "[]"] => fields_of::<RawTrigger>(),
        ["services", "[]", "verify", "[]"] => fields_of::<RawVerify>(),
        _ => None,
    }
}

/// The field names serde's derive gives a struct (renames applied), read by asking it to
/// deserialize from a deserializer that only records them.
fn fields_of<'de, T: Deserialize<'de>>() -> Option<&'static [&'static str]> {
    let mut fields = None;
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = Some(fields);
        Err(serde::de::Error::custom("fields recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}
