//! The TOML configuration: backends, plugins and the routes between them.
//!
//! Unknown keys are errors that suggest the key meant, and every error
//! names the key and where its value came from: the file and line, or the
//! environment variable that set it. `docs/config.md` lists every key the
//! structs below accept; a test holds the two together ([`keys`]).
//! Environment variables override what a deployment changes most, so the
//! same file runs anywhere:
//!
//! - `SLUICE_BACKEND_URL` replaces the URL of every backend (move a whole
//!   deployment to another broker);
//! - `SLUICE_BACKEND_<NAME>_URL` replaces one backend's URL (NAME upper-cased,
//!   `-` as `_`), and wins over `SLUICE_BACKEND_URL`.
//!
//! A backend URL that carries a secret need not be written in the file: it
//! can come from a file of its own (`url_file`, e.g. a mounted secret), and
//! `${VAR}` anywhere in it is replaced by the environment variable `VAR`.
//!
//! Relative plugin paths are resolved against the config file's directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::backend::StartFrom;
use crate::router::{OutputFailure, Rename};
use crate::runtime::{OutboundHttp, OutputLimits, PluginSettings};

mod check;
mod defaults;
mod error;
pub mod keys;
mod locate;
mod secrets;
#[cfg(test)]
mod tests;

use error::Sources;
pub use error::{ConfigError, Origin};
use locate::Document;
use secrets::{expand_variables, with_password};

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Message backends by name; routes refer to them by that name.
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    /// Plugins by name; routes refer to them by that name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    /// What to consume, with which plugin, and where results go.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Settings of the WebAssembly runtime.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The admin HTTP API (deploy, rollback, pause, metrics, health); off
    /// unless this table is present.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// Where the spans of each delivery go; not exported unless this table
    /// is present. Read when the host starts (a reload keeps it).
    #[serde(default)]
    pub telemetry: Option<TelemetryConfig>,
}

/// Export of delivery spans over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (e.g. `http://localhost:4318`);
    /// spans are sent to `<endpoint>/v1/traces` as protobuf. `${VAR}` is
    /// replaced by the environment variable.
    pub otlp_endpoint: String,
    /// The `service.name` the spans carry.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
    /// Headers sent with every export, e.g. a collector's API key (write
    /// `${VAR}` to keep it out of the file).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// The admin HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on; loopback only unless a token is set.
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    /// Bearer token required on every request except health checks;
    /// `SLUICE_ADMIN_TOKEN` overrides it. Required when `listen` is not a
    /// loopback address.
    #[serde(default)]
    pub token: Option<String>,
    /// Largest plugin upload, in MiB.
    #[serde(default = "defaults::max_upload_mb")]
    pub max_upload_mb: u64,
}

