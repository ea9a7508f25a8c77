//! Sluice's project tasks, run as `cargo xtask <task>`: building the guest
//! plugins, the demo, the tests, the benchmark, the lints and a long fuzz
//! run, each in one command that works on a fresh checkout.

mod brokers;
mod demo;
mod process;
mod report;
mod tasks;
mod toolchains;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use process::Failed;

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Sluice project tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build every plugin: the Rust ones for wasm32-wasip2 in release, and
    /// the Python, JavaScript and C examples with `sluice build` (installing
    /// the wasm target and missing toolchains).
    Plugins,
    /// Run examples/demo.toml on sample messages, show and check the results.
    Demo,
    /// Build the plugins, then run the host's tests and the SDK's.
    Test {
        /// Passed on to `cargo test --workspace` as given, e.g. a test name
        /// filter, `--release` or `-- --nocapture`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the plugins, then benchmark the pipeline, wasm against native.
    Bench,
    /// Check formatting and run clippy in both workspaces.
    Lint,
    /// Fuzz every reader of untrusted bytes (config, backend URLs, file log
    /// files, message envelopes and headers) for a while, showing each
    /// target's progress, then how many inputs each ran. A failing input is
    /// saved under host/fuzz/regressions/.
    Fuzz {
        /// Seconds the whole run takes (after the build), shared by the
        /// targets.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            exit_code(&error)
        }
    }
}

fn dispatch(task: Task) -> Result<()> {
    match task {
        Task::Plugins => tasks::plugins(),
        Task::Demo => demo::demo(),
        Task::Test { .. } => tasks::test(&passthrough_args("test")),
        Task::Bench => tasks::bench(),
        Task::Lint => tasks::lint(),
        Task::Fuzz { seconds } => tasks::fuzz(seconds),
    }
}

/// The words after `task` exactly as typed. Clap drops the first `--`, but
/// `cargo test` needs it to tell its own options from the test binaries'.
fn passthrough_args(task: &str) -> Vec<String> {
    std::env::args()
        .skip(1)
        .skip_while(|arg| arg != task)
        .skip(1)
        .collect()
}

/// A failed step's own status, so callers such as CI see what cargo said.
fn exit_code(error: &anyhow::Error) -> ExitCode {
    let code = error
        .downcast_ref::<Failed>()
        .map_or(1, |failed| failed.code);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
