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
    #[command(
        after_help = "Examples:\n  sluice new shout --lang python\n  sluice new shout --lang rust --dir ~/plugins"
    )]
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
    #[command(
        after_help = "Examples:\n  sluice build                  # the project in this directory\n  sluice build shout -o shout.wasm"
    )]
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
    /// Build a plugin project, run it on a local backend and print each
    /// message's outcome; rebuild and deploy it on every save.
    ///
    /// The route reads the topics of test/messages.jsonl (published once at
    /// the start) from a SQLite file in PROJECT/target/sluice-dev/; feed it
    /// with the `sluice publish` line it prints. With --admin and --plugin
    /// each build is deployed to that running host instead.
    #[command(after_help = "Examples:
  sluice dev                                # the project in this directory
  sluice dev my-handler --topic orders      # read another topic
  sluice dev --admin http://127.0.0.1:9464 --plugin upper   # deploy to a running host")]
    Dev {
        /// The project directory.
        #[arg(default_value = ".")]
        project: PathBuf,
        /// A topic the route reads; repeatable (default: the input's topics).
        #[arg(long, short)]
        topic: Vec<String>,
        /// Messages published once at the start (default:
        /// PROJECT/test/messages.jsonl if it exists).
        #[arg(long, short)]
        input: Option<PathBuf>,
        /// The backend the route reads (default: a SQLite file in
        /// PROJECT/target/sluice-dev/).
        #[arg(long, conflicts_with = "admin")]
        url: Option<String>,
        /// A value of the plugin's `config` table, KEY=VALUE; repeatable.
        #[arg(long = "set", short = 's', value_name = "KEY=VALUE")]
        config: Vec<String>,
        /// Deploy each build to the running host with this admin API.
        #[arg(long, requires = "plugin")]
        admin: Option<String>,
        /// With --admin: the plugin each build is a version of.
        #[arg(long, requires = "admin")]
        plugin: Option<String>,
        /// With --admin: its bearer token.
        #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Run a plugin on recorded messages (JSON lines, as `sluice tail
    /// --json` prints them) with no backend and print one line per message:
    /// `N ok -> …`, `N retry: …`, `N reject: …`, or `N trap|timeout|memory-limit: …`.
    /// Exit status: 0 if every message returned (outputs, retry or reject)
    /// and any --expect file matched; 2 if a message trapped, timed out or
    /// hit the memory cap; 1 if the lines differ from --expect or the run
    /// failed.
    #[command(
        after_help = "Examples:\n  sluice test target/shout.wasm --input test/messages.jsonl --expect test/expected.txt\n  sluice tail --url sqlite://sluice.db orders --json > orders.jsonl && sluice test target/shout.wasm -i orders.jsonl"
    )]
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
            KitCommand::Dev {
                project,
                topic,
                input,
                url,
                config,
                admin,
                plugin,
                token,
            } => {
                let options = super::dev::DevOptions {
                    build: BuildOptions {
                        project,
                        out: None,
                        toolchains: Toolchains::locate()?,
                        force: false,
                        cache_dir: super::cache_dir(),
                    },
                    url,
                    topics: topic,
                    input,
                    config: key_values(&config)?,
                    attach: admin.zip(plugin).map(|(admin, plugin)| super::dev::Attach {
                        client: crate::admin::client::AdminClient::new(&admin, token),
                        plugin,
                    }),
                };
                super::dev::run(options, crate::app::shutdown_on_signals()).await?;
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
                let config = key_values(&config)?;
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

/// `KEY=VALUE` arguments as pairs.
fn key_values(pairs: &[String]) -> Result<Vec<(String, String)>> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("config `{pair}` is not KEY=VALUE"))
        })
        .collect()
}
