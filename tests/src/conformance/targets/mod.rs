//! How the suite reaches each backend: a handle to the same storage or
//! server on demand, and a restart where the backend has one.

// A target's `new` makes storage or starts a server, which a `Default`
// should not be expected to do.
#![allow(clippy::new_without_default)]

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use sluice::backend::{self, Backend};

/// A backend under test.
#[async_trait]
pub trait Target: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// A handle on the backend. Handles share storage (or server): what one
    /// publishes, another can consume.
    async fn open(&self) -> Result<Arc<dyn Backend>>;

    /// The URL the backend is opened with, where its capabilities depend
    /// on it (the registry is asked with it instead of the kind).
    fn backend_url(&self) -> Option<String> {
        None
    }

    /// A factor on the message counts of volume-heavy cases, below 1 for an
    /// emulator too slow for the full volume (reported with the results).
    fn volume_scale(&self) -> f64 {
        1.0
    }

    /// Whether stress rounds may run at the same time: not on an emulator
    /// that slows down so far under them that leases run out under live
    /// consumers (a redelivery the test cannot tell from a route's own).
    fn rounds_in_parallel(&self) -> bool {
        true
    }

    /// Whether the backend reports a group's backlog. Pinned here rather
    /// than read from its capabilities, so a backend that stops reporting
    /// it (and says so) fails instead of skipping the check.
    fn reports_backlog(&self) -> bool {
        true
    }

    /// Whether the backlog still counts messages delivered and not yet
    /// settled (a figure that runs from a committed position).
    fn backlog_counts_held(&self) -> bool {
        false
    }

    /// Whether [`Target::restart`] can restart anything.
    fn can_restart(&self) -> bool {
        false
    }

    /// Restarts the server (or storage) under every open handle.
    async fn restart(&self) -> Result<()> {
        anyhow::bail!("{} has no server to restart", self.name())
    }

    /// Whether [`Target::restart_empty`] can do anything.
    fn can_restart_empty(&self) -> bool {
        false
    }

    /// Restarts the server with nothing of what it stored: a broker that
    /// came back from a lost disk, or a fresh pod.
    async fn restart_empty(&self) -> Result<()> {
        anyhow::bail!("{} has no server to restart empty", self.name())
    }

    /// How long a running subscription may take to carry on once the
    /// server lost what the backend made there for its group, if the
    /// backend makes anything there (None: [`Target::lose_state`] does
    /// nothing).
    fn restores_within(&self) -> Option<std::time::Duration> {
        None
    }

    /// Deletes on the server what the backend made for `group` reading
    /// `topic` (a consumer, a consumer group, a queue), under its running
    /// subscriptions, as an operator's mistake would.
    async fn lose_state(&self, _topic: &str, _group: &str) -> Result<()> {
        anyhow::bail!("{} keeps no server-side state to lose", self.name())
    }
}

/// The in-memory backend: every handle is the same instance.
pub struct Memory(Arc<dyn Backend>);

impl Memory {
    pub fn new() -> Self {
        Memory(Arc::new(backend::memory::MemoryBackend::new(100_000)))
    }
}

#[async_trait]
impl Target for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        Ok(self.0.clone())
    }
}

/// SQLite: every handle is a new connection pool on one database file.
pub struct Sqlite {
    _dir: tempfile::TempDir,
    url: String,
}

impl Sqlite {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?poll_ms=20",
            dir.path().join("conformance.db").display()
        );
        Sqlite { _dir: dir, url }
    }
}

#[async_trait]
impl Target for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.url).await
    }
}

/// The append-only file log: every handle opens the same directory (and so,
/// within one process, shares one store).
pub struct FileLog {
    _dir: tempfile::TempDir,
    url: String,
}

impl FileLog {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("log").display());
        FileLog { _dir: dir, url }
    }
}

#[async_trait]
impl Target for FileLog {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.url).await
    }
}

/// A server process of the suite's own, on a free port with its own data
/// directory, so the restart case can kill it (SIGKILL: a crash, not a clean
/// shutdown) without disturbing the servers other tests share.
pub struct ServerProcess {
    child: std::sync::Mutex<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
    spawn: Box<Spawn>,
    ready: fn(u16) -> bool,
}

/// Starts a server on a port with a data directory.
type Spawn = dyn Fn(u16, &std::path::Path) -> std::process::Child + Send + Sync;

