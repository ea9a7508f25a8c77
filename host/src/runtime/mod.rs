//! The WebAssembly runtime: one wasmtime `Engine` for the process, plugins
//! compiled once (and cached on disk by content hash), and warm instances
//! that workers reuse from call to call.
//!
//! Every call runs under a deadline (epoch interruption; the call yields to
//! the async executor at every tick so a busy plugin never starves others)
//! and every store under a memory cap. A trap, timeout or cap hit poisons the
//! instance: the worker drops it and instantiates afresh.
//!
//! A plugin implements the `handler` world of `sluice:plugin@0.2.0` (or of
//! 0.1.0, which is the same world under the older name), or the
//! `batch-handler` world, which adds `handle-batch`; loading tells which.

mod cache;
mod gate;
mod host_api;
mod instance;
mod log;
mod messaging;
mod outbound;
mod outputs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

use crate::request::Requester;

pub use gate::{Gate, Share};
pub use instance::{BatchError, CallError, Instance, Outcome};
pub use log::{LogBudget, escape};
pub use messaging::PACKAGE as MESSAGING_PACKAGE;
pub use outbound::{Origin, OutboundHttp};
pub use outputs::{HOST_HEADER_PREFIX, OutputLimits};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "batch-handler",
    exports: { default: async },
    // A request waits for its reply without blocking the thread.
    imports: { "sluice:plugin/host.request": async },
    // Messages go into a call borrowed from the delivery, not copied first.
    ownership: Borrowing { duplicate_if_necessary: true },
});

/// Bindings of the `handler` world, sharing the interfaces generated above.
mod single {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "handler",
        exports: { default: async },
        ownership: Borrowing { duplicate_if_necessary: true },
        with: {
            "sluice:plugin/types": super::sluice::plugin::types,
            "sluice:plugin/host": super::sluice::plugin::host,
        },
    });
}

use single::{Handler, HandlerPre};

/// The WIT world every plugin implements (or its 0.1.0 version).
pub const WORLD: &str = "sluice:plugin/handler@0.2.0";
/// The world of a plugin that also exports `handle-batch`.
pub const BATCH_WORLD: &str = "sluice:plugin/batch-handler@0.2.0";
/// The world of plugins built against the first version of the WIT.
pub const WORLD_0_1: &str = "sluice:plugin/handler@0.1.0";

/// The plugin world's WIT, as this build implements it.
pub const WIT: &str = include_str!("../../../wit/sluice.wit");

/// The package [`WIT`] declares (`sluice:plugin@0.2.0`), from its package
/// line.
pub fn wit_package() -> Option<&'static str> {
    WIT.lines()
        .find_map(|line| line.trim().strip_prefix("package "))
        .map(|package| package.trim_end_matches(';').trim())
}

/// How often the epoch advances; deadlines are rounded up to this.
const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What a plugin's calls reach of the route they run for.
#[derive(Clone, Default)]
pub struct RouteLink {
    /// Sends the plugin's requests (without one, a request fails).
    pub requester: Option<Arc<Requester>>,
    /// The names of the route's output backends: what a `wasi:messaging`
    /// client may connect to besides `default`.
    pub output_backends: Arc<[String]>,
}

/// Limits and grants of one plugin, from its config.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    pub name: String,
    /// Longest a single call may run.
    pub timeout: Duration,
    /// Most memory an instance may hold, in bytes: all its linear memories
    /// and tables together.
    pub memory_limit: usize,
    /// Caps on what one call may hand the host.
    pub limits: OutputLimits,
    /// The plugin's log-line rate, shared by all its instances and versions.
    pub log_budget: Arc<LogBudget>,
    /// Values the plugin reads with `config-get`.
    pub config: BTreeMap<String, String>,
    /// Topic patterns the plugin may publish to (outputs and `publish`);
    /// none unless granted.
    pub publish_to: Vec<String>,
    /// Topic patterns the plugin may send requests to (`request`); none
    /// unless granted.
    pub request_to: Vec<String>,
    /// Environment variables visible to the plugin.
    pub env: BTreeMap<String, String>,
    /// Host directories the plugin may read, by the path it sees them at.
    pub read_dirs: BTreeMap<String, PathBuf>,
    /// The origins the plugin may send HTTP requests to (none unless
    /// granted), shared by all its instances.
    pub outbound_http: Arc<OutboundHttp>,
    /// Error kinds of a `wasi:messaging` handler's result that reject
    /// (dead-letter) the message instead of retrying it.
    pub reject_on: Vec<String>,
}

