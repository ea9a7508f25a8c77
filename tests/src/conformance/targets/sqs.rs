//! SQS and SNS+SQS on a private moto server (`moto_server`, from PyPI's
//! `moto[server]`), on a free port. moto keeps everything in memory, so a
//! restart would lose every queue: the restart case does not apply.

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use sluice::backend::{self, Backend};

use super::{ServerProcess, Target, quiet};

pub struct Sqs {
    server: ServerProcess,
    name: &'static str,
    scheme: &'static str,
}

impl Sqs {
    fn spawn(port: u16, _: &std::path::Path) -> std::process::Child {
        quiet(std::process::Command::new("moto_server").args([
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start moto_server ({e}); install it with: pip install 'moto[server]'")
        })
    }

    /// Whether an HTTP server answers on `port`.
    fn answers_http(port: u16) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let request = format!(
            "GET /moto-api/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        );
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut first = [0u8; 5];
        stream.read_exact(&mut first).is_ok() && &first == b"HTTP/"
    }

    fn start(name: &'static str, scheme: &'static str) -> Self {
        Sqs {
            server: ServerProcess::start_with(Self::spawn, Self::answers_http),
            name,
            scheme,
        }
    }

    /// Plain SQS: publishers send to every group's queue.
    pub fn queue() -> Self {
        Self::start("sqs", "sqs")
    }

    /// SNS topics fanning out to a queue per group.
    pub fn fan_out() -> Self {
        Self::start("sns-sqs", "sns+sqs")
    }
}

#[async_trait]
impl Target for Sqs {
    fn name(&self) -> &'static str {
        self.name
    }

    /// moto scans a whole queue several times per received message, so a
    /// receive from a 400-message backlog takes 0.3-1 s on a busy machine,
    /// as long as the concurrent case gives a consumer to go idle; at a
    /// quarter of the volume it takes about a quarter of that.
    fn volume_scale(&self) -> f64 {
        0.25
    }

    /// Two rounds at once still slow moto (even with one-second long
    /// polls, see `wait_s` above) until a heartbeat falls behind the 5 s
    /// leases of the host cases now and then: an ordered route then gets
    /// an input again while it holds it, and publishes it twice.
    fn rounds_in_parallel(&self) -> bool {
        false
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&format!(
            // One-second long polls: moto busy-waits a FIFO long poll while
            // one of the queue's message groups is in flight.
            "{}://test:test@127.0.0.1:{}?region=us-east-1&wait_s=1",
            self.scheme, self.server.port
        ))
        .await
    }

    fn restores_within(&self) -> Option<std::time::Duration> {
        // The next receive finds the queue missing; the fetch after it
        // makes the queue again.
        Some(std::time::Duration::from_secs(15))
    }

    /// Deletes the case's queues (the group's queue and its dead-letter
    /// queue: their names carry the case's namespace).
    async fn lose_state(&self, topic: &str, _group: &str) -> Result<()> {
        use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
        let namespace = topic.split('.').next().unwrap_or(topic);
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{}", self.server.port))
            .credentials_provider(Credentials::new("test", "test", None, None, "conformance"))
            .build();
        let sqs = aws_sdk_sqs::Client::from_conf(config);
        let urls = sqs
            .list_queues()
            .send()
            .await?
            .queue_urls
            .unwrap_or_default();
        let ours: Vec<&String> = urls.iter().filter(|u| u.contains(namespace)).collect();
        anyhow::ensure!(!ours.is_empty(), "no queue of `{namespace}` to delete");
        for url in ours {
            sqs.delete_queue().queue_url(url).send().await?;
        }
        Ok(())
    }
}
