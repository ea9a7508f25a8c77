//! What the tests need for the backends whose servers do not run on the
//! machine already, installed only when missing: an SQS/SNS emulator (moto)
//! and two Kafka-protocol brokers (tansu, and nisshi, its later releases
//! under a new name), from which the tests start private servers of their
//! own, and what librdkafka's build needs (cmake, libcurl's headers, which
//! it includes even with curl off, and OpenSSL's).
//!
//! The brokers are long builds, so they are built in the background while
//! the host builds: on two cores that takes far less than one after the
//! other, since neither build keeps both cores busy throughout.

use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;

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

/// The broker for the one Kafka test tansu 0.6.0 fails for a fault of its
/// own (a member whose session lapsed leaves its partitions to no one),
/// fixed in 0.7.0-pre.1. Its 0.7.0 and later releases need a newer Rust
/// than Sluice does.
const NISSHI: [&str; 7] = [
    "nisshi",
    "--version",
    "0.7.0-pre.2",
    "--locked",
    "--no-default-features",
    "--features",
    "dynostore",
];

/// Brokers being installed in the background.
#[must_use = "wait for the brokers before the tests start them"]
pub struct Installing(Vec<JoinHandle<Result<()>>>);

impl Installing {
    /// Waits for every install; the first that failed is the error.
    pub fn wait(self) -> Result<()> {
        let mut first_failure = None;
        for install in self.0 {
            let result = install
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a broker's install panicked")));
            if let Err(error) = result {
                first_failure.get_or_insert(error);
            }
        }
        first_failure.map_or(Ok(()), Err)
    }
}

/// Installs whatever the tests need and is missing: what builds take and
/// the emulator now, the brokers in the background (wait for them with
/// [`Installing::wait`]).
pub fn ensure() -> Result<Installing> {
    build_deps()?;
    if !on_path("moto_server") {
        println!("==> installing the moto SQS/SNS emulator…");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", MOTO_REQUIREMENT]))?;
    }
    let mut installs = Vec::new();
    for (crate_args, variable) in [(&TANSU[..], "SLUICE_TANSU"), (&NISSHI[..], "SLUICE_NISSHI")] {
        let program = crate_args[0];
        if std::env::var_os(variable).is_some() || on_path(program) {
            continue;
        }
        println!(
            "==> installing the {program} Kafka-protocol broker in the background (a long build, once)…"
        );
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        command.arg("install").args(crate_args);
        installs.push(std::thread::spawn(move || run(&mut command)));
    }
    Ok(Installing(installs))
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
