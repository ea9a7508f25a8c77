//! A plugin slot: the version of a plugin that routes run now, the versions
//! before it (for rollback), and what went wrong with the last refused one.
//!
//! Workers read the current version at the start of every message, so a
//! swap takes effect for the next message while calls in flight finish on
//! the version they started with.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Result, bail};
use serde::Serialize;

use super::Shadow;
use crate::message::now_ms;
use crate::runtime::Plugin;

/// How many earlier versions are kept for rollback.
const KEPT_VERSIONS: usize = 10;

/// What is known of one loaded version.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// SHA-256 of the .wasm, hex.
    pub hash: String,
    /// When it became current, milliseconds since the epoch.
    pub loaded_at_ms: u64,
    /// Where it came from: a file path, `upload` or `rollback`.
    pub source: String,
}

/// Failure counters of a plugin, across its versions.
#[derive(Debug, Default)]
pub struct PluginCounters {
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub memory_limit_hits: AtomicU64,
    pub output_limit_hits: AtomicU64,
    pub calls: AtomicU64,
}

pub struct PluginSlot {
    pub name: String,
    current: RwLock<(Arc<Plugin>, VersionInfo)>,
    earlier: Mutex<Vec<(Arc<Plugin>, VersionInfo)>>,
    last_error: Mutex<Option<String>>,
    pub counters: PluginCounters,
    /// A candidate version handling the same messages, unpublished.
    shadow: RwLock<Option<Arc<Shadow>>>,
}

impl PluginSlot {
    pub fn new(name: impl Into<String>, plugin: Arc<Plugin>, source: impl Into<String>) -> Self {
        let info = VersionInfo {
            hash: plugin.hash.clone(),
            loaded_at_ms: now_ms(),
            source: source.into(),
        };
        PluginSlot {
            name: name.into(),
            current: RwLock::new((plugin, info)),
            earlier: Mutex::new(Vec::new()),
            last_error: Mutex::new(None),
            counters: PluginCounters::default(),
            shadow: RwLock::new(None),
        }
    }

    /// The version new messages run on.
    pub fn current(&self) -> Arc<Plugin> {
        self.current.read().unwrap().0.clone()
    }

    pub fn current_info(&self) -> VersionInfo {
        self.current.read().unwrap().1.clone()
    }

    /// Earlier versions, newest first.
    pub fn history(&self) -> Vec<VersionInfo> {
        self.earlier
            .lock()
            .unwrap()
            .iter()
            .rev()
            .map(|(_, info)| info.clone())
            .collect()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }

    pub fn record_error(&self, error: String) {
        *self.last_error.lock().unwrap() = Some(error);
    }

    /// Makes `plugin` current. Returns `None` if it is already current.
    pub fn swap(&self, plugin: Arc<Plugin>, source: impl Into<String>) -> Option<VersionInfo> {
        let mut current = self.current.write().unwrap();
        if current.0.hash == plugin.hash {
            return None;
        }
        let info = VersionInfo {
            hash: plugin.hash.clone(),
            loaded_at_ms: now_ms(),
            source: source.into(),
        };
        let previous = std::mem::replace(&mut *current, (plugin, info.clone()));
        let mut earlier = self.earlier.lock().unwrap();
        earlier.push(previous);
        if earlier.len() > KEPT_VERSIONS {
            earlier.remove(0);
        }
        *self.last_error.lock().unwrap() = None;
        Some(info)
    }

    /// Returns to the version before the current one.
    pub fn rollback(&self) -> Result<VersionInfo> {
        let mut current = self.current.write().unwrap();
        let Some((plugin, mut info)) = self.earlier.lock().unwrap().pop() else {
            bail!(
                "plugin `{}` has no earlier version to roll back to",
                self.name
            );
        };
        info.loaded_at_ms = now_ms();
        info.source = format!("rollback to {}", &info.hash[..12]);
        // The version rolled back from is dropped: rolling back twice goes
        // further back, as an operator expects.
        *current = (plugin, info.clone());
        Ok(info)
    }

    /// The candidate running in the shadow of the current version, if any.
    pub fn shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.read().unwrap().clone()
    }

    /// Starts `shadow` in place of any earlier candidate.
    pub fn set_shadow(&self, shadow: Shadow) {
        *self.shadow.write().unwrap() = Some(Arc::new(shadow));
    }

    /// Ends the shadow run, returning its candidate.
    pub fn take_shadow(&self) -> Option<Arc<Shadow>> {
        self.shadow.write().unwrap().take()
    }

    pub fn count(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
