//! `sluice dlq`: the dead letters of a config's routes, from the command
//! line: list, show, redrive, purge.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::{DeadLetters, Filter, Summary};
use crate::admin::table::{Table, ago, print_json};
use crate::backend::{self, Backend};
use crate::config;
use crate::message::headers;

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Per route: its dead-letter topic, how many dead letters wait, the
    /// oldest and the newest, their causes.
    #[command(after_help = "Example:\n  sluice dlq list -c prod.toml")]
    List {
        #[command(flatten)]
        scope: Scope,
        /// One JSON document: per route, its topic and the summary the admin
        /// API answers (`count`, `causes`, `oldest_ms`, `newest_ms`).
        #[arg(long)]
        json: bool,
    },
    /// The dead letters themselves, one a row: when, cause, attempts,
    /// original topic and id, key, reason and the start of the payload
    /// (--json for all of them, headers included).
    #[command(
        after_help = "Examples:\n  sluice dlq show --route enrich --newer-than 1h\n  sluice dlq show --route enrich --json > letters.jsonl"
    )]
    Show {
        #[command(flatten)]
        scope: Scope,
        /// One JSON object per dead letter, as `sluice tail --json` prints.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back through the route that failed them (its
    /// group only; the route needs `redrive = true`), as new messages with
    /// their key, headers and payload, and attempts from 1.
    #[command(
        after_help = "Examples:\n  sluice dlq redrive --route enrich --dry-run\n  sluice dlq redrive --route enrich --cause attempts-exhausted --rate 50"
    )]
    Redrive {
        #[command(flatten)]
        scope: Scope,
        /// Say what would be redriven, and redrive nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most this many messages a second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Drop dead letters for good.
    #[command(after_help = "Example:\n  sluice dlq purge --route enrich --older-than 7d --yes")]
    Purge {
        #[command(flatten)]
        scope: Scope,
        /// Do not ask (required when stdin is not a terminal).
        #[arg(long)]
        yes: bool,
    },
}

/// Which routes and which of their dead letters.
#[derive(Args, Debug)]
pub struct Scope {
    /// The config whose routes' dead letters these are.
    #[arg(long, short = 'c', default_value = "sluice.toml")]
    config: PathBuf,
    /// Only this route; every route if absent.
    #[arg(long)]
    route: Option<String>,
    /// Only dead letters of this cause (`rejected`, `attempts-exhausted`,
    /// `hop-limit`, `too-large`, `undecodable`); repeatable.
    #[arg(long = "cause")]
    causes: Vec<String>,
    /// Only this message (the dead letter's id or the original's);
    /// repeatable.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Only dead letters at least this old, e.g. `30m`, `2h`, `7d`.
    #[arg(long, value_parser = parse_age)]
    older_than: Option<Duration>,
    /// Only dead letters at most this old.
    #[arg(long, value_parser = parse_age)]
    newer_than: Option<Duration>,
}

impl Scope {
    fn filter(&self) -> Filter {
        Filter {
            causes: self.causes.clone(),
            ids: self.ids.clone(),
            older_than: self.older_than,
            newer_than: self.newer_than,
        }
    }

    /// The dead letters of each route in scope, their backends connected.
    async fn routes(&self) -> Result<Vec<DeadLetters>> {
        let loaded = config::load(&self.config)?;
        if let Some(name) = &self.route
            && !loaded.config.routes.iter().any(|r| &r.name == name)
        {
            bail!("{} has no route named `{name}`", self.config.display());
        }
        let mut connected: BTreeMap<String, Arc<dyn Backend>> = BTreeMap::new();
        let mut routes = Vec::new();
        for route in &loaded.config.routes {
            if self.route.as_ref().is_some_and(|name| *name != route.name) {
                continue;
            }
            let backend =
                connect(&loaded, &mut connected, loaded.dead_letter_backend(route)).await?;
            let redrive = match route.redrive {
                true => Some((
                    connect(&loaded, &mut connected, loaded.source_backend(route)).await?,
                    route.redrive_topic(),
                )),
                false => None,
            };
            routes.push(DeadLetters {
                route: route.name.clone(),
                backend,
                topic: route.dead_letter_topic(),
                redrive,
            });
        }
        Ok(routes)
    }
}

/// Backend `name` of the config, connected once.
async fn connect(
    loaded: &config::Loaded,
    connected: &mut BTreeMap<String, Arc<dyn Backend>>,
    name: &str,
) -> Result<Arc<dyn Backend>> {
    if let Some(backend) = connected.get(name) {
        return Ok(backend.clone());
    }
    let backend = backend::connect(&loaded.config.backends[name].url)
        .await
        .with_context(|| format!("backends.{name}"))?;
    connected.insert(name.to_string(), backend.clone());
    Ok(backend)
}

