//! How the suite reaches each backend: a handle to the same storage or
//! server on demand, and a restart where the backend has one.

use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use sluice::backend::{self, Backend};

/// A backend under test.
#[async_trait]
pub trait Target: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// A handle on the backend. Handles share storage (or server): what one
    /// publishes, another can consume.
    async fn open(&self) -> Result<Arc<dyn Backend>>;

    /// Whether [`Target::restart`] can restart anything.
    fn can_restart(&self) -> bool {
        false
    }

    /// Restarts the server (or storage) under every open handle.
    async fn restart(&self) -> Result<()> {
        anyhow::bail!("{} has no server to restart", self.name())
    }
}

/// The in-memory backend: every handle is the same instance.
pub struct Memory(Arc<dyn Backend>);

impl Memory {
    pub fn new() -> Self {
        Memory(Arc::new(backend::memory::MemoryBackend::new(100_000)))
    }
}

#[async_trait]
impl Target for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        Ok(self.0.clone())
    }
}

/// SQLite: every handle is a new connection pool on one database file.
pub struct Sqlite {
    _dir: tempfile::TempDir,
    url: String,
}

impl Sqlite {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!(
            "sqlite://{}?poll_ms=20",
            dir.path().join("conformance.db").display()
        );
        Sqlite { _dir: dir, url }
    }
}

#[async_trait]
impl Target for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.url).await
    }
}

/// The append-only file log: every handle opens the same directory (and so,
/// within one process, shares one store).
pub struct FileLog {
    _dir: tempfile::TempDir,
    url: String,
}

impl FileLog {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("log").display());
        FileLog { _dir: dir, url }
    }
}

#[async_trait]
impl Target for FileLog {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.url).await
    }
}
