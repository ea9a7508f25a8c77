//! The TOML configuration: backends, plugins and the routes between them.
//!
//! Unknown keys are errors, and every error names the key and its line.
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
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::backend::{StartFrom, pattern};
use crate::runtime::{OutputLimits, PluginSettings};

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
#[derive(Debug, Deserialize)]
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
#[derive(Debug, Deserialize)]
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
    /// Environment variables the plugin sees (none by default).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host directories the plugin may read, keyed by the path it sees
    /// (none by default).
    #[serde(default)]
    pub read_dirs: BTreeMap<String, PathBuf>,
    /// A candidate version to run in the shadow of this one: it handles
    /// the same messages with the same settings, its results are compared
    /// and never published (`sluice shadow report`).
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
}

/// A shadow run's candidate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The candidate's .wasm component, relative to the config file.
    pub path: PathBuf,
    /// Share of messages the candidate also handles, 0 to 1.
    #[serde(default = "defaults::shadow_sample")]
    pub sample: f64,
}

/// A route: a subscription, the plugin that handles it, and its policies.
#[derive(Debug, Deserialize)]
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
    /// The consumer group; the route's name if absent.
    #[serde(default)]
    pub group: Option<String>,
    /// Where a new group starts: `earliest` (default) or `latest`.
    #[serde(default)]
    pub start: StartFrom,
    /// The plugin that handles each message.
    pub plugin: Spanned<String>,
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
#[derive(Debug, Clone, Deserialize)]
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

mod defaults {
    pub fn timeout_ms() -> u64 {
        1_000
    }
    pub fn memory_limit_mb() -> u64 {
        64
    }
    pub fn max_outputs() -> usize {
        crate::runtime::OutputLimits::default().max_outputs
    }
    pub fn max_output_mb() -> usize {
        crate::runtime::OutputLimits::default().max_bytes >> 20
    }
    pub fn max_message_bytes() -> usize {
        crate::runtime::OutputLimits::default().max_message_bytes
    }
    pub fn max_hops() -> u32 {
        crate::router::RouteSpec::DEFAULT_MAX_HOPS
    }
    pub fn concurrency() -> usize {
        1
    }
    pub fn lease_ms() -> u64 {
        30_000
    }
    pub fn shadow_sample() -> f64 {
        1.0
    }

    pub fn service_name() -> String {
        "sluice".into()
    }

    pub fn stalled_after_ms() -> u64 {
        30_000
    }
    pub fn max_in_flight() -> usize {
        crate::router::RouteSpec::DEFAULT_MAX_IN_FLIGHT
    }
    pub fn batch_size() -> usize {
        1
    }
    pub fn max_attempts() -> u32 {
        5
    }
    pub fn initial_backoff_ms() -> u64 {
        200
    }
    pub fn max_backoff_ms() -> u64 {
        30_000
    }
    pub fn multiplier() -> f64 {
        2.0
    }
    pub fn jitter() -> f64 {
        0.2
    }
    pub fn yes() -> bool {
        true
    }
    pub fn shutdown_grace_ms() -> u64 {
        30_000
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9464".into()
    }
    pub fn max_upload_mb() -> u64 {
        32
    }
}

/// A config that refers to something that does not exist or makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("{file}: line {line}: `{key}`: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// A loaded, checked configuration with environment overrides applied.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// The directory relative paths are resolved against.
    pub base_dir: PathBuf,
    pub source_name: String,
}

