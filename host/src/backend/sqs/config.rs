//! Backend URLs of `sqs://` and `sns+sqs://`: where the service is, which
//! credentials to use, and the parameters both schemes understand, parsed
//! with errors that name the parameter.

use std::time::Duration;

use anyhow::{Result, bail};

use crate::backend::url::{BackendUrl, percent_decode};

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
    /// The longest a receive long-polls, in seconds (`wait_s`, 1 to 20,
    /// default 20). A shorter wait suits an emulator: moto busy-waits a
    /// FIFO long poll while one of the queue's message groups is in flight.
    pub wait_s: u8,
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
        "wait_s",
        "tls",
        "profile",
    ];

    /// Parses `scheme://[KEY:SECRET@]HOST[:PORT][?params]`, where HOST
    /// `aws` means AWS itself.
    pub fn parse(url: &str, scheme: &str) -> Result<Self> {
        let mut url = BackendUrl::split(url, scheme)?;
        let (authority, path) = url.address.split_once('/').unwrap_or((&url.address, ""));
        if !path.is_empty() {
            // An unescaped `/` in a secret ends the authority early, and the
            // redacted form would then show the secret's tail: say nothing.
            bail!(
                "{scheme} URL has a path; write it as {scheme}://[KEY:SECRET@]HOST[:PORT][?params], \
                 with `/` in a secret escaped as %2F"
            );
        }
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host.to_string()),
            None => (None, authority.to_string()),
        };
        if host.is_empty() {
            return Err(url.error(format!(
                "names no endpoint (expected {scheme}://{AWS_HOST}?region=REGION \
                 for AWS, or {scheme}://HOST:PORT for a local endpoint)"
            )));
        }
        let credentials = userinfo.map(|info| credentials(&url, info)).transpose()?;
        let region = url.take_with("region", |value| {
            if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err("is not a region name".to_string());
            }
            Ok(value.to_string())
        })?;
        let prefix = url.take_with("prefix", |value| {
            if value.len() > MAX_PREFIX_LEN
                || !value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "must be at most {MAX_PREFIX_LEN} letters, digits, `-` or `_` \
                     (SQS queue names allow nothing else)"
                ));
            }
            Ok(value.to_string())
        })?;
        let profile = url.take_with("profile", |value| match value {
            "" => Err("is empty".to_string()),
            profile => Ok(profile.to_string()),
        })?;
        if credentials.is_some() && profile.is_some() {
            return Err(url.error("give either KEY:SECRET@ or profile, not both"));
        }
        let config = SqsConfig {
            endpoint: None,
            credentials,
            region,
            profile,
            prefix: prefix.unwrap_or_else(|| "sluice-".into()),
            max_receive: url.take_in("max_receive", 0..=1000)?.unwrap_or(25),
            retention: Duration::from_secs(
                url.take_in("retention_s", 60..=MAX_RETENTION_S)?
                    .unwrap_or(MAX_RETENTION_S),
            ),
            discover: url
                .take_ms("discover_ms")?
                .unwrap_or(Duration::from_millis(2000)),
            ack_batch: url
                .take_ms("ack_batch_ms")?
                .unwrap_or(Duration::from_millis(10)),
            heartbeat: url.take_bool("heartbeat")?.unwrap_or(true),
            wait_s: url.take_in("wait_s", 1..=20)?.unwrap_or(20),
            shown: url.redacted.clone(),
        };
        let tls = url.take_bool("tls")?;
        url.finish(Self::PARAMS)?;
        if host == AWS_HOST {
            if tls == Some(false) {
                return Err(url.error(format!(
                    "tls=false needs a HOST:PORT endpoint, not {AWS_HOST}"
                )));
            }
            return Ok(config);
        }
        let scheme = if tls.unwrap_or(false) {
            "https"
        } else {
            "http"
        };
        Ok(SqsConfig {
            endpoint: Some(format!("{scheme}://{host}")),
            ..config
        })
    }
}

/// The static credentials of the user info `KEY:SECRET`, %-decoded; errors
/// never show them.
fn credentials(url: &BackendUrl, info: &str) -> Result<(String, String)> {
    let (key, secret) = info
        .split_once(':')
        .ok_or_else(|| url.error("credentials must be KEY:SECRET"))?;
    let key = percent_decode(key).map_err(|e| url.error(format!("access key: {e}")))?;
    let secret = percent_decode(secret).map_err(|e| url.error(format!("secret key: {e}")))?;
    if key.is_empty() || secret.is_empty() {
        return Err(url.error("credentials must be KEY:SECRET, both non-empty"));
    }
    Ok((key, secret))
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
        assert!(err("sqs://h:1?wait_s=21").contains("wait_s"));
        assert_eq!(
            SqsConfig::parse("sqs://h:1?wait_s=1", "sqs")
                .unwrap()
                .wait_s,
            1
        );
        assert_eq!(SqsConfig::parse("sqs://h:1", "sqs").unwrap().wait_s, 20);
        let leaked = err("sqs://KEY:abc/s3kr1t@h:1");
        assert!(
            !leaked.contains("s3kr1t") && !leaked.contains("abc"),
            "{leaked}"
        );
        assert!(err("sqs://KEY@h:1").contains("KEY:SECRET"));
        assert!(err("sqs://K:S@h:1?profile=p").contains("not both"));
    }
}
