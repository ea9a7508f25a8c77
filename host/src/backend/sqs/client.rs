//! The AWS clients of a backend, configured from its URL: region and
//! credentials from the URL or the standard AWS chain, and the endpoint
//! override for a local or private endpoint.

use std::time::Duration;

use anyhow::{Result, bail};
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::config::Credentials;
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
