//! The backend URL parsers as one fuzz target: every input goes to every
//! parser this build has, as it is and with its scheme replaced by the
//! parser's own, so each parser's query and credential handling sees every
//! mutation. Only the parsing runs; nothing connects. Besides never
//! panicking, a parser's error must not show the password of the URL's
//! user info (the dictionary's `s3kr1t`).

use anyhow::Result;

use super::{Target, fuzz};

pub const TARGET: Target = Target {
    name: "backend_url",
    dictionary: &[
        b"memory://",
        b"sqlite://",
        b"file://",
        b"redis://",
        b"redis+pubsub://",
        b"postgres://",
        b"postgresql://",
        b"nats://",
        b"jetstream://",
        b"sqs://",
        b"sns+sqs://",
        b"kafka://",
        b"://",
        b"user:s3kr1t@",
        b"s3kr1t",
        b"127.0.0.1:6379",
        b"[::1]:4222",
        b"aws",
        b"capacity=",
        b"fsync=",
        b"segment_bytes=",
        b"retention_ms=",
        b"synchronous=",
        b"poll_ms=",
        b"prefix=",
        b"block_ms=",
        b"count=",
        b"claim_idle_ms=",
        b"maxlen=",
        b"schema=",
        b"pool=",
        b"sslmode=",
        b"options=",
        b"stream=",
        b"subjects=",
        b"retention=",
        b"replicas=",
        b"max_age_ms=",
        b"timeout_ms=",
        b"pending=",
        b"tls=",
        b"region=",
        b"max_receive=",
        b"retention_s=",
        b"partitions=",
        b"rdkafka.",
        b"session_timeout_ms=",
        b"buffer=",
    ],
    max_len: 256,
};

#[test]
fn backend_url() {
    fuzz(&TARGET, check);
}

fn check(bytes: &[u8]) {
    let url = String::from_utf8_lossy(bytes);
    let errors = parse_everywhere(&url);
    let _ = crate::backend::url::percent_decode(&url);
    if let Some(secret) = password(&url) {
        let redacted = crate::backend::redact(&url);
        assert!(
            !redacted.contains(secret),
            "the redacted URL `{redacted}` shows the password"
        );
        for error in errors {
            let shown = format!("{error:#}");
            assert!(
                !shown.contains(secret),
                "an error shows the password: {shown}"
            );
        }
    }
}

/// The dictionary's password when it stands alone in the user info of
/// the URL's authority, where every parser must keep it hidden.
fn password(url: &str) -> Option<&'static str> {
    const SECRET: &str = "s3kr1t";
    let (_, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let (userinfo, _) = authority.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (password == SECRET && url.matches(SECRET).count() == 1).then_some(SECRET)
}

type Parser = fn(&str) -> Result<()>;

/// Every URL parser of this build, by the scheme it reads.
fn parsers() -> Vec<(&'static str, Parser)> {
    let mut all: Vec<(&'static str, Parser)> = vec![("memory", |url| {
        crate::backend::memory::MemoryBackend::from_url(url).map(drop)
    })];
    #[cfg(feature = "sqlite")]
    all.push(("sqlite", |url| {
        crate::backend::sqlite::parse_url(url).map(drop)
    }));
    #[cfg(feature = "filelog")]
    all.push(("file", |url| {
        crate::backend::filelog::parse_url(url).map(drop)
    }));
    #[cfg(feature = "redis")]
    all.extend([
        ("redis", redis_streams as Parser),
        ("redis+pubsub", redis_pubsub),
    ]);
    #[cfg(feature = "postgres")]
    all.extend([("postgres", postgres as Parser), ("postgresql", postgres)]);
    #[cfg(feature = "nats")]
    all.extend([("nats", nats_core as Parser), ("jetstream", jetstream)]);
    #[cfg(feature = "sqs")]
    all.extend([
        ("sqs", (|url| sqs(url, "sqs")) as Parser),
        ("sns+sqs", |url| sqs(url, "sns+sqs")),
    ]);
    #[cfg(feature = "kafka")]
    all.push(("kafka", kafka));
    all
}

/// Parses `url` with every parser, as it is and under each parser's own
/// scheme; returns the errors.
pub fn parse_everywhere(url: &str) -> Vec<anyhow::Error> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let mut errors = Vec::new();
    for (scheme, parse) in parsers() {
        for candidate in [url.to_string(), format!("{scheme}://{rest}")] {
            if let Err(error) = parse(&candidate) {
                errors.push(error);
            }
        }
    }
    errors
}

#[cfg(feature = "redis")]
fn redis_streams(url: &str) -> Result<()> {
    use crate::backend::redis::config::{self, StreamsConfig, Tls};
    let (mut parsed, _tls) = config::open(url, "redis")?;
    StreamsConfig::from_url(&mut parsed)?;
    parsed.finish(&[StreamsConfig::PARAMS, Tls::PARAMS].concat())?;
    // Without the TLS files: a fuzzed path could name anything.
    parsed.client(&Tls::default()).map(drop)
}

#[cfg(feature = "redis")]
fn redis_pubsub(url: &str) -> Result<()> {
    use crate::backend::redis::config::{self, PubSubConfig, Tls};
    let (mut parsed, _tls) = config::open(url, "redis+pubsub")?;
    PubSubConfig::from_url(&mut parsed)?;
    parsed.finish(&[PubSubConfig::PARAMS, Tls::PARAMS].concat())?;
    // Without the TLS files: a fuzzed path could name anything.
    parsed.client(&Tls::default()).map(drop)
}

#[cfg(feature = "postgres")]
fn postgres(url: &str) -> Result<()> {
    crate::backend::postgres::settings::PostgresSettings::parse(url).map(drop)
}

#[cfg(feature = "nats")]
fn nats_core(url: &str) -> Result<()> {
    crate::backend::nats::core::parse_url(url).map(drop)
}

#[cfg(feature = "nats")]
fn jetstream(url: &str) -> Result<()> {
    use crate::backend::nats::settings::{SCHEME, Settings};
    let (mut server, pairs) = crate::backend::nats::split_url(url, SCHEME)?;
    let settings = Settings::parse(&mut server, pairs)?;
    settings.apply(&mut async_nats::jetstream::stream::Config::default());
    Ok(())
}

#[cfg(feature = "sqs")]
fn sqs(url: &str, scheme: &str) -> Result<()> {
    crate::backend::sqs::config::SqsConfig::parse(url, scheme).map(drop)
}

#[cfg(feature = "kafka")]
fn kafka(url: &str) -> Result<()> {
    let config = crate::backend::kafka::config::KafkaConfig::parse(url)?;
    for lease in [0, 1, u64::MAX] {
        let _ = config.session_timeout(std::time::Duration::from_millis(lease));
    }
    Ok(())
}