impl PluginSettings {
    pub fn new(name: impl Into<String>) -> Self {
        PluginSettings {
            name: name.into(),
            timeout: Duration::from_secs(1),
            memory_limit: 64 << 20,
            limits: OutputLimits::default(),
            log_budget: Arc::new(LogBudget::default()),
            config: BTreeMap::new(),
            publish_to: Vec::new(),
            request_to: Vec::new(),
            env: BTreeMap::new(),
            read_dirs: BTreeMap::new(),
            outbound_http: Arc::default(),
            reject_on: Vec::new(),
        }
    }
}

/// The process-wide engine, linker and compiled-component cache.
pub struct Runtime {
    engine: Engine,
    linker: Linker<instance::State>,
    cache_dir: Option<PathBuf>,
    ticker_stop: Arc<AtomicBool>,
}

/// A loaded plugin: validated against the world and ready to instantiate.
pub struct Plugin {
    pub settings: Arc<PluginSettings>,
    /// SHA-256 of the .wasm file, hex.
    pub hash: String,
    /// The component as loaded, so a rollback can put it back on disk.
    pub wasm: Arc<[u8]>,
    engine: Engine,
    exports: Exports,
    /// Built against `sluice:plugin@0.1.0`.
    v0_1: bool,
}

/// The plugin's exports, typed: `handle`, and `handle-batch` if it has it,
/// or the `wasi:messaging` draft's `incoming-handler`.
#[derive(Clone)]
enum Exports {
    Single(HandlerPre<instance::State>),
    Batch(BatchHandlerPre<instance::State>),
    /// A draft component; `true` if it imports `request-reply`.
    Messaging(messaging::MessagingRequestReplyPre<instance::State>, bool),
}

