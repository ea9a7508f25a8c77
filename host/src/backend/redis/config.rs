//! Backend URLs: where the Redis server is, how to reach it (TLS with
//! `rediss://`), and the query parameters each Redis backend understands,
//! parsed with errors that name the parameter.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::backend::url::BackendUrl;

/// A backend URL split into what the `redis` crate connects to and our own
/// parameters.
pub type RedisUrl = BackendUrl;

/// Parses a URL of `scheme` (`redis` or `redis+pubsub`) or of its TLS form
/// (`rediss`, `rediss+pubsub`), taking the TLS parameters out.
pub fn open(url: &str, scheme: &str) -> Result<(RedisUrl, Tls)> {
    let tls_scheme = scheme.replacen("redis", "rediss", 1);
    let secure = url.starts_with(&format!("{tls_scheme}://"));
    let mut parsed = RedisUrl::parse(url, if secure { &tls_scheme } else { scheme })?;
    let tls = Tls::from_url(&mut parsed, secure)?;
    Ok((parsed, tls))
}

/// TLS of a `rediss://` URL. The server's certificate is checked against
/// `ca` (PEM), or the system's roots without it; `cert` and `key` (PEM
/// files) are the client's certificate for servers that ask for one
/// (`tls-auth-clients yes`).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    enabled: bool,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl Tls {
    pub const PARAMS: &[&str] = &["ca", "cert", "key"];

    fn from_url(url: &mut RedisUrl, secure: bool) -> Result<Self> {
        let tls = Tls {
            enabled: secure,
            ca: url.take_path("ca")?,
            cert: url.take_path("cert")?,
            key: url.take_path("key")?,
        };
        let given = [("ca", &tls.ca), ("cert", &tls.cert), ("key", &tls.key)];
        if let Some((name, _)) = given.iter().find(|(_, p)| p.is_some())
            && !secure
        {
            bail!(
                "backend URL `{}`: `{name}` is a TLS parameter; TLS needs the rediss:// scheme",
                url.redacted
            );
        }
        if tls.cert.is_some() != tls.key.is_some() {
            bail!(
                "backend URL `{}`: a client certificate needs both `cert` and `key`",
                url.redacted
            );
        }
        Ok(tls)
    }

    /// The files, read: what the `redis` crate takes.
    fn certificates(&self) -> Result<::redis::TlsCertificates> {
        let read = |name: &str, path: &PathBuf| {
            std::fs::read(path).with_context(|| {
                format!(
                    "cannot read the {name} file `{}` of the Redis URL",
                    path.display()
                )
            })
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some(::redis::ClientTlsConfig {
                client_cert: read("cert", cert)?,
                client_key: read("key", key)?,
            }),
            _ => None,
        };
        let root_cert = self.ca.as_ref().map(|ca| read("ca", ca)).transpose()?;
        Ok(::redis::TlsCertificates {
            client_tls,
            root_cert,
        })
    }
}

impl BackendUrl {
    /// `redis[s]://[user:password@]host[:port][/db]`, for `redis::Client`.
    pub fn client(&self, tls: &Tls) -> Result<::redis::Client> {
        let invalid = || format!("backend URL `{}` is not a valid Redis URL", self.redacted);
        if !tls.enabled {
            return ::redis::Client::open(format!("redis://{}", self.address).as_str())
                .with_context(invalid);
        }
        crate::backend::choose_rustls_provider();
        let info = ::redis::IntoConnectionInfo::into_connection_info(
            format!("rediss://{}", self.address).as_str(),
        )
        .with_context(invalid)?;
        ::redis::Client::build_with_tls(info, tls.certificates()?).with_context(|| {
            format!(
                "backend URL `{}`: the TLS files (ca, cert, key) are not valid PEM",
                self.redacted
            )
        })
    }
}

/// Settings of the Redis Streams backend.
#[derive(Debug, Clone)]
pub struct StreamsConfig {
    /// Prepended to every key Sluice creates (`prefix`, default `sluice:`).
    pub prefix: String,
    /// The longest one XREADGROUP blocks (`block_ms`, default 1000).
    pub block: Duration,
    /// Entries per stream per XREADGROUP at most (`count`, default 100).
    pub count: usize,
    /// How long an entry stays unacknowledged before another consumer may
    /// claim it (`claim_idle_ms`); by default the subscription's lease.
    pub claim_idle: Option<Duration>,
    /// Approximate length cap of each topic stream (`maxlen`); none by
    /// default.
    pub maxlen: Option<usize>,
    /// How often pattern subscriptions look for new streams written by other
    /// processes (`scan_ms`, default 5000).
    pub scan: Duration,
}

impl StreamsConfig {
    pub const PARAMS: &[&str] = &[
        "prefix",
        "block_ms",
        "count",
        "claim_idle_ms",
        "maxlen",
        "scan_ms",
    ];