/// One message backend.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Where it is, e.g. `sqlite://sluice.db` or `memory://`. `${VAR}` is
    /// replaced by the environment variable `VAR` (an unset one is an
    /// error), so a password need not be written here.
    #[serde(default)]
    pub url: String,
    /// A file holding the URL instead (relative to the config file; its
    /// surrounding whitespace is ignored), e.g. a mounted secret.
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// A file holding the password (relative to the config file; a final
    /// newline is ignored), put into the URL's user part:
    /// `redis://app@cache` becomes `redis://app:PASSWORD@cache`, and a URL
    /// with no user gets `:PASSWORD@` (as Redis takes a bare password).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// One plugin and what it is allowed to do.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The .wasm component, relative to the config file.
    pub path: PathBuf,
    /// Longest one call may run, in milliseconds.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Most memory one instance may hold, in MiB: all its linear memories
    /// and tables together.
    #[serde(default = "defaults::memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// Most outputs (returned and `publish`ed together) one call may hand
    /// the host; over it the call fails with cause `output-limit`.
    #[serde(default = "defaults::max_outputs")]
    pub max_outputs: usize,
    /// Most bytes of outputs one call may hand the host, in MiB; over it
    /// the call fails with cause `output-limit`.
    #[serde(default = "defaults::max_output_mb")]
    pub max_output_mb: usize,
    /// Values the plugin reads with `config-get`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Topic patterns the plugin may publish to; none if absent, so a
    /// plugin that produces outputs needs this.
    #[serde(default)]
    pub publish_to: Vec<String>,
    /// Topic patterns the plugin may send requests to with `request`
    /// (each waits for its reply); none if absent.
    #[serde(default)]
    pub request_to: Vec<String>,
    /// Environment variables the plugin sees (none by default).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host directories the plugin may read, keyed by the path it sees
    /// (none by default).
    #[serde(default)]
    pub read_dirs: BTreeMap<String, PathBuf>,
    /// Origins the plugin may send HTTP requests to, as
    /// `scheme://host[:port]` (`https://api.example.com`,
    /// `http://127.0.0.1:*`, `https://*.example.com`); none if absent.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    /// Most HTTP requests the plugin may have in flight at once, across
    /// all its instances; a request over it waits for a turn, within the
    /// call's deadline.
    #[serde(default = "defaults::max_outbound_requests")]
    pub max_outbound_requests: usize,
    /// For a component built for `wasi:messaging`: the kinds of `error`
    /// its handler returns that dead-letter the message at once
    /// (`timeout`, `connection`, `permission-denied`, `other`); every
    /// other error is retried. None if absent.
    #[serde(default)]
    pub reject_on: Vec<DraftErrorKind>,
    /// A candidate version to run in the shadow of this one: it handles
    /// the same messages with the same settings, its results are compared
    /// and never published (`sluice shadow report`).
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
}

/// A kind of `wasi:messaging` `error`, as `reject_on` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DraftErrorKind {
    Timeout,
    Connection,
    PermissionDenied,
    Other,
}

impl DraftErrorKind {
    /// The variant's name in the WIT.
    pub fn as_str(self) -> &'static str {
        match self {
            DraftErrorKind::Timeout => "timeout",
            DraftErrorKind::Connection => "connection",
            DraftErrorKind::PermissionDenied => "permission-denied",
            DraftErrorKind::Other => "other",
        }
    }
}

/// A shadow run's candidate.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The candidate's .wasm component, relative to the config file.
    pub path: PathBuf,
    /// Share of messages the candidate also handles, 0 to 1.
    #[serde(default = "defaults::shadow_sample")]
    pub sample: f64,
}

