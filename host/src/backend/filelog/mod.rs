//! The file log backend: a durable, embedded, append-only log in a
//! directory, for one process (like SQLite, no server; unlike it, files an
//! operator can read with `less` and repair with `sluice log`).
//!
//! # URL
//!
//! `file://DIR[?fsync=always|interval|never&fsync_interval_ms=N&segment_bytes=N&retention_ms=N&retention_bytes=N]`;
//! `DIR` is created if missing.
//!
//! | `fsync` | when data reaches stable storage | lost on a process crash | lost on a power failure |
//! |---|---|---|---|
//! | `always` (default) | before `publish`, `fetch`, `ack`, `nack` return (concurrent callers share one fsync) | nothing | nothing that was acknowledged to the caller |
//! | `interval` | every `fsync_interval_ms` (default 200) | nothing (every write is in the OS before the call returns) | up to `fsync_interval_ms` of publishes, acks and claims |
//! | `never` | when the OS writes back | nothing | whatever the OS had not written |
//!
//! A lost ack or claim means a message is delivered again (at least once);
//! a lost publish is the loss the table describes. With `always`, a record
//! is delivered only after it is synced, so no consumer acts on a record a
//! power failure could take back.
//!
//! `segment_bytes` (default 64 MiB) is where a topic's segment is closed
//! and a new one started. `retention_ms` and `retention_bytes` (default:
//! none) bound each topic; see [`maintenance`] for how retention and
//! acknowledgement interact (the limits win).
//!
//! # On disk
//!
//! ```text
//! DIR/LOCK                                    flock'ed by the owning process, holds "pid N"
//! DIR/topics/<topic>/<first offset, 20 digits>.ndjson   segments, oldest first
//! DIR/groups/<group>/state.json               snapshot of the group (one sealed line)
//! DIR/groups/<group>/journal-<gen>.ndjson     what happened since the snapshot
//! DIR/quarantine/<same relative path>         damaged lines moved out, as JSON with the raw bytes
//! ```
//!
//! Names are escaped into single directory names (bytes outside
//! `[A-Za-z0-9._-]`, and a leading `.`, become `%XX`). A group's directory
//! is named by its key (name and topics, see `SubscribeOptions::group_key`).
//!
//! Every line of every file is one JSON object sealed with a CRC32 (see
//! [`record`]). A segment line is a message:
//!
//! ```text
//! {"offset":0,"at":1767225600000,"topic":"orders","id":"0199…","key":"k1","ts":1767225600000,"headers":[["trace","t-1"]],"payload":"hello","crc":"5e1f02aa"}
//! ```
//!
//! `offset` is per topic, rising, never reused; `at` is when it was
//! appended (retention uses it), `ts` the message's own timestamp. A
//! payload that is not UTF-8 is stored as `payload_b64` instead.
//!
//! # Durability
//!
//! - A publish of many messages is one `write` per topic segment and one
//!   fsync per file touched. A failed write is cut back; a failed write or
//!   fsync stops the store (the file's state is unknown): later calls fail
//!   until the process restarts and the startup check has run.
//! - The startup check (also `sluice log check`/`recover`) reads every
//!   line: a torn last record (no newline) is truncated, a damaged complete
//!   line (bad checksum, bad JSON, out-of-order offset) is moved to
//!   `DIR/quarantine/…`, always saved there before the file is changed, and
//!   reported as a `tracing` warning. The rest stays readable. Leftover
//!   `.tmp` files of interrupted compactions or snapshots are removed.
//! - Group state is a journal of claims (with attempt numbers), acks and
//!   delayed nacks, folded into a snapshot when it passes 4 MiB and on
//!   compaction (see [`journal`]). After a restart every unacknowledged
//!   delivery is ready again with its attempt count kept, or waits out its
//!   nack delay; its holder died with the old process, so no lease applies.
//!
//! # Delivery
//!
//! Groups work as in the backend contract; topic patterns are matched by
//! the host ([`crate::backend::pattern`]) and a topic created later joins
//! every group whose patterns match it (read from its first offset). A
//! fetch returns redeliveries first (lowest offset first), then new
//! records in offset order per topic, topics taken in turn. Messages of
//! one key arrive in publish order within a topic; a nack with a delay
//! lets later ones pass, as on the other backends. Within the process a
//! delivery whose holder vanished comes back after the subscription's
//! lease. An in-memory index (offset → file, position, length) serves
//! fetches; records are read with `pread` outside the lock.
//!
//! # One process
//!
//! Opening takes an exclusive `flock` on `DIR/LOCK`; a second process gets
//! an error naming the directory and the holder's pid. Every `connect()`
//! to the same directory within a process shares one open store.

