//! `sluice dev`: the plugin author's inner loop. Builds the project, runs it
//! on a route over an embedded backend, rebuilds and deploys it on every
//! save of its sources, and prints each message's outcome as it happens.
//!
//! The backend is a SQLite file in the project's `target/sluice-dev/` (not
//! `target/sluice/`, which every build stages afresh), so other
//! shells can feed it with `sluice publish --url …` and read what came out
//! with `sluice tail`. With `--admin` the loop deploys each build to a
//! running host instead, which then does the handling.
//!
//! A build that fails, or a component that does not fit the world, is
//! reported and the running version stays, as on a production host.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::build::{BuildOptions, Built, build};
use super::test::{describe_call_error, describe_outcome, parse_input, printable};
use crate::admin::client::AdminClient;
use crate::backend::{self, SubscribeOptions};
use crate::deploy::PluginSlot;
use crate::message::{Message, headers};
use crate::router::{
    MessageHandler, RetryPolicy, Route, RouteControl, RouteSpec, RouteStats, WasmHandler, Worker,
};
use crate::runtime::{CallError, Outcome, PluginSettings, Runtime};

/// Quiet time after the last change before a rebuild: editors save in
/// several writes.
const SETTLE: Duration = Duration::from_millis(300);

/// How often a running build says it is still running.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What `sluice dev` runs.
pub struct DevOptions {
    /// How to build the project (its directory, toolchains, cache).
    pub build: BuildOptions,
    /// The backend the route reads; a SQLite file in the project by default.
    pub url: Option<String>,
    /// The topics the route reads; by default those of the input messages.
    pub topics: Vec<String>,
    /// Messages published once at the start (JSON lines, as `sluice test`
    /// reads them); `test/messages.jsonl` of the project by default.
    pub input: Option<PathBuf>,
    /// The plugin's `config` table.
    pub config: Vec<(String, String)>,
    /// Deploy each build to the running host whose admin API this is,
    /// as plugin `plugin`, instead of running a route here.
    pub attach: Option<Attach>,
}

/// A running host the loop deploys to.
pub struct Attach {
    pub client: AdminClient,
    pub plugin: String,
}

/// Runs the loop until `shutdown`.
pub async fn run(mut options: DevOptions, shutdown: CancellationToken) -> Result<()> {
    options.build.project = options
        .build
        .project
        .canonicalize()
        .with_context(|| format!("no project at {}", options.build.project.display()))?;
    let project = options.build.project.clone();
    let options = Arc::new(options);
    let first = build_showing_progress(&options)
        .await
        .context("the first build failed; fix it and run `sluice dev` again")?;
    let deploy: Box<dyn Deploy> = match &options.attach {
        Some(_) => {
            let remote = Remote(options.clone());
            remote.deployed(&first).await?;
            Box::new(remote)
        }
        None => Box::new(Local::start(&options, &first, shutdown.clone()).await?),
    };

    let (_watcher, mut changes) = watch(&project)?;
    println!("watching {} for changes; Ctrl-C stops", project.display());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = changes.recv() => {
                let Some(mut changed) = changed else { break };
                // Let the burst of writes of one save end; its last names
                // the file (an editor's first may name a temporary one).
                while let Ok(Some(later)) = tokio::time::timeout(SETTLE, changes.recv()).await {
                    changed = later;
                }
                println!("changed: {}; rebuilding", shown(&project, &changed));
                match build_showing_progress(&options).await {
                    Ok(built) => {
                        if let Err(e) = deploy.deployed(&built).await {
                            println!("not deployed, the running version stays: {e:#}");
                        }
                    }
                    Err(e) => println!("build failed, the running version stays: {e:#}"),
                }
            }
        }
    }
    deploy.stop().await
}

