//! The Kafka backend's URL: the bootstrap servers and the query parameters
//! it understands, parsed with errors that name the parameter.
//!
//! `kafka://HOST:PORT[,HOST:PORT…][?partitions=N&…&rdkafka.NAME=VALUE]`;
//! the table of parameters is in the module documentation of
//! [`super`](crate::backend::kafka).

use std::time::Duration;

use anyhow::{Context, Result};

use crate::backend::url::BackendUrl;

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
    /// librdkafka only now and then (`buffer`, default 1000). In an ordered
    /// group, those it could hand out now, or an eighth of all it holds if
    /// that is more.
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
        let mut url = BackendUrl::split(url, SCHEME)?;
        let hosts: Vec<&str> = url
            .address
            .trim_end_matches('/')
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            return Err(url.error(format!(
                "names no broker (expected e.g. {SCHEME}://127.0.0.1:9092)"
            )));
        }
        if hosts.iter().any(|h| h.contains('@') || h.contains('/')) {
            return Err(url.error(
                "brokers are HOST:PORT (credentials go in sasl.username and sasl.password)",
            ));
        }
        let bootstrap = hosts.join(",");
        let positive_ms = |url: &mut BackendUrl, name| -> Result<Option<Duration>> {
            Ok(url.take_in(name, 1..)?.map(Duration::from_millis))
        };
        let mut config = KafkaConfig {
            bootstrap,
            shown: url.redacted.clone(),
            partitions: url.take_in("partitions", 1..)?.unwrap_or(3),
            replication: url.take_in("replication", 1..)?.unwrap_or(1),
            timeout: positive_ms(&mut url, "timeout_ms")?.unwrap_or(Duration::from_secs(30)),
            commit_interval: positive_ms(&mut url, "commit_ms")?
                .unwrap_or(Duration::from_millis(200)),
            heartbeat: positive_ms(&mut url, "heartbeat_ms")?.unwrap_or(Duration::from_millis(500)),
            session_timeout: positive_ms(&mut url, "session_timeout_ms")?,
            metadata_refresh: positive_ms(&mut url, "metadata_refresh_ms")?
                .unwrap_or(Duration::from_millis(1000)),
            buffer: url.take_in("buffer", 1..)?.unwrap_or(1000),
            join_timeout: positive_ms(&mut url, "join_timeout_ms")?
                .unwrap_or(Duration::from_secs(15)),
            properties: Vec::new(),
        };
        for name in Self::SECURITY {
            if let Some(value) = security(&mut url, name)? {
                config.properties.push((name.to_string(), value));
            }
        }
        config.properties.extend(url.take_prefixed("rdkafka.")?);
        url.finish(&[Self::PARAMS, Self::SECURITY].concat())?;
        let mut names: Vec<&str> = config.properties.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(twice) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(url.error(format!(
                "`{0}` is given twice (as {0} and rdkafka.{0})",
                twice[0]
            )));
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

/// Takes security property `name`, checking the values librdkafka would
/// refuse only when a client is made, so the error names the parameter and
/// what it accepts.
fn security(url: &mut BackendUrl, name: &str) -> Result<Option<String>> {
    let accepted: &[&str] = match name {
        "security.protocol" => &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
        "sasl.mechanism" => &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"],
        _ => return url.take(name, "a value"),
    };
    let choices: Vec<(&str, String)> = accepted.iter().map(|a| (*a, a.to_string())).collect();
    url.take_choice(name, &choices)
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

    /// librdkafka compares the mechanism's name exactly (`strcmp`), so a
    /// name given in another case is passed on as librdkafka spells it.
    #[test]
    fn a_mechanism_in_any_case_is_passed_on_as_librdkafka_spells_it() {
        let config = KafkaConfig::parse("kafka://h:1?sasl.mechanism=scram-sha-256").unwrap();
        assert_eq!(
            config.properties,
            [("sasl.mechanism".to_string(), "SCRAM-SHA-256".to_string())]
        );
    }
}
