//! The Kafka backend's URL: the bootstrap servers and the query parameters
//! it understands, parsed with errors that name the parameter.
//!
//! `kafka://HOST:PORT[,HOST:PORT…][?partitions=N&…&rdkafka.NAME=VALUE]`;
//! the table of parameters is in the module documentation of
//! [`super`](crate::backend::kafka).

use std::time::Duration;

use crate::backend::url::percent_decode;
use anyhow::{Context, Result, bail};

use crate::backend::redact;

const SCHEME: &str = "kafka";

/// Everything the URL says.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port,host:port`, as librdkafka's `bootstrap.servers` takes it.
    pub bootstrap: String,
    /// The URL with any password hidden, for messages and logs.
    pub shown: String,
    /// Partitions of a topic Sluice creates (`partitions`, default 3).
    pub partitions: i32,
    /// Replicas of a topic Sluice creates (`replication`, default 1).
    pub replication: i32,
    /// Longest wait for the broker: an admin request, a publish's
    /// acknowledgement, a group lookup (`timeout_ms`, default 30000).
    pub timeout: Duration,
    /// How often settled offsets are committed (`commit_ms`, default 200).
    pub commit_interval: Duration,
    /// The consumer's heartbeat; a rebalance is noticed within about one
    /// (`heartbeat_ms`, default 500).
    pub heartbeat: Duration,
    /// Session timeout: how long a member that stopped heartbeating keeps
    /// its partitions (`session_timeout_ms`); by default the subscription's
    /// lease, kept within 6 s and 30 min, the range Kafka brokers accept
    /// unless configured otherwise.
    pub session_timeout: Option<Duration>,
    /// How often topic metadata is refreshed, so a pattern subscription
    /// sees new topics (`metadata_refresh_ms`, default 1000).
    pub metadata_refresh: Duration,
    /// Messages a group member buffers before it takes records from
    /// librdkafka only now and then (`buffer`, default 1000).
    pub buffer: usize,
    /// Longest wait in `subscribe` for the group to hand this member its
    /// partitions (`join_timeout_ms`, default 15000).
    pub join_timeout: Duration,
    /// Raw librdkafka properties (`rdkafka.NAME=VALUE`), applied last, to
    /// producer, consumers and admin client alike.
    pub properties: Vec<(String, String)>,
}

impl KafkaConfig {
    /// librdkafka's security properties, taken without the `rdkafka.`
    /// prefix under the names Kafka clients use.
    pub const SECURITY: &[&str] = &[
        "security.protocol",
        "sasl.mechanism",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.key.password",
    ];
    /// Properties that name a file, checked before librdkafka reads them.
    const FILES: &[&str] = &[
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.crl.location",
        "ssl.keystore.location",
    ];

    pub const PARAMS: &[&str] = &[
        "partitions",
        "replication",
        "timeout_ms",
        "commit_ms",
        "heartbeat_ms",
        "session_timeout_ms",
        "metadata_refresh_ms",
        "buffer",
        "join_timeout_ms",
        "rdkafka.NAME",
    ];