/// Builds on a blocking thread, saying every few seconds that it still runs.
async fn build_showing_progress(options: &Arc<DevOptions>) -> Result<Built> {
    let started = Instant::now();
    println!("building {}…", options.build.project.display());
    let task = {
        let options = options.clone();
        tokio::task::spawn_blocking(move || build(&options.build))
    };
    tokio::pin!(task);
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let built = loop {
        tokio::select! {
            done = &mut task => break done.context("the build panicked")??,
            _ = ticks.tick() => {
                println!("  still building ({} s)", started.elapsed().as_secs());
            }
        }
    };
    println!(
        "built {} ({} plugin, {} KiB) in {:.1} s",
        built.wasm.display(),
        built.lang,
        built.size.div_ceil(1024),
        started.elapsed().as_secs_f64()
    );
    Ok(built)
}

/// Where a build goes once it is built.
#[async_trait]
trait Deploy: Send + Sync {
    async fn deployed(&self, built: &Built) -> Result<()>;
    async fn stop(self: Box<Self>) -> Result<()>;
}

/// A route run here, over the project's own backend.
struct Local {
    runtime: Arc<Runtime>,
    settings: PluginSettings,
    slot: Arc<PluginSlot>,
    route: CancellationToken,
    running: tokio::task::JoinHandle<Result<()>>,
}

impl Local {
    async fn start(
        options: &DevOptions,
        first: &Built,
        shutdown: CancellationToken,
    ) -> Result<Self> {
        let project = &options.build.project;
        let runtime = Arc::new(Runtime::new(options.build.cache_dir.clone())?);
        let name = first
            .wasm
            .file_stem()
            .map_or("plugin".into(), |s| s.to_string_lossy().into_owned());
        let mut settings = PluginSettings::new(name.clone());
        settings.config = options.config.iter().cloned().collect();
        // A dev loop shows every output; which topics a deployment may
        // publish to is its config's business.
        settings.publish_to = vec![">".into()];
        let plugin = Arc::new(runtime.load_file(&first.wasm, settings.clone())?);
        let slot = Arc::new(PluginSlot::new(name.clone(), plugin, "sluice dev"));

        let url = match &options.url {
            Some(url) => url.clone(),
            None => {
                let dir = project.join("target").join("sluice-dev");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                format!("sqlite://{}", dir.join("dev.db").display())
            }
        };
        let backend = backend::connect(&url).await?;
        let input = match &options.input {
            Some(path) => Some(path.clone()),
            None => Some(project.join("test").join("messages.jsonl")).filter(|p| p.is_file()),
        };
        let messages = match &input {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                parse_input(&text)
                    .with_context(|| format!("{} is not JSON lines of messages", path.display()))?
                    .into_iter()
                    .map(|(message, _)| message)
                    .collect()
            }
            None => Vec::new(),
        };
        let topics = route_topics(&options.topics, &messages, &name);

        let mut spec = RouteSpec::new(
            name.clone(),
            SubscribeOptions::new(topics.clone(), "sluice-dev"),
        );
        // Failures show within seconds, not after minutes of backoff.
        spec.retry = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
            jitter: 0.0,
        };
        let route = Route {
            spec,
            source: backend.clone(),
            outputs: vec![backend.clone()],
            dead_letters: None,
            handler: Arc::new(Printing {
                inner: WasmHandler::over(slot.clone()),
                seen: Arc::new(AtomicUsize::new(0)),
            }),
            stats: Arc::new(RouteStats::default()),
        };
        let dead_letter_topic = route.spec.dead_letter_topic.clone();
        let subscribed = route.subscribe().await?;
        let token = shutdown.child_token();
        let running =
            tokio::spawn(subscribed.run_with(token.clone(), Arc::new(RouteControl::default())));
        if !messages.is_empty() {
            backend.publish(messages.clone()).await?;
            println!(
                "published {} message(s) from {}",
                messages.len(),
                input.as_deref().map(Path::display).expect("read above")
            );
        }
        println!(
            "{name} reads {} on {}; dead letters go to {dead_letter_topic}",
            topics.join(", "),
            backend::redact(&url)
        );
        println!(
            "send one:  sluice publish --url {} {} hello",
            shell_word(&url),
            topics[0]
        );
        println!("running version {}", slot.current().short_hash());
        Ok(Local {
            runtime,
            settings,
            slot,
            route: token,
            running,
        })
    }
}

