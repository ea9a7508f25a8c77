//! The AWS clients of a backend, configured from its URL: region and
//! credentials from the URL or the standard AWS chain (environment, the
//! shared files' profile, web identity, SSO, container and instance
//! roles), and the endpoint override for a local or private endpoint.

use std::time::Duration;

use anyhow::{Result, bail};
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::{Credentials, ProvideCredentials};
use aws_sdk_sqs::error::ProvideErrorMetadata;

use super::config::SqsConfig;

/// The region an endpoint override gets when neither the URL nor the
/// environment names one (local emulators accept any).
const ENDPOINT_REGION: &str = "us-east-1";
/// Connecting must not take longer than this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer than the longest receive (a 20 s long poll) with room to spare,
/// so only a hung request hits it.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The SDK configuration both clients are built from.
pub async fn sdk_config(config: &SqsConfig) -> Result<aws_config::SdkConfig> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(
        TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_attempt_timeout(ATTEMPT_TIMEOUT)
            .build(),
    );
    if let Some(region) = &config.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(endpoint) = &config.endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some(profile) = &config.profile {
        loader = loader.profile_name(profile);
    }
    if let Some((key, secret)) = &config.credentials {
        loader = loader.credentials_provider(Credentials::new(
            key.clone(),
            secret.clone(),
            None,
            None,
            "sluice-backend-url",
        ));
    }
    let loaded = loader.load().await;
    // The chain is asked now, so missing or refused credentials are one
    // clear error at start rather than a failed first request.
    if let Some(provider) = loaded.credentials_provider() {
        provider.provide_credentials().await.map_err(|e| {
            anyhow::anyhow!(
                "backend URL `{}`: no AWS credentials: {}",
                config.shown,
                one_line(&e)
            )
        })?;
    }
    if loaded.region().is_some() {
        return Ok(loaded);
    }
    if config.endpoint.is_none() {
        bail!(
            "backend URL `{}` names no AWS region and the environment has none: add region=REGION \
             or set AWS_REGION",
            config.shown
        );
    }
    Ok(loaded
        .into_builder()
        .region(Region::new(ENDPOINT_REGION))
        .build())
}

/// An error and its sources on one line: the chain's error lists each
/// provider it tried on a line of its own.
fn one_line(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    let mut out = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}

/// The error code of a failed AWS call, if the service answered.
pub fn error_code<E: ProvideErrorMetadata, R>(
    error: &aws_sdk_sqs::error::SdkError<E, R>,
) -> Option<&str> {
    error.as_service_error().and_then(|e| e.code())
}

/// Whether an error code says the queue does not exist (SQS has two
/// spellings, by protocol).
pub fn is_missing_queue(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("QueueDoesNotExist" | "AWS.SimpleQueueService.NonExistentQueue")
    )
}
