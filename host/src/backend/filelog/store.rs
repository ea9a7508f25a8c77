//! The open log directory: its lock and in-memory state, the fsync policy
//! (applied after the state lock is released, so concurrent callers share
//! syncs), the stop after a failed write, and publishing. Loading is in
//! `load`, the consumer side in `delivery`.
//!
//! One `Mutex<State>` guards all topics and groups. It is held for memory
//! work and `write` calls only; `fsync`, and reading records for a fetch,
//! happen outside it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::Notify;

use super::file::{LogFile, is_torn};
use super::group::{Cursor, Group};
use super::load::load;
use super::lock::DirLock;
use super::options::{Fsync, Options};
use super::scan::Report;
use super::topic::Topic;
use crate::message::{Message, now_ms};

/// A group's journal is folded into a snapshot once it is this large.
pub(super) const SNAPSHOT_AFTER: u64 = 4 << 20;

pub struct State {
    pub topics: BTreeMap<Arc<str>, Topic>,
    pub groups: HashMap<String, Group>,
    /// For topics that do not exist (any more) but that groups had read:
    /// the lowest offset they may start at, so offsets are never reused.
    pub floors: HashMap<String, u64>,
    pub next_sub: u64,
    pub next_claim: u64,
}

pub struct Store {
    pub root: PathBuf,
    pub options: Options,
    _lock: DirLock,
    pub state: Mutex<State>,
    /// Woken on publish, nack and close, so waiting fetches look again.
    pub changed: Notify,
    /// Set by the first failed write or fsync; later writes are refused.
    failed: Mutex<Option<String>>,
    /// Files written since the last interval sync.
    dirty: Mutex<Vec<Arc<LogFile>>>,
}

impl Store {
    /// Locks and loads a directory, repairing what the startup check finds.
    pub fn open(root: &Path, options: Options) -> Result<(Store, Report)> {
        std::fs::create_dir_all(root)
            .with_context(|| format!("cannot create the file log directory {}", root.display()))?;
        let lock = DirLock::acquire(root)?;
        Self::open_locked(root, options, lock)
    }

    /// [`Store::open`] with the directory's lock already taken.
    pub fn open_locked(root: &Path, options: Options, lock: DirLock) -> Result<(Store, Report)> {
        let mut report = Report::new(root, true);
        let state = load(root, options.fsync, &mut report)
            .with_context(|| format!("cannot open the file log in {}", root.display()))?;
        let store = Store {
            root: root.to_path_buf(),
            options,
            _lock: lock,
            state: Mutex::new(state),
            changed: Notify::new(),
            failed: Mutex::new(None),
            dirty: Mutex::new(Vec::new()),
        };
        Ok((store, report))
    }

