//! Backend URLs of `sqs://` and `sns+sqs://`: where the service is, which
//! credentials to use, and the parameters both schemes understand, parsed
//! with errors that name the parameter.

use std::time::Duration;

use crate::backend::url::percent_decode;
use anyhow::{Context, Result, bail};

use crate::backend::redact;

/// The host that means "real AWS, endpoints from the region".
pub const AWS_HOST: &str = "aws";

/// SQS keeps a message at most 14 days.
const MAX_RETENTION_S: u64 = 1_209_600;
/// Longest name prefix; the rest of the 80 characters of a queue name go to
/// the topic, the group and their hashes (see [`super::names`]).
pub const MAX_PREFIX_LEN: usize = 20;

/// Settings of an SQS or SNS+SQS backend.
#[derive(Debug, Clone)]
pub struct SqsConfig {
    /// `http(s)://HOST:PORT` for a local or private endpoint; `None` for
    /// AWS itself (`sqs://aws`).
    pub endpoint: Option<String>,
    /// Static credentials from the URL's user info (`KEY:SECRET@`); `None`
    /// means the standard AWS chain (environment, profile, instance role).
    pub credentials: Option<(String, String)>,
    /// `region`; otherwise the chain's, or `us-east-1` for an endpoint.
    pub region: Option<String>,
    /// `profile`: the profile of the shared config and credentials files
    /// the chain reads (instead of `AWS_PROFILE` or `default`).
    pub profile: Option<String>,
    /// Put before every queue and topic name (`prefix`, default `sluice-`).
    pub prefix: String,
    /// Receives after which SQS moves a message to the queue's dead-letter
    /// queue (`max_receive`, default 25; 0 = no dead-letter queue).
    pub max_receive: u32,
    /// How long SQS keeps an unconsumed message (`retention_s`, default and
    /// most 14 days).
    pub retention: Duration,
    /// How long a publisher trusts its list of a topic's groups before it
    /// asks SQS again (`discover_ms`, default 2000; `sqs://` only).
    pub discover: Duration,
    /// How long acknowledgements wait to be sent together (`ack_batch_ms`,
    /// default 10).
    pub ack_batch: Duration,
    /// Extend the visibility of deliveries held longer than half the lease
    /// (`heartbeat`, default true).
    pub heartbeat: bool,
    /// The URL with the secret hidden, for messages and logs.
    pub shown: String,
}

impl SqsConfig {
    pub const PARAMS: &[&str] = &[
        "region",
        "prefix",
        "max_receive",
        "retention_s",
        "discover_ms",
        "ack_batch_ms",
        "heartbeat",
        "tls",
        "profile",
    ];

