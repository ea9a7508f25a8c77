//! `sluice log check|recover|compact|stats PATH`: the operator's tools for a
//! file log directory. Each takes the directory's lock, so none runs while
//! a process has the log open.
//!
//! Exit codes: 0 done (for `check`: no problems); 1 `check` found
//! problems, or the command failed midway; 2 the command could not start
//! (no such directory, not a file log, in use by another process, bad
//! arguments).

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use super::load::load;
use super::lock::{Busy, DirLock, LOCK_FILE, busy_message};
use super::maintenance::{self, Removed};
use super::options::{Options, parse_url};
use super::scan::Report;
use super::store::{State, Store};
use crate::message::now_ms;

#[derive(Debug, clap::Subcommand)]
pub enum LogCommand {
    /// Check every record and group file without changing anything; exit 1
    /// if problems are found (each printed with its file and line).
    #[command(after_help = "Example:\n  sluice log check ./data")]
    Check {
        /// The log directory (or its file:// URL).
        path: String,
    },
    /// Repair: truncate torn tails, move damaged records to quarantine/,
    /// remove files left by interrupted writes; print what was done.
    #[command(after_help = "Example:\n  sluice log recover ./data")]
    Recover {
        /// The log directory (or its file:// URL).
        path: String,
    },
    /// Apply retention and rewrite segments without records every group has
    /// acknowledged (or past retention); print the bytes before and after.
    #[command(
        after_help = "Example:\n  sluice log compact \"file://./data?retention_bytes=1000000000\""
    )]
    Compact {
        /// The log directory, or its file:// URL with retention_ms and
        /// retention_bytes to apply.
        path: String,
    },
    /// Per topic: segments, records, bytes, oldest and newest; per group:
    /// position, pending and in-flight messages.
    #[command(after_help = "Example:\n  sluice log stats file://./data")]
    Stats {
        /// The log directory (or its file:// URL).
        path: String,
    },
}

/// Why a command ended without doing its work.
enum Failure {
    /// It could not start (exit 2).
    Usage(String),
    /// It failed midway (exit 1).
    Error(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure::Error(error)
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure::Error(error.into())
    }
}

