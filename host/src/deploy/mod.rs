//! Deploying plugin versions into a running host: load and validate off the
//! hot path, swap atomically, keep earlier versions for rollback, and watch
//! the plugin files so dropping a new .wasm in place deploys it.
//!
//! A version that fails to compile or does not fit the world is refused: the
//! error is logged and kept for the admin API, and the running version stays.
//! Each version that runs is kept in a store, so a file that is broken at
//! the next start does not take the route down.

mod shadow;
mod slot;
mod store;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

pub use shadow::{Difference, Shadow, ShadowReport};
pub use slot::{PluginCounters, PluginSlot, VersionInfo};
pub use store::{LAST_GOOD, VersionStore};

use crate::config::Loaded;
use crate::runtime::{Plugin, PluginSettings, Runtime};

/// One configured plugin.
struct Entry {
    slot: Arc<PluginSlot>,
    path: PathBuf,
    settings: PluginSettings,
    /// Hash of what the plugin's file holds, as far as this host knows: the
    /// watcher deploys a file only when it differs, so the host's own
    /// writes (an upload, a rollback) are not deployed a second time.
    file_hash: std::sync::Mutex<String>,
}

/// The plugins of a running host.
pub struct Deployer {
    runtime: Arc<Runtime>,
    /// Shared with the deployer of the config before a reload, for each
    /// plugin the reload kept.
    entries: BTreeMap<String, Arc<Entry>>,
    /// Where the versions that ran are kept; none when only checking, or
    /// when the compiled cache is off.
    store: Option<VersionStore>,
}

impl Deployer {
    /// Loads every plugin of the config; any refusal is an error. For
    /// checking a config: nothing is recorded as having run.
    pub fn load(runtime: Arc<Runtime>, loaded: &Loaded) -> Result<Self> {
        Self::load_with(runtime, loaded, None)
    }

    /// Loads every plugin of the config to run it. A plugin whose file is
    /// refused starts from the version it last ran, loudly, if the store
    /// has one (an error otherwise); every version loaded is recorded.
    pub fn start(runtime: Arc<Runtime>, loaded: &Loaded) -> Result<Self> {
        let store = runtime
            .cache_dir()
            .map(|dir| VersionStore::new(dir.join("versions")));
        Self::load_with(runtime, loaded, store)
    }

