//! Single-process ownership of a log directory: an exclusive `flock` on
//! `DIR/LOCK` (holding the owner's pid, for the error another process
//! gets), and the process-wide registry that lets every `connect()` to the
//! same directory share one open store.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::options::Options;
use super::store::Store;

pub const LOCK_FILE: &str = "LOCK";

/// Held for as long as the directory is open; the lock goes with the file.
pub struct DirLock {
    _file: File,
}

/// Another open file description holds the lock.
#[derive(Debug)]
pub struct Busy {
    pub pid: Option<u32>,
}

impl DirLock {
    /// Takes the lock or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        match Self::try_acquire(dir)? {
            Ok(lock) => Ok(lock),
            Err(busy) => bail!("{}", busy_message(dir, &busy)),
        }
    }

    pub fn try_acquire(dir: &Path) -> Result<std::result::Result<DirLock, Busy>> {
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Ok(Err(Busy {
                    pid: text
                        .trim()
                        .strip_prefix("pid ")
                        .and_then(|p| p.parse().ok()),
                }));
            }
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(format!("pid {}\n", std::process::id()).as_bytes())?;
        Ok(Ok(DirLock { _file: file }))
    }
}

pub fn busy_message(dir: &Path, busy: &Busy) -> String {
    let holder = match busy.pid {
        Some(pid) if pid == std::process::id() => "this process".to_string(),
        Some(pid) => format!("process {pid}"),
        None => "another process".to_string(),
    };
    format!(
        "the file log {} is in use by {holder}; a file log belongs to one process at a time \
         (stop that process, or use another directory)",
        dir.display()
    )
}

static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<Store>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// The store for `dir`: the one already open in this process, or a newly
/// opened one (which runs the startup check).
pub fn open_shared(dir: &Path, options: Options) -> Result<Arc<Store>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the file log directory {}", dir.display()))?;
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", dir.display()))?;
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|_, weak| weak.strong_count() > 0);
    if let Some(store) = open.get(&canonical).and_then(Weak::upgrade) {
        if store.options != options {
            tracing::warn!(
                log = %canonical.display(),
                "file log already open in this process with other options; keeping {:?}",
                store.options
            );
        }
        return Ok(store);
    }
    // The previous store of this directory may be in the middle of being
    // dropped on another thread, still holding the lock for a moment.
    let give_up = Instant::now() + Duration::from_secs(5);
    let lock = loop {
        match DirLock::try_acquire(&canonical)? {
            Ok(lock) => break lock,
            Err(Busy { pid: Some(pid) })
                if pid == std::process::id() && Instant::now() < give_up =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(busy) => bail!("{}", busy_message(&canonical, &busy)),
        }
    };
    let (store, report) = Store::open_locked(&canonical, options, lock)?;
    for finding in &report.findings {
        tracing::warn!(log = %canonical.display(), "file log startup check: {finding}");
    }
    let store = Arc::new(store);
    super::maintenance::spawn(&store);
    open.insert(canonical, Arc::downgrade(&store));
    Ok(store)
}
