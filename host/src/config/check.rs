//! The checks serde cannot make: references between tables, patterns,
//! values that must be positive, a lease longer than the plugin's timeout,
//! backends this build can open. Each error names the key and where its
//! value came from.

use std::ops::RangeInclusive;

use anyhow::Result;

use super::Config;
use super::error::Sources;
use crate::backend::{self, StartFrom, pattern};
use crate::runtime::Origin;

pub(super) fn check(config: &Config, sources: &Sources<'_>) -> Result<()> {
    let error = |key: String, message: String| sources.error(&key, message);
    if let Some(telemetry) = &config.telemetry {
        let endpoint = &telemetry.otlp_endpoint;
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(error(
                "telemetry.otlp_endpoint".into(),
                format!(
                    "`{endpoint}` is not an http:// or https:// URL (OTLP over HTTP, \
                     e.g. http://localhost:4318)"
                ),
            )
            .into());
        }
    }
    for (name, listed) in &config.backends {
        let key = format!("backends.{name}.url");
        let Some((scheme, _)) = listed.url.split_once("://") else {
            return Err(error(
                key,
                format!(
                    "`{}` is not a URL (expected e.g. sqlite://sluice.db or memory://)",
                    backend::redact(&listed.url)
                ),
            )
            .into());
        };
        let supported = backend::supported_schemes();
        if !supported.contains(&scheme) {
            return Err(error(key, backend::unsupported_scheme(scheme, &supported)).into());
        }
        backend::parse_url(&listed.url).map_err(|e| error(key, format!("{e:#}")))?;
    }
    if let Some(admin) = &config.admin {
        within(admin.max_upload_mb, 1..=MAX_MIB, "MiB")
            .map_err(|m| error("admin.max_upload_mb".into(), m))?;
    }
    within(
        config.runtime.max_message_bytes as u64,
        1..=MAX_MIB << 20,
        "bytes",
    )
    .map_err(|m| error("runtime.max_message_bytes".into(), m))?;
    for (name, plugin) in &config.plugins {
        for (key, value, range, unit) in [
            ("timeout_ms", plugin.timeout_ms, 1..=u64::MAX, "ms"),
            (
                "memory_limit_mb",
                plugin.memory_limit_mb,
                1..=MAX_MIB,
                "MiB",
            ),
            ("max_outputs", plugin.max_outputs as u64, 1..=u64::MAX, ""),
            (
                "max_outbound_requests",
                plugin.max_outbound_requests as u64,
                1..=1024,
                "",
            ),
            (
                "max_output_mb",
                plugin.max_output_mb as u64,
                1..=MAX_MIB,
                "MiB",
            ),
        ] {
            within(value, range, unit).map_err(|m| error(format!("plugins.{name}.{key}"), m))?;
        }
        for (key, topics) in [
            ("publish_to", &plugin.publish_to),
            ("request_to", &plugin.request_to),
        ] {
            for topic in topics {
                pattern::validate(topic).map_err(|m| error(format!("plugins.{name}.{key}"), m))?;
            }
        }
        for origin in &plugin.allowed_outbound_hosts {
            origin
                .parse::<Origin>()
                .map_err(|m| error(format!("plugins.{name}.allowed_outbound_hosts"), m))?;
        }
        if let Some(shadow) = &plugin.shadow
            && !(0.0..=1.0).contains(&shadow.sample)
        {
            return Err(error(
                format!("plugins.{name}.shadow.sample"),
                format!("{} is not a share of messages within 0..=1", shadow.sample),
            )
            .into());
        }
    }
    if let Some(admin) = &config.admin {
        let address: std::net::SocketAddr = admin.listen.parse().map_err(|_| {
            error(
                "admin.listen".into(),
                format!("`{}` is not an IP address and port", admin.listen),
            )
        })?;
        if !address.ip().is_loopback() && admin.token.as_deref().unwrap_or("").is_empty() {
            return Err(error(
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
        let fail = |field: &str, message: String| -> anyhow::Error {
            let key = format!("routes[{index}].{field}");
            let within = format!("route `{}`", route.name);
            sources.error_within(&key, Some(within), message).into()
        };
        if !names.insert(route.name.as_str()) {
            return Err(fail("name", "another route has the same name".into()));
        }
        if route.topics.is_empty() {
            return Err(fail("topics", "a route needs at least one topic".into()));
        }
        for topic in &route.topics {
            pattern::validate(topic.get_ref()).map_err(|m| fail("topics", m))?;
        }
        match (&route.plugin, route.forward) {
            (None, false) => {
                return Err(fail(
                    "plugin",
                    "a route needs a plugin, or `forward = true` to forward its messages as \
                     they are"
                        .into(),
                ));
            }
            (Some(_), true) => {
                return Err(fail(
                    "forward",
                    "a forwarding route has no plugin: remove `plugin` or `forward`".into(),
                ));
            }
            (Some(plugin), false) if !config.plugins.contains_key(plugin.get_ref()) => {
                return Err(fail(
                    "plugin",
                    format!(
                        "no plugin named `{}` (defined: {})",
                        plugin.get_ref(),
                        list(config.plugins.keys())
                    ),
                ));
            }
            _ => {}
        }
        if !route.rename.is_empty() && !route.forward {
            return Err(fail(
                "rename",
                "only a forwarding route (`forward = true`) renames topics; a plugin names its \
                 outputs' topics itself"
                    .into(),
            ));
        }
        for (i, rule) in route.rename.iter().enumerate() {
            rule.validate()
                .map_err(|m| fail(&format!("rename[{i}]"), m))?;
        }
        if route.output_backend.is_some() && !route.output_backends.is_empty() {
            return Err(fail(
                "output_backends",
                "give `output_backend` or `output_backends`, not both".into(),
            ));
        }
        let mut outputs = std::collections::BTreeSet::new();
        if let Some(name) = route
            .output_backends
            .iter()
            .find(|name| !outputs.insert(name.get_ref()))
        {
            return Err(fail(
                "output_backends",
                format!("`{}` is listed twice", name.get_ref()),
            ));
        }
        let named = [
            ("backend", route.backend.as_ref()),
            ("output_backend", route.output_backend.as_ref()),
            ("dead_letter_backend", route.dead_letter_backend.as_ref()),
        ]
        .into_iter()
        .chain(
            route
                .output_backends
                .iter()
                .map(|name| ("output_backends", Some(name))),
        );
        for (field, backend) in named {
            if let Some(name) = backend
                && !config.backends.contains_key(name.get_ref())
            {
                return Err(fail(
                    field,
                    format!(
                        "no backend named `{}` (defined: {})",
                        name.get_ref(),
                        list(config.backends.keys())
                    ),
                ));
            }
        }
        if route.backend.is_none() && config.backends.len() != 1 {
            return Err(fail(
                "backend",
                format!(
                    "required when the config has {} backends",
                    config.backends.len()
                ),
            ));
        }
        let source = match &route.backend {
            Some(name) => name.get_ref().as_str(),
            None => config.backends.keys().next().map_or("", String::as_str),
        };
        let url = &config.backends[source].url;
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        if let Some(caps) = backend::capabilities_of(url) {
            if route.ordered && !keeps_order(&caps) {
                return Err(fail(
                    "ordered",
                    format!(
                        "backend `{source}` ({scheme}://) does not keep each key's messages in \
                         order{}; these do: {}{}",
                        if caps.ordered_per_key {
                            " across the consumers of a group (it is at-most-once: a group's \
                             members split a key between them, and what one held is lost \
                             when it goes)"
                        } else {
                            ""
                        },
                        schemes(backend::schemes_with(keeps_order)),
                        if backend::capabilities_of("jetstream://localhost?shards=1")
                            .is_some_and(|caps| keeps_order(&caps))
                        {
                            ", and jetstream:// with shards=N"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if route.start == Some(StartFrom::Earliest) && !caps.history {
                return Err(fail(
                    "start",
                    format!(
                        "`earliest` asks for messages published before the group existed, and \
                         backend `{source}` ({scheme}://) keeps none; these do: {}",
                        schemes(backend::schemes_with(|c| c.history))
                    ),
                ));
            }
        }
        let redrive = route.redrive_topic();
        if route.redrive && (pattern::validate(&redrive).is_err() || pattern::is_pattern(&redrive))
        {
            return Err(fail(
                "redrive",
                format!(
                    "the route's name cannot name a topic: its redrive topic would be \
                     `{redrive}` (use letters, digits, `-` and `_` in the name)"
                ),
            ));
        }
        if let Some(topic) = &route.dead_letter_topic
            && (pattern::validate(topic.get_ref()).is_err() || pattern::is_pattern(topic.get_ref()))
        {
            return Err(fail(
                "dead_letter_topic",
                format!("`{}` is not a concrete topic", topic.get_ref()),
            ));
        }
        for (name, value) in [
            ("concurrency", route.concurrency as u64),
            ("max_in_flight", route.max_in_flight as u64),
            ("batch_size", route.batch_size as u64),
            ("stalled_after_ms", route.stalled_after_ms),
            ("max_hops", u64::from(route.max_hops)),
        ] {
            within(value, 1..=u64::MAX, "").map_err(|m| fail(name, m))?;
        }
        if let Some(rate) = route.max_rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(fail(
                "max_rate",
                format!("{rate} is not a positive number of messages per second"),
            ));
        }
        if route.max_in_flight < route.concurrency {
            return Err(fail(
                "max_in_flight",
                format!(
                    "{} is less than concurrency ({}): some workers could never get a message",
                    route.max_in_flight, route.concurrency
                ),
            ));
        }
        let retry = &route.retry;
        if retry.max_attempts == 0 {
            return Err(fail("retry.max_attempts", "must be at least 1".into()));
        }
        if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
            return Err(fail(
                "retry.multiplier",
                format!("{} is not a factor of at least 1.0", retry.multiplier),
            ));
        }
        if retry.initial_backoff_ms > retry.max_backoff_ms {
            return Err(fail(
                "retry.initial_backoff_ms",
                format!(
                    "{} ms is longer than retry.max_backoff_ms ({} ms)",
                    retry.initial_backoff_ms, retry.max_backoff_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            return Err(fail("retry.jitter", "must be within 0..=1".into()));
        }
        let plugin_timeout = route
            .plugin_name()
            .map_or(0, |plugin| config.plugins[plugin].timeout_ms);
        if route.lease_ms <= plugin_timeout {
            return Err(fail(
                "lease_ms",
                format!(
                    "{} ms must exceed the plugin's timeout_ms ({plugin_timeout} ms), or a slow call \
                     would be handed to a second consumer while it runs",
                    route.lease_ms
                ),
            ));
        }
    }
    Ok(())
}

/// The most MiB a size may name: 4 GiB, the most a plugin's 32-bit memory
/// can hold, and far below where a size in bytes would overflow.
const MAX_MIB: u64 = 4096;

/// Whether `ordered = true` can hold on a backend: each key in publish
/// order, and no key split among a group's members and lost with one.
fn keeps_order(caps: &backend::Capabilities) -> bool {
    caps.ordered_per_key && caps.at_least_once
}

/// Whether a whole-number setting lies in `range`, with the reason if not.
fn within(value: u64, range: RangeInclusive<u64>, unit: &str) -> Result<(), String> {
    if range.contains(&value) {
        return Ok(());
    }
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    Err(if *range.end() == u64::MAX {
        format!("must be at least {}", range.start())
    } else {
        format!(
            "{value}{unit} is outside {}..={}{unit}",
            range.start(),
            range.end()
        )
    })
}

fn schemes(schemes: Vec<&str>) -> String {
    schemes
        .iter()
        .map(|scheme| format!("{scheme}://"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
