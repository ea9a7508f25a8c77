//! The NATS backends: NATS core (`nats://`), fast and at-most-once, and
//! JetStream (`jetstream://`), persistent and at-least-once. Both use one
//! `async-nats` connection per backend handle, which reconnects (and
//! resubscribes) by itself after a server restart.
//!
//! Sluice topics are NATS subjects: the same dot-separated tokens, and the
//! `*` and `>` wildcards are matched by the server. A message travels as a
//! NATS message: the payload is the body, the id, key and timestamp ride in
//! headers (see [`headers`]), user headers are NATS headers as they are.
//!
//! | | NATS core | JetStream |
//! |---|---|---|
//! | delivery | at-most-once: what a consumer holds when it goes away, and what the server drops for a slow consumer, is lost | at-least-once: ack explicit, unacked deliveries return after the lease (AckWait) |
//! | groups | a queue group per consumer group (competing members, every group gets every message) | a durable pull consumer per group and topic |
//! | patterns | native (`*`, `>`) | native, as consumer filter subjects |
//! | ordering | per publishing connection, for one member; a nack with delay lets later messages pass | none promised: a nack lets later messages pass, members share the consumer |
//! | persistence | none, no history: a group gets what is published while it is subscribed | file (or memory) streams; a new group starts at the first message, or only new ones |
//! | nack with delay | in-process timer, lost if the process stops | native (`-NAK` with delay), survives restarts |
//! | lease | none (nothing to recover) | AckWait = the route's lease; in-progress acks keep a held delivery alive |
//! | what the host adds | attempts counting for in-process redeliveries; dead-lettering | dead-lettering (publish then ack; `+TERM` is never needed) and the retry policy, counting attempts from the server's delivery count |
//!
//! Request-reply (NATS core only): a request's reply subject is put on the
//! delivered message as the header `sluice-reply-to`; a handler answers by
//! publishing an output to that topic (its plugin needs `_INBOX.>` in
//! `publish_to`). See [`core`].

pub mod core;
pub mod headers;
pub mod jetstream;
mod provision;
mod pull;
pub(crate) mod settings;
mod window;

use std::time::Duration;

use crate::backend::url::percent_decode;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use super::redact;

/// Connection settings shared by both schemes, parsed from the URL.
#[derive(Debug, Clone)]
pub(crate) struct ServerUrl {
    /// `nats://[user:pass@]host:port` per server, as `async-nats` takes them.
    servers: Vec<String>,
    /// The URL with any password hidden, for messages and logs.
    shown: String,
    name: Option<String>,
    tls: bool,
    /// How long a publish (its flush or acknowledgement) may take.
    pub timeout: Duration,
}

/// Splits `scheme://servers?query` into the servers and the query pairs;
/// the caller takes the pairs it knows and passes the rest to
/// [`ServerUrl::take_common`].
pub(crate) fn split_url(url: &str, scheme: &str) -> Result<(ServerUrl, Vec<(String, String)>)> {
    let shown = redact(url);
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix("://"))
        .with_context(|| format!("a {scheme} URL starts with {scheme}://, not `{shown}`"))?;
    let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
    let hosts = hosts.trim_end_matches('/');
    if hosts.is_empty() {
        bail!("{scheme} URL `{shown}` names no server (expected e.g. {scheme}://127.0.0.1:4222)");
    }
    let servers = hosts
        .split(',')
        .map(|h| format!("nats://{}", h.trim()))
        .collect();
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).with_context(|| {
            format!("{scheme} URL: parameter `{key}` is not valid percent-encoding")
        })?;
        pairs.push((key.to_string(), value));
    }
    Ok((
        ServerUrl {
            servers,
            shown,
            name: None,
            tls: false,
            timeout: Duration::from_secs(10),
        },
        pairs,
    ))
}

impl ServerUrl {
    /// Takes the parameters both schemes know; returns whether `key` was one.
    pub(crate) fn take_common(&mut self, scheme: &str, key: &str, value: &str) -> Result<bool> {
        match key {
            "name" => self.name = Some(value.to_string()),
            "tls" => self.tls = parse_bool(scheme, key, value)?,
            "timeout_ms" => self.timeout = Duration::from_millis(parse_num(scheme, key, value)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Connects, logging connection events (without credentials).
    pub(crate) async fn connect(&self, subscription_capacity: usize) -> Result<async_nats::Client> {
        let shown = self.shown.clone();
        let mut options = async_nats::ConnectOptions::new()
            .name(self.name.clone().unwrap_or_else(|| "sluice".to_string()))
            .subscription_capacity(subscription_capacity)
            .request_timeout(Some(self.timeout))
            .event_callback(move |event| {
                let shown = shown.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(url = %shown, "NATS connected")
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(url = %shown, "NATS disconnected; reconnecting")
                        }
                        other => tracing::warn!(url = %shown, "NATS: {other}"),
                    }
                }
            });
        if self.tls {
            options = options.require_tls(true);
        }
        let addrs: Vec<async_nats::ServerAddr> = self
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("NATS URL `{}` has a malformed server address", self.shown))?;
        // A few tries, so a host starting while the server restarts waits
        // for it; a wrong address still fails within about two seconds.
        let mut tries = 0;
        loop {
            match options.clone().connect(addrs.clone()).await {
                Ok(client) => return Ok(client),
                Err(e) if tries < 8 && e.kind() == async_nats::ConnectErrorKind::Io => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot connect to NATS at `{}`", self.shown));
                }
            }
        }
    }

    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }
}

pub(crate) fn parse_num<T: std::str::FromStr>(scheme: &str, key: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| anyhow::anyhow!("{scheme} URL: {key} `{value}` is not a valid number"))
}

pub(crate) fn parse_bool(scheme: &str, key: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" | "" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => bail!("{scheme} URL: {key} must be true or false, not `{value}`"),
    }
}

/// A name NATS accepts as a queue group, consumer or stream name, derived
/// from `readable` and unique for `identity`: the readable part is cut to
/// letters, digits, `-` and `_` (so `a.b` and `a_b` would collide), and a
/// hash of the full identity tells them apart.
pub(crate) fn nats_name(readable: &str, identity: &str) -> String {
    let clean: String = readable
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let digest = Sha256::digest(identity.as_bytes());
    format!("{clean}_{}", hex::encode(&digest[..8]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_and_distinct() {
        let a = nats_name("orders.eu", "orders.eu[x]");
        let b = nats_name("orders_eu", "orders_eu[x]");
        assert_ne!(a, b);
        assert!(a.starts_with("orders_eu_"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        );
    }

    #[test]
    fn urls_split_into_servers_and_parameters() {
        let (url, pairs) = split_url(
            "nats://u:secret@a:4222,b:4223?name=x&subjects=o.%3E",
            "nats",
        )
        .unwrap();
        assert_eq!(url.servers, ["nats://u:secret@a:4222", "nats://b:4223"]);
        assert!(!url.shown.contains("secret"));
        assert_eq!(pairs[1], ("subjects".to_string(), "o.>".to_string()));
        assert!(split_url("nats://", "nats").is_err());
    }
}