impl Loaded {
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
        settings.env = plugin.env.clone();
        settings.read_dirs = plugin
            .read_dirs
            .iter()
            .map(|(guest, host)| (guest.clone(), self.base_dir.join(host)))
            .collect();
        Some((self.base_dir.join(&plugin.path), settings))
    }

    /// The backend a route consumes from.
    pub fn source_backend<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        match &route.backend {
            Some(name) => name.get_ref(),
            None => self.config.backends.keys().next().map_or("", |s| s),
        }
    }

    /// The backend a route publishes to.
    pub fn output_backend<'a>(&'a self, route: &'a RouteConfig) -> &'a str {
        match &route.output_backend {
            Some(name) => name.get_ref(),
            None => self.source_backend(route),
        }
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
    let mut config: Config =
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{source_name}: {e}"))?;
    if let (Some(admin), Some(token)) = (config.admin.as_mut(), env("SLUICE_ADMIN_TOKEN")) {
        admin.token = Some(token);
    }
    let everywhere = env("SLUICE_BACKEND_URL");
    for (name, backend) in config.backends.iter_mut() {
        let own = format!(
            "SLUICE_BACKEND_{}_URL",
            name.to_uppercase().replace('-', "_")
        );
        let error = |key: &str, message: String| ConfigError {
            file: source_name.to_string(),
            line: text
                .find(&format!("[backends.{name}]"))
                .map_or(0, |o| line_of(text, o)),
            key: format!("backends.{name}.{key}"),
            message,
        };
        if let Some(url) = env(&own).or_else(|| everywhere.clone()) {
            backend.url = url;
        } else if let Some(path) = &backend.url_file {
            if !backend.url.is_empty() {
                return Err(error("url_file", "give `url` or `url_file`, not both".into()).into());
            }
            let path = base_dir.join(path);
            backend.url = std::fs::read_to_string(&path)
                .map_err(|e| error("url_file", format!("cannot read {}: {e}", path.display())))?
                .trim()
                .to_string();
        } else if backend.url.is_empty() {
            return Err(error("url", "missing: give `url` or `url_file`".into()).into());
        }
        backend.url = expand_variables(&backend.url, &env).map_err(|m| error("url", m))?;
        if let Some(path) = &backend.password_file {
            let path = base_dir.join(path);
            let password = std::fs::read_to_string(&path).map_err(|e| {
                error(
                    "password_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let password = password.strip_suffix('\n').unwrap_or(&password);
            let password = password.strip_suffix('\r').unwrap_or(password);
            backend.url =
                with_password(&backend.url, password).map_err(|m| error("password_file", m))?;
        }
    }
    if let Some(telemetry) = config.telemetry.as_mut() {
        let error = |key: &str, message: String| ConfigError {
            file: source_name.to_string(),
            line: text.find("[telemetry]").map_or(0, |o| line_of(text, o)),
            key: format!("telemetry.{key}"),
            message,
        };
        telemetry.otlp_endpoint = expand_variables(&telemetry.otlp_endpoint, &env)
            .map_err(|m| error("otlp_endpoint", m))?;
        for (name, value) in telemetry.headers.iter_mut() {
            *value =
                expand_variables(value, &env).map_err(|m| error(&format!("headers.{name}"), m))?;
        }
    }
    let loaded = Loaded {
        config,
        base_dir,
        source_name: source_name.to_string(),
    };
    check(&loaded, text)?;
    Ok(loaded)
}

/// `url` with `password` (percent-encoded) in its user part. Errors never
/// show the URL, which may hold other secrets.
fn with_password(url: &str, password: &str) -> std::result::Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("the URL has no `scheme://` to put a password after".into());
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (user, host) = match authority.rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => {
            return Err("the URL already holds a password; give it there or in \
                        `password_file`, not both"
                .into());
        }
        Some((user, host)) => (user, host),
        None => ("", authority),
    };
    let mut encoded = String::with_capacity(password.len());
    for byte in password.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(format!("{scheme}://{user}:{encoded}@{host}{tail}"))
}

/// `text` with every `${VAR}` replaced by the environment variable `VAR`.
/// Errors never show the text, which may hold a secret already expanded.
fn expand_variables(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("`${` without a closing `}`".into());
        };
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{name}}}` is not a variable name (letters, digits and `_`)"
            ));
        }
        let value = env(name).ok_or_else(|| {
            format!("the environment variable `{name}` (in `${{{name}}}`) is not set")
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line of `key = ` inside the n-th `[[routes]]` table, for keys
/// that carry no span of their own.
fn route_line(text: &str, index: usize, key: &str) -> usize {
    let mut seen = None;
    for (number, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("[[routes]]") {
            seen = Some(seen.map_or(0, |n| n + 1));
        } else if seen == Some(index)
            && trimmed
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return number + 1;
        }
    }
    0
}

fn check(loaded: &Loaded, text: &str) -> Result<()> {
    let config = &loaded.config;
    let error = |line: usize, key: String, message: String| ConfigError {
        file: loaded.source_name.clone(),
        line,
        key,
        message,
    };
    if let Some(telemetry) = &config.telemetry {
        let endpoint = &telemetry.otlp_endpoint;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(error(
                text.find("otlp_endpoint").map_or(0, |o| line_of(text, o)),
                "telemetry.otlp_endpoint".into(),
                format!(
                    "`{endpoint}` is not an http:// or https:// URL (OTLP over HTTP, \
                     e.g. http://localhost:4318)"
                ),
            )
            .into());
        }
    }
    for (name, backend) in &config.backends {
        if !backend.url.contains("://") {
            let line = text.find(&backend.url).map_or(0, |o| line_of(text, o));
            return Err(error(
                line,
                format!("backends.{name}.url"),
                format!(
                    "`{}` is not a URL (expected e.g. sqlite://sluice.db or memory://)",
                    crate::backend::redact(&backend.url)
                ),
            )
            .into());
        }
    }
    for (name, plugin) in &config.plugins {
        let zero = [
            ("timeout_ms", plugin.timeout_ms == 0),
            ("memory_limit_mb", plugin.memory_limit_mb == 0),
            ("max_outputs", plugin.max_outputs == 0),
            ("max_output_mb", plugin.max_output_mb == 0),
        ];
        if let Some((key, _)) = zero.iter().find(|(_, is_zero)| *is_zero) {
            return Err(error(
                0,
                format!("plugins.{name}.{key}"),
                "must be greater than zero".into(),
            )
            .into());
        }
        for topic in &plugin.publish_to {
            pattern::validate(topic)
                .map_err(|m| error(0, format!("plugins.{name}.publish_to"), m))?;
        }
        if let Some(shadow) = &plugin.shadow
            && !(0.0..=1.0).contains(&shadow.sample)
        {
            return Err(error(
                text.find("sample").map_or(0, |o| line_of(text, o)),
                format!("plugins.{name}.shadow.sample"),
                format!("{} is not a share of messages within 0..=1", shadow.sample),
            )
            .into());
        }
    }
    if let Some(admin) = &config.admin {
        let line = text.find("[admin]").map_or(0, |o| line_of(text, o));
        let address: std::net::SocketAddr = admin.listen.parse().map_err(|_| {
            error(
                line,
                "admin.listen".into(),
                format!("`{}` is not an IP address and port", admin.listen),
            )
        })?;
        if !address.ip().is_loopback() && admin.token.as_deref().unwrap_or("").is_empty() {
            return Err(error(
                line,
                "admin.token".into(),
                format!(
                    "required when the admin API listens on {address}, which is not loopback \
                     (or set SLUICE_ADMIN_TOKEN)"
                ),
            )
            .into());
        }
    }
    let mut names = std::collections::HashSet::new();
    for (index, route) in config.routes.iter().enumerate() {
        let key = |field: &str| format!("routes[{index}].{field} (route `{}`)", route.name);
        if !names.insert(route.name.as_str()) {
            return Err(error(
                route_line(text, index, "name"),
                key("name"),
                "another route has the same name".into(),
            )
            .into());
        }
        if route.topics.is_empty() {
            return Err(error(
                route_line(text, index, "topics"),
                key("topics"),
                "a route needs at least one topic".into(),
            )
            .into());
        }
        for topic in &route.topics {
            pattern::validate(topic.get_ref())
                .map_err(|m| error(line_of(text, topic.span().start), key("topics"), m))?;
        }
        if !config.plugins.contains_key(route.plugin.get_ref()) {
            return Err(error(
                line_of(text, route.plugin.span().start),
                key("plugin"),
                format!(
                    "no plugin named `{}` (defined: {})",
                    route.plugin.get_ref(),
                    list(config.plugins.keys())
                ),
            )
            .into());
        }
        for (field, backend) in [
            ("backend", &route.backend),
            ("output_backend", &route.output_backend),
            ("dead_letter_backend", &route.dead_letter_backend),
        ] {
            if let Some(name) = backend
                && !config.backends.contains_key(name.get_ref())
            {
                return Err(error(
                    line_of(text, name.span().start),
                    key(field),
                    format!(
                        "no backend named `{}` (defined: {})",
                        name.get_ref(),
                        list(config.backends.keys())
                    ),
                )
                .into());
            }
        }
        if route.backend.is_none() && config.backends.len() != 1 {
            return Err(error(
                route_line(text, index, "name"),
                key("backend"),
                format!(
                    "required when the config has {} backends",
                    config.backends.len()
                ),
            )
            .into());
        }
        let redrive = route.redrive_topic();
        if route.redrive && (pattern::validate(&redrive).is_err() || pattern::is_pattern(&redrive))
        {
            return Err(error(
                route_line(text, index, "redrive"),
                key("redrive"),
                format!(
                    "the route's name cannot name a topic: its redrive topic would be \
                     `{redrive}` (use letters, digits, `-` and `_` in the name)"
                ),
            )
            .into());
        }
        if let Some(topic) = &route.dead_letter_topic
            && (pattern::validate(topic.get_ref()).is_err() || pattern::is_pattern(topic.get_ref()))
        {
            return Err(error(
                line_of(text, topic.span().start),
                key("dead_letter_topic"),
                format!("`{}` is not a concrete topic", topic.get_ref()),
            )
            .into());
        }
        for (name, value) in [
            ("concurrency", route.concurrency),
            ("max_in_flight", route.max_in_flight),
            ("batch_size", route.batch_size),
            ("stalled_after_ms", route.stalled_after_ms as usize),
        ] {
            if value == 0 {
                return Err(error(
                    route_line(text, index, name),
                    key(name),
                    "must be at least 1".into(),
                )
                .into());
            }
        }
        if let Some(rate) = route.max_rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(error(
                route_line(text, index, "max_rate"),
                key("max_rate"),
                format!("{rate} is not a positive number of messages per second"),
            )
            .into());
        }
        if route.max_in_flight < route.concurrency {
            return Err(error(
                route_line(text, index, "max_in_flight"),
                key("max_in_flight"),
                format!(
                    "{} is less than concurrency ({}): some workers could never get a message",
                    route.max_in_flight, route.concurrency
                ),
            )
            .into());
        }
        let retry = &route.retry;
        if retry.max_attempts == 0 || retry.multiplier < 1.0 || !(0.0..=1.0).contains(&retry.jitter)
        {
            return Err(error(
                0,
                key("retry"),
                "max_attempts must be at least 1, multiplier at least 1.0 and jitter within 0..=1"
                    .into(),
            )
            .into());
        }
        let plugin_timeout = config.plugins[route.plugin.get_ref()].timeout_ms;
        if route.lease_ms <= plugin_timeout {
            return Err(error(
                route_line(text, index, "lease_ms"),
                key("lease_ms"),
                format!(
                    "{} ms must exceed the plugin's timeout_ms ({plugin_timeout} ms), or a slow call \
                     would be handed to a second consumer while it runs",
                    route.lease_ms
                ),
            )
            .into());
        }
    }
    Ok(())
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[backends.main]
url = "sqlite://demo.db"

[plugins.upper]
path = "upper.wasm"

[[routes]]
name = "upper"
topics = ["orders.*"]
plugin = "upper"
"#;

    fn parse_with(text: &str, env: &[(&str, &str)]) -> Result<Loaded> {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse(text, "test.toml", PathBuf::from("/etc/sluice"), |k| {
            env.get(k).cloned()
        })
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let loaded = parse_with(GOOD, &[]).unwrap();
        let route = &loaded.config.routes[0];
        assert_eq!(route.group(), "upper");
        assert_eq!(route.dead_letter_topic(), "upper.dead-letter");
        assert_eq!(loaded.source_backend(route), "main");
        let (path, settings) = loaded.plugin_settings("upper").unwrap();
        assert_eq!(path, PathBuf::from("/etc/sluice/upper.wasm"));
        assert_eq!(settings.timeout, Duration::from_secs(1));
    }

    #[test]
    fn environment_overrides_backend_url() {
        let all = parse_with(GOOD, &[("SLUICE_BACKEND_URL", "memory://")]).unwrap();
        assert_eq!(all.config.backends["main"].url, "memory://");
        let one = parse_with(
            GOOD,
            &[
                ("SLUICE_BACKEND_URL", "memory://"),
                ("SLUICE_BACKEND_MAIN_URL", "sqlite://x.db"),
            ],
        )
        .unwrap();
        assert_eq!(one.config.backends["main"].url, "sqlite://x.db");
    }

    #[test]
    fn a_backend_url_takes_variables_from_the_environment() {
        let text = GOOD.replace(
            "url = \"sqlite://demo.db\"",
            "url = \"redis://app:${REDIS_PASSWORD}@cache:6379/${DB}\"",
        );
        let loaded = parse_with(&text, &[("REDIS_PASSWORD", "s3cr/t"), ("DB", "2")]).unwrap();
        assert_eq!(
            loaded.config.backends["main"].url,
            "redis://app:s3cr/t@cache:6379/2"
        );
        let err = format!("{:#}", parse_with(&text, &[("DB", "2")]).unwrap_err());
        assert!(err.contains("backends.main.url"), "{err}");
        assert!(err.contains("`REDIS_PASSWORD`"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        let broken = GOOD.replace("sqlite://demo.db", "redis://${OOPS@cache");
        let err = format!("{:#}", parse_with(&broken, &[]).unwrap_err());
        assert!(err.contains("without a closing"), "{err}");
    }

    #[test]
    fn a_backend_url_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("url"), "postgres://app:pw@db/test\n").unwrap();
        let text = GOOD.replace("url = \"sqlite://demo.db\"", "url_file = \"url\"");
        let parse_in = |text: &str| parse(text, "test.toml", dir.path().to_path_buf(), |_| None);
        let loaded = parse_in(&text).unwrap();
        assert_eq!(
            loaded.config.backends["main"].url,
            "postgres://app:pw@db/test"
        );

        let both = GOOD.replace(
            "url = \"sqlite://demo.db\"",
            "url = \"memory://\"\nurl_file = \"url\"",
        );
        let err = format!("{:#}", parse_in(&both).unwrap_err());
        assert!(err.contains("backends.main.url_file"), "{err}");
        assert!(err.contains("not both"), "{err}");
        let missing = GOOD.replace("url = \"sqlite://demo.db\"", "url_file = \"nowhere\"");
        let err = format!("{:#}", parse_in(&missing).unwrap_err());
        assert!(
            err.contains("`backends.main.url_file`: cannot read"),
            "{err}"
        );
        let neither = GOOD.replace("url = \"sqlite://demo.db\"", "");
        let err = format!("{:#}", parse_in(&neither).unwrap_err());
        assert!(err.contains("`backends.main.url`: missing"), "{err}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = GOOD.replace("plugin = \"upper\"", "plugin = \"upper\"\nconcurency = 4");
        let err = format!("{:#}", parse_with(&text, &[]).unwrap_err());
        assert!(err.contains("concurency"), "{err}");
        assert!(err.contains("line 12"), "{err}");
    }

    #[test]
    fn wrong_type_is_named_with_its_line() {
        let text = GOOD.replace("[plugins.upper]", "[plugins.upper]\ntimeout_ms = \"soon\"");
        let err = format!("{:#}", parse_with(&text, &[]).unwrap_err());
        assert!(err.contains("timeout_ms"), "{err}");
        assert!(err.contains("line 6"), "{err}");
    }

    #[test]
    fn missing_plugin_is_named_with_its_line() {
        let text = GOOD.replace("plugin = \"upper\"", "plugin = \"lower\"");
        let err = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("routes[0].plugin"), "{err}");
        assert!(err.contains("line 11"), "{err}");
        assert!(err.contains("no plugin named `lower`"), "{err}");
    }

    #[test]
    fn bad_pattern_is_refused() {
        let text = GOOD.replace("orders.*", "orders.>.x");
        let err = parse_with(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("routes[0].topics"), "{err}");
    }

    #[test]
    fn max_rate_must_be_a_positive_rate() {
        for bad in ["0", "-5", "nan", "inf"] {
            let text = GOOD.replace(
                "plugin = \"upper\"\n",
                &format!("plugin = \"upper\"\nmax_rate = {bad}\n"),
            );
            let err = parse_with(&text, &[]).unwrap_err().to_string();
            assert!(err.contains("routes[0].max_rate"), "{bad}: {err}");
        }
        let text = GOOD.replace(
            "plugin = \"upper\"\n",
            "plugin = \"upper\"\nmax_rate = 2.5\n",
        );
        assert_eq!(
            parse_with(&text, &[]).unwrap().config.routes[0].max_rate,
            Some(2.5)
        );
    }

    #[test]
    fn telemetry_takes_its_endpoint_and_headers_from_the_environment() {
        let text = format!(
            "{GOOD}\n[telemetry]\notlp_endpoint = \"${{OTLP}}\"\nheaders = {{ key = \"${{KEY}}\" }}\n"
        );
        let loaded = parse_with(&text, &[("OTLP", "http://collector:4318"), ("KEY", "k")]).unwrap();
        let telemetry = loaded.config.telemetry.unwrap();
        assert_eq!(telemetry.otlp_endpoint, "http://collector:4318");
        assert_eq!(telemetry.headers["key"], "k");
        assert_eq!(telemetry.service_name, "sluice");
        let err = parse_with(&text, &[("OTLP", "collector:4317"), ("KEY", "k")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
        let err = parse_with(&text, &[("OTLP", "http://c")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("telemetry.headers.key"), "{err}");
        assert!(err.contains("`KEY`"), "{err}");
    }

    #[test]
    fn a_password_file_fills_the_urls_user_part() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "p@ss/wörd:1\n").unwrap();
        let text = |url: &str| {
            format!(
                "[backends.main]\nurl = \"{url}\"\npassword_file = \"pw\"\n\n\
                 [plugins.upper]\npath = \"upper.wasm\"\n\n\
                 [[routes]]\nname = \"upper\"\ntopics = [\"t\"]\nplugin = \"upper\"\n"
            )
        };
        let load = |url: &str| {
            parse(&text(url), "t.toml", dir.path().to_path_buf(), |_| None)
                .map(|l| l.config.backends["main"].url.clone())
        };
        assert_eq!(
            load("redis://app@cache:6379/0?prefix=x").unwrap(),
            "redis://app:p%40ss%2Fw%C3%B6rd%3A1@cache:6379/0?prefix=x"
        );
        assert_eq!(
            load("redis://cache").unwrap(),
            "redis://:p%40ss%2Fw%C3%B6rd%3A1@cache"
        );
        assert_eq!(
            crate::backend::redact(&load("postgres://app@db/test").unwrap()),
            "postgres://app:***@db/test"
        );
        let err = load("redis://app:inline@cache").unwrap_err().to_string();
        assert!(err.contains("backends.main.password_file"), "{err}");
        assert!(err.contains("not both"), "{err}");
        assert!(!err.contains("inline"), "{err}");
        std::fs::remove_file(dir.path().join("pw")).unwrap();
        let err = load("redis://app@cache").unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}