    pub fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves memory that still matches
        // the files (every change is written before it is applied).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses work once a write or fsync has failed.
    pub fn check_usable(&self) -> Result<()> {
        match &*self.failed.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => bail!(
                "file log {} stopped accepting work after an I/O error ({why}); restart the \
                 process so the startup check can repair the log",
                self.root.display()
            ),
            None => Ok(()),
        }
    }

    /// Marks the store failed: after a failed write or fsync the state of
    /// the file is unknown, and retrying an fsync can report success for
    /// data that never reached the disk.
    pub fn fail(&self, what: &str, error: &dyn std::fmt::Display) -> anyhow::Error {
        let why = format!("{what}: {error}");
        tracing::error!(log = %self.root.display(), "file log: {why}; refusing further work");
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert_with(|| why.clone());
        anyhow!("file log {}: {why}", self.root.display())
    }

    /// The error of a failed append: the store stops only if the file may
    /// hold part of the write (a cleanly failed write, e.g. a full disk,
    /// can be retried once there is room).
    pub fn write_failed(&self, what: &str, error: io::Error) -> anyhow::Error {
        if is_torn(&error) {
            self.fail(what, &error)
        } else {
            anyhow!("file log {}: {what}: {error}", self.root.display())
        }
    }

    /// Applies the fsync policy to what was just appended.
    pub fn commit(&self, tickets: &[(Arc<LogFile>, u64)]) -> Result<()> {
        match self.options.fsync {
            Fsync::Always => {
                for (file, ticket) in tickets {
                    file.sync_to(*ticket).map_err(|e| {
                        self.fail(&format!("fsync of {}", file.path().display()), &e)
                    })?;
                }
            }
            Fsync::Interval => {
                let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
                for (file, _) in tickets {
                    if !file.dirty.swap(true, std::sync::atomic::Ordering::AcqRel) {
                        dirty.push(file.clone());
                    }
                }
            }
            Fsync::Never => {}
        }
        Ok(())
    }

    /// The interval syncer's work.
    pub fn sync_dirty(&self) {
        let files = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        for file in files {
            file.dirty
                .store(false, std::sync::atomic::Ordering::Release);
            if let Err(e) = file.sync() {
                let _ = self.fail(&format!("fsync of {}", file.path().display()), &e);
            }
        }
    }

    pub fn publish(&self, messages: Vec<Message>) -> Result<()> {
        self.check_usable()?;
        if messages.is_empty() {
            return Ok(());
        }
        let mut by_topic: BTreeMap<&str, Vec<&Message>> = BTreeMap::new();
        for message in &messages {
            if message.topic.is_empty() {
                bail!("message {} has no topic", message.id);
            }
            by_topic.entry(&message.topic).or_default().push(message);
        }
        let now = now_ms();
        let mut tickets = Vec::new();
        let mut ends = Vec::new();
        let mut failure = None;
        {
            let mut state = self.lock_state();
            for (name, batch) in by_topic {
                let topic = match self.topic_mut(&mut state, name) {
                    Ok(topic) => topic,
                    Err(e) => {
                        failure = Some(anyhow!(
                            "file log {}: cannot create topic `{name}`: {e}",
                            self.root.display()
                        ));
                        break;
                    }
                };
                match topic.append(&batch, &self.options, now) {
                    Ok(written) => tickets.extend(written),
                    Err(e) => {
                        failure =
                            Some(self.write_failed(&format!("appending to topic `{name}`"), e));
                        break;
                    }
                }
                if self.options.fsync == Fsync::Always {
                    ends.push((topic.name.clone(), topic.next));
                } else {
                    topic.visible = topic.next;
                }
            }
        }
        self.commit(&tickets)?;
        if !ends.is_empty() {
            let mut state = self.lock_state();
            for (name, end) in ends {
                if let Some(topic) = state.topics.get_mut(&name) {
                    topic.visible = topic.visible.max(end);
                }
            }
        }
        self.changed.notify_waiters();
        failure.map_or(Ok(()), Err)
    }

    /// The topic, created (with cursors for the groups that match it) if new.
    fn topic_mut<'s>(&self, state: &'s mut State, name: &str) -> io::Result<&'s mut Topic> {
        if !state.topics.contains_key(name) {
            let floor = state.floors.remove(name).unwrap_or(0);
            let topic = Topic::create(&self.root.join("topics"), name, floor, self.options.fsync)?;
            for group in state.groups.values_mut() {
                if group.wants(name) {
                    group
                        .cursors
                        .entry(topic.name.clone())
                        .or_insert_with(|| Cursor::at(floor));
                }
            }
            state.topics.insert(topic.name.clone(), topic);
        }
        Ok(state.topics.get_mut(name).expect("just ensured"))
    }

    /// Snapshots every durable group (used by compaction and on shutdown).
    pub fn snapshot_groups(&self, state: &mut State) -> Result<()> {
        for group in state.groups.values_mut() {
            group
                .snapshot()
                .map_err(|e| self.fail(&format!("snapshotting group `{}`", group.key), &e))?;
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // A clean shutdown narrows the interval window to nothing.
        if self.options.fsync == Fsync::Interval {
            self.sync_dirty();
        }
    }
}
