//! The configuration file as written: serde structs whose every value keeps
//! its place in the file ([`Spanned`]), so that validation can name the
//! line of each problem.
//!
//! Scalars are read as a [`Scalar`] whatever their TOML type, and unknown
//! keys are collected instead of refused here: the validator then reports
//! a value of the wrong type or a misspelt key together with every other
//! problem in the file, not one at a time.

use serde::Deserialize;
use toml::Spanned;

/// A value of any scalar TOML type; the validator says what was expected.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Scalar {
    /// The value as a person wrote it, for messages.
    pub(crate) fn described(&self) -> String {
        match self {
            Scalar::Bool(b) => format!("the boolean {b}"),
            Scalar::Int(n) => format!("the number {n}"),
            Scalar::Float(x) => format!("the number {x}"),
            Scalar::Text(t) => format!("the string \"{t}\""),
        }
    }
}

/// A key that may be absent.
pub(crate) type Field = Option<Spanned<Scalar>>;

/// Per-site parameters as written in `[defaults]` or a `[[site]]` table.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawSite {
    pub name: Field,
    pub address: Field,
    pub channels: Field,
    pub channels_max: Field,
    pub channel_idle_timeout: Field,
    pub pipeline_depth: Field,
    pub heartbeat_interval: Field,
    pub heartbeat_timeout: Field,
    pub channel_timeout: Field,
    pub query_timeout: Field,
    pub connect_retry: Field,
    pub channel_retry: Field,
    pub connect_timeout: Field,
    pub client_idle_timeout: Field,
    pub client_request_timeout: Field,
    pub max_clients: Field,
    pub max_request_bytes: Field,
    pub max_header_lines: Field,
    pub max_line_bytes: Field,
    pub keepalive_idle: Field,
    pub keepalive_interval: Field,
    pub keepalive_count: Field,
    pub tcp_user_timeout: Field,
    pub response_idle_timeout: Field,
    pub send_stall_grace: Field,
    pub listen: Field,
    pub only_from: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub tls: Option<Spanned<RawListenerTls>>,
    pub ca_file: Field,
    pub verify: Field,
    pub server_name: Field,
    pub client_cert_file: Field,
    pub client_key_file: Field,
    pub tls_handshake_timeout: Field,
    pub cache: Field,
    pub cache_max_age: Field,
    pub coalesce: Field,
    pub inventory: Field,
    pub commands: Field,
    pub listen_commands: Field,
    pub commands_from_uids: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub commands_from_groups: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub audit_command_arguments: Field,
    pub slow_query_threshold: Field,
    pub slow_query_log_values: Field,
    pub fair_share: Field,
    pub socket_mode: Field,
    pub socket_group: Field,
    pub allow_world_writable: Field,
}

/// A `[[federation]]` table as written.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawFederation {
    pub name: Field,
    pub sites: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub on_site_error: Field,
    pub dialect: Field,
    pub commands: Field,
    pub listen_commands: Field,
    pub commands_from_uids: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub commands_from_groups: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub listen: Field,
    pub only_from: Option<Spanned<Vec<Spanned<Scalar>>>>,
    pub tls: Option<Spanned<RawListenerTls>>,
    pub socket_mode: Field,
    pub socket_group: Field,
    pub allow_world_writable: Field,
}

/// The `[inventory]` section as written.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawInventory {
    pub dir: Field,
    pub interval: Field,
    pub full_interval: Field,
    pub max_file_bytes: Field,
}

/// `tls = { cert_file = "...", key_file = "...", tls_client_ca = "...",
/// tls_client_names = [...] }` of a TCP listener.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawListenerTls {
    pub cert_file: Field,
    pub key_file: Field,
    pub tls_client_ca: Field,
    pub tls_client_names: Option<Spanned<Vec<Spanned<Scalar>>>>,
}

/// The file as written.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct RawConfig {
    pub socket_dir: Field,
    pub pid_file: Field,
    pub metrics_listen: Field,
    pub state_file: Field,
    pub state_interval: Field,
    pub shutdown_grace: Field,
    pub worker_threads: Field,
    pub spool_dir: Field,
    pub spool_memory_per_response: Field,
    pub spool_memory_budget: Field,
    pub spool_disk_budget: Field,
    pub request_memory_budget: Field,
    pub request_memory_wait: Field,
    pub cache_budget: Field,
    pub cache_max_entry: Field,
    pub inventory: Option<Spanned<RawInventory>>,
    pub federation: Option<Vec<Spanned<RawFederation>>>,
    pub federation_sort_budget: Field,
    pub defaults: Option<Spanned<RawSite>>,
    pub site: Option<Vec<Spanned<RawSite>>>,
}
