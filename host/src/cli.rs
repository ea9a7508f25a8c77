//! The `sluice` command: run a config, check it, publish and tail messages;
//! create, build and test plugins.

use std::io::{BufRead, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{self, Backend, StartFrom, SubscribeOptions};
use crate::{Message, app, config};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

/// `--version`: this build's version, the plugin world it implements (from
/// the WIT file's package line), the foreign world it also runs, and the
/// backends compiled in.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let world = crate::runtime::wit_package().unwrap_or("unknown");
    format!(
        "{}\nplugin world: {world}\nalso runs: {} (messaging-core, messaging-request-reply)\nbackends: {}",
        env!("CARGO_PKG_VERSION"),
        crate::runtime::MESSAGING_PACKAGE,
        backend::supported_schemes().join(", ")
    )
});

#[derive(Parser)]
#[command(
    name = "sluice",
    // Whatever the executable is called (the tests build their own).
    bin_name = "sluice",
    version,
    long_version = LONG_VERSION.as_str(),
    about = "Runs message handlers as sandboxed WebAssembly components",
    after_help = "Examples:
  sluice check                                   # ./sluice.toml and its plugins
  sluice run                                     # until Ctrl-C or SIGTERM
  sluice publish --url sqlite://sluice.db words hello
  sluice tail --url sqlite://sluice.db shouted --json
  sluice dlq list                                # dead letters of every route
  sluice new my-handler --lang rust              # a plugin project"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every route of a config until SIGINT or SIGTERM.
    #[command(
        after_help = "Examples:\n  sluice run                                  # ./sluice.toml\n  sluice run batch.toml --exit-when-idle 5     # a batch job"
    )]
    Run {
        /// The TOML config.
        #[arg(default_value = "sluice.toml")]
        config: PathBuf,
        /// Stop once no message has been seen for this many seconds.
        #[arg(long, value_name = "SECONDS")]
        exit_when_idle: Option<f64>,
    },
    /// Check a config and that every plugin implements the handler world.
    #[command(
        after_help = "Examples:\n  sluice check examples/anywhere.toml\n  SLUICE_BACKEND_URL=redis://127.0.0.1 sluice check   # with the override\n  sluice check --connect examples/anywhere.toml   # reach every backend too\n\nExit status: 0 when all is well, 1 when the config is wrong or (with --connect) a backend cannot be reached."
    )]
    Check {
        /// The TOML config.
        #[arg(default_value = "sluice.toml")]
        config: PathBuf,
        /// Also connect to every configured backend (credentials, server,
        /// where Sluice's state stands), changing nothing; one line each.
        #[arg(long)]
        connect: bool,
    },
    /// Publish messages to a topic.
    #[command(
        after_help = "Examples:\n  sluice publish --url sqlite://sluice.db orders '{\"id\": 1}' --key a1 -H source=cli\n  sluice tail --url sqlite://a.db orders --json | sluice publish --url redis://127.0.0.1 orders --lines --json"
    )]
    Publish {
        #[command(flatten)]
        target: Target,
        /// The topic.
        topic: String,
        /// The payload; with --lines, payloads are read from stdin, one per line.
        payload: Option<String>,
        /// Read one payload per line from stdin.
        #[arg(long, conflicts_with = "payload")]
        lines: bool,
        /// With --lines: each line is a message as `sluice tail --json`
        /// prints it; its key, headers and payload are published to TOPIC
        /// as they were (--key and --header add to them).
        #[arg(long, requires = "lines")]
        json: bool,
        /// The message key.
        #[arg(long)]
        key: Option<String>,
        /// A header, NAME=VALUE; repeatable.
        #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Publish the payload this many times.
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
    /// Send a request and print its reply's payload (exit 1 if none came in time).
    #[command(
        after_help = "Examples:\n  sluice request --url nats://127.0.0.1:4222 prices.quote '{\"sku\": \"a1\"}' --timeout-ms 2000\n  sluice request -c sluice.toml prices.quote a1 --json"
    )]
    Request {
        #[command(flatten)]
        target: Target,
        /// The topic a responder reads.
        topic: String,
        /// The request's payload.
        payload: String,
        /// The message key.
        #[arg(long)]
        key: Option<String>,
        /// A header, NAME=VALUE; repeatable.
        #[arg(long = "header", short = 'H', value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// How long to wait for the reply, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Print the whole reply as `sluice tail --json` does.
        #[arg(long)]
        json: bool,
    },
    /// Print the messages of topics (patterns allowed), e.g. a dead-letter topic.
    #[command(
        after_help = "Examples:\n  sluice tail --url redis://127.0.0.1 'orders.>' --follow --json\n  sluice tail -c sluice.toml orders.dead-letter --limit 10"
    )]
    Tail {
        #[command(flatten)]
        target: Target,
        /// Topics or patterns.
        #[arg(required = true)]
        topics: Vec<String>,
        /// Consume as this group (messages are then acknowledged for it);
        /// by default a throw-away group reads without disturbing others.
        #[arg(long)]
        group: Option<String>,
        /// Start from the earliest message or only new ones.
        #[arg(long, value_enum, default_value = "earliest")]
        from: From,
        /// Keep waiting for new messages instead of stopping when idle.
        #[arg(long, short)]
        follow: bool,
        /// Stop after this many messages.
        #[arg(long)]
        limit: Option<usize>,
        /// Print one JSON object per message.
        #[arg(long)]
        json: bool,
    },
    /// Handle a route's stored messages again, from a time on.
    ///
    /// They go to the route's redrive topic (it needs `redrive = true`),
    /// which only its group reads. Backends that keep history only.
    #[command(after_help = "Example:\n  sluice replay --route enrich --from 2h --rate 100")]
    Replay {
        /// The config the route is in.
        #[arg(long, short = 'c', default_value = "sluice.toml")]
        config: PathBuf,
        /// The route.
        #[arg(long)]
        route: String,
        /// From this time: an age (`30m`, `2h`, `7d` ago) or milliseconds
        /// since the epoch.
        #[arg(long, value_parser = crate::replay::parse_time)]
        from: u64,
        /// Up to this time (the same forms); now if absent.
        #[arg(long, value_parser = crate::replay::parse_time)]
        to: Option<u64>,
        /// At most this many messages a second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// A config's dead letters: list, show, redrive or purge them.
    #[command(
        after_help = "Examples:\n  sluice dlq list\n  sluice dlq redrive --route enrich --cause attempts-exhausted"
    )]
    Dlq {
        #[command(subcommand)]
        command: crate::dlq::cli::DlqCommand,
    },
    #[cfg(feature = "kit")]
    #[command(flatten)]
    Kit(crate::kit::cli::KitCommand),
    #[command(flatten)]
    Admin(crate::admin::cli::AdminCommand),
    /// Print a shell's completion script.
    ///
    /// e.g. `sluice completions bash > ~/.local/share/bash-completion/completions/sluice`.
    #[command(after_help = "Example:\n  sluice completions zsh > ~/.zfunc/_sluice")]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Check, repair, compact or describe a file log directory (file:// backend).
    #[cfg(feature = "filelog")]
    #[command(
        after_help = "Examples:\n  sluice log check ./data\n  sluice log compact \"file://./data?retention_ms=86400000\""
    )]
    Log {
        #[command(subcommand)]
        command: backend::filelog::LogCommand,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum From {
    Earliest,
    Latest,
}

/// Which backend a command talks to.
#[derive(Args)]
struct Target {
    /// A backend URL, e.g. sqlite://sluice.db.
    #[arg(long, env = "SLUICE_BACKEND_URL", conflicts_with = "config")]
    url: Option<String>,
    /// Take the backend from this config.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The backend's name in the config (needed when it has several).
    #[arg(long, requires = "config")]
    backend: Option<String>,
}

impl Target {
    async fn connect(&self) -> Result<Arc<dyn Backend>> {
        let url = match (&self.url, &self.config) {
            (Some(url), _) => url.clone(),
            (None, Some(path)) => {
                let loaded = config::load(path)?;
                let backends = &loaded.config.backends;
                let name = match &self.backend {
                    Some(name) => name.clone(),
                    None if backends.len() == 1 => backends.keys().next().unwrap().clone(),
                    None => bail!(
                        "{} has {} backends; choose one with --backend",
                        path.display(),
                        backends.len()
                    ),
                };
                backends
                    .get(&name)
                    .with_context(|| format!("{} has no backend named `{name}`", path.display()))?
                    .url
                    .clone()
            }
            (None, None) => {
                bail!("say which backend: --url URL, --config FILE or SLUICE_BACKEND_URL")
            }
        };
        backend::connect(&url).await
    }
}

/// Parses the command line and runs the command, as the `sluice` binary
/// does; the integration tests build their own binary on it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The span exporter starts with the log, before the config is loaded
    // for real; a config that does not load is reported by `run` itself.
    let telemetry = match &cli.command {
        Command::Run { config, .. } => config::load(config)
            .ok()
            .and_then(|loaded| loaded.config.telemetry),
        _ => None,
    };
    // Dropped last, after the runtime: it sends the spans still waiting.
    let _telemetry = match crate::telemetry::init(telemetry.as_ref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Admin(command) => {
            tokio::task::spawn_blocking(move || command.run()).await??;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "kit")]
        Command::Kit(command) => command.run().await,
        Command::Run {
            config,
            exit_when_idle,
        } => run(&config, exit_when_idle.map(Duration::from_secs_f64)).await,
        Command::Check { config, connect } => check(&config, connect).await,
        Command::Replay {
            config,
            route,
            from,
            to,
            rate,
        } => replay(&config, &route, from, to, rate).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "sluice", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq { command } => {
            command.run().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish {
            target,
            topic,
            payload,
            lines,
            json,
            key,
            headers,
            count,
        } => {
            let backend = target.connect().await?;
            let headers_parsed = parse_headers(&headers)?;
            let mut messages = Vec::new();
            if lines {
                for (number, line) in std::io::stdin().lock().lines().enumerate() {
                    let line = line?;
                    messages.push(if json {
                        if line.trim().is_empty() {
                            continue;
                        }
                        crate::message::json::read(&line, &topic)
                            .with_context(|| format!("stdin line {}", number + 1))?
                    } else {
                        Message::new(topic.clone(), line)
                    });
                }
            } else {
                let payload = payload.unwrap_or_default();
                messages.extend((0..count).map(|_| Message::new(topic.clone(), payload.clone())));
            }
            for message in &mut messages {
                if key.is_some() {
                    message.key = key.clone();
                }
                message.headers.extend(headers_parsed.iter().cloned());
            }
            let total = messages.len();
            for chunk in messages.chunks(500) {
                backend.publish(chunk.to_vec()).await?;
            }
            eprintln!("published {total} message(s) to {topic}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Request {
            target,
            topic,
            payload,
            key,
            headers,
            timeout_ms,
            json,
        } => {
            let backend = target.connect().await?;
            let mut request = Message::new(topic, payload);
            request.key = key;
            request.headers = parse_headers(&headers)?;
            let requester = crate::request::Requester::new(backend);
            match requester
                .request(request, Duration::from_millis(timeout_ms))
                .await
            {
                Ok(reply) if json => println!("{}", crate::message::json::write(&reply, &[])),
                Ok(reply) => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&reply.payload)?;
                    out.write_all(b"\n")?;
                }
                Err(error) => {
                    eprintln!("{error}");
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail {
            target,
            topics,
            group,
            from,
            follow,
            limit,
            json,
        } => {
            let backend = target.connect().await?;
            tail(backend, topics, group, from, follow, limit, json).await
        }
        #[cfg(feature = "filelog")]
        Command::Log { command } => Ok(backend::filelog::run_cli(command)),
    }
}

/// `NAME=VALUE` headers, as given on the command line.
fn parse_headers(headers: &[String]) -> Result<Vec<(String, String)>> {
    headers
        .iter()
        .map(|header| {
            let (name, value) = header
                .split_once('=')
                .with_context(|| format!("header `{header}` is not NAME=VALUE"))?;
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

async fn run(path: &Path, exit_when_idle: Option<Duration>) -> Result<ExitCode> {
    let shutdown = app::shutdown_on_signals();
    let summary = app::serve(path, shutdown, exit_when_idle).await?;
    println!("Summary");
    for (route, stats) in summary {
        println!("  route {route}: {stats}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn replay(
    path: &Path,
    name: &str,
    from_ms: u64,
    to_ms: Option<u64>,
    rate: Option<f64>,
) -> Result<ExitCode> {
    if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of messages a second");
    }
    let loaded = config::load(path)?;
    let route = loaded
        .config
        .routes
        .iter()
        .find(|r| r.name == name)
        .with_context(|| format!("{} has no route named `{name}`", path.display()))?;
    let backend_name = loaded.source_backend(route);
    let backend = backend::connect(&loaded.config.backends[backend_name].url)
        .await
        .with_context(|| format!("backends.{backend_name}"))?;
    let replay = crate::replay::Replay {
        route: name.to_string(),
        backend,
        topics: route.topics.iter().map(|t| t.get_ref().clone()).collect(),
        redrive_topic: route.redrive.then(|| route.redrive_topic()),
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sent = replay
        .run(from_ms, to_ms, rate, |n| {
            if terminal {
                eprint!("\rroute {name}: replayed {n}");
            }
        })
        .await?;
    if terminal {
        eprintln!();
    }
    println!("route {name}: replayed {sent} message(s)");
    Ok(ExitCode::SUCCESS)
}

async fn check(path: &Path, connect: bool) -> Result<ExitCode> {
    use std::io::Write;
    use std::sync::Mutex;

    use tracing::instrument::WithSubscriber;

    /// Log lines held while checking, written after the verdict so none
    /// lands in the middle of it.
    #[derive(Clone, Default)]
    struct Held(Arc<Mutex<Vec<u8>>>);
    impl Write for Held {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Backend URLs by name.
    type Urls = Vec<(String, String)>;

    /// The lines that describe a valid config, and its backends' URLs.
    fn verdict(path: &Path) -> Result<(Vec<String>, Urls)> {
        let loaded = config::load(path)?;
        // At most once: nothing keeps a message for a reader not connected.
        // (`run` starts such a route anyway, warning, so one config still
        // runs on every backend.)
        for (index, route) in loaded.config.routes.iter().enumerate() {
            let name = loaded.dead_letter_backend(route);
            let scheme = loaded.config.backends[name]
                .url
                .split("://")
                .next()
                .unwrap_or("");
            if matches!(scheme, "nats" | "redis+pubsub" | "rediss+pubsub") {
                let from = match loaded.set_by_env(&format!("backends.{name}.url")) {
                    Some(variable) => format!(", as {variable} sets it"),
                    None => String::new(),
                };
                bail!(
                    "{}: routes[{index}].dead_letter_backend: route `{}` would send its dead \
                     letters to backend `{name}` ({scheme}://{from}), which keeps nothing nobody \
                     is subscribed to; set `dead_letter_backend` to a backend that keeps them",
                    path.display(),
                    route.name
                );
            }
        }
        let runtime = Arc::new(app::runtime(&loaded)?);
        let plugins = crate::deploy::Deployer::load(runtime, &loaded)?;
        let mut lines = vec![format!(
            "{}: ok ({} backend(s), {} plugin(s), {} route(s))",
            path.display(),
            loaded.config.backends.len(),
            plugins.slots().count(),
            loaded.config.routes.len()
        )];
        for (name, backend) in &loaded.config.backends {
            let from = match loaded.set_by_env(&format!("backends.{name}.url")) {
                Some(variable) => format!(" (from {variable})"),
                None => String::new(),
            };
            lines.push(format!(
                "  backend {name}: {}{from}",
                backend::redact(&backend.url)
            ));
        }
        for slot in plugins.slots() {
            let plugin = slot.current();
            lines.push(format!(
                "  plugin {}: implements {} (sha256 {})",
                slot.name,
                plugin.world(),
                slot.current_info().hash
            ));
            if plugin.settings.publish_to.is_empty() {
                lines.push(format!(
                    "  plugin {}: may publish to no topic; if it has outputs, add `plugins.{}.publish_to`",
                    slot.name, slot.name
                ));
            }
        }
        for route in &loaded.config.routes {
            let topics: Vec<&str> = route.topics.iter().map(|t| t.get_ref().as_str()).collect();
            lines.push(format!(
                "  route {}: {} on {} -> {} -> {}; dead letters to {} on {}",
                route.name,
                topics.join(", "),
                loaded.source_backend(route),
                route
                    .plugin_name()
                    .map_or("forward".into(), |plugin| format!("plugin {plugin}")),
                loaded.output_backends(route).join(" and "),
                route.dead_letter_topic(),
                loaded.dead_letter_backend(route)
            ));
        }
        let backends = loaded
            .config
            .backends
            .iter()
            .map(|(name, backend)| (name.clone(), backend.url.clone()))
            .collect();
        Ok((lines, backends))
    }

    /// One line per backend, and the names of those that cannot be reached.
    async fn reach(backends: &Urls) -> (Vec<String>, Vec<String>) {
        let probes = backends.iter().map(|(name, url)| async move {
            let found = tokio::time::timeout(PROBE_LIMIT, backend::probe(url))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {PROBE_LIMIT:?}")));
            (name, found)
        });
        let mut lines = Vec::new();
        let mut unreachable = Vec::new();
        for (name, found) in futures::future::join_all(probes).await {
            match found {
                Ok(detail) => lines.push(format!("  connect {name}: ok: {detail}")),
                Err(e) => {
                    lines.push(format!("  connect {name}: failed: {e:#}"));
                    unreachable.push(name.clone());
                }
            }
        }
        (lines, unreachable)
    }

    let held = Held::default();
    let writer = held.clone();
    let log = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .finish();
    let log = tracing::Dispatch::new(log);
    let mut result = tracing::dispatcher::with_default(&log, || verdict(path));
    if let Ok((lines, backends)) = &mut result
        && connect
    {
        let (reached, unreachable) = reach(backends).with_subscriber(log.clone()).await;
        lines.extend(reached);
        if !unreachable.is_empty() {
            println!("{}", lines.join("\n"));
            result = Err(anyhow::anyhow!(
                "cannot reach backend(s) {}",
                unreachable.join(", ")
            ));
        }
    }
    if let Ok((lines, _)) = &result {
        println!("{}", lines.join("\n"));
    }
    let logged = std::mem::take(&mut *held.0.lock().unwrap());
    std::io::stderr().write_all(&logged)?;
    result.map(|_| ExitCode::SUCCESS)
}

/// How long `check --connect` waits for each backend.
const PROBE_LIMIT: Duration = Duration::from_secs(20);

async fn tail(
    backend: Arc<dyn Backend>,
    topics: Vec<String>,
    group: Option<String>,
    from: From,
    follow: bool,
    limit: Option<usize>,
    json: bool,
) -> Result<ExitCode> {
    let ephemeral = group.is_none();
    let group = group.unwrap_or_else(|| format!("sluice-tail-{}", uuid_like()));
    let mut options = SubscribeOptions::new(topics, group);
    options.ephemeral = ephemeral;
    options.start = match from {
        From::Earliest => StartFrom::Earliest,
        From::Latest => StartFrom::Latest,
    };
    let subscription = backend.subscribe(options).await?;
    let mut printed = 0usize;
    let shutdown = app::shutdown_on_signals();
    loop {
        if shutdown.is_cancelled() || limit.is_some_and(|l| printed >= l) {
            break;
        }
        let want = limit.map_or(100, |l| (l - printed).min(100));
        let deliveries = subscription.fetch(want, Duration::from_millis(500)).await?;
        if deliveries.is_empty() && !follow {
            break;
        }
        for delivery in deliveries {
            print_message(&delivery.message, delivery.attempt, json);
            subscription.ack(&delivery).await?;
            printed += 1;
        }
    }
    subscription.close().await?;
    eprintln!("{printed} message(s)");
    Ok(ExitCode::SUCCESS)
}

fn print_message(message: &Message, attempt: u32, json: bool) {
    if json {
        let value = crate::message::json::write(message, &[("attempt", attempt.into())]);
        println!("{value}");
    } else {
        let payload = String::from_utf8_lossy(&message.payload);
        let key = message
            .key
            .as_deref()
            .map(|k| format!(" key={k}"))
            .unwrap_or_default();
        println!("[{}]{key} {payload}", message.topic);
        for (name, value) in &message.headers {
            println!("    {name}: {value}");
        }
    }
}

fn uuid_like() -> String {
    Message::new("x", Vec::new()).id
}
