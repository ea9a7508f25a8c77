//! A config as it runs: its connected backends, its plugins and what each
//! route keeps across reloads (counters, pause). A reload builds the next
//! generation from the running one, reusing every backend and plugin whose
//! config did not change, and says which routes it can leave running.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::admin::{AdminState, BackendHandle, RouteHandle};
use crate::backend::{self, Backend, SubscribeOptions};
use crate::config::{Loaded, RouteConfig};
use crate::deploy::Deployer;
use crate::dlq::DeadLetters;
use crate::request::Requester;
use crate::router::{
    Forward, MessageHandler, Route, RouteControl, RouteSpec, RouteStats, WasmHandler,
};

/// What a route keeps while it has the same name: a reload that restarts
/// it hands these to the new one.
#[derive(Clone, Default)]
pub struct RouteState {
    pub stats: Arc<RouteStats>,
    pub control: Arc<RouteControl>,
}

/// A config, wired.
pub struct Generation {
    pub loaded: Loaded,
    pub backends: BTreeMap<String, Arc<dyn Backend>>,
    pub deployer: Arc<Deployer>,
    /// By route name.
    pub routes: BTreeMap<String, RouteState>,
}

/// What a reload does, by name.
#[derive(Debug, Default)]
pub struct Changes {
    /// Routes left running as they are.
    pub kept: Vec<String>,
    /// Routes drained and started again with their new config.
    pub restarted: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Plugins whose slot carried over.
    pub plugins_kept: Vec<String>,
    /// Plugins loaded from their files into a new slot.
    pub plugins_loaded: Vec<String>,
    /// Backends whose connection carried over.
    pub backends_kept: Vec<String>,
    /// Backends connected anew.
    pub backends_connected: Vec<String>,
}

impl Changes {
    /// The routes to drain before the new config starts.
    pub fn to_stop(&self) -> Vec<String> {
        self.restarted
            .iter()
            .chain(&self.removed)
            .cloned()
            .collect()
    }

    /// The routes to start once those are drained.
    pub fn to_start(&self) -> Vec<String> {
        self.restarted.iter().chain(&self.added).cloned().collect()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |names: &[String]| format!("{} [{}]", names.len(), names.join(", "));
        write!(
            f,
            "routes kept {}, restarted {}, added {}, removed {}; plugins kept {}, loaded anew {}; \
             backends kept {}, connected anew {}",
            list(&self.kept),
            list(&self.restarted),
            list(&self.added),
            list(&self.removed),
            list(&self.plugins_kept),
            list(&self.plugins_loaded),
            list(&self.backends_kept),
            list(&self.backends_connected),
        )
    }
}

impl Generation {
    /// The first generation: every backend connected, every plugin loaded
    /// (a refused file runs its last good version, see [`Deployer::start`]).
    pub async fn start(loaded: Loaded) -> Result<Self> {
        let runtime = Arc::new(super::runtime(&loaded)?);
        let deployer = Arc::new(Deployer::start(runtime, &loaded)?);
        let mut backends = BTreeMap::new();
        for name in loaded.config.backends.keys() {
            backends.insert(name.clone(), connect(&loaded, name).await?);
        }
        let routes = loaded
            .config
            .routes
            .iter()
            .map(|r| (r.name.clone(), RouteState::default()))
            .collect();
        Ok(Generation {
            loaded,
            backends,
            deployer,
            routes,
        })
    }

