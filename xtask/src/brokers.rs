//! What the tests need for the backends whose servers do not run on the
//! machine already: a Kafka-API broker (tansu), an SQS/SNS emulator (moto),
//! and the build tools librdkafka is compiled with. Each is installed only
//! when missing; the tests start private servers of their own from them.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::process::run;

/// The Kafka-API broker the Kafka tests run against.
const TANSU_VERSION: &str = "0.6.0";
/// The SQS/SNS emulator the AWS tests run against.
const MOTO_REQUIREMENT: &str = "moto[server]==5.2.1";
/// Debian packages rdkafka's bundled librdkafka build needs: cmake, and
/// curl's headers, which it includes even with curl support off.
const RDKAFKA_BUILD_PACKAGES: &[&str] = &["cmake", "libcurl4-openssl-dev"];

/// Installs whatever is missing.
pub fn ensure() -> Result<()> {
    ensure_build_packages()?;
    if !on_path("tansu") {
        println!(
            "==> installing the tansu {TANSU_VERSION} Kafka-API broker \
             (a one-time build of several minutes)…"
        );
        run(Command::new("cargo").args([
            "install",
            "tansu",
            "--version",
            TANSU_VERSION,
            "--locked",
            "--features",
            "dynostore",
        ]))?;
    }
    if !on_path("moto_server") {
        println!("==> installing the moto SQS/SNS emulator…");
        run(Command::new("python3").args(["-m", "pip", "install", "--quiet", MOTO_REQUIREMENT]))?;
    }
    Ok(())
}

fn ensure_build_packages() -> Result<()> {
    if Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_err()
    {
        // Not Debian: the build says what it lacks, if anything.
        return Ok(());
    }
    let missing: Vec<&str> = RDKAFKA_BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|package| !debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "building the Kafka backend needs {}: install them with \
             `sudo apt-get install {}`",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    println!("==> installing {}…", missing.join(", "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq"])
        .args(&missing))
}

fn on_path(program: &str) -> bool {
    let cargo_bin = std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin"));
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(cargo_bin)
        .any(|dir| dir.join(program).is_file())
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}