impl DlqCommand {
    pub async fn run(self) -> Result<()> {
        match self {
            DlqCommand::List { scope, json } => {
                let filter = scope.filter();
                let mut table =
                    Table::new(&["ROUTE", "TOPIC", "COUNT", "OLDEST", "NEWEST", "CAUSES"])
                        .numbers(&["COUNT"]);
                let mut summaries = Vec::new();
                for route in scope.routes().await? {
                    let summary = Summary::of(&route.peek(&filter).await?);
                    let causes: Vec<String> = summary
                        .causes
                        .iter()
                        .map(|(cause, n)| format!("{cause} {n}"))
                        .collect();
                    table.row(vec![
                        route.route.clone(),
                        route.topic.clone(),
                        summary.count.to_string(),
                        ago(summary.oldest_ms),
                        ago(summary.newest_ms),
                        causes.join(", "),
                    ]);
                    let mut entry = serde_json::to_value(&summary)?;
                    entry["route"] = route.route.into();
                    entry["topic"] = route.topic.into();
                    summaries.push(entry);
                }
                match json {
                    true => print_json(&summaries.into()),
                    false => print!("{table}"),
                }
            }
            DlqCommand::Show { scope, json } => {
                let filter = scope.filter();
                let mut table = Table::new(&[
                    "ROUTE",
                    "DEAD-LETTERED",
                    "CAUSE",
                    "ATTEMPTS",
                    "FROM",
                    "ID",
                    "KEY",
                    "REASON",
                    "PAYLOAD",
                ])
                .numbers(&["ATTEMPTS"]);
                for route in scope.routes().await? {
                    for letter in route.peek(&filter).await? {
                        if json {
                            let line = crate::message::json::write(
                                &letter,
                                &[("route", route.route.clone().into())],
                            );
                            println!("{line}");
                            continue;
                        }
                        let field = |name| letter.header(name).unwrap_or("-").to_string();
                        table.row(vec![
                            route.route.clone(),
                            ago(Some(letter.timestamp_ms)),
                            field(headers::DEAD_LETTER_CAUSE),
                            field(headers::ATTEMPTS),
                            field(headers::ORIGINAL_TOPIC),
                            letter
                                .header(headers::ORIGINAL_ID)
                                .unwrap_or(&letter.id)
                                .to_string(),
                            letter.key.clone().unwrap_or_default(),
                            field(headers::DEAD_LETTER_REASON),
                            preview(&letter.payload),
                        ]);
                    }
                }
                if !json {
                    print!("{table}");
                }
            }
            DlqCommand::Redrive {
                scope,
                dry_run,
                rate,
            } => {
                if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                    bail!("--rate must be a positive number of messages a second");
                }
                let filter = scope.filter();
                for route in scope.routes().await? {
                    if dry_run {
                        let letters = route.peek(&filter).await?;
                        for letter in &letters {
                            println!(
                                "would redrive {} ({}) to `{}.redrive`",
                                letter.header(headers::ORIGINAL_ID).unwrap_or(&letter.id),
                                letter.header(headers::DEAD_LETTER_CAUSE).unwrap_or("-"),
                                route.route
                            );
                        }
                        println!(
                            "route {}: would redrive {} dead letter(s)",
                            route.route,
                            letters.len()
                        );
                        continue;
                    }
                    let terminal = std::io::stderr().is_terminal();
                    let redriven = route
                        .redrive(&filter, rate, |n| {
                            if terminal {
                                eprint!("\rroute {}: redriven {n}", route.route);
                            }
                        })
                        .await?;
                    if terminal {
                        eprintln!();
                    }
                    println!("route {}: redriven {redriven} dead letter(s)", route.route);
                }
            }
            DlqCommand::Purge { scope, yes } => {
                let filter = scope.filter();
                for route in scope.routes().await? {
                    let waiting = route.peek(&filter).await?.len();
                    if waiting == 0 {
                        println!("route {}: nothing to purge", route.route);
                        continue;
                    }
                    if !yes
                        && !confirm(&format!(
                            "purge {waiting} dead letter(s) of route `{}` for good?",
                            route.route
                        ))?
                    {
                        println!("route {}: kept", route.route);
                        continue;
                    }
                    let purged = route.purge(&filter, |_| {}).await?;
                    println!("route {}: purged {purged} dead letter(s)", route.route);
                }
            }
        }
        Ok(())
    }
}

/// Asks on the terminal; refuses to guess when there is none.
fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{question} Say --yes: stdin is not a terminal to ask on");
    }
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// `30s`, `15m`, `2h` or `7d`.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not an age like 30s, 15m, 2h or 7d"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86400,
        _ => return Err(format!("`{text}` is not an age like 30s, 15m, 2h or 7d")),
    };
    Ok(Duration::from_secs(seconds))
}

/// A payload as a quoted, escaped string where it is text (the table
/// cuts it short), its size where it is not.
fn preview(payload: &[u8]) -> String {
    // More than a cell ever shows, without escaping a whole large payload.
    const SHOWN: usize = 64;
    match std::str::from_utf8(payload) {
        Ok(text) if text.chars().count() > SHOWN => {
            format!("{:?}…", text.chars().take(SHOWN).collect::<String>())
        }
        Ok(text) => format!("{text:?}"),
        Err(_) => format!("{} bytes, not UTF-8", payload.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_people_write_them() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_age("2w").is_err());
        assert!(parse_age("h").is_err());
    }
}