    /// Parses `scheme://[KEY:SECRET@]HOST[:PORT][?params]`, where HOST
    /// `aws` means AWS itself.
    pub fn parse(url: &str, scheme: &str) -> Result<Self> {
        let shown = redact(url);
        let Some(rest) = url.strip_prefix(scheme).and_then(|r| r.strip_prefix("://")) else {
            bail!("backend URL `{shown}` does not start with {scheme}://");
        };
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = authority.split_once('/').unwrap_or((authority, ""));
        if !path.is_empty() {
            // An unescaped `/` in a secret ends the authority early, and the
            // redacted form would then show the secret's tail: say nothing.
            bail!(
                "{scheme} URL has a path; write it as {scheme}://[KEY:SECRET@]HOST[:PORT][?params], \
                 with `/` in a secret escaped as %2F"
            );
        }
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        if host.is_empty() {
            bail!(
                "backend URL `{shown}` names no endpoint (expected {scheme}://{AWS_HOST}?region=REGION \
                 for AWS, or {scheme}://HOST:PORT for a local endpoint)"
            );
        }
        let credentials = userinfo
            .map(|info| -> Result<(String, String)> {
                let (key, secret) = info.split_once(':').with_context(|| {
                    format!("backend URL `{shown}`: credentials must be KEY:SECRET")
                })?;
                let key = percent_decode(key)
                    .with_context(|| format!("backend URL `{shown}`: access key"))?;
                let secret = percent_decode(secret)
                    .with_context(|| format!("backend URL `{shown}`: secret key"))?;
                if key.is_empty() || secret.is_empty() {
                    bail!("backend URL `{shown}`: credentials must be KEY:SECRET, both non-empty");
                }
                Ok((key, secret))
            })
            .transpose()?;

        let mut config = SqsConfig {
            endpoint: None,
            credentials,
            region: None,
            profile: None,
            prefix: "sluice-".into(),
            max_receive: 25,
            retention: Duration::from_secs(MAX_RETENTION_S),
            discover: Duration::from_millis(2000),
            ack_batch: Duration::from_millis(10),
            heartbeat: true,
            shown: shown.clone(),
        };
        let mut tls = None;
        let mut seen = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                bail!(
                    "backend URL `{shown}`: parameter `{pair}` has no value (expected NAME=VALUE)"
                );
            };
            if seen.contains(&name) {
                bail!("backend URL `{shown}`: `{name}` is given twice");
            }
            seen.push(name);
            let value = percent_decode(value)
                .with_context(|| format!("backend URL `{shown}`: parameter `{name}`"))?;
            let number = |expected: &str| -> Result<u64> {
                value.parse().map_err(|_| {
                    anyhow::anyhow!("backend URL `{shown}`: {name} `{value}` is not {expected}")
                })
            };
            match name {
                "region" => {
                    if value.is_empty()
                        || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    {
                        bail!("backend URL `{shown}`: region `{value}` is not a region name");
                    }
                    config.region = Some(value.clone());
                }
                "prefix" => {
                    if value.len() > MAX_PREFIX_LEN
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        bail!(
                            "backend URL `{shown}`: prefix `{value}` must be at most {MAX_PREFIX_LEN} \
                             letters, digits, `-` or `_` (SQS queue names allow nothing else)"
                        );
                    }
                    config.prefix = value.clone();
                }
                "max_receive" => {
                    let n = number("a number of receives")?;
                    if n > 1000 {
                        bail!(
                            "backend URL `{shown}`: max_receive must be 0 (off) or 1 to 1000, not {n}"
                        );
                    }
                    config.max_receive = n as u32;
                }
                "retention_s" => {
                    let s = number("a number of seconds")?;
                    if !(60..=MAX_RETENTION_S).contains(&s) {
                        bail!(
                            "backend URL `{shown}`: retention_s must be 60 to {MAX_RETENTION_S} (14 days), not {s}"
                        );
                    }
                    config.retention = Duration::from_secs(s);
                }
                "discover_ms" => {
                    config.discover = Duration::from_millis(number("a number of milliseconds")?)
                }
                "ack_batch_ms" => {
                    config.ack_batch = Duration::from_millis(number("a number of milliseconds")?)
                }
                "heartbeat" => config.heartbeat = parse_bool(&shown, name, &value)?,
                "tls" => tls = Some(parse_bool(&shown, name, &value)?),
                "profile" => {
                    if config.credentials.is_some() {
                        bail!(
                            "backend URL `{shown}`: give either KEY:SECRET@ or profile, not both"
                        );
                    }
                    if value.is_empty() {
                        bail!("backend URL `{shown}`: profile is empty");
                    }
                    config.profile = Some(value.clone());
                }
                _ => bail!(
                    "backend URL `{shown}`: unknown parameter `{name}` (known: {})",
                    Self::PARAMS.join(", ")
                ),
            }
        }
        if host == AWS_HOST {
            if tls == Some(false) {
                bail!(
                    "backend URL `{shown}`: tls=false needs a HOST:PORT endpoint, not {AWS_HOST}"
                );
            }
        } else {
            let scheme = if tls.unwrap_or(false) {
                "https"
            } else {
                "http"
            };
            config.endpoint = Some(format!("{scheme}://{host}"));
        }
        Ok(config)
    }
}

fn parse_bool(shown: &str, name: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => bail!("backend URL `{shown}`: {name} must be true or false, not `{value}`"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_credentials_and_parameters() {
        let config = SqsConfig::parse(
            "sqs://AKID:se%2Fcret@127.0.0.1:5000?region=eu-west-1&prefix=app-&max_receive=0&heartbeat=false",
            "sqs",
        )
        .unwrap();
        assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(
            config.credentials,
            Some(("AKID".to_string(), "se/cret".to_string()))
        );
        assert_eq!(config.region.as_deref(), Some("eu-west-1"));
        assert_eq!(config.prefix, "app-");
        assert_eq!(config.max_receive, 0);
        assert!(!config.heartbeat);
        assert!(!config.shown.contains("cret"), "{}", config.shown);

        let aws = SqsConfig::parse("sns+sqs://aws?region=us-east-2", "sns+sqs").unwrap();
        assert_eq!(aws.endpoint, None);
        assert_eq!(aws.credentials, None);
        let tls = SqsConfig::parse("sqs://sqs.internal:443?tls=true", "sqs").unwrap();
        assert_eq!(tls.endpoint.as_deref(), Some("https://sqs.internal:443"));
    }

    #[test]
    fn errors_name_the_parameter_and_hide_the_secret() {
        let err = |url: &str| SqsConfig::parse(url, "sqs").unwrap_err().to_string();
        assert!(err("sqs://h:1?max_receive=lots").contains("max_receive `lots`"));
        assert!(err("sqs://h:1?prefix=a.b").contains("prefix `a.b`"));
        assert!(err("sqs://h:1?retention_s=5").contains("retention_s"));
        assert!(err("sqs://h:1?colour=red").contains("unknown parameter `colour`"));
        assert!(err("sqs://h:1?region=eu&region=us").contains("given twice"));
        assert!(err("sqs://?region=eu").contains("names no endpoint"));
        assert!(err("sqs://aws?tls=false").contains("tls=false"));
        let leaked = err("sqs://KEY:abc/s3kr1t@h:1");
        assert!(
            !leaked.contains("s3kr1t") && !leaked.contains("abc"),
            "{leaked}"
        );
        assert!(err("sqs://KEY@h:1").contains("KEY:SECRET"));
        assert!(err("sqs://K:S@h:1?profile=p").contains("not both"));
    }
}
