//! The build, test, benchmark and lint tasks: each a short sequence of cargo
//! runs over the host workspace and the guest workspace in `plugins/`.

use std::process::Command;

use anyhow::{Context, Result};

use crate::process::{cargo, plugins_dir, run, run_all};

/// The target every plugin is built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// The host built with every finished backend, as the tests, benchmarks
/// and lints build it (the default build leaves out AWS, which takes long
/// to compile).
const ALL_BACKENDS: &str = "sluice/full";

/// The example plugins written in Python, JavaScript and C, each built by
/// `sluice build` into its own `target/`.
pub const LANGUAGE_EXAMPLES: &[&str] = &[
    "plugins/python/enrich",
    "plugins/js/enrich",
    "plugins/c/enrich",
];

/// Builds every plugin: the Rust ones, then the other languages' examples.
pub fn plugins() -> Result<()> {
    rust_plugins()?;
    language_examples()
}

/// Builds the Rust plugins in release, installing the wasm target if needed.
pub fn rust_plugins() -> Result<()> {
    ensure_wasm_target()?;
    println!("==> building plugins…");
    run(guest_cargo().args(["build", "--target", WASM_TARGET, "--release"]))
}

/// Builds the Python, JavaScript and C examples with `sluice build`,
/// installing the system toolchains when missing (componentize-py and
/// componentize-js go into target/toolchains).
pub fn language_examples() -> Result<()> {
    crate::toolchains::ensure()?;
    crate::brokers::build_deps()?;
    println!("==> building the Python, JavaScript and C examples…");
    for example in LANGUAGE_EXAMPLES {
        run(cargo()
            .args(["run", "--quiet", "-p", "sluice", "--features", ALL_BACKENDS])
            .args(["--", "build", example])
            .env("SLUICE_TOOLCHAINS", crate::toolchains::dir()))?;
    }
    Ok(())
}

/// Host tests (with `extra` passed on to `cargo test`), then the SDK's own
/// tests, which run natively.
pub fn test(extra: &[String]) -> Result<()> {
    plugins()?;
    crate::brokers::ensure()?;
    println!("==> testing the host workspace, every backend…");
    let mut host = cargo();
    // Every test binary runs even after one fails, so a run shows all that
    // is wrong at once.
    host.args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--features",
        ALL_BACKENDS,
    ])
    .args(extra);
    let mut sdk = guest_cargo();
    sdk.args(["test", "-p", "sluice-sdk"]);
    let result = run_all([host, sdk]);
    crate::report::conformance_table();
    result
}

/// The wasm-versus-native pipeline benchmark, the plugin languages side by
/// side, then Sluice against plain client loops on Redis and NATS (which
/// skips a broker it cannot reach).
pub fn bench() -> Result<()> {
    plugins()?;
    println!("==> benchmarking the pipeline (release build)…");
    run(cargo().args([
        "bench",
        "-p",
        "sluice",
        "--features",
        ALL_BACKENDS,
        "--bench",
        "pipeline",
    ]))?;
    println!("==> benchmarking the plugin languages (release build)…");
    run(cargo()
        .args([
            "bench",
            "-p",
            "sluice",
            "--features",
            ALL_BACKENDS,
            "--bench",
            "languages",
        ])
        .env("SLUICE_TOOLCHAINS", crate::toolchains::dir()))?;
    println!("==> benchmarking the brokers (release build)…");
    crate::brokers::ensure()?;
    run(cargo().args([
        "bench",
        "-p",
        "sluice",
        "--features",
        ALL_BACKENDS,
        "--bench",
        "brokers",
    ]))
}

/// Formatting and clippy, both workspaces; clippy on the guests checks them
/// for the target they are built for.
pub fn lint() -> Result<()> {
    println!("==> linting both workspaces…");
    let mut steps = Vec::new();
    for mut command in [cargo(), guest_cargo()] {
        command.args(["fmt", "--all", "--check"]);
        steps.push(command);
    }
    let mut host_clippy = cargo();
    host_clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        ALL_BACKENDS,
        "--",
        "-D",
        "warnings",
    ]);
    let mut guest_clippy = guest_cargo();
    guest_clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--target",
        WASM_TARGET,
    ]);
    guest_clippy.args(["--", "-D", "warnings"]);
    steps.extend([host_clippy, guest_clippy]);
    run_all(steps)
}

fn guest_cargo() -> Command {
    let mut command = cargo();
    command.current_dir(plugins_dir());
    command
}

fn ensure_wasm_target() -> Result<()> {
    println!("==> checking the {WASM_TARGET} target…");
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let Ok(listed) = listed else {
        // Without rustup the toolchain is managed some other way; the build
        // itself says clearly if the target is missing.
        println!("    rustup not found; assuming {WASM_TARGET} is installed");
        return Ok(());
    };
    let installed = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|line| line.trim() == WASM_TARGET);
    if installed {
        return Ok(());
    }
    println!("==> installing the {WASM_TARGET} target…");
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
        .with_context(|| format!("cannot install the {WASM_TARGET} target"))
}
