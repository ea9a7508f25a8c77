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
//! Request-reply: besides Sluice's own (`crate::request`, alike on every
//! backend), a NATS core request from any NATS client has its reply
//! subject put on the delivered message as the header `sluice-reply-to`; a
//! handler answers by publishing an output to that topic (its plugin needs
//! `_INBOX.>` in `publish_to`). See [`core`].
//!
//! Both schemes take `tls=true` (require TLS), `ca`, `cert` and `key` (PEM
//! files), and one of `creds` (a `.creds` file), `nkey` (a file holding a
//! user seed) or `token`; a user and password go before the host. Secrets
//! on disk stay files the URL names, so the URL itself can be logged
//! (redacted) and kept in a config file.

pub mod core;
pub mod headers;
pub mod jetstream;
mod leases;
mod provision;
mod pull;
pub(crate) mod settings;
mod shards;
mod turns;
mod window;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

use crate::backend::url::{BackendUrl, percent_decode};

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
    /// TLS files and credentials, see [`Access`].
    access: Access,
}

/// How the client proves who it is and checks the server: `ca` (PEM file
/// of the CA that signed the server's certificate; also turns TLS on),
/// `cert` and `key` (PEM files of a client certificate, for a server with
/// `verify: true`), and at most one way to log in: a user and password in
/// the address (`nats://USER:PASSWORD@HOST`), `creds` (a `.creds` file:
/// user JWT and seed), `nkey` (a file holding a user nkey seed) or `token`.
#[derive(Debug, Clone, Default)]
struct Access {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    creds: Option<PathBuf>,
    nkey: Option<PathBuf>,
    token: Option<String>,
}

/// The parameters both schemes take.
pub(crate) const COMMON_PARAMS: &[&str] = &[
    "name",
    "tls",
    "timeout_ms",
    "ca",
    "cert",
    "key",
    "creds",
    "nkey",
    "token",
];

/// Splits `scheme://servers?query` into the servers and the query
/// parameters; the caller takes those both schemes know with
/// [`ServerUrl::take_common`], then its own.
pub(crate) fn split_url(url: &str, scheme: &str) -> Result<(ServerUrl, BackendUrl)> {
    let params = BackendUrl::split(url, scheme)?;
    let hosts = params.address.trim_end_matches('/');
    if hosts.is_empty() {
        return Err(params.error(format!(
            "names no server (expected e.g. {scheme}://127.0.0.1:4222)"
        )));
    }
    let server = ServerUrl {
        servers: hosts
            .split(',')
            .map(|h| format!("nats://{}", h.trim()))
            .collect(),
        shown: params.redacted.clone(),
        name: None,
        tls: false,
        timeout: Duration::from_secs(10),
        access: Access::default(),
    };
    Ok((server, params))
}

impl ServerUrl {
    /// Takes the parameters both schemes know.
    pub(crate) fn take_common(&mut self, url: &mut BackendUrl) -> Result<()> {
        self.name = url.take("name", "a connection name")?;
        self.tls = url.take_bool("tls")?.unwrap_or(false);
        if let Some(timeout) = url.take_ms("timeout_ms")? {
            self.timeout = timeout;
        }
        self.access = Access {
            ca: url.take_path("ca")?,
            cert: url.take_path("cert")?,
            key: url.take_path("key")?,
            creds: url.take_path("creds")?,
            nkey: url.take_path("nkey")?,
            token: url.take_with("token", |token| match token {
                "" => Err("is empty".into()),
                token => Ok(token.to_string()),
            })?,
        };
        Ok(())
    }