#[async_trait]
impl Deploy for Local {
    async fn deployed(&self, built: &Built) -> Result<()> {
        // Compiling takes seconds: off the runtime's threads, which carry
        // the route meanwhile.
        let (runtime, settings, wasm) = (
            self.runtime.clone(),
            self.settings.clone(),
            built.wasm.clone(),
        );
        let plugin = tokio::task::spawn_blocking(move || runtime.load_file(&wasm, settings))
            .await
            .context("the compile task panicked")??;
        match self.slot.swap(Arc::new(plugin), "sluice dev") {
            Some(info) => println!("deployed version {}", &info.hash[..12]),
            None => println!(
                "running version {} (unchanged)",
                self.slot.current().short_hash()
            ),
        }
        Ok(())
    }

    async fn stop(self: Box<Self>) -> Result<()> {
        self.route.cancel();
        self.running.await.context("the route panicked")?
    }
}

/// Builds deployed to a running host through its admin API.
struct Remote(Arc<DevOptions>);

#[async_trait]
impl Deploy for Remote {
    async fn deployed(&self, built: &Built) -> Result<()> {
        let options = self.0.clone();
        let wasm = std::fs::read(&built.wasm)
            .with_context(|| format!("cannot read {}", built.wasm.display()))?;
        let answer = tokio::task::spawn_blocking(move || {
            let attach = options.attach.as_ref().expect("remote deploys attach");
            attach
                .client
                .put(&format!("/api/plugins/{}", attach.plugin), wasm)
                .map(|answer| (attach.plugin.clone(), answer))
        })
        .await??;
        let (plugin, answer) = answer;
        match answer["deployed"]["hash"].as_str() {
            Some(hash) => println!(
                "deployed plugin {plugin} version {}",
                hash.get(..12).unwrap_or(hash)
            ),
            None => println!("plugin {plugin}: the running host already runs this version"),
        }
        Ok(())
    }

    async fn stop(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// The topics the route reads: those asked for, else those the input
/// messages go to, else `<name>.in`.
fn route_topics(asked: &[String], messages: &[Message], name: &str) -> Vec<String> {
    if !asked.is_empty() {
        return asked.to_vec();
    }
    let mut topics: Vec<String> = Vec::new();
    for message in messages {
        if !topics.contains(&message.topic) {
            topics.push(message.topic.clone());
        }
    }
    if topics.is_empty() {
        topics.push(format!("{name}.in"));
    }
    topics
}

/// Changes to the project's sources: everything but build output, hidden
/// files and caches.
fn watch(project: &Path) -> Result<(notify::RecommendedWatcher, mpsc::UnboundedReceiver<PathBuf>)> {
    let (changes, incoming) = mpsc::unbounded_channel();
    let root = project.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        for path in event.paths {
            if is_source(&root, &path) {
                let _ = changes.send(path);
            }
        }
    })?;
    watcher
        .watch(project, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", project.display()))?;
    Ok((watcher, incoming))
}

/// Whether a change at `path` is to a source of the project at `root`.
fn is_source(root: &Path, path: &Path) -> bool {
    let Ok(relative) = path.strip_prefix(root) else {
        return false;
    };
    let mut parts = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy());
    let Some(first) = parts.next() else {
        return false;
    };
    if first == "target" {
        return false;
    }
    let ignored = |part: &str| {
        part.starts_with('.')
            || part.ends_with('~')
            || matches!(part, "__pycache__" | "node_modules")
    };
    !ignored(&first) && !parts.any(|part| ignored(&part))
}

fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// `word` as one shell word.
fn shell_word(word: &str) -> String {
    if word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/:._-+=@".contains(c))
    {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// A handler that prints what happens to each message it handles.
struct Printing {
    inner: WasmHandler,
    /// Messages handled so far, to number the lines.
    seen: Arc<AtomicUsize>,
}

impl MessageHandler for Printing {
    fn worker(&self) -> Box<dyn Worker> {
        Box::new(PrintingWorker {
            inner: self.inner.worker(),
            seen: self.seen.clone(),
        })
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

struct PrintingWorker {
    inner: Box<dyn Worker>,
    seen: Arc<AtomicUsize>,
}

impl PrintingWorker {
    fn print(&self, message: &Message, attempt: u32, result: &Result<Outcome, CallError>) {
        let number = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        println!("{}", outcome_line(number, message, attempt, result));
    }
}

#[async_trait]
impl Worker for PrintingWorker {
    async fn handle(&mut self, message: &Message, attempt: u32) -> Result<Outcome, CallError> {
        let result = self.inner.handle(message, attempt).await;
        self.print(message, attempt, &result);
        result
    }

    async fn handle_batch(&mut self, batch: &[(&Message, u32)]) -> Vec<Result<Outcome, CallError>> {
        let results = self.inner.handle_batch(batch).await;
        for ((message, attempt), result) in batch.iter().zip(&results) {
            self.print(message, *attempt, result);
        }
        results
    }

    fn plugin(&self) -> (String, String) {
        self.inner.plugin()
    }
}

/// `N TOPIC [key=K] PAYLOAD [(attempt A)] => OUTCOME`, the outcome as
/// `sluice test` words it, without the version header every output carries.
fn outcome_line(
    number: usize,
    message: &Message,
    attempt: u32,
    result: &Result<Outcome, CallError>,
) -> String {
    let mut line = format!("{number} {}", message.topic);
    if let Some(key) = &message.key {
        line.push_str(&format!(" key={key}"));
    }
    match printable(&message.payload) {
        payload if payload.is_empty() => line.push_str(" \"\""),
        payload => line.push_str(&format!(" {payload}")),
    }
    if attempt > 1 {
        line.push_str(&format!(" (attempt {attempt})"));
    }
    let outcome = match result {
        Ok(Outcome::Outputs(outputs)) => {
            let mut outputs = outputs.clone();
            for output in &mut outputs {
                output.headers.retain(|(n, _)| n != headers::PLUGIN_VERSION);
            }
            describe_outcome(&Outcome::Outputs(outputs))
        }
        Ok(outcome) => describe_outcome(outcome),
        Err(error) => describe_call_error(error),
    };
    format!("{line} => {outcome}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sources_trigger_a_rebuild() {
        let root = Path::new("/p");
        assert!(is_source(root, Path::new("/p/plugin.py")));
        assert!(is_source(root, Path::new("/p/src/lib.rs")));
        assert!(!is_source(root, Path::new("/p/target/x.wasm")));
        assert!(!is_source(root, Path::new("/p/.git/index")));
        assert!(!is_source(root, Path::new("/p/__pycache__/plugin.pyc")));
        assert!(!is_source(root, Path::new("/p/src/.lib.rs.swp")));
        assert!(!is_source(root, Path::new("/p/plugin.py~")));
        assert!(!is_source(root, Path::new("/elsewhere/plugin.py")));
    }

    #[test]
    fn topics_come_from_the_flag_then_the_input_then_the_name() {
        let messages = vec![
            Message::new("words", "a"),
            Message::new("orders", "b"),
            Message::new("words", "c"),
        ];
        assert_eq!(route_topics(&["x".into()], &messages, "n"), ["x"]);
        assert_eq!(route_topics(&[], &messages, "n"), ["words", "orders"]);
        assert_eq!(route_topics(&[], &[], "n"), ["n.in"]);
    }

    #[test]
    fn outcome_lines_say_what_came_in_and_what_came_of_it() {
        let message = Message::new("words", "hi\n").with_key("k");
        let rejected = Ok(Outcome::Reject("empty".into()));
        assert_eq!(
            outcome_line(3, &message, 2, &rejected),
            r#"3 words key=k hi\n (attempt 2) => reject: empty"#
        );
        let trapped = Err(CallError::Trap("unreachable".into()));
        assert_eq!(
            outcome_line(1, &message, 1, &trapped),
            r#"1 words key=k hi\n => trap: plugin trapped: unreachable"#
        );
    }
}