mod cli;
pub(crate) mod delivery;
mod file;
mod group;
pub mod journal;
pub(crate) mod load;
mod lock;
pub mod maintenance;
mod options;
pub mod record;
pub(crate) mod scan;
pub(crate) mod store;
mod subscription;
mod topic;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use async_trait::async_trait;

pub use cli::{LogCommand, run as run_cli};
pub use maintenance::Compaction;
pub use options::{Fsync, Options, parse_url};

use super::{Backend, Capabilities, SubscribeOptions, Subscription};
use crate::message::Message;
use store::Store;
use subscription::FileSubscription;

/// What this backend guarantees.
pub const CAPABILITIES: Capabilities = Capabilities {
    persistent: true,
    history: true,
    consumer_groups: true,
    ordered_per_key: true,
    native_delay: true,
    lease: true,
    wildcards: true,
    at_least_once: true,
    lease_checked: false,
    backlog: true,
    key_affinity: false,
};

/// The `file://` backend. Cheap to clone through `connect`: handles to one
/// directory share the store.
pub struct FileLogBackend {
    store: Arc<Store>,
}

/// Looks at the log's directory without opening the log (which would take
/// its lock): it exists, or it can be made.
pub async fn probe(url: &str) -> Result<String> {
    let (dir, _) = parse_url(url)?;
    if dir.is_dir() {
        let metadata = std::fs::metadata(&dir)
            .with_context(|| format!("cannot read directory `{}`", dir.display()))?;
        anyhow::ensure!(
            !metadata.permissions().readonly(),
            "directory `{}` is read-only",
            dir.display()
        );
        let entries = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot list directory `{}`", dir.display()))?
            .count();
        return Ok(format!(
            "directory `{}` exists ({entries} entries)",
            dir.display()
        ));
    }
    anyhow::ensure!(
        !dir.exists(),
        "`{}` exists and is not a directory",
        dir.display()
    );
    // The first run makes every missing directory on the way.
    let existing = dir
        .ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.exists())
        .unwrap_or(std::path::Path::new("."));
    anyhow::ensure!(
        existing.is_dir(),
        "`{}` cannot be made: `{}` is not a directory",
        dir.display(),
        existing.display()
    );
    Ok(format!(
        "directory `{}` does not exist yet; the first run makes it",
        dir.display()
    ))
}

impl FileLogBackend {
    /// Opens (creating if needed) the log a `file://` URL names.
    pub async fn connect(url: &str) -> Result<Self> {
        let (dir, options) = parse_url(url)?;
        Self::open(dir, options).await
    }

    /// Opens the log in `dir`; the startup check runs if this process does
    /// not have it open yet.
    pub async fn open(dir: impl AsRef<Path>, options: Options) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let store = tokio::task::spawn_blocking(move || lock::open_shared(&dir, options))
            .await
            .context("opening the file log")??;
        Ok(FileLogBackend { store })
    }

    /// Applies retention and compacts segments now (see [`maintenance`]).
    pub async fn compact(&self) -> Result<Compaction> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || maintenance::compact(&store))
            .await
            .context("compacting the file log")?
    }

    /// The directory, as opened.
    pub fn dir(&self) -> &Path {
        &self.store.root
    }
}

#[async_trait]
impl Backend for FileLogBackend {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    async fn backlog(&self, group_key: &str) -> Result<Option<u64>> {
        let state = self.store.lock_state();
        Ok(state
            .groups
            .get(group_key)
            .map(|group| group.unread(&state.topics)))
    }

    async fn publish(&self, messages: Vec<Message>) -> Result<()> {
        blocking(&self.store, || self.store.publish(messages))
    }

    async fn subscribe(&self, options: SubscribeOptions) -> Result<Box<dyn Subscription>> {
        let (key, id) = blocking(&self.store, || self.store.subscribe(&options))?;
        Ok(Box::new(FileSubscription {
            store: self.store.clone(),
            key,
            id,
            lease: options.lease,
            closed: AtomicBool::new(false),
            mine: Mutex::new(HashMap::new()),
        }))
    }
}

/// Runs file work that may wait on an fsync. On a multi-threaded runtime
/// with `fsync=always` the worker thread is handed over meanwhile, so other
/// tasks keep running; otherwise the work is short enough to run inline.
fn blocking<T>(store: &Store, work: impl FnOnce() -> T) -> T {
    let may_wait = store.options.fsync == Fsync::Always;
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if may_wait && multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}