    pub fn parse(url: &str) -> Result<Self> {
        let shown = redact(url);
        let rest = url
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix("://"))
            .with_context(|| format!("a {SCHEME} URL starts with {SCHEME}://, not `{shown}`"))?;
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts: Vec<&str> = hosts
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            bail!(
                "{SCHEME} URL `{shown}` names no broker (expected e.g. {SCHEME}://127.0.0.1:9092)"
            );
        }
        for host in &hosts {
            if host.contains('@') || host.contains('/') {
                bail!(
                    "{SCHEME} URL `{shown}`: brokers are HOST:PORT (credentials go in \
                     sasl.username and sasl.password)"
                );
            }
        }
        let mut config = KafkaConfig {
            bootstrap: hosts.join(","),
            shown: shown.clone(),
            partitions: 3,
            replication: 1,
            timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(200),
            heartbeat: Duration::from_millis(500),
            session_timeout: None,
            metadata_refresh: Duration::from_millis(1000),
            buffer: 1000,
            join_timeout: Duration::from_secs(15),
            properties: Vec::new(),
        };
        let mut seen: Vec<String> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                bail!("{SCHEME} URL: parameter `{pair}` has no value (expected NAME=VALUE)");
            };
            let value = percent_decode(value).with_context(|| {
                format!("{SCHEME} URL: parameter `{key}` is not valid percent-encoding")
            })?;
            if seen.iter().any(|k| k == key) {
                bail!("{SCHEME} URL: `{key}` is given twice");
            }
            seen.push(key.to_string());
            if let Some(property) = key.strip_prefix("rdkafka.") {
                if property.is_empty() {
                    bail!("{SCHEME} URL: `rdkafka.` needs a librdkafka property name after it");
                }
                config.properties.push((property.to_string(), value));
                continue;
            }
            if Self::SECURITY.contains(&key) {
                security(key, &value)?;
                config.properties.push((key.to_string(), value));
                continue;
            }
            match key {
                "partitions" => config.partitions = positive(key, &value)?,
                "replication" => config.replication = positive(key, &value)?,
                "timeout_ms" => config.timeout = millis(key, &value)?,
                "commit_ms" => config.commit_interval = millis(key, &value)?,
                "heartbeat_ms" => config.heartbeat = millis(key, &value)?,
                "session_timeout_ms" => config.session_timeout = Some(millis(key, &value)?),
                "metadata_refresh_ms" => config.metadata_refresh = millis(key, &value)?,
                "buffer" => config.buffer = positive(key, &value)?,
                "join_timeout_ms" => config.join_timeout = millis(key, &value)?,
                _ => bail!(
                    "{SCHEME} URL: unknown parameter `{key}` (known: {}, {})",
                    Self::PARAMS.join(", "),
                    Self::SECURITY.join(", ")
                ),
            }
        }
        let mut names: Vec<&str> = config.properties.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!(
                "{SCHEME} URL: `{0}` is given twice (as {0} and rdkafka.{0})",
                twice[0]
            );
        }
        Ok(config)
    }

    /// Fails naming the property and the file unless every file the
    /// properties name can be read: librdkafka's own error is vaguer.
    pub fn check_files(&self) -> Result<()> {
        for (name, path) in &self.properties {
            if Self::FILES.contains(&name.as_str()) {
                std::fs::File::open(path).with_context(|| {
                    format!(
                        "{SCHEME} URL `{}`: cannot read the {name} file `{path}`",
                        self.shown
                    )
                })?;
            }
        }
        Ok(())
    }

    /// The session timeout for a subscription with this lease.
    pub fn session_timeout(&self, lease: Duration) -> Duration {
        self.session_timeout
            .unwrap_or_else(|| lease.clamp(Duration::from_secs(6), Duration::from_secs(30 * 60)))
    }
}

/// Checks the values librdkafka would refuse only when a client is made,
/// so the error names the parameter and what it accepts.
fn security(key: &str, value: &str) -> Result<()> {
    let accepted: &[&str] = match key {
        "security.protocol" => &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
        "sasl.mechanism" => &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"],
        _ => return Ok(()),
    };
    if !accepted.iter().any(|a| a.eq_ignore_ascii_case(value)) {
        bail!(
            "{SCHEME} URL: {key} `{value}` is not one of {}",
            accepted.join(", ")
        );
    }
    Ok(())
}

fn positive<T: std::str::FromStr + PartialOrd + Default>(key: &str, value: &str) -> Result<T> {
    match value.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => bail!("{SCHEME} URL: {key} `{value}` is not a positive whole number"),
    }
}

fn millis(key: &str, value: &str) -> Result<Duration> {
    Ok(Duration::from_millis(positive(key, value)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_brokers_parameters_and_raw_properties() {
        let config = KafkaConfig::parse(
            "kafka://a:9092, b:9093/?partitions=6&commit_ms=50&rdkafka.client.id=x%26y",
        )
        .unwrap();
        assert_eq!(config.bootstrap, "a:9092,b:9093");
        assert_eq!(config.partitions, 6);
        assert_eq!(config.commit_interval, Duration::from_millis(50));
        assert_eq!(
            config.properties,
            [("client.id".to_string(), "x&y".to_string())]
        );
        assert_eq!(
            config.session_timeout(Duration::from_millis(500)),
            Duration::from_secs(6)
        );
        assert_eq!(
            config.session_timeout(Duration::from_secs(40)),
            Duration::from_secs(40)
        );
    }

    #[test]
    fn errors_name_the_parameter() {
        let err = |url: &str| KafkaConfig::parse(url).unwrap_err().to_string();
        assert!(err("kafka://h:1?partitions=0").contains("partitions `0`"));
        assert!(err("kafka://h:1?buffer=lots").contains("buffer `lots`"));
        assert!(err("kafka://h:1?colour=red").contains("unknown parameter `colour`"));
        assert!(err("kafka://h:1?timeout_ms=1&timeout_ms=2").contains("given twice"));
        assert!(err("kafka://h:1?rdkafka.=1").contains("property name"));
        assert!(err("kafka://").contains("names no broker"));
        assert!(err("kafka://u:secret@h:1").contains("sasl"));
        assert!(err("kafka://h:1?security.protocol=tls").contains("security.protocol `tls`"));
        assert!(err("kafka://h:1?sasl.mechanism=GSSAPI").contains("SCRAM-SHA-512"));
        assert!(
            err("kafka://h:1?sasl.username=a&rdkafka.sasl.username=b")
                .contains("`sasl.username` is given twice")
        );
        assert!(!err("kafka://u:secret@h:1").contains("secret"));
    }
}