impl Runtime {
    /// Builds the engine. `cache_dir` keeps compiled components between runs.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // Every plugin links `wasi:http` (componentize-js components import
        // it whether or not they fetch); requests go out only by grant.
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        crate::backend::choose_rustls_provider();
        BatchHandler::add_to_linker::<instance::State, HasSelf<instance::State>>(
            &mut linker,
            |s| s,
        )?;
        host_api::add_v0_1_to_linker(&mut linker)?;
        messaging::add_to_linker(&mut linker)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticking_engine = engine.clone();
        let stop = ticker_stop.clone();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticking_engine.increment_epoch();
                }
            })?;
        Ok(Runtime {
            engine,
            linker,
            cache_dir,
            ticker_stop,
        })
    }

    /// Where compiled components are cached, if they are.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache_dir.as_deref()
    }

    /// The cache directory used when the config names none.
    pub fn default_cache_dir() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("sluice").join("components"))
    }

    /// Loads a plugin from a .wasm file.
    pub fn load_file(&self, path: &Path, settings: PluginSettings) -> Result<Plugin> {
        let bytes = std::fs::read(path).map_err(|e| unreadable(path, e))?;
        self.load(&bytes, settings)
            .with_context(|| format!("plugin `{}` ({})", path.display(), settings_name(path)))
    }

    /// Compiles (or fetches from the cache) and validates a component.
    pub fn load(&self, wasm: &[u8], settings: PluginSettings) -> Result<Plugin> {
        let hash = hash(wasm);
        let component = match &self.cache_dir {
            Some(dir) => cache::load_or_compile(&self.engine, dir, &hash, wasm)?,
            None => Component::new(&self.engine, wasm).map_err(not_a_component)?,
        };
        // WASI imports of a newer 0.2.x than the host's match the host's by
        // semver.
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| wrong_world(e, &component, &self.engine))?;
        let ty = component.component_type();
        // A `handle-batch` of the wrong type is refused, not ignored: its
        // author meant the host to call it.
        let exports = if ty
            .get_export(&self.engine, messaging::HANDLER_EXPORT)
            .is_some()
        {
            let request_reply = ty
                .imports(&self.engine)
                .any(|(name, _)| name == messaging::REQUEST_REPLY_IMPORT);
            Exports::Messaging(
                messaging::MessagingRequestReplyPre::new(pre)
                    .map_err(|e| wrong_world(e, &component, &self.engine))?,
                request_reply,
            )
        } else if ty.get_export(&self.engine, "handle-batch").is_some() {
            Exports::Batch(
                BatchHandlerPre::new(pre).map_err(|e| wrong_world(e, &component, &self.engine))?,
            )
        } else {
            Exports::Single(
                HandlerPre::new(pre).map_err(|e| wrong_world(e, &component, &self.engine))?,
            )
        };
        let v0_1 = ty
            .imports(&self.engine)
            .any(|(name, _)| name.starts_with("sluice:plugin/") && name.contains("@0.1."));
        Ok(Plugin {
            settings: Arc::new(settings),
            hash,
            wasm: Arc::from(wasm),
            engine: self.engine.clone(),
            exports,
            v0_1,
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

impl Plugin {
    /// A fresh warm instance for one worker, outside any route's share of
    /// the CPU (for tools and tests that call a plugin directly).
    pub async fn instantiate(self: &Arc<Self>) -> Result<Instance> {
        Instance::new(self.clone(), None, RouteLink::default()).await
    }

    /// A fresh warm instance for a worker of the route holding `share`:
    /// its calls run only in a slot of the route's share, and reach what
    /// `link` gives of the route.
    pub async fn instantiate_sharing(
        self: &Arc<Self>,
        share: Share,
        link: RouteLink,
    ) -> Result<Instance> {
        Instance::new(self.clone(), Some(share), link).await
    }

    /// Whether the plugin exports `handle-batch`.
    pub fn batches(&self) -> bool {
        matches!(self.exports, Exports::Batch(_))
    }

    /// The world the plugin implements.
    pub fn world(&self) -> &'static str {
        match (&self.exports, self.v0_1) {
            (Exports::Messaging(_, false), _) => messaging::CORE_WORLD,
            (Exports::Messaging(_, true), _) => messaging::REQUEST_REPLY_WORLD,
            (Exports::Batch(_), _) => BATCH_WORLD,
            (Exports::Single(_), true) => WORLD_0_1,
            (Exports::Single(_), false) => WORLD,
        }
    }

    /// The first 12 hex digits of the content hash, for logs.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }
}

/// SHA-256 of a component, hex: the identity of a plugin version.
pub fn hash(wasm: &[u8]) -> String {
    hex::encode(Sha256::digest(wasm))
}

fn settings_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A plugin file that cannot be read; one that is not there most often
/// has not been built yet.
fn unreadable(path: &Path, e: std::io::Error) -> anyhow::Error {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "plugin file `{}` does not exist: did you build it?",
            absolute.display()
        )
    } else {
        anyhow::anyhow!("cannot read plugin `{}`: {e}", absolute.display())
    }
}

fn not_a_component(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "not a valid WebAssembly component (build plugins for wasm32-wasip2 or with a component toolchain): {e:#}"
    )
}

/// Explains a failed link: which import or export does not match the world.
fn wrong_world(e: wasmtime::Error, component: &Component, engine: &Engine) -> anyhow::Error {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let imports: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    // The SDKs export `handle` from one macro or decorator; a component
    // without it most likely left that out.
    let hint = if exports
        .iter()
        .any(|name| name == "handle" || name == messaging::HANDLER_EXPORT)
    {
        ""
    } else {
        "; it does not export `handle`: in Rust, did you forget `sluice_sdk::handler!`?"
    };
    anyhow::anyhow!(
        "component does not implement the `{WORLD}` world (nor `batch-handler`, nor 0.1.0's \
         `handler`, nor `{}`'s `messaging-core` or `messaging-request-reply`): {e:#} (it exports [{}]; it imports [{}]; a handler must export `handle`, \
         may export `handle-batch`, and may import only `sluice:plugin/host` and WASI 0.2, `wasi:http` included){hint}",
        messaging::PACKAGE,
        exports.join(", "),
        imports.join(", ")
    )
}
