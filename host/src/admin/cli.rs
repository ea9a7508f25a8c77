//! The operator commands that talk to a running host's admin API.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::Value;

use super::client::AdminClient;

/// Where the running host's admin API is.
#[derive(Args, Debug, Clone)]
pub struct AdminTarget {
    /// The admin API's base URL.
    #[arg(
        long,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:9464",
        global = true
    )]
    pub admin: String,
    /// Bearer token, if the API requires one.
    #[arg(
        long,
        env = "SLUICE_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub token: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Deploy a new version of a plugin into the running host.
    Deploy {
        /// The .wasm component.
        file: PathBuf,
        /// The plugin it is a version of.
        #[arg(long)]
        plugin: String,
        /// Run it in the shadow of the live version instead: it handles the
        /// same messages, its results are compared and never published.
        #[arg(long)]
        shadow: bool,
        /// With --shadow: the share of messages it handles too (0 to 1).
        #[arg(long, requires = "shadow", default_value_t = 1.0)]
        sample: f64,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// A shadow run: `report`, `promote` (make the candidate live) or `stop`.
    Shadow {
        #[arg(value_enum)]
        action: ShadowAction,
        /// The plugin whose candidate it is.
        plugin: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List plugins, their running versions and earlier ones.
    Plugins {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Return a plugin to its previous version.
    Rollback {
        plugin: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List routes and whether they are paused.
    Routes {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Stop fetching on a route (messages in flight finish).
    Pause {
        route: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Resume a paused route.
    Resume {
        route: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Print each route's counters and each plugin's failures.
    Stats {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Re-read the running host's config file and apply it (like SIGHUP).
    Reload {
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// What to do with a shadow run.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ShadowAction {
    /// How the candidate compares so far, with the latest differences.
    Report,
    /// Make the candidate the live version (as `deploy` does) and end the run.
    Promote,
    /// End the run; the live version is untouched.
    Stop,
}

impl AdminCommand {
    pub fn run(self) -> Result<()> {
        match self {
            AdminCommand::Deploy {
                file,
                plugin,
                shadow: true,
                sample,
                target,
            } => {
                let wasm = std::fs::read(&file)
                    .with_context(|| format!("cannot read `{}`", file.display()))?;
                let answer = client(&target).put(
                    &format!("/api/plugins/{plugin}/shadow?sample={sample}"),
                    wasm,
                )?;
                println!(
                    "plugin {plugin}: candidate {} runs in the shadow of the live version on {}% of messages",
                    short(&answer["shadow"]),
                    sample * 100.0
                );
            }
            AdminCommand::Shadow {
                action,
                plugin,
                target,
            } => {
                let client = client(&target);
                let path = format!("/api/plugins/{plugin}/shadow");
                match action {
                    ShadowAction::Report => print_shadow(&plugin, &client.get(&path)?),
                    ShadowAction::Stop => {
                        let answer = client.post(&format!("{path}/stop"))?;
                        print_shadow(&plugin, &answer["stopped"]);
                        println!("plugin {plugin}: shadow run stopped");
                    }
                    ShadowAction::Promote => {
                        let answer = client.post(&format!("{path}/promote"))?;
                        match answer.get("deployed") {
                            Some(info) => {
                                println!("plugin {plugin}: candidate {} is live", short(info))
                            }
                            None => println!("plugin {plugin}: the candidate was already live"),
                        }
                    }
                }
            }
            AdminCommand::Deploy {
                file,
                plugin,
                target,
                ..
            } => {
                let wasm = std::fs::read(&file)
                    .with_context(|| format!("cannot read `{}`", file.display()))?;
                let answer = client(&target).put(&format!("/api/plugins/{plugin}"), wasm)?;
                match answer.get("deployed") {
                    Some(info) => println!("plugin {plugin}: version {} is live", short(info)),
                    None => println!("plugin {plugin}: that version is already running"),
                }
            }
            AdminCommand::Plugins { target } => {
                for plugin in list(client(&target).get("/api/plugins")?) {
                    println!(
                        "{:<20} {}  since {}  ({} earlier version(s))",
                        plugin["name"].as_str().unwrap_or(""),
                        short(&plugin["current"]),
                        plugin["current"]["loaded_at_ms"],
                        plugin["earlier"].as_array().map_or(0, Vec::len)
                    );
                    if plugin["current"]["source"] == crate::deploy::LAST_GOOD {
                        println!(
                            "{:<20} RUNNING ITS LAST GOOD VERSION: its file was refused at start",
                            ""
                        );
                    }
                    if let Some(error) = plugin["last_error"].as_str() {
                        println!("{:<20} last refused version: {error}", "");
                    }
                }
            }
            AdminCommand::Rollback { plugin, target } => {
                let answer = client(&target).post(&format!("/api/plugins/{plugin}/rollback"))?;
                println!(
                    "plugin {plugin}: version {} is live again",
                    short(&answer["current"])
                );
            }
            AdminCommand::Routes { target } => {
                for route in list(client(&target).get("/api/routes")?) {
                    println!(
                        "{:<20} {:<9} plugin {:<16} group {:<16} backlog {:<8} topics {}",
                        route["name"].as_str().unwrap_or(""),
                        if route["paused"].as_bool() == Some(true) {
                            "paused"
                        } else if route["trouble"].is_string() {
                            "not-ready"
                        } else {
                            "running"
                        },
                        route["plugin"].as_str().unwrap_or(""),
                        route["group"].as_str().unwrap_or(""),
                        count(&route["backlog"]),
                        route["topics"]
                    );
                    if let Some(trouble) = route["trouble"].as_str() {
                        println!("    {trouble}");
                    }
                }
            }
            AdminCommand::Pause { route, target } => {
                client(&target).post(&format!("/api/routes/{route}/pause"))?;
                println!("route {route}: paused");
            }
            AdminCommand::Resume { route, target } => {
                client(&target).post(&format!("/api/routes/{route}/resume"))?;
                println!("route {route}: resumed");
            }
            AdminCommand::Reload { target } => {
                client(&target).post("/api/reload")?;
                println!("config reloaded");
            }
            AdminCommand::Stats { target } => {
                let client = client(&target);
                for route in list(client.get("/api/routes")?) {
                    let s = &route["stats"];
                    println!(
                        "route {:<20} received {} acked {} outputs {} retried {} dead-lettered {} in flight {} pending {} backlog {} plugin errors {} backend errors {}",
                        route["name"].as_str().unwrap_or(""),
                        s["received"],
                        s["succeeded"],
                        s["published"],
                        s["retried"],
                        s["dead_lettered"],
                        s["in_flight"],
                        count(&route["pending"]),
                        count(&route["backlog"]),
                        s["plugin_errors"],
                        s["backend_errors"]
                    );
                }
                let metrics = client.metrics()?;
                for line in metrics.lines().filter(|l| {
                    l.starts_with("sluice_plugin_traps_total")
                        || l.starts_with("sluice_plugin_timeouts_total")
                        || l.starts_with("sluice_plugin_memory_limit_hits_total")
                }) {
                    println!("{line}");
                }
            }
        }
        Ok(())
    }
}

fn client(target: &AdminTarget) -> AdminClient {
    AdminClient::new(&target.admin, target.token.clone())
}

fn list(value: Value) -> Vec<Value> {
    value.as_array().cloned().unwrap_or_default()
}

/// A count the backend may not know: `-` then.
fn count(value: &Value) -> String {
    value
        .as_u64()
        .map_or_else(|| "-".to_string(), |n| n.to_string())
}

fn short(info: &Value) -> String {
    info["hash"]
        .as_str()
        .map(|h| h[..12.min(h.len())].to_string())
        .unwrap_or_default()
}

/// A shadow report, for people: counts, then each difference side by side.
fn print_shadow(plugin: &str, report: &Value) {
    let number = |key: &str| report[key].as_u64().unwrap_or(0);
    println!(
        "plugin {plugin}: candidate {} on {}% of messages: {} same, {} different, {} candidate failed",
        short(&report["candidate"]),
        report["sample"].as_f64().unwrap_or(0.0) * 100.0,
        number("same"),
        number("different"),
        number("candidate_failed"),
    );
    for difference in list(report["differences"].clone()) {
        println!(
            "  message {} (attempt {})",
            difference["message_id"].as_str().unwrap_or(""),
            difference["attempt"]
        );
        println!(
            "    live:      {}",
            difference["live"].as_str().unwrap_or("")
        );
        println!(
            "    candidate: {}",
            difference["candidate"].as_str().unwrap_or("")
        );
    }
}