impl ServerProcess {
    /// A Redis or NATS server: ready once it answers PING or sends INFO.
    fn start(spawn: fn(u16, &std::path::Path) -> std::process::Child) -> Self {
        Self::start_with(spawn, answers)
    }

    /// A server that is ready once `ready(port)` says so.
    fn start_with(
        spawn: impl Fn(u16, &std::path::Path) -> std::process::Child + Send + Sync + 'static,
        ready: fn(u16) -> bool,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = spawn(port, dir.path());
        wait_ready(port, ready);
        ServerProcess {
            child: std::sync::Mutex::new(child),
            port,
            dir,
            spawn: Box::new(spawn),
            ready,
        }
    }

    fn url(&self, scheme: &str, rest: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{rest}", self.port)
    }

    fn restart(&self) {
        self.restart_wiping(false);
    }

    /// Restarts the server; with `wipe`, with an empty data directory.
    fn restart_wiping(&self, wipe: bool) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        if wipe {
            std::fs::remove_dir_all(self.dir.path()).unwrap();
            std::fs::create_dir(self.dir.path()).unwrap();
        }
        *child = (self.spawn)(self.port, self.dir.path());
        wait_ready(self.port, self.ready);
    }

    /// Kills the server (SIGKILL), to be started again by [`Self::start_again`].
    fn kill(&self) {
        let mut child = self.child.lock().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the server again on its port and data after [`Self::kill`].
    fn start_again(&self) {
        let mut child = self.child.lock().unwrap();
        *child = (self.spawn)(self.port, self.dir.path());
        wait_ready(self.port, self.ready);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // The last case's collectors close their subscriptions just after
        // the suite ends; let them, rather than fail against a dead server.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let child = self.child.get_mut().unwrap();
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn wait_ready(port: u16, ready: fn(u16) -> bool) {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready(port) {
        assert!(
            std::time::Instant::now() < give_up,
            "no server answered on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether something accepts connections and speaks first or answers PING
/// (Redis answers `+PONG` once loaded; NATS sends `INFO` on connect).
fn answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
    let _ = stream.write_all(b"PING\r\n");
    let mut first = [0u8; 5];
    stream.read_exact(&mut first).is_ok() && (&first == b"+PONG" || &first[..4] == b"INFO")
}

fn quiet(command: &mut std::process::Command) -> &mut std::process::Command {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
}

/// Redis Streams or pub/sub on a private `redis-server`, its append-only
/// file fsynced on every write so a crash loses no accepted write.
pub struct Redis {
    server: ServerProcess,
    name: &'static str,
    scheme: &'static str,
    rest: &'static str,
}

impl Redis {
    fn spawn(port: u16, dir: &std::path::Path) -> std::process::Child {
        quiet(std::process::Command::new("redis-server").args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            dir.to_str().unwrap(),
        ]))
        .spawn()
        .expect("start redis-server (apt-get install redis-server)")
    }

    pub fn streams() -> Self {
        Redis {
            server: ServerProcess::start(Self::spawn),
            name: "redis-streams",
            scheme: "redis",
            rest: "/0?scan_ms=500",
        }
    }

    /// The server's URL, for another process.
    pub fn url(&self) -> String {
        self.server.url(self.scheme, self.rest)
    }

    pub fn pubsub() -> Self {
        Redis {
            server: ServerProcess::start(Self::spawn),
            name: "redis-pubsub",
            scheme: "redis+pubsub",
            rest: "",
        }
    }
}

#[async_trait]
impl Target for Redis {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.url()).await
    }

    fn reports_backlog(&self) -> bool {
        // Pub/sub keeps nothing that could wait.
        self.name == "redis-streams"
    }

    fn can_restart(&self) -> bool {
        true
    }

    async fn restart(&self) -> Result<()> {
        tokio::task::block_in_place(|| self.server.restart());
        Ok(())
    }

    fn can_restart_empty(&self) -> bool {
        true
    }

    async fn restart_empty(&self) -> Result<()> {
        tokio::task::block_in_place(|| self.server.restart_wiping(true));
        Ok(())
    }

    fn restores_within(&self) -> Option<std::time::Duration> {
        // The next read finds the group gone (NOGROUP) and makes it again.
        (self.name == "redis-streams").then_some(std::time::Duration::from_secs(10))
    }

    /// Deletes the topic's stream, and its consumer groups with it.
    async fn lose_state(&self, topic: &str, _group: &str) -> Result<()> {
        let client = redis::Client::open(self.server.url("redis", "/0"))?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let deleted: u64 = redis::cmd("DEL")
            .arg(format!("sluice:{topic}"))
            .query_async(&mut connection)
            .await?;
        anyhow::ensure!(deleted == 1, "no stream `sluice:{topic}` to delete");
        Ok(())
    }
}