/// A route: a subscription, the plugin that handles it, and its policies.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs, metrics and dead-letter headers.
    pub name: String,
    /// Topics or patterns (`orders.*`, `orders.>`) to consume.
    pub topics: Vec<Spanned<String>>,
    /// The backend to consume from; the only backend if there is one.
    #[serde(default)]
    pub backend: Option<Spanned<String>>,
    /// The backend outputs and dead letters go to; the input backend if absent.
    #[serde(default)]
    pub output_backend: Option<Spanned<String>>,
    /// Backends every output goes to, each of them (dual publish, while
    /// moving from one backend to another); instead of `output_backend`.
    /// An input is acked only once all of them have taken its outputs.
    /// Dead letters go to the first, unless `dead_letter_backend` says
    /// otherwise.
    #[serde(default)]
    pub output_backends: Vec<Spanned<String>>,
    /// What becomes of a message whose outputs an output backend does not
    /// take: `wait` (the default) sends them to that backend again, and
    /// only to it, after the route's backoff, until it takes them (the
    /// input stays unacked, and the route fetches nothing new once
    /// `max_in_flight` messages wait); `dead-letter` gives up after
    /// `retry.max_attempts` tries and dead-letters the input (cause
    /// `output-failed`), while the backends that took its outputs keep them.
    #[serde(default)]
    pub output_failure: OutputFailure,
    /// The consumer group; the route's name if absent.
    #[serde(default)]
    pub group: Option<String>,
    /// Where a new group starts: `earliest` (the default: every message the
    /// backend still holds) or `latest`. Given as `earliest`, the backend
    /// must keep history, or the route is refused.
    #[serde(default)]
    pub start: Option<StartFrom>,
    /// The plugin that handles each message; none on a forwarding route.
    #[serde(default)]
    pub plugin: Option<Spanned<String>>,
    /// Forward each message as it is, without a plugin: a bridge from
    /// `backend` to the output backends, keeping each message's id, key,
    /// headers and payload (the far side can deduplicate on the id).
    #[serde(default)]
    pub forward: bool,
    /// On a forwarding route, topics to forward under another name: the
    /// first rule whose `from` matches renames (`{ from = "orders.>",
    /// to = "legacy.orders.>" }`); other topics keep theirs.
    #[serde(default)]
    pub rename: Vec<Rename>,
    /// Messages handled at once.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// Handle messages of one key one at a time, in order (retries of a
    /// message then hold back later messages of its key).
    #[serde(default)]
    pub ordered: bool,
    /// How long a fetched message is reserved for this consumer before
    /// another may take it, in milliseconds. Must exceed the plugin timeout.
    #[serde(default = "defaults::lease_ms")]
    pub lease_ms: u64,
    /// The most messages between fetched and settled (handled or waiting to
    /// be, or waiting for their outputs' publish and their ack). Bounds
    /// memory and what a crash sends back for redelivery; larger lets the
    /// settler gather larger batches.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
    /// Messages handed to the plugin in one call when it exports
    /// `handle-batch` (`sluice:plugin@0.2.0`); a plugin that exports only
    /// `handle` gets one message per call whatever this says.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Retries and dead-lettering.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Where rejected and exhausted messages go; `<name>.dead-letter` if absent.
    #[serde(default)]
    pub dead_letter_topic: Option<Spanned<String>>,
    /// The backend dead letters go to; the output backend if absent. It
    /// must keep messages nobody has read yet: the host makes a durable
    /// group for the dead-letter topic there at start (`sluice-dead-letters`),
    /// so NATS core and Redis pub/sub, which keep nothing, are refused.
    #[serde(default)]
    pub dead_letter_backend: Option<Spanned<String>>,
    /// Most routes a chain of messages may pass through: each output
    /// carries its input's hop count plus one (`sluice-hops`), and a
    /// message past this is dead-lettered with cause `hop-limit` instead
    /// of handled, so a plugin that feeds its own input cannot loop forever.
    #[serde(default = "defaults::max_hops")]
    pub max_hops: u32,
    /// How long, in milliseconds, a route's fetches may keep failing, or the
    /// route may hold messages without settling any, before `/readyz` and
    /// `sluice routes` report it as not ready (with the reason). A paused
    /// route is never reported.
    #[serde(default = "defaults::stalled_after_ms")]
    pub stalled_after_ms: u64,
    /// Also read `<name>.redrive`, where `sluice dlq redrive` sends this
    /// route's dead letters back: only this route's group reads it, and
    /// each message is handled under the topic it was dead-lettered from.
    /// Off by default: it costs the route a second subscription.
    #[serde(default)]
    pub redrive: bool,
    /// Messages per second the route takes from its backend, at most
    /// (bursts of up to a tenth of a second's worth); unlimited if absent.
    /// For a downstream API with a quota: messages wait in the backend,
    /// not in the host.
    #[serde(default)]
    pub max_rate: Option<f64>,
}

/// How failed messages are retried.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; then the message is dead-lettered.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry, in milliseconds.
    #[serde(default = "defaults::initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest delay between retries, in milliseconds.
    #[serde(default = "defaults::max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Factor by which the delay grows per attempt.
    #[serde(default = "defaults::multiplier")]
    pub multiplier: f64,
    /// Random spread of each delay, as a fraction (0.2 = ±20%).
    #[serde(default = "defaults::jitter")]
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: defaults::max_attempts(),
            initial_backoff_ms: defaults::initial_backoff_ms(),
            max_backoff_ms: defaults::max_backoff_ms(),
            multiplier: defaults::multiplier(),
            jitter: defaults::jitter(),
        }
    }
}

