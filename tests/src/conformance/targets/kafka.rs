//! Kafka on a private tansu broker (a Kafka-protocol broker in one binary),
//! started on a free port for the suite, keeping its log in S3 served by a
//! private moto server, so the restart case can kill the broker and find
//! its messages and offsets after it comes back.
//!
//! `tansu` must be on `PATH` (`cargo install tansu --version 0.6.0 --locked
//! --features dynostore`) or named by `SLUICE_TANSU`, and `moto_server` on
//! `PATH` (`pip install 'moto[server]'`); `cargo xtask test` installs both.
//! `SLUICE_TANSU_LOG=FILE` keeps the broker's log, `SLUICE_KAFKA_PARAMS`
//! adds URL parameters (e.g. `rdkafka.debug=cgrp`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use sluice::backend::{self, Backend};

use super::{ServerProcess, Target, quiet};

/// The bucket tansu keeps its log in.
const BUCKET: &str = "tansu";

pub struct Kafka {
    // Declared first, so the broker stops before its storage.
    broker: ServerProcess,
    _storage: ServerProcess,
}

impl Kafka {
    pub fn new() -> Self {
        let storage = ServerProcess::start_with(spawn_moto, listens);
        create_bucket(storage.port);
        let s3 = storage.port;
        let broker = ServerProcess::start_with(
            move |port, _: &Path| spawn_tansu(port, s3),
            answers_api_versions,
        );
        Kafka {
            broker,
            _storage: storage,
        }
    }
}

fn spawn_moto(port: u16, _: &Path) -> Child {
    quiet(Command::new("moto_server").args(["-H", "127.0.0.1", "-p", &port.to_string()]))
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start moto_server ({e}), which serves the broker's S3 storage: pip install 'moto[server]'")
        })
}

fn spawn_tansu(port: u16, s3: u16) -> Child {
    let listener = format!("tcp://127.0.0.1:{port}");
    let binary = tansu_binary();
    let mut command = Command::new(&binary);
    quiet(&mut command);
    if let Some(path) = std::env::var_os("SLUICE_TANSU_LOG")
        && let Ok(file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        && let Ok(copy) = file.try_clone()
    {
        command.stdout(copy).stderr(file);
    }
    command
        .args(["broker", "--listener-url", &listener])
        .args(["--advertised-listener-url", &listener])
        .args(["--storage-engine", &format!("s3://{BUCKET}/")])
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{s3}"))
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "tansu")
        .env("AWS_SECRET_ACCESS_KEY", "tansu")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start the Kafka-protocol broker `{}` ({e}): install tansu \
                 (cargo install tansu --version 0.6.0 --locked --features dynostore) \
                 or set SLUICE_TANSU to its path",
                binary.display()
            )
        })
}

fn tansu_binary() -> PathBuf {
    std::env::var_os("SLUICE_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tansu"))
}

fn listens(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Creates the bucket with an unsigned S3 `PUT /BUCKET` (moto does not
/// check signatures).
fn create_bucket(port: u16) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("moto listens");
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    write!(
        stream,
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("send the bucket request");
    let mut status = [0u8; 12];
    stream.read_exact(&mut status).expect("moto answers");
    assert_eq!(&status[9..12], b"200", "moto did not create the bucket");
}

/// Whether a Kafka broker answers an ApiVersions request (v0) on the port.
fn answers_api_versions(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    // api key 18 (ApiVersions), version 0, correlation id 7, no client id.
    let body: [u8; 10] = [0, 18, 0, 0, 0, 0, 0, 7, 0xff, 0xff];
    let mut request = (body.len() as u32).to_be_bytes().to_vec();
    request.extend_from_slice(&body);
    if stream.write_all(&request).is_err() {
        return false;
    }
    let mut header = [0u8; 8];
    stream.read_exact(&mut header).is_ok() && header[4..8] == [0, 0, 0, 7]
}

#[async_trait]
impl Target for Kafka {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn backlog_counts_held(&self) -> bool {
        // Lag runs from the committed offset, which stays at the lowest
        // unsettled one.
        true
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        // The backend's own session timeout (at least 6 s), not a shorter
        // one: tansu refreshes a member's last contact only on heartbeats,
        // which librdkafka does not send while it joins and syncs, so with
        // 2 s members were expelled mid-rebalance.
        let extra = std::env::var("SLUICE_KAFKA_PARAMS")
            .map(|params| format!("?{params}"))
            .unwrap_or_default();
        backend::connect(&self.broker.url("kafka", &extra)).await
    }

    fn can_restart(&self) -> bool {
        true
    }

    async fn restart(&self) -> Result<()> {
        tokio::task::block_in_place(|| self.broker.restart());
        Ok(())
    }
}