    /// The generation of `loaded`, built beside this running one without
    /// touching it: backends and plugins whose config is unchanged are
    /// shared, the others connected and loaded (any failure refuses the
    /// config). The runtime (engine, compiled cache) is the running one's.
    pub async fn next(&self, loaded: Loaded) -> Result<(Self, Changes)> {
        let mut changes = Changes::default();
        let mut backends = BTreeMap::new();
        for (name, config) in &loaded.config.backends {
            let running = self
                .backends
                .get(name)
                .filter(|_| self.loaded.config.backends.get(name) == Some(config));
            let backend = match running {
                Some(backend) => {
                    changes.backends_kept.push(name.clone());
                    backend.clone()
                }
                None => {
                    changes.backends_connected.push(name.clone());
                    connect(&loaded, name).await?
                }
            };
            backends.insert(name.clone(), backend);
        }

        let plugins_unchanged: BTreeSet<String> = loaded
            .config
            .plugins
            .iter()
            .filter(|(name, config)| {
                self.loaded.config.plugins.get(*name) == Some(*config)
                    && self.loaded.base_dir == loaded.base_dir
                    && self.loaded.config.runtime.max_message_bytes
                        == loaded.config.runtime.max_message_bytes
            })
            .map(|(name, _)| name.clone())
            .collect();
        let deployer = Arc::new(self.deployer.reload(&loaded, &plugins_unchanged)?);
        for name in loaded.config.plugins.keys() {
            if deployer.same_slot(&self.deployer, name) {
                changes.plugins_kept.push(name.clone());
            } else {
                if self.loaded.config.plugins.contains_key(name) {
                    tracing::info!(
                        plugin = %name,
                        "the plugin's config changed: loaded from its file into a new slot; \
                         its earlier versions (and a version deployed since the start) are no \
                         longer there to roll back to"
                    );
                }
                changes.plugins_loaded.push(name.clone());
            }
        }

        let mut routes = BTreeMap::new();
        for route in &loaded.config.routes {
            let state = match self.routes.get(&route.name) {
                Some(state) => {
                    let before = self
                        .loaded
                        .config
                        .routes
                        .iter()
                        .find(|r| r.name == route.name);
                    let same = before.is_some_and(|before| {
                        self.runs_alike(before, &loaded, &backends, &deployer, route)
                    });
                    if same {
                        changes.kept.push(route.name.clone());
                    } else {
                        changes.restarted.push(route.name.clone());
                    }
                    state.clone()
                }
                None => {
                    changes.added.push(route.name.clone());
                    RouteState::default()
                }
            };
            routes.insert(route.name.clone(), state);
        }
        changes.removed = self
            .loaded
            .config
            .routes
            .iter()
            .filter(|r| !routes.contains_key(&r.name))
            .map(|r| r.name.clone())
            .collect();

        warn_of_start_only_settings(&self.loaded, &loaded);
        Ok((
            Generation {
                loaded,
                backends,
                deployer,
                routes,
            },
            changes,
        ))
    }

