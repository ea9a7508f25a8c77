//! An append-only file with group-commit fsync, positional reads, and the
//! small durable-filesystem helpers the log needs (directory fsync, atomic
//! replace through a temporary file).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Suffix of every file being written before it is renamed into place; any
/// left over after a crash is removed at startup.
pub const TMP_SUFFIX: &str = ".tmp";

/// One open log file. Appends happen under the store's lock; syncs happen
/// outside it, and concurrent callers share one `fdatasync` (group commit).
pub struct LogFile {
    path: PathBuf,
    file: File,
    len: AtomicU64,
    /// Number of completed appends; a caller's ticket is the count after its own.
    written: AtomicU64,
    /// How many appends the last completed sync covered.
    synced: Mutex<u64>,
    /// Queued for the interval syncer.
    pub(crate) dirty: AtomicBool,
}

impl LogFile {
    /// Creates a new, empty file for appending.
    pub fn create(path: &Path) -> io::Result<LogFile> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(path)?;
        Ok(Self::wrap(path, file, 0))
    }

    /// Opens an existing file, for appending or read-only.
    pub fn open(path: &Path, writable: bool) -> io::Result<LogFile> {
        let file = if writable {
            OpenOptions::new().read(true).append(true).open(path)?
        } else {
            File::open(path)?
        };
        let len = file.metadata()?.len();
        Ok(Self::wrap(path, file, len))
    }

    fn wrap(path: &Path, file: File, len: u64) -> LogFile {
        LogFile {
            path: path.to_path_buf(),
            file,
            len: AtomicU64::new(len),
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
            dirty: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Appends `bytes` with one write and returns the sync ticket. On a
    /// failed write the file is cut back, so no partial line stays behind;
    /// if even that fails the error says so, and the caller must stop
    /// writing (the startup check will truncate the torn tail).
    pub fn append(&self, bytes: &[u8]) -> io::Result<u64> {
        let before = self.len();
        if let Err(error) = (&self.file).write_all(bytes) {
            return match self.file.set_len(before) {
                Ok(()) => Err(error),
                Err(cut) => Err(io::Error::other(TornWrite(format!(
                    "{error}; cutting the partial write back also failed: {cut}"
                )))),
            };
        }
        self.len
            .store(before + bytes.len() as u64, Ordering::Release);
        Ok(self.written.fetch_add(1, Ordering::AcqRel) + 1)
    }

    /// Returns once every append up to `ticket` is on stable storage. One
    /// caller syncs for all who wait meanwhile.
    pub fn sync_to(&self, ticket: u64) -> io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *synced >= ticket {
            return Ok(());
        }
        let covered = self.written.load(Ordering::Acquire);
        self.file.sync_data()?;
        *synced = covered;
        Ok(())
    }

    /// Syncs everything appended so far.
    pub fn sync(&self) -> io::Result<()> {
        self.sync_to(self.written.load(Ordering::Acquire))
    }

    /// The ticket that covers every append so far.
    pub fn ticket(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    pub fn read_at(&self, pos: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buffer = vec![0; len];
        self.file.read_exact_at(&mut buffer, pos)?;
        Ok(buffer)
    }

    /// Cuts the file to `len` bytes and syncs it.
    pub fn truncate(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        self.len.store(len, Ordering::Release);
        self.file.sync_all()
    }
}

/// A write failed and part of it may still be in the file.
#[derive(Debug)]
pub struct TornWrite(String);

impl std::fmt::Display for TornWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TornWrite {}

/// Whether an error leaves a file in an unknown state.
pub fn is_torn(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<TornWrite>())
}

/// Makes the creation, rename or removal of entries in `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `contents` to `path` so that a crash leaves either the old file
/// or the new one: temporary file, fsync, rename, directory fsync.
pub fn replace_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let mut file = File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(TMP_SUFFIX);
    path.with_file_name(name)
}

/// Appends to a file, creating it (and its directory) if needed, and syncs.
pub fn append_synced(path: &Path, contents: &[u8]) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