    fn load_with(
        runtime: Arc<Runtime>,
        loaded: &Loaded,
        store: Option<VersionStore>,
    ) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for name in loaded.config.plugins.keys() {
            let entry = load_entry(&runtime, loaded, name, store.as_ref())?;
            if let Some(store) = &store {
                remember(store, name, &entry.slot.current());
            }
            entries.insert(name.clone(), Arc::new(entry));
        }
        Ok(Deployer {
            runtime,
            entries,
            store,
        })
    }

    /// The plugins of `loaded`, the next config of a running host. Those
    /// named in `unchanged` keep their slot: the version deployed last, the
    /// earlier ones for rollback, their counters and shadow run. The others
    /// are loaded from their files, and any refusal is an error (the
    /// running config stays, so there is no need for the last good
    /// version). Nothing is recorded as having run until
    /// [`Deployer::record_running`].
    pub fn reload(&self, loaded: &Loaded, unchanged: &BTreeSet<String>) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for name in loaded.config.plugins.keys() {
            let kept = unchanged
                .contains(name)
                .then(|| self.entries.get(name))
                .flatten();
            let entry = match kept {
                Some(entry) => entry.clone(),
                None => Arc::new(load_entry(&self.runtime, loaded, name, None)?),
            };
            entries.insert(name.clone(), entry);
        }
        Ok(Deployer {
            runtime: self.runtime.clone(),
            entries,
            store: self.store.clone(),
        })
    }

    /// Whether plugin `name` is the same slot here as in `other`: its
    /// versions carried over a reload.
    pub fn same_slot(&self, other: &Deployer, name: &str) -> bool {
        match (self.entries.get(name), other.entries.get(name)) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Records every plugin's current version as the one that runs, for a
    /// start whose file is broken.
    pub fn record_running(&self) {
        if let Some(store) = &self.store {
            for (name, entry) in &self.entries {
                remember(store, name, &entry.slot.current());
            }
        }
    }

    /// Deploys what the files of plugins `names` hold now, where that is
    /// not what this host last loaded or wrote there: a reload re-reads
    /// them, as a start does, even with the watcher off. A refused file is
    /// logged and the running version stays.
    pub async fn deploy_changed_files(&self, names: &[String]) {
        for name in names {
            let Some(entry) = self.entries.get(name) else {
                continue;
            };
            match std::fs::read(&entry.path) {
                Ok(wasm) => {
                    let source = entry.path.display().to_string();
                    let _ = self.deploy_file(name, wasm, &source).await;
                }
                Err(e) => {
                    tracing::warn!(plugin = %name, path = %entry.path.display(), "cannot read the plugin's file; the running version stays: {e}");
                }
            }
        }
    }

    pub fn slot(&self, name: &str) -> Option<&Arc<PluginSlot>> {
        self.entries.get(name).map(|e| &e.slot)
    }

    pub fn slots(&self) -> impl Iterator<Item = &Arc<PluginSlot>> {
        self.entries.values().map(|e| &e.slot)
    }

    /// Compiles and validates `wasm` as a new version of plugin `name` on a
    /// blocking thread, then makes it current. `Ok(None)`: already current.
    pub async fn deploy(
        &self,
        name: &str,
        wasm: Vec<u8>,
        source: &str,
    ) -> Result<Option<VersionInfo>> {
        let entry = self
            .entries
            .get(name)
            .with_context(|| format!("no plugin named `{name}`"))?;
        if crate::runtime::hash(&wasm) == entry.slot.current_info().hash {
            return Ok(None);
        }
        let runtime = self.runtime.clone();
        let settings = entry.settings.clone();
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&wasm, settings))
            .await
            .context("the compile task failed")?;
        match loaded {
            Ok(plugin) => {
                if let Some(store) = &self.store {
                    remember(store, name, &plugin);
                }
                let info = entry.slot.swap(Arc::new(plugin), source);
                if let Some(info) = &info {
                    tracing::info!(plugin = %name, version = &info.hash[..12], source, "new plugin version is live");
                }
                Ok(info)
            }
            Err(error) => {
                let message = format!("{error:#}");
                tracing::error!(
                    plugin = %name,
                    running = &entry.slot.current_info().hash[..12],
                    source,
                    "new plugin version refused, the running version stays: {message}"
                );
                entry.slot.record_error(message);
                Err(error)
            }
        }
    }

    /// Compiles and validates `wasm` as a candidate of plugin `name` and
    /// runs it in the shadow of the live version on `sample` (0..=1) of its
    /// messages, replacing any earlier candidate.
    pub async fn shadow(&self, name: &str, wasm: Vec<u8>, sample: f64) -> Result<VersionInfo> {
        let entry = self
            .entries
            .get(name)
            .with_context(|| format!("no plugin named `{name}`"))?;
        if !(0.0..=1.0).contains(&sample) || sample.is_nan() {
            anyhow::bail!("the sample must be within 0..=1, not {sample}");
        }
        let runtime = self.runtime.clone();
        let settings = entry.settings.clone();
        let plugin = tokio::task::spawn_blocking(move || runtime.load(&wasm, settings))
            .await
            .context("the compile task failed")?
            .context("the candidate is refused")?;
        let info = VersionInfo {
            hash: plugin.hash.clone(),
            loaded_at_ms: crate::message::now_ms(),
            source: "shadow".into(),
        };
        tracing::info!(plugin = %name, candidate = &info.hash[..12], sample, "shadow run started");
        entry
            .slot
            .set_shadow(Shadow::new(Arc::new(plugin), info.clone(), sample));
        Ok(info)
    }

    /// How plugin `name`'s candidate compares so far.
    pub fn shadow_report(&self, name: &str) -> Result<ShadowReport> {
        Ok(self.running_shadow(name)?.report())
    }

    /// Ends plugin `name`'s shadow run; its report is the last word.
    pub fn stop_shadow(&self, name: &str) -> Result<ShadowReport> {
        self.running_shadow(name)?;
        let shadow = self.entries[name]
            .slot
            .take_shadow()
            .context("no shadow run")?;
        tracing::info!(plugin = %name, candidate = &shadow.info.hash[..12], "shadow run stopped");
        Ok(shadow.report())
    }

    /// Makes plugin `name`'s candidate the live version (as an upload is,
    /// on disk too) and ends the shadow run.
    pub async fn promote_shadow(&self, name: &str) -> Result<Option<VersionInfo>> {
        let wasm = self.running_shadow(name)?.plugin.wasm.to_vec();
        let info = self.deploy_upload(name, wasm).await?;
        self.entries[name].slot.take_shadow();
        Ok(info)
    }

    fn running_shadow(&self, name: &str) -> Result<Arc<Shadow>> {
        self.entries
            .get(name)
            .with_context(|| format!("no plugin named `{name}`"))?
            .slot
            .shadow()
            .with_context(|| format!("plugin `{name}` has no shadow run"))
    }

    /// Deploys what the watcher found in the plugin's file, unless the file
    /// holds what this host last wrote or loaded there.
    pub async fn deploy_file(
        &self,
        name: &str,
        wasm: Vec<u8>,
        source: &str,
    ) -> Result<Option<VersionInfo>> {
        let entry = self
            .entries
            .get(name)
            .with_context(|| format!("no plugin named `{name}`"))?;
        let hash = crate::runtime::hash(&wasm);
        if *entry.file_hash.lock().unwrap() == hash {
            return Ok(None);
        }
        *entry.file_hash.lock().unwrap() = hash;
        self.deploy(name, wasm, source).await
    }

    /// Deploys an uploaded version and, once it is live, writes it over the
    /// plugin's file (atomically), so a restart runs the same version.
    pub async fn deploy_upload(&self, name: &str, wasm: Vec<u8>) -> Result<Option<VersionInfo>> {
        let info = self.deploy(name, wasm.clone(), "upload").await?;
        if info.is_some() {
            self.write_plugin_file(name, &wasm)?;
        }
        Ok(info)
    }

    /// Makes the previous version current again, on disk too.
    pub fn rollback(&self, name: &str) -> Result<VersionInfo> {
        let entry = self
            .entries
            .get(name)
            .with_context(|| format!("no plugin named `{name}`"))?;
        let info = entry.slot.rollback()?;
        tracing::info!(plugin = %name, version = &info.hash[..12], "rolled back");
        if let Some(store) = &self.store {
            remember(store, name, &entry.slot.current());
        }
        self.write_plugin_file(name, &entry.slot.current().wasm)?;
        Ok(info)
    }

    /// Writes the running version over the plugin's file, so a restart (or
    /// the watcher) finds what runs.
    fn write_plugin_file(&self, name: &str, wasm: &[u8]) -> Result<()> {
        let entry = &self.entries[name];
        write_atomically(&entry.path, wasm).with_context(|| {
            format!(
                "version is live but `{}` was not updated",
                entry.path.display()
            )
        })?;
        *entry.file_hash.lock().unwrap() = crate::runtime::hash(wasm);
        Ok(())
    }

    /// The configured file of each plugin.
    fn paths(&self) -> Vec<(String, PathBuf)> {
        self.entries
            .iter()
            .map(|(name, e)| (name.clone(), e.path.clone()))
            .collect()
    }

    /// Watches the plugin files until `shutdown`; see [`watch`].
    pub fn watch(self: &Arc<Self>, shutdown: tokio_util::sync::CancellationToken) -> Result<()> {
        watch::spawn(self.clone(), self.paths(), shutdown)
    }
}