    /// Whether route `before` of this generation would run exactly as
    /// `after` does in the next one: the same route table, on the same
    /// connections, with the same plugin slot and message size limit.
    fn runs_alike(
        &self,
        before: &RouteConfig,
        next: &Loaded,
        next_backends: &BTreeMap<String, Arc<dyn Backend>>,
        next_deployer: &Deployer,
        after: &RouteConfig,
    ) -> bool {
        let wired = |loaded: &Loaded, route: &RouteConfig| {
            let mut names = vec![
                loaded.source_backend(route).to_string(),
                loaded.dead_letter_backend(route).to_string(),
            ];
            names.extend(loaded.output_backends(route).into_iter().map(String::from));
            names
        };
        let names = wired(&self.loaded, before);
        let same_backends = names == wired(next, after)
            && names.iter().all(
                |name| match (self.backends.get(name), next_backends.get(name)) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    _ => false,
                },
            );
        before == after
            && same_backends
            && after
                .plugin_name()
                .is_none_or(|plugin| next_deployer.same_slot(&self.deployer, plugin))
            && self.loaded.config.runtime.max_message_bytes == next.config.runtime.max_message_bytes
    }

    /// The route named `name`, wired to run: its own subscription and, with
    /// `redrive`, a second one on its redrive topic.
    pub fn wire(&self, name: &str) -> Vec<Route> {
        let loaded = &self.loaded;
        let route = loaded
            .config
            .routes
            .iter()
            .find(|r| r.name == name)
            .expect("a configured route");
        let state = &self.routes[name];
        let handler: Arc<dyn MessageHandler> = match route.plugin_name() {
            Some(plugin) => {
                let slot = self.deployer.slot(plugin).expect("checked plugin").clone();
                let handler = WasmHandler::over(slot)
                    .publishing_to(loaded.output_backends(route).into_iter().map(str::to_owned));
                // Requests go out on the route's (first) output backend.
                Arc::new(if loaded.config.plugins[plugin].request_to.is_empty() {
                    handler
                } else {
                    let output = &self.backends[loaded.output_backend(route)];
                    handler.requesting(Arc::new(Requester::new(output.clone())))
                })
            }
            None => Arc::new(Forward::new(route.rename.clone())),
        };
        let spec = RouteSpec {
            name: route.name.clone(),
            subscribe: subscribe_options(route),
            concurrency: route.concurrency,
            ordered: route.ordered,
            retry: (&route.retry).into(),
            dead_letter_topic: route.dead_letter_topic(),
            max_in_flight: route.max_in_flight,
            batch_size: route.batch_size,
            max_hops: route.max_hops,
            max_message_bytes: loaded.config.runtime.max_message_bytes,
            max_rate: route.max_rate,
            redriven: false,
            output_failure: route.output_failure,
        };
        let wire = |spec: RouteSpec| Route {
            spec,
            source: self.backends[loaded.source_backend(route)].clone(),
            outputs: loaded
                .output_backends(route)
                .into_iter()
                .map(|name| self.backends[name].clone())
                .collect(),
            dead_letters: (loaded.dead_letter_backend(route) != loaded.output_backend(route))
                .then(|| self.backends[loaded.dead_letter_backend(route)].clone()),
            handler: handler.clone(),
            stats: state.stats.clone(),
        };
        let mut parts = Vec::new();
        if route.redrive {
            // A second subscription of the same group, on the redrive topic
            // alone: the route's own subscription (and its place in its
            // topics) stays as it was. Counters and pause are the route's.
            let mut redriven = spec.clone();
            redriven.subscribe.topics = vec![route.redrive_topic()];
            redriven.redriven = true;
            parts.push(wire(redriven));
        }
        parts.push(wire(spec));
        parts
    }

    /// The names of the routes, in config order.
    pub fn route_names(&self) -> Vec<String> {
        self.loaded
            .config
            .routes
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// What the admin API shows and controls of this generation.
    pub fn admin_state(&self) -> AdminState {
        let loaded = &self.loaded;
        let routes = loaded
            .config
            .routes
            .iter()
            .map(|route| {
                let state = &self.routes[&route.name];
                let subscribe = subscribe_options(route);
                let source = self.backends[loaded.source_backend(route)].clone();
                RouteHandle {
                    name: route.name.clone(),
                    topics: subscribe.topics.clone(),
                    group: route.group().to_string(),
                    plugin: route.plugin_name().map(String::from),
                    backend: loaded.source_backend(route).to_string(),
                    stats: state.stats.clone(),
                    control: state.control.clone(),
                    group_key: subscribe.group_key(),
                    source: source.clone(),
                    stalled_after: Duration::from_millis(route.stalled_after_ms),
                    dead_letters: DeadLetters {
                        route: route.name.clone(),
                        backend: self.backends[loaded.dead_letter_backend(route)].clone(),
                        topic: route.dead_letter_topic(),
                        redrive: route
                            .redrive
                            .then(|| (source.clone(), route.redrive_topic())),
                    },
                }
            })
            .collect();
        let backends = self
            .backends
            .iter()
            .map(|(name, b)| BackendHandle {
                name: name.clone(),
                kind: b.kind(),
            })
            .collect();
        AdminState::new(self.deployer.clone(), routes, backends)
    }

    /// How long in-flight messages may take to finish when routes stop.
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.loaded.config.runtime.shutdown_grace_ms)
    }
}

fn subscribe_options(route: &RouteConfig) -> SubscribeOptions {
    let mut subscribe = SubscribeOptions::new(
        route.topics.iter().map(|t| t.get_ref().clone()).collect(),
        route.group(),
    );
    subscribe.start = route.start.unwrap_or_default();
    subscribe.lease = Duration::from_millis(route.lease_ms);
    subscribe
}

async fn connect(loaded: &Loaded, name: &str) -> Result<Arc<dyn Backend>> {
    let url = &loaded.config.backends[name].url;
    let backend = backend::connect(url)
        .await
        .with_context(|| format!("backends.{name}"))?;
    tracing::info!(backend = %name, url = %backend::redact(url), kind = backend.kind(), "backend connected");
    Ok(backend)
}

/// Settings a running host reads once, at its start.
fn warn_of_start_only_settings(running: &Loaded, next: &Loaded) {
    let (was, now) = (&running.config.runtime, &next.config.runtime);
    if was.cache != now.cache || was.cache_dir != now.cache_dir {
        tracing::warn!(
            "`runtime.cache` and `runtime.cache_dir` take effect at the next start, not on a reload"
        );
    }
    let admin = |loaded: &Loaded| {
        loaded
            .config
            .admin
            .as_ref()
            .map(|a| (a.listen.clone(), a.token.clone(), a.max_upload_mb))
    };
    if admin(running) != admin(next) {
        tracing::warn!("`[admin]` takes effect at the next start, not on a reload");
    }
}
