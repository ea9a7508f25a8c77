//! The build, test, benchmark, lint and fuzz tasks: each a short sequence of
//! cargo runs over the host workspace and the guest workspace in `plugins/`.

use std::process::Command;

use anyhow::{Context, Result};

use crate::process::{cargo, plugins_dir, root, run, run_all};

/// The target every plugin is built for.
pub const WASM_TARGET: &str = "wasm32-wasip2";

/// The host built with every finished backend, as the tests, benchmarks
/// and lints build it (the default build leaves out AWS, which takes long
/// to compile).
const ALL_BACKENDS: &str = "sluice/full";

/// Every backend, and every integration test: those that need a server or
/// a toolchain too, which `test` provides.
const EVERYTHING: &str = "sluice/full,sluice-tests/full";

/// The example plugins written in Python, JavaScript and C, each built by
/// `sluice build` into its own `target/`.
pub const LANGUAGE_EXAMPLES: &[&str] = &[
    "plugins/python/enrich",
    "plugins/js/enrich",
    "plugins/c/enrich",
];

/// The Python component written against `wasi:messaging@0.2.0-draft`
/// alone (world `messaging-core`), which `sluice build` cannot build: it
/// knows only Sluice's own world.
const PYTHON_WASI_MESSAGING: &str = "plugins/python/wasi_messaging";

/// Builds every plugin: the Rust ones, then the other languages' examples.
pub fn plugins() -> Result<()> {
    rust_plugins()?;
    language_examples()
}

/// Builds the Rust plugins in release, installing the wasm target if needed.
/// The `wasi:messaging` WIT is fetched first: `plugins/wasi_messaging`
/// generates its bindings from it.
pub fn rust_plugins() -> Result<()> {
    ensure_wasm_target()?;
    sluice_witdeps::ensure(&root())?;
    println!("==> building plugins…");
    run(guest_cargo().args(["build", "--target", WASM_TARGET, "--release"]))
}

/// Builds the Python, JavaScript and C examples with `sluice build`,
/// installing the system toolchains when missing (componentize-py and
/// componentize-js go into target/toolchains), then the Python
/// `wasi:messaging` component.
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
    python_wasi_messaging()
}

/// Builds [`PYTHON_WASI_MESSAGING`] into its `target/` with componentize-py
/// itself, the one `sluice build` installed for the Python example above
/// (in the venv `target/toolchains/python`).
fn python_wasi_messaging() -> Result<()> {
    let wit = sluice_witdeps::ensure(&root())?;
    let componentize = crate::toolchains::dir().join("python/bin/componentize-py");
    let project = root().join(PYTHON_WASI_MESSAGING);
    println!("==> building the Python wasi:messaging component…");
    run(Command::new(componentize)
        .arg("--wit-path")
        .arg(wit)
        .args(["--world", "messaging-core", "componentize", "app"])
        .arg("--python-path")
        .arg(&project)
        .arg("--output")
        .arg(project.join("target/wasi_messaging.wasm")))
}

/// Host tests (with `extra` passed on to `cargo test`), then the SDK's own
/// tests, which run natively.
pub fn test(extra: &[String]) -> Result<()> {
    plugins()?;
    let brokers = crate::brokers::ensure()?;
    if extra.is_empty() {
        println!("==> building the host workspace's tests, every backend…");
        run(cargo().args(["test", "--workspace", "--no-run", "--features", EVERYTHING]))?;
    }
    brokers.wait()?;
    println!("==> testing the host workspace, every backend…");
    let mut host = cargo();
    // Every test binary runs even after one fails, so a run shows all that
    // is wrong at once.
    host.args([
        "test",
        "--workspace",
        "--no-fail-fast",
        "--features",
        EVERYTHING,
    ])
    .args(extra);
    let mut steps = vec![host];
    if extra.is_empty() {
        // Tests that measure throughput, alone once the rest are done: the
        // others beside them would move their figures.
        let mut alone = cargo();
        alone.args(["test", "-p", "sluice-tests", "--test", "integration"]);
        alone.args(["--features", EVERYTHING, "--", "--ignored", "hostile::"]);
        steps.push(alone);
    }
    let mut sdk = guest_cargo();
    sdk.args(["test", "-p", "sluice-sdk"]);
    steps.push(sdk);
    let result = run_all(steps);
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
    crate::brokers::ensure()?.wait()?;
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
        EVERYTHING,
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

/// The host's fuzz targets (`host/src/fuzz/`) with `seconds` to share,
/// then a table of the inputs each ran. They run in the test build, whose
/// overflow checks turn an arithmetic overflow into a finding.
pub fn fuzz(seconds: u64) -> Result<()> {
    let report = root().join("target/fuzz/report.tsv");
    if let Some(dir) = report.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Each target appends its line; a previous run's must not count.
    let _ = std::fs::remove_file(&report);
    println!("==> fuzzing every reader of untrusted bytes for {seconds} s…");
    let result = run(cargo()
        .args(["test", "-p", "sluice", "--features", ALL_BACKENDS])
        .args(["--lib", "fuzz::", "--", "--nocapture"])
        .env("SLUICE_FUZZ_SECONDS", seconds.to_string())
        .env("SLUICE_FUZZ_REPORT", &report));
    fuzz_summary(&report);
    result
}

/// The inputs each target ran, from the lines the targets appended.
fn fuzz_summary(report: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(report) else {
        return;
    };
    let mut rows: Vec<(&str, u64, &str)> = text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            let target = fields.next()?;
            let inputs = fields.next()?.parse().ok()?;
            Some((target, inputs, fields.next().unwrap_or("")))
        })
        .collect();
    rows.sort();
    println!("==> fuzz targets and the inputs each ran:");
    println!("{:<24} {:>10} {:>8}", "target", "inputs", "seconds");
    for (target, inputs, seconds) in &rows {
        println!("{target:<24} {inputs:>10} {seconds:>8}");
    }
    let total: u64 = rows.iter().map(|(_, inputs, _)| inputs).sum();
    println!("{:<24} {total:>10}", "total");
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
