//! Watches plugin files and deploys a file once it has settled.
//!
//! Editors and copy tools write files in several steps, so an event only
//! schedules a look: the file is read once no event came for
//! [`SETTLE`] and its size and modification time stayed the same across a
//! further check. A file written with a rename into place is seen whole at
//! once. A half-written file that still slips through fails validation and
//! is refused — the running version stays — and the next event for the
//! finished file deploys it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Deployer;

/// Quiet time after the last event before a file is read.
const SETTLE: Duration = Duration::from_millis(300);

pub fn spawn(
    deployer: Arc<Deployer>,
    paths: Vec<(String, PathBuf)>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (events, mut incoming) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            for path in event.paths {
                let _ = events.send(path);
            }
        }
    })?;
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|(_, p)| normalize(p).parent().map(PathBuf::from).unwrap_or_default())
        .collect();
    dirs.sort();
    dirs.dedup();
    for dir in &dirs {
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("cannot watch plugin directory `{}`", dir.display()))?;
        tracing::info!(dir = %dir.display(), "watching for new plugin versions");
    }
    let by_file: HashMap<PathBuf, String> = paths
        .into_iter()
        .map(|(name, path)| (normalize(&path), name))
        .collect();

    tokio::spawn(async move {
        let _watcher = watcher;
        let mut due: HashMap<String, Instant> = HashMap::new();
        loop {
            let next = due.values().min().copied();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                path = incoming.recv() => {
                    let Some(path) = path else { return };
                    if let Some(name) = by_file.get(&normalize(&path)) {
                        due.insert(name.clone(), Instant::now() + SETTLE);
                    }
                }
                _ = sleep_until(next) => {
                    let now = Instant::now();
                    let ready: Vec<String> = due
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(name, _)| name.clone())
                        .collect();
                    for name in ready {
                        due.remove(&name);
                        let path = by_file.iter().find(|(_, n)| **n == name).map(|(p, _)| p.clone());
                        if let Some(path) = path {
                            match settled(&path).await {
                                Some(bytes) => {
                                    let source = path.display().to_string();
                                    let _ = deployer.deploy_file(&name, bytes, &source).await;
                                }
                                // Still changing: look again later.
                                None => { due.insert(name, Instant::now() + SETTLE); }
                            }
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The file's bytes if its size and mtime hold still for a moment; `None`
/// while it changes or is missing (mid-rename).
async fn settled(path: &PathBuf) -> Option<Vec<u8>> {
    let stamp = |path: &PathBuf| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.len(), m.modified().ok()))
    };
    let before = stamp(path)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    if stamp(path)? != before {
        return None;
    }
    std::fs::read(path).ok()
}

/// The canonical directory joined with the file name, so paths reported by
/// the watcher and configured ones (relative, with `..`) compare equal even
/// while the file itself is missing mid-rename.
fn normalize(path: &std::path::Path) -> PathBuf {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    match path.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    }
}
