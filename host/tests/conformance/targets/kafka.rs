//! Kafka on a private tansu broker (a Kafka-protocol broker in one binary),
//! started on a free port for the suite.
//!
//! `tansu` must be on `PATH` (`cargo install tansu --locked --features
//! dynostore`), or named by `SLUICE_TANSU`; without it the suite fails,
//! saying so.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use async_trait::async_trait;
use sluice::backend::{self, Backend};

use super::{ServerProcess, Target, quiet};

pub struct Kafka {
    server: ServerProcess,
}

impl Kafka {
    pub fn new() -> Self {
        Kafka {
            server: ServerProcess::start_with(Self::spawn, answers_api_versions),
        }
    }

    fn spawn(port: u16, _: &Path) -> Child {
        let listener = format!("tcp://127.0.0.1:{port}");
        let binary = tansu_binary();
        let mut command = Command::new(&binary);
        quiet(&mut command);
        // The broker's own log, when a case needs explaining.
        if let Some(path) = std::env::var_os("SLUICE_TANSU_LOG")
            && let Ok(file) = std::fs::File::create(path)
            && let Ok(copy) = file.try_clone()
        {
            command.stdout(copy).stderr(file);
        }
        command.args([
            "broker",
            "--listener-url",
            &listener,
            "--advertised-listener-url",
            &listener,
            "--storage-engine",
            "memory://tansu/",
        ])
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start the Kafka-protocol broker `{}` ({e}): install tansu \
                 (cargo install tansu --locked --features dynostore) or set SLUICE_TANSU to its path",
                binary.display()
            )
        })
    }
}

fn tansu_binary() -> PathBuf {
    std::env::var_os("SLUICE_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tansu"))
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

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        // The backend's own session timeout (at least 6 s), not a shorter
        // one: tansu refreshes a member's last contact only on heartbeats,
        // which librdkafka does not send while it joins and syncs, so with
        // 2 s members were expelled mid-rebalance and groups of two or more
        // kept rebalancing.
        // Extra URL parameters for a run, e.g. `rdkafka.debug=cgrp`.
        let extra = std::env::var("SLUICE_KAFKA_PARAMS")
            .map(|params| format!("?{params}"))
            .unwrap_or_default();
        backend::connect(&self.server.url("kafka", &extra)).await
    }
}
