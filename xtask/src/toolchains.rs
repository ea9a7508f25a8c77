//! The system toolchains the Python, JavaScript and C example plugins need:
//! checked before building, and installed with apt-get when missing and
//! running as root on Debian (as CI does). componentize-py and
//! componentize-js themselves are installed by `sluice build`, into
//! `target/toolchains`.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::process::{root, run};

/// Where `sluice build` installs componentize-py and componentize-js for
/// this checkout.
pub fn dir() -> PathBuf {
    root().join("target").join("toolchains")
}

/// Makes sure python3 (with venv), node with npm, and clang with wasm-ld
/// and wasi-libc are present.
pub fn ensure() -> Result<()> {
    println!("==> checking the Python, Node.js and C toolchains…");
    let mut missing: Vec<&str> = Vec::new();
    if !succeeds(Command::new("python3").args(["-c", "import venv, ensurepip"])) {
        missing.extend(["python3", "python3-venv"]);
    }
    if !succeeds(Command::new("node").arg("--version"))
        || !succeeds(Command::new("npm").arg("--version"))
    {
        missing.extend(["nodejs", "npm"]);
    }
    if !c_compiles() {
        missing.extend(["clang", "lld", "wasi-libc", "libclang-rt-14-dev-wasm32"]);
    }
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing, "the plugin toolchains")?;
    if !c_compiles() {
        bail!("clang still cannot build for wasm32-wasi after installing the packages");
    }
    Ok(())
}

/// Installs Debian packages `for_what` needs, when running as root on
/// Debian; otherwise fails, naming them.
pub fn apt_install(packages: &[&str], for_what: &str) -> Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root || !succeeds(Command::new("apt-get").arg("--version")) {
        bail!(
            "{for_what} need these Debian packages (or their equivalents): {}",
            packages.join(" ")
        );
    }
    println!("==> installing {}…", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Whether clang builds a trivial wasm32-wasi reactor (compiler, linker,
/// libc and builtins all present).
fn c_compiles() -> bool {
    let dir = dir().join("c-check");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let source = dir.join("check.c");
    if std::fs::write(
        &source,
        "#include <stdio.h>\nint check(void) { return puts(\"\"); }\n",
    )
    .is_err()
    {
        return false;
    }
    succeeds(
        Command::new("clang")
            .args(["--target=wasm32-wasi", "-mexec-model=reactor", "-O2"])
            .arg(&source)
            .arg("-o")
            .arg(dir.join("check.wasm")),
    )
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