    pub fn from_url(url: &mut RedisUrl) -> Result<Self> {
        let config = StreamsConfig {
            prefix: url
                .take("prefix", "a key prefix")?
                .unwrap_or_else(|| "sluice:".into()),
            block: url
                .take_ms("block_ms")?
                .unwrap_or(Duration::from_millis(1000)),
            count: url.take("count", "a number")?.unwrap_or(100),
            claim_idle: url.take_ms("claim_idle_ms")?,
            maxlen: url.take("maxlen", "a number of entries")?,
            scan: url
                .take_ms("scan_ms")?
                .unwrap_or(Duration::from_millis(5000)),
        };
        if config.block.is_zero() {
            bail!(
                "backend URL `{}`: block_ms must be at least 1",
                url.redacted
            );
        }
        if config.count == 0 {
            bail!("backend URL `{}`: count must be at least 1", url.redacted);
        }
        if config.maxlen == Some(0) {
            bail!("backend URL `{}`: maxlen must be at least 1", url.redacted);
        }
        if config.claim_idle.is_some_and(|d| d.is_zero()) {
            bail!(
                "backend URL `{}`: claim_idle_ms must be at least 1",
                url.redacted
            );
        }
        Ok(config)
    }
}

/// Settings of the Redis pub/sub backend.
#[derive(Debug, Clone)]
pub struct PubSubConfig {
    /// Prepended to every channel (`prefix`, default `sluice:`). Pub/sub
    /// channels ignore the database number, so this is what separates
    /// deployments sharing a server.
    pub prefix: String,
    /// Messages a group holds in memory (waiting, delayed or in flight)
    /// before newer ones are dropped (`capacity`, default 10000).
    pub capacity: usize,
}

impl PubSubConfig {
    pub const PARAMS: &[&str] = &["prefix", "capacity"];

    pub fn from_url(url: &mut RedisUrl) -> Result<Self> {
        let config = PubSubConfig {
            prefix: url
                .take("prefix", "a channel prefix")?
                .unwrap_or_else(|| "sluice:".into()),
            capacity: url.take("capacity", "a number")?.unwrap_or(10_000),
        };
        if config.capacity == 0 {
            bail!(
                "backend URL `{}`: capacity must be at least 1",
                url.redacted
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_address_and_parameters() {
        let mut url = RedisUrl::parse(
            "redis://user:p?ss@127.0.0.1:6379/2?prefix=app:&block_ms=50&count=7",
            "redis",
        )
        .unwrap();
        assert_eq!(url.address, "user:p?ss@127.0.0.1:6379/2");
        let config = StreamsConfig::from_url(&mut url).unwrap();
        url.finish(StreamsConfig::PARAMS).unwrap();
        assert_eq!(config.prefix, "app:");
        assert_eq!(config.block, Duration::from_millis(50));
        assert_eq!(config.count, 7);
        assert_eq!(config.maxlen, None);
    }

    #[test]
    fn errors_name_the_parameter_and_hide_the_password() {
        let mut url = RedisUrl::parse("redis://u:secret@h/0?block_ms=soon", "redis").unwrap();
        let err = StreamsConfig::from_url(&mut url).unwrap_err().to_string();
        assert!(err.contains("block_ms `soon`"), "{err}");
        assert!(!err.contains("secret"), "{err}");

        let mut url = RedisUrl::parse("redis://h?colour=red", "redis").unwrap();
        StreamsConfig::from_url(&mut url).unwrap();
        let err = url.finish(StreamsConfig::PARAMS).unwrap_err().to_string();
        assert!(err.contains("unknown parameter `colour`"), "{err}");

        let mut url = RedisUrl::parse("redis+pubsub://h?capacity=0", "redis+pubsub").unwrap();
        let err = PubSubConfig::from_url(&mut url).unwrap_err().to_string();
        assert!(err.contains("capacity"), "{err}");
        assert!(RedisUrl::parse("redis://?prefix=x", "redis").is_err());
    }

    #[test]
    fn tls_parameters_need_rediss() {
        let (url, tls) = open(
            "rediss://app:pw@h:6380/0?ca=/etc/ca%20dir/ca.pem&cert=/c.pem&key=/c.key&prefix=p:",
            "redis",
        )
        .unwrap();
        assert_eq!(url.address, "app:pw@h:6380/0");
        assert!(tls.enabled);
        assert_eq!(
            tls.ca.as_deref(),
            Some(std::path::Path::new("/etc/ca dir/ca.pem"))
        );
        let (_, tls) = open("rediss+pubsub://h", "redis+pubsub").unwrap();
        assert!(tls.enabled && tls.ca.is_none());
        let (_, tls) = open("redis://h", "redis").unwrap();
        assert!(!tls.enabled);

        let err = |url: &str, scheme: &str| open(url, scheme).err().unwrap().to_string();
        assert!(err("redis://h?ca=/ca.pem", "redis").contains("rediss://"));
        assert!(err("rediss://h?cert=/c.pem", "redis").contains("both `cert` and `key`"));
        assert!(err("rediss+pubsub://h?key=/k", "redis+pubsub").contains("`cert` and `key`"));
        assert!(err("rediss://h", "redis+pubsub").contains("redis+pubsub://"));
    }
}