    /// TLS and credentials applied to `options`, reading the files the URL
    /// names; errors name the parameter and the file.
    async fn authenticate(
        &self,
        mut options: async_nats::ConnectOptions,
        addrs: &[async_nats::ServerAddr],
    ) -> Result<async_nats::ConnectOptions> {
        let access = &self.access;
        let scheme = self.shown.split("://").next().unwrap_or("nats");
        // The client library does not log in with a server address's user
        // and password by itself.
        let mut logins = Vec::new();
        for addr in addrs {
            if let Some(user) = addr.username() {
                let Some(password) = addr.password() else {
                    bail!(
                        "{scheme} URL: a user needs a password (USER:PASSWORD@HOST); a token goes in token="
                    );
                };
                let decoded = (percent_decode(user)?, percent_decode(password)?);
                if !logins.contains(&decoded) {
                    logins.push(decoded);
                }
            }
        }
        if logins.len() > 1 {
            bail!("{scheme} URL: every server must have the same user and password");
        }
        let ways = [
            !logins.is_empty(),
            access.creds.is_some(),
            access.nkey.is_some(),
            access.token.is_some(),
        ];
        if ways.iter().filter(|w| **w).count() > 1 {
            bail!("{scheme} URL: give at most one of a user and password, creds, nkey and token");
        }
        if let Some((user, password)) = logins.pop() {
            options = options.user_and_password(user, password);
        }
        if self.tls || access.ca.is_some() || access.cert.is_some() {
            options = options.require_tls(true);
        }
        if let Some(ca) = &access.ca {
            readable(scheme, "ca", ca)?;
            options = options.add_root_certificates(ca.clone());
        }
        match (&access.cert, &access.key) {
            (Some(cert), Some(key)) => {
                readable(scheme, "cert", cert)?;
                readable(scheme, "key", key)?;
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            (None, None) => {}
            _ => bail!("{scheme} URL: a client certificate needs both `cert` and `key`"),
        }
        if let Some(creds) = &access.creds {
            readable(scheme, "creds", creds)?;
            options = options.credentials_file(creds).await.with_context(|| {
                format!(
                    "{scheme} URL: creds file `{}` is not a NATS credentials file",
                    creds.display()
                )
            })?;
        }
        if let Some(nkey) = &access.nkey {
            let seed = std::fs::read_to_string(nkey).with_context(|| {
                format!(
                    "{scheme} URL: cannot read the nkey file `{}`",
                    nkey.display()
                )
            })?;
            let seed = seed.trim();
            if !seed.starts_with("SU") || seed.contains(char::is_whitespace) {
                bail!(
                    "{scheme} URL: nkey file `{}` does not hold a user nkey seed (one line starting SU)",
                    nkey.display()
                );
            }
            options = options.nkey(seed.to_string());
        }
        if let Some(token) = &access.token {
            options = options.token(token.clone());
        }
        Ok(options)
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
                        async_nats::Event::Closed => {
                            tracing::debug!(url = %shown, "NATS connection closed")
                        }
                        other => tracing::warn!(url = %shown, "NATS: {other}"),
                    }
                }
            });
        let addrs: Vec<async_nats::ServerAddr> = self
            .servers
            .iter()
            .map(|s| s.parse())
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("NATS URL `{}` has a malformed server address", self.shown))?;
        options = self.authenticate(options, &addrs).await?;
        // A server may ask for TLS whatever the URL says.
        crate::backend::choose_rustls_provider();
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
                    bail!(
                        "cannot connect to NATS at `{}`: {}",
                        self.shown,
                        crate::backend::cause_line(&e)
                    );
                }
            }
        }
    }

    pub(crate) fn shown(&self) -> &str {
        &self.shown
    }
}

/// Fails naming the parameter and the file unless it can be read (the
/// client library would report it later, without saying which).
fn readable(scheme: &str, key: &str, path: &std::path::Path) -> Result<()> {
    std::fs::File::open(path).map(drop).with_context(|| {
        format!(
            "{scheme} URL: cannot read the {key} file `{}`",
            path.display()
        )
    })
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
        let (server, mut params) = split_url(
            "nats://u:secret@a:4222,b:4223?name=x&subjects=o.%3E",
            "nats",
        )
        .unwrap();
        assert_eq!(server.servers, ["nats://u:secret@a:4222", "nats://b:4223"]);
        assert!(!server.shown.contains("secret"));
        assert_eq!(
            params
                .take::<String>("subjects", "subjects")
                .unwrap()
                .as_deref(),
            Some("o.>")
        );
        assert!(split_url("nats://", "nats").is_err());
        assert!(split_url("nats:///", "nats").is_err());
    }

    #[tokio::test]
    async fn tls_and_credential_parameters() {
        let (mut server, mut params) = split_url(
            "nats://h:4222?ca=/ca.pem&cert=/c.pem&key=/c.key&nkey=/u.nk&token=t%26k",
            "nats",
        )
        .unwrap();
        server.take_common(&mut params).unwrap();
        params.finish(COMMON_PARAMS).unwrap();
        assert_eq!(server.access.ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(server.access.token.as_deref(), Some("t&k"));
        let options = async_nats::ConnectOptions::new();
        let err = server
            .authenticate(options, &[])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("at most one of"), "{err}");
        for query in ["creds=", "token=", "tls=maybe"] {
            let (mut server, mut params) = split_url(&format!("nats://h?{query}"), "nats").unwrap();
            assert!(server.take_common(&mut params).is_err(), "{query}");
        }

        let (mut server, mut params) = split_url("nats://h:4222?cert=/c.pem", "nats").unwrap();
        server.take_common(&mut params).unwrap();
        let err = server
            .authenticate(async_nats::ConnectOptions::new(), &[])
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("both `cert` and `key`"), "{err}");
    }
}