/// Settings of the WebAssembly runtime.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; the user cache dir if absent.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Set to false to compile every plugin at every start.
    #[serde(default = "defaults::yes")]
    pub cache: bool,
    /// Deploy a plugin's new version when its file changes.
    #[serde(default = "defaults::yes")]
    pub watch_plugins: bool,
    /// On SIGTERM, how long in-flight messages may take to finish before the
    /// host exits anyway (their leases then return them), in milliseconds.
    #[serde(default = "defaults::shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// Largest message (payload, key and headers) in bytes: a plugin's
    /// output over it fails the call (cause `output-limit`), and a consumed
    /// message over it is dead-lettered (cause `too-large`) unhandled.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            cache: true,
            watch_plugins: true,
            shutdown_grace_ms: defaults::shutdown_grace_ms(),
            max_message_bytes: defaults::max_message_bytes(),
        }
    }
}

/// A loaded, checked configuration with environment overrides applied.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The directory relative paths are resolved against.
    pub base_dir: PathBuf,
    pub source_name: String,
    /// Keys whose value an environment variable set, with the variable.
    from_env: BTreeMap<String, String>,
}

impl Loaded {
    /// The environment variable that set `key` (`backends.main.url`), if
    /// one did rather than the file.
    pub fn set_by_env(&self, key: &str) -> Option<&str> {
        self.from_env.get(key).map(String::as_str)
    }

    /// The settings the runtime needs for a plugin.
    pub fn plugin_settings(&self, name: &str) -> Option<(PathBuf, PluginSettings)> {
        let plugin = self.config.plugins.get(name)?;
        let mut settings = PluginSettings::new(name);
        settings.timeout = Duration::from_millis(plugin.timeout_ms);
        settings.memory_limit = (plugin.memory_limit_mb as usize) << 20;
        settings.limits = OutputLimits {
            max_outputs: plugin.max_outputs,
            max_bytes: plugin.max_output_mb << 20,
            max_message_bytes: self.config.runtime.max_message_bytes,
        };
        settings.config = plugin.config.clone();
        settings.publish_to = plugin.publish_to.clone();
        settings.request_to = plugin.request_to.clone();
        settings.reject_on = plugin
            .reject_on
            .iter()
            .map(|kind| kind.as_str().to_owned())
            .collect();
        settings.env = plugin.env.clone();
        settings.read_dirs = plugin
            .read_dirs
            .iter()
            .map(|(guest, host)| (guest.clone(), self.base_dir.join(host)))
            .collect();
        // Checked when the config was loaded.
        let origins = plugin
            .allowed_outbound_hosts
            .iter()
            .filter_map(|origin| origin.parse().ok())
            .collect();
        settings.outbound_http = Arc::new(OutboundHttp::new(origins, plugin.max_outbound_requests));
        Some((self.base_dir.join(&plugin.path), settings))
    }

    /// The backend a route consumes from.
    pub fn source_backend<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        match &route.backend {
            Some(name) => name.get_ref(),
            None => self.config.backends.keys().next().map_or("", |s| s),
        }
    }

    /// The backends a route publishes to: one, or several with
    /// `output_backends`.
    pub fn output_backends<'a>(&'a self, route: &'a RouteConfig) -> Vec<&'a str> {
        match (&route.output_backend, route.output_backends.as_slice()) {
            (Some(name), _) => vec![name.get_ref()],
            (None, []) => vec![self.source_backend(route)],
            (None, names) => names.iter().map(|name| name.get_ref().as_str()).collect(),
        }
    }

    /// The backend a route publishes to first (its only one, unless it has
    /// `output_backends`).
    pub fn output_backend<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        self.output_backends(route)[0]
    }

    /// The backend a route's dead letters go to.
    pub fn dead_letter_backend<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        match &route.dead_letter_backend {
            Some(name) => name.get_ref(),
            None => self.output_backend(route),
        }
    }
}

