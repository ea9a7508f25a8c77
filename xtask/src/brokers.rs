//! What the tests need for the backends whose servers do not run on the
//! machine already, installed only when missing: an SQS/SNS emulator (moto)
//! and a Kafka-protocol broker (tansu), from which the tests start private
//! servers of their own, and what librdkafka's build needs (cmake,
//! libcurl's headers, which it includes even with curl off, and OpenSSL's).

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::process::run;
use crate::toolchains::apt_install;

/// The SQS/SNS emulator the AWS tests run against.
const MOTO_REQUIREMENT: &str = "moto[server]==5.2.1";

/// The Kafka-protocol broker the Kafka tests run against; its default
/// build has no storage engine.
const TANSU: [&str; 6] = [
    "tansu",
    "--version",
    "0.6.0",
    "--locked",
    "--features",
    "dynostore",
];

/// Installs whatever the tests need and is missing.
pub fn ensure() -> Result<()> {
    build_deps()?;
    if !on_path("moto_server") {
        println!("==> installing the moto SQS/SNS emulator…");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", MOTO_REQUIREMENT]))?;
    }
    if std::env::var_os("SLUICE_TANSU").is_none() && !on_path("tansu") {
        println!("==> installing the tansu Kafka-protocol broker (a long build, once)…");
        run(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .arg("install")
                .args(TANSU),
        )?;
    }
    Ok(())
}

/// Installs what building every backend needs and is missing: librdkafka
/// is built from source.
pub fn build_deps() -> Result<()> {
    let mut packages = Vec::new();
    if !on_path("cmake") {
        packages.push("cmake");
    }
    if !Path::new("/usr/include/curl/curl.h").exists()
        && !Path::new("/usr/include/x86_64-linux-gnu/curl/curl.h").exists()
    {
        packages.push("libcurl4-openssl-dev");
    }
    // SSL and SASL/SCRAM in librdkafka.
    if !Path::new("/usr/include/openssl/ssl.h").exists() {
        packages.push("libssl-dev");
    }
    if packages.is_empty() {
        return Ok(());
    }
    apt_install(&packages, "librdkafka's build")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .any(|dir| Path::new(&dir).join(program).is_file())
}