/// Loads plugin `name` of `loaded` into a new slot. A refused file runs
/// the last good version in `store`, if given and it has one.
fn load_entry(
    runtime: &Runtime,
    loaded: &Loaded,
    name: &str,
    store: Option<&VersionStore>,
) -> Result<Entry> {
    let (path, settings) = loaded.plugin_settings(name).expect("listed plugin");
    let file = std::fs::read(&path).unwrap_or_default();
    let loaded_file = runtime
        .load_file(&path, settings.clone())
        .with_context(|| format!("plugins.{name}"));
    let (plugin, source, refusal) = match (loaded_file, store) {
        (Ok(plugin), _) => (plugin, path.display().to_string(), None),
        (Err(refused), Some(store)) => {
            let refusal = format!("{refused:#}; running the last good version");
            let plugin = last_good(runtime, store, name, &settings, refused)?;
            (plugin, LAST_GOOD.into(), Some(refusal))
        }
        (Err(refused), None) => return Err(refused),
    };
    tracing::info!(plugin = %name, version = plugin.short_hash(), path = %path.display(), "plugin loaded");
    // The file's own hash, even when it was refused: the watcher then
    // deploys it only once it changes.
    let file_hash = std::sync::Mutex::new(crate::runtime::hash(&file));
    let slot = Arc::new(PluginSlot::new(name, Arc::new(plugin), source));
    if let Some(refusal) = refusal {
        slot.record_error(refusal);
    }
    if let Some(shadow) = &loaded.config.plugins[name].shadow {
        let path = loaded.base_dir.join(&shadow.path);
        let candidate = runtime
            .load_file(&path, settings.clone())
            .with_context(|| format!("plugins.{name}.shadow"))?;
        let info = VersionInfo {
            hash: candidate.hash.clone(),
            loaded_at_ms: crate::message::now_ms(),
            source: path.display().to_string(),
        };
        tracing::info!(plugin = %name, candidate = candidate.short_hash(), sample = shadow.sample, "shadow run started");
        slot.set_shadow(Shadow::new(Arc::new(candidate), info, shadow.sample));
    }
    Ok(Entry {
        slot,
        path,
        settings,
        file_hash,
    })
}

/// The version plugin `name` last ran, loaded, in place of its refused
/// file; the refusal if there is none.
fn last_good(
    runtime: &Runtime,
    store: &VersionStore,
    name: &str,
    settings: &PluginSettings,
    refused: anyhow::Error,
) -> Result<Plugin> {
    let stored = match store.last_good(name) {
        Ok(Some(stored)) => stored,
        Ok(None) => return Err(refused),
        Err(e) => return Err(refused.context(format!("and no last good version: {e:#}"))),
    };
    let (hash, wasm) = stored;
    let plugin = runtime
        .load(&wasm, settings.clone())
        .with_context(|| format!("{refused:#}; and its last good version {hash} fails too"))?;
    tracing::error!(
        plugin = %name,
        version = plugin.short_hash(),
        "the plugin's file is refused; running the last good version it ran instead: {refused:#}"
    );
    Ok(plugin)
}

/// Records that `plugin` ran; a failure only costs the fallback.
fn remember(store: &VersionStore, name: &str, plugin: &Plugin) {
    if let Err(e) = store.record(name, &plugin.hash, &plugin.wasm) {
        tracing::warn!(plugin = %name, "cannot keep this version as the last good one: {e:#}");
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().context("plugin path has no file name")?;
    let tmp = dir.join(format!(".{}.upload", name.to_string_lossy()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