impl RouteConfig {
    /// The plugin's name; none on a forwarding route.
    pub fn plugin_name(&self) -> Option<&str> {
        self.plugin.as_ref().map(|name| name.get_ref().as_str())
    }

    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or(&self.name)
    }

    /// The topic `sluice dlq redrive` sends this route's dead letters back
    /// on (read only with `redrive = true`).
    pub fn redrive_topic(&self) -> String {
        format!("{}.redrive", self.name)
    }

    pub fn dead_letter_topic(&self) -> String {
        match &self.dead_letter_topic {
            Some(topic) => topic.get_ref().clone(),
            None => format!("{}.dead-letter", self.name),
        }
    }
}

/// Reads, parses, overrides from the environment and checks a config file.
pub fn load(path: &Path) -> Result<Loaded> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config `{}`", path.display()))?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    parse(&text, &path.display().to_string(), base_dir, |name| {
        std::env::var(name).ok()
    })
}

/// Parses config text; `env` looks up environment variables.
pub fn parse(
    text: &str,
    source_name: &str,
    base_dir: PathBuf,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Loaded> {
    let mut sources = Sources {
        file: source_name.to_string(),
        document: Document::parse(text),
        from_env: BTreeMap::new(),
        from_file: BTreeMap::new(),
    };
    let mut config: Config =
        toml::from_str(text).map_err(|e| error::from_toml(&e, &sources.document, source_name))?;
    if let (Some(admin), Some(token)) = (config.admin.as_mut(), env("SLUICE_ADMIN_TOKEN")) {
        admin.token = Some(token);
        sources
            .from_env
            .insert("admin.token".into(), "SLUICE_ADMIN_TOKEN".into());
    }
    let everywhere = env("SLUICE_BACKEND_URL");
    for (name, backend) in config.backends.iter_mut() {
        let key = |field: &str| format!("backends.{name}.{field}");
        let own = format!(
            "SLUICE_BACKEND_{}_URL",
            name.to_uppercase().replace('-', "_")
        );
        let overridden = match env(&own) {
            Some(url) => Some((url, own)),
            None => everywhere
                .clone()
                .map(|url| (url, "SLUICE_BACKEND_URL".to_string())),
        };
        if let Some((url, variable)) = overridden {
            backend.url = url;
            sources.from_env.insert(key("url"), variable);
        } else if let Some(path) = &backend.url_file {
            if !backend.url.is_empty() {
                return Err(sources
                    .error(&key("url_file"), "give `url` or `url_file`, not both")
                    .into());
            }
            let path = base_dir.join(path);
            backend.url = std::fs::read_to_string(&path)
                .map_err(|e| {
                    sources.error(
                        &key("url_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?
                .trim()
                .to_string();
            let source = (key("url_file"), path.display().to_string());
            sources.from_file.insert(key("url"), source);
        } else if backend.url.is_empty() {
            return Err(sources
                .error(&key("url"), "missing: give `url` or `url_file`")
                .into());
        }
        backend.url =
            expand_variables(&backend.url, &env).map_err(|m| sources.error(&key("url"), m))?;
        if let Some(path) = &backend.password_file {
            let path = base_dir.join(path);
            let password = std::fs::read_to_string(&path).map_err(|e| {
                sources.error(
                    &key("password_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            backend.url = with_password(&backend.url, password)
                .map_err(|m| sources.error(&key("password_file"), m))?;
        }
    }
    if let Some(telemetry) = config.telemetry.as_mut() {
        telemetry.otlp_endpoint = expand_variables(&telemetry.otlp_endpoint, &env)
            .map_err(|m| sources.error("telemetry.otlp_endpoint", m))?;
        for (name, value) in telemetry.headers.iter_mut() {
            *value = expand_variables(value, &env)
                .map_err(|m| sources.error(&format!("telemetry.headers.{name}"), m))?;
        }
    }
    check::check(&config, &sources)?;
    Ok(Loaded {
        config,
        base_dir,
        source_name: source_name.to_string(),
        from_env: sources.from_env,
    })
}
