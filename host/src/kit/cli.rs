//! The kit's commands as the `sluice` binary parses them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

use super::Lang;
use super::build::{BuildOptions, build};
use super::test::{TestOptions, Verdict};
use super::toolchain::Toolchains;

#[derive(Subcommand)]
pub enum KitCommand {
    /// Create a plugin project that builds with `sluice build` and passes
    /// its own `sluice test`.
    New {
        /// The plugin's name; the project goes into a directory of this name.
        name: String,
        /// The language to write it in.
        #[arg(long, value_enum)]
        lang: Lang,
        /// Create the project inside this directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// For a Rust project: depend on the SDK in this directory (the `sdk/`
        /// of a Sluice checkout) instead of a copy of it in the project.
        #[arg(long, env = "SLUICE_SDK")]
        sdk: Option<PathBuf>,
    },
    /// Build a plugin project (Rust, Python, JavaScript or C) into a
    /// component and check it against the world. Python and JavaScript
    /// toolchains are installed on first use into $SLUICE_TOOLCHAINS
    /// (default ~/.cache/sluice/toolchains).
    Build {
        /// The project directory.
        #[arg(default_value = ".")]
        project: PathBuf,
        /// Where to write the component (default: PROJECT/target/NAME.wasm).
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Rebuild a Python, JavaScript or C plugin even if nothing changed.
        #[arg(long)]
        force: bool,
    },
    /// Run a plugin on recorded messages (JSON lines, as `sluice tail
    /// --json` prints them) with no backend and print one line per message:
    /// `N ok -> …`, `N retry: …`, `N reject: …`, or `N trap|timeout|memory-limit: …`.
    /// Exit status: 0 if every message returned (outputs, retry or reject)
    /// and any --expect file matched; 2 if a message trapped, timed out or
    /// hit the memory cap; 1 if the lines differ from --expect or the run
    /// failed.
    Test {
        /// The component.
        plugin: PathBuf,
        /// The messages, one JSON object per line.
        #[arg(long, short)]
        input: PathBuf,
        /// A value of the plugin's `config` table, KEY=VALUE; repeatable.
        /// (`-c` elsewhere names a config file, so not here.)
        #[arg(long = "set", short = 's', alias = "config", value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Compare the printed lines with this file.
        #[arg(long)]
        expect: Option<PathBuf>,
        /// Deadline of one call.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Memory cap of an instance.
        #[arg(long, default_value_t = 64)]
        memory_mb: usize,
        /// Hand the plugin this many messages per call (its `handle-batch`,
        /// as a route with this `batch_size` would).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        batch: u32,
    },
}

impl KitCommand {
    pub async fn run(self) -> Result<ExitCode> {
        match self {
            KitCommand::New {
                name,
                lang,
                dir,
                sdk,
            } => {
                let project = super::new::scaffold(&name, lang, &dir, sdk.as_deref())?;
                println!("created {} ({lang}); then:", project.display());
                println!("  cd {}", project.display());
                println!("  sluice build");
                println!(
                    "  sluice test target/{name}.wasm --input test/messages.jsonl --expect test/expected.txt"
                );
                Ok(ExitCode::SUCCESS)
            }
            KitCommand::Build {
                project,
                out,
                force,
            } => {
                let options = BuildOptions {
                    project,
                    out,
                    toolchains: Toolchains::locate()?,
                    force,
                    cache_dir: super::cache_dir(),
                };
                let built = tokio::task::spawn_blocking(move || build(&options)).await??;
                let how = if built.up_to_date {
                    "up to date".to_string()
                } else {
                    format!("built in {:.1} s", built.elapsed.as_secs_f64())
                };
                println!(
                    "{} ({} plugin, {} KiB, {how}): implements {}",
                    built.wasm.display(),
                    built.lang,
                    built.size.div_ceil(1024),
                    built.world
                );
                Ok(ExitCode::SUCCESS)
            }
            KitCommand::Test {
                plugin,
                input,
                config,
                expect,
                timeout_ms,
                memory_mb,
                batch,
            } => {
                let config = config
                    .iter()
                    .map(|pair| {
                        pair.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .with_context(|| format!("config `{pair}` is not KEY=VALUE"))
                    })
                    .collect::<Result<_>>()?;
                let options = TestOptions {
                    wasm: plugin,
                    input,
                    config,
                    expect,
                    timeout: Duration::from_millis(timeout_ms),
                    memory_limit: memory_mb << 20,
                    batch: batch as usize,
                    cache_dir: super::cache_dir(),
                };
                let (verdict, _) = super::test::run(&options).await?;
                Ok(match verdict {
                    Verdict::Passed => ExitCode::SUCCESS,
                    Verdict::Trapped => ExitCode::from(2),
                    Verdict::Mismatch => ExitCode::FAILURE,
                })
            }
        }
    }
}
