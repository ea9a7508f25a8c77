//! PostgreSQL on a private server of the suite's own (Debian's PostgreSQL
//! binaries, a fresh cluster in a temp dir), so the restart case can crash
//! it without disturbing the shared server on port 5432.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;

use anyhow::Result;
use async_trait::async_trait;
use sluice::backend::{self, Backend};

use super::{ServerProcess, Target, quiet};

pub struct Postgres {
    server: ServerProcess,
}

impl Postgres {
    pub fn new() -> Self {
        Postgres {
            server: ServerProcess::start_with(spawn, ready),
        }
    }

    /// The server's URL, for another process.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?schema=conformance&poll_ms=200",
            self.server.port
        )
    }
}

/// Where Debian installs the server binaries (they are not on `PATH`).
fn bin(name: &str) -> PathBuf {
    let found = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|version| version.path().join("bin").join(name))
        .filter(|path| path.exists())
        .max();
    found.unwrap_or_else(|| {
        panic!(
            "PostgreSQL's `{name}` was not found under /usr/lib/postgresql \
             (install Debian's postgresql package)"
        )
    })
}

/// The server refuses to run as root: run it as `postgres` when we are root.
fn as_server_user(program: PathBuf) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"));
    if !root {
        return Command::new(program);
    }
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
    command
}

fn spawn(port: u16, dir: &Path) -> Child {
    let data = dir.join("data");
    if !data.exists() {
        let _ = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir)
            .status();
        let status = quiet(as_server_user(bin("initdb")).arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]))
        .status()
        .expect("initdb runs");
        assert!(status.success(), "initdb failed for {}", data.display());
    }
    // After a crash the old server's backends take a moment to notice and
    // exit; until they have, a new server refuses the data directory.
    for _ in 0..50 {
        let mut child = quiet(
            as_server_user(bin("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-k"])
                .arg(dir)
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]),
        )
        .spawn()
        .expect("postgres starts");
        std::thread::sleep(std::time::Duration::from_millis(200));
        if child
            .try_wait()
            .expect("postgres can be waited for")
            .is_none()
        {
            return child;
        }
    }
    panic!("postgres would not start on {}", data.display());
}

fn ready(port: u16) -> bool {
    quiet(Command::new(bin("pg_isready")).args(["-h", "127.0.0.1", "-p", &port.to_string()]))
        .status()
        .is_ok_and(|status| status.success())
}

#[async_trait]
impl Target for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn open(&self) -> Result<Arc<dyn Backend>> {
        backend::connect(&self.url()).await
    }

    fn can_restart(&self) -> bool {
        true
    }

    async fn restart(&self) -> Result<()> {
        tokio::task::block_in_place(|| self.server.restart());
        Ok(())
    }

    fn can_restart_empty(&self) -> bool {
        true
    }

    /// Drops Sluice's schema with everything in it: the database came back
    /// without what Sluice stored (the cluster itself keeps running).
    async fn restart_empty(&self) -> Result<()> {
        let pool = sqlx::PgPool::connect(&format!(
            "postgres://postgres@127.0.0.1:{}/postgres",
            self.server.port
        ))
        .await?;
        sqlx::query("DROP SCHEMA conformance CASCADE")
            .execute(&pool)
            .await?;
        Ok(())
    }
}