/// Runs a `sluice log` command and says how the process should exit.
pub fn run(command: LogCommand) -> ExitCode {
    let result = match command {
        LogCommand::Check { path } => check(&path),
        LogCommand::Recover { path } => recover(&path),
        LogCommand::Compact { path } => compact(&path),
        LogCommand::Stats { path } => stats(&path),
    };
    let _ = std::io::stdout().flush();
    match result {
        Ok(code) => code,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Error(error)) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

/// The directory a PATH or URL names, checked to be a file log, and locked.
fn open_dir(path: &str) -> Result<(PathBuf, Options, DirLock), Failure> {
    let (dir, options) = if path.starts_with("file://") {
        parse_url(path).map_err(|e| Failure::Usage(format!("{e:#}")))?
    } else {
        (PathBuf::from(path), Options::default())
    };
    if !dir.exists() {
        return Err(Failure::Usage(format!(
            "no file log at {}: the directory does not exist",
            dir.display()
        )));
    }
    if !dir.is_dir() {
        return Err(Failure::Usage(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let looks_like_log = ["topics", "groups", LOCK_FILE]
        .iter()
        .any(|name| dir.join(name).exists());
    if !looks_like_log {
        return Err(Failure::Usage(format!(
            "{} is not a Sluice file log (it has no topics/, groups/ or {LOCK_FILE})",
            dir.display()
        )));
    }
    match DirLock::try_acquire(&dir)? {
        Ok(lock) => Ok((dir, options, lock)),
        Err(busy @ Busy { .. }) => Err(Failure::Usage(busy_message(&dir, &busy))),
    }
}

fn check(path: &str) -> Result<ExitCode, Failure> {
    let (dir, options, _lock) = open_dir(path)?;
    let mut report = Report::new(&dir, false);
    let state = load(&dir, options.fsync, &mut report)?;
    println!("checked {}: {}", dir.display(), summary(&state));
    if report.findings.is_empty() {
        println!("no problems found");
        return Ok(ExitCode::SUCCESS);
    }
    for finding in &report.findings {
        println!("{finding}");
    }
    println!(
        "{} problem(s) found; `sluice log recover {}` repairs them",
        report.findings.len(),
        dir.display()
    );
    Ok(ExitCode::from(1))
}

fn recover(path: &str) -> Result<ExitCode, Failure> {
    let (dir, options, lock) = open_dir(path)?;
    let (store, report) = Store::open_locked(&dir, options, lock)?;
    for finding in &report.findings {
        println!("{finding}");
    }
    let state = store.lock_state();
    if report.findings.is_empty() {
        println!(
            "nothing to repair: {} is clean ({})",
            dir.display(),
            summary(&state)
        );
    } else {
        println!(
            "{} problem(s) repaired in {} ({})",
            report.findings.len(),
            dir.display(),
            summary(&state)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn compact(path: &str) -> Result<ExitCode, Failure> {
    let (dir, options, lock) = open_dir(path)?;
    let (store, report) = Store::open_locked(&dir, options, lock)?;
    for finding in &report.findings {
        println!("repaired first: {finding}");
    }
    let done = maintenance::compact(&store)?;
    let print = |what: &str, removed: &[Removed]| {
        for r in removed {
            println!(
                "  {}: {what} {} record(s), {} whole segment(s) deleted",
                r.topic, r.records, r.segments
            );
        }
    };
    print("retention dropped", &done.retention);
    print("compaction removed", &done.rewritten);
    let saved = done.bytes_before.saturating_sub(done.bytes_after);
    println!(
        "compacted {}: {} before, {} after ({} freed)",
        dir.display(),
        bytes(done.bytes_before),
        bytes(done.bytes_after),
        bytes(saved)
    );
    Ok(ExitCode::SUCCESS)
}

fn stats(path: &str) -> Result<ExitCode, Failure> {
    let (dir, options, _lock) = open_dir(path)?;
    let mut report = Report::new(&dir, false);
    let state = load(&dir, options.fsync, &mut report)?;
    println!("file log {}: {}", dir.display(), summary(&state));
    println!("topics:");
    if state.topics.is_empty() {
        println!("  (none)");
    }
    for (name, topic) in &state.topics {
        let first_at = topic.segments.iter().filter_map(|s| s.first_at).min();
        let last_at = topic.segments.iter().filter_map(|s| s.last_at).max();
        let offsets = match topic.records() {
            0 => format!("none (next {})", topic.next),
            _ => format!("{}..{}", topic.low(), topic.next - 1),
        };
        println!(
            "  {name}: {} segment(s), {} record(s), {}, offsets {offsets}, oldest {}, newest {}",
            topic.segments.len(),
            topic.records(),
            bytes(topic.bytes()),
            first_at.map_or("-".into(), utc),
            last_at.map_or("-".into(), utc),
        );
    }
    println!("groups:");
    if state.groups.is_empty() {
        println!("  (none)");
    }
    let mut keys: Vec<&String> = state.groups.keys().collect();
    keys.sort();
    let now = now_ms();
    for key in keys {
        let group = &state.groups[key];
        println!("  {key}: patterns {}", group.patterns.join(", "));
        for (name, cursor) in &group.cursors {
            let Some(topic) = state.topics.get(name) else {
                continue;
            };
            let unread = topic.records_from(cursor.next);
            let delayed = cursor
                .pending
                .values()
                .filter(|p| p.visible_ms > now)
                .count();
            println!(
                "    {name}: position {}, pending {} (unread {unread}, delivered and unacknowledged {}), \
                 in flight {}, delayed {delayed}",
                cursor.position(),
                unread + cursor.pending.len(),
                cursor.pending.len(),
                cursor.pending.len() - delayed,
            );
        }
    }
    if !report.findings.is_empty() {
        println!(
            "{} problem(s) found; see `sluice log check {}`",
            report.findings.len(),
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn summary(state: &State) -> String {
    let segments: usize = state.topics.values().map(|t| t.segments.len()).sum();
    let records: usize = state.topics.values().map(|t| t.records()).sum();
    format!(
        "{} topic(s), {segments} segment(s), {records} record(s), {} group(s)",
        state.topics.len(),
        state.groups.len()
    )
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {} ({n} bytes)", UNITS[unit])
}

/// `2026-01-01T00:00:00.000Z` from milliseconds since the epoch.
fn utc(ms: u64) -> String {
    let (secs, millis) = (ms / 1000, ms % 1000);
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::utc(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