/// NATS core or JetStream on a private `nats-server` (JetStream with a file
/// store and the server's default sync: fsync about every two minutes, so
/// the restart case tests a process crash, not a power failure).
pub struct Nats {
    server: ServerProcess,
    /// The URL scheme: `nats` or `jetstream`.
    scheme: &'static str,
    /// What the suite reports it as.
    name: &'static str,
    /// The URL's parameters.
    query: &'static str,
}

impl Nats {
    fn spawn_core(port: u16, _: &std::path::Path) -> std::process::Child {
        quiet(std::process::Command::new("nats-server").args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ]))
        .spawn()
        .expect("start nats-server (apt-get install nats-server)")
    }

    fn spawn_jetstream(port: u16, dir: &std::path::Path) -> std::process::Child {
        quiet(std::process::Command::new("nats-server").args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "-sd",
            dir.to_str().unwrap(),
        ]))
        .spawn()
        .expect("start nats-server (apt-get install nats-server)")
    }

    pub fn core() -> Self {
        Nats {
            server: ServerProcess::start(Self::spawn_core),
            scheme: "nats",
            name: "nats",
            query: "",
        }
    }

    pub fn jetstream() -> Self {
        Nats {
            server: ServerProcess::start(Self::spawn_jetstream),
            scheme: "jetstream",
            name: "jetstream",
            query: "",
        }
    }

    /// JetStream with each topic kept in key shards (`shards=16`).
    pub fn jetstream_sharded() -> Self {
        Nats {
            server: ServerProcess::start(Self::spawn_jetstream),
            scheme: "jetstream",
            name: "jetstream_sharded",
            query: "?shards=16",
        }
    }

    /// The server's URL, with `query` (`?timeout_ms=1000`).
    pub fn url(&self, query: &str) -> String {
        self.server.url(self.scheme, query)
    }

    /// Kills the server (SIGKILL) and leaves it down.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Starts the killed server again, with what it stored.
    pub fn start_again(&self) {
        self.server.start_again();
    }
}

#[async_trait]
impl Target for Nats {
    fn name(&self) -> &'static str {
        self.name
    }

    fn backend_url(&self) -> Option<String> {
        Some(self.server.url(self.scheme, self.query))
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.server.url(self.scheme, self.query)).await
    }

    fn reports_backlog(&self) -> bool {
        // NATS core keeps nothing that could wait.
        self.scheme == "jetstream"
    }

    fn can_restart(&self) -> bool {
        true
    }

    async fn restart(&self) -> Result<()> {
        tokio::task::block_in_place(|| self.server.restart());
        Ok(())
    }

    fn can_restart_empty(&self) -> bool {
        self.scheme == "jetstream"
    }

    async fn restart_empty(&self) -> Result<()> {
        tokio::task::block_in_place(|| self.server.restart_wiping(true));
        Ok(())
    }

    fn restores_within(&self) -> Option<std::time::Duration> {
        // The next pull finds the consumer gone and makes it again.
        (self.scheme == "jetstream").then_some(std::time::Duration::from_secs(10))
    }

    /// Deletes every consumer of the stream that keeps `topic` (each case
    /// has streams of its own), as `nats consumer rm` would.
    async fn lose_state(&self, topic: &str, _group: &str) -> Result<()> {
        use futures::TryStreamExt;
        let client = async_nats::connect(self.server.url("nats", "")).await?;
        let js = async_nats::jetstream::new(client);
        // A sharded stream keeps the topic's unkeyed messages one token in.
        let subject = match (self.query.is_empty(), topic.split_once('.')) {
            (false, Some((first, rest))) => format!("{first}.~u.{rest}"),
            _ => topic.to_string(),
        };
        let stream_name = js.stream_by_subject(subject).await?;
        let stream = js.get_stream(&stream_name).await?;
        let names: Vec<String> = stream.consumer_names().try_collect().await?;
        anyhow::ensure!(!names.is_empty(), "stream `{stream_name}` has no consumer");
        for name in names {
            stream.delete_consumer(&name).await?;
        }
        Ok(())
    }
}

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod postgres;
#[cfg(feature = "sqs")]
pub mod sqs;
