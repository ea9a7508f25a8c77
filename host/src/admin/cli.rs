//! The operator commands that talk to a running host's admin API.

use std::path::PathBuf;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::AdminClient;
use super::table::{print_json, short_hash};
use super::views;

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
    #[command(
        after_help = "Examples:\n  sluice deploy target/shout.wasm --plugin shout\n  sluice deploy target/shout.wasm --plugin shout --shadow --sample 0.1"
    )]
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
    #[command(
        after_help = "Examples:\n  sluice shadow report shout\n  sluice shadow promote shout"
    )]
    Shadow {
        #[arg(value_enum)]
        action: ShadowAction,
        /// The plugin whose candidate it is.
        plugin: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List plugins: live version, when it was deployed, earlier versions,
    /// shadow candidate.
    #[command(
        after_help = "Example:\n  sluice plugins --admin http://10.0.0.5:9464 --token \"$TOKEN\""
    )]
    Plugins {
        #[command(flatten)]
        output: Output,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Return a plugin to its previous version.
    #[command(after_help = "Example:\n  sluice rollback shout")]
    Rollback {
        plugin: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// List routes: running, paused or not ready, what they read, and their
    /// backlog.
    #[command(after_help = "Examples:\n  sluice routes\n  sluice routes --json")]
    Routes {
        #[command(flatten)]
        output: Output,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Stop fetching on a route (messages in flight finish).
    #[command(after_help = "Example:\n  sluice pause enrich")]
    Pause {
        route: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Resume a paused route.
    #[command(after_help = "Example:\n  sluice resume enrich")]
    Resume {
        route: String,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Print each route's counters, rate and last activity, and each
    /// plugin's failures.
    #[command(after_help = "Example:\n  sluice stats --interval 5")]
    Stats {
        /// Seconds between the two readings the rate is taken from; 0 reads
        /// once and shows no rate.
        #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
        interval: f64,
        #[command(flatten)]
        output: Output,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Re-read the running host's config file and apply it (like SIGHUP).
    #[command(
        after_help = "Example:\n  sluice reload                 # or: kill -HUP <pid of sluice run>"
    )]
    Reload {
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// How a listing is printed.
#[derive(Args, Debug, Clone)]
pub struct Output {
    /// Print the admin API's answer as one JSON document, for scripts.
    #[arg(long)]
    pub json: bool,
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
            AdminCommand::Plugins { output, target } => {
                let plugins = client(&target).get("/api/plugins")?;
                match output.json {
                    true => print_json(&plugins),
                    false => print!("{}", views::plugins(&list(plugins))),
                }
            }
            AdminCommand::Rollback { plugin, target } => {
                let answer = client(&target).post(&format!("/api/plugins/{plugin}/rollback"))?;
                println!(
                    "plugin {plugin}: version {} is live again",
                    short(&answer["current"])
                );
            }
            AdminCommand::Routes { output, target } => {
                let routes = client(&target).get("/api/routes")?;
                match output.json {
                    true => print_json(&routes),
                    false => print!("{}", views::routes(&list(routes))),
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
            AdminCommand::Stats {
                interval,
                output,
                target,
            } => stats(&client(&target), interval, output.json)?,
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

/// `sluice stats`: two readings of the routes `interval` seconds apart
/// give each route's rate; with `json`, one document of the routes (the
/// second reading), the plugins, and the rates by route.
fn stats(client: &AdminClient, interval: f64, json: bool) -> Result<()> {
    if !(interval.is_finite() && interval >= 0.0) {
        bail!("--interval must be a number of seconds, 0 or more");
    }
    let before = list(client.get("/api/routes")?);
    let started = Instant::now();
    let routes = match interval > 0.0 {
        true => {
            std::thread::sleep(Duration::from_secs_f64(interval));
            list(client.get("/api/routes")?)
        }
        false => before.clone(),
    };
    let seconds = match interval > 0.0 {
        true => started.elapsed().as_secs_f64(),
        false => 0.0,
    };
    let rates = views::rates(&before, &routes, seconds);
    let plugins = client.get("/api/plugins")?;
    if json {
        let by_route: serde_json::Map<String, Value> = routes
            .iter()
            .zip(&rates)
            .map(|(route, rate)| (route["name"].as_str().unwrap_or("").into(), json!(rate)))
            .collect();
        print_json(&json!({
            "routes": routes,
            "plugins": plugins,
            "handled_per_second": by_route,
        }));
    } else {
        print!("{}", views::stats(&routes, &rates, &list(plugins)));
    }
    Ok(())
}

fn short(info: &Value) -> String {
    short_hash(info["hash"].as_str().unwrap_or_default())
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
